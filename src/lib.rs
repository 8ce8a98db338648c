//! pacsgate: an authenticating DICOM gateway in front of a legacy PACS.
//!
//! # Layout
//! Wire (PS3.8 / PS3.7, no policy):
//! - `ul`: the DICOM upper layer: PDU framing, RJ / A-ABORT (`ul::pdu`), PDV items checked in one pass
//!   and written within a Maximum Length (`ul::pdata`), association items, the one Maximum Length
//!   reader and the implementation UID (`ul::association`, `ul`), the one requestor (`ul::requestor`:
//!   exchange, messages, release, abort), flushed writes and the bounded A-ASSOCIATE-RQ read (`ul::io`).
//! - `dimse`: DIMSE command sets and statuses, the command encoder, data-set structure checks.
//! - `tls`: rustls server and client configs (TLS 1.2/1.3, ECDHE + AEAD), certificate loading.
//!
//! The gateway (one association, in the order it meets them):
//! - `gateway`: the accept loop, `Gateway` / `State` (reload, drain); `gateway::associate` runs the phases
//!   (TLS, A-ASSOCIATE-RQ, called AE, authentication, archive connect, the archive's answer, relay), each
//!   returning `Result<_, Stop>`; `gateway::stop` turns a `Stop` into the wire answer, log line, metric and
//!   audit event; `gateway::return_path` carries C-MOVE results back.
//! - `relay`: whole PDUs both ways, each P-DATA checked once and offered to an `Inspector` (the seam for
//!   DIMSE policy); unchanged PDUs written from the read buffer (`relay::gather`).
//! - `session`: the DIMSE policy per association (assembly, decisions, reporting).
//! - `moves`: the registry of C-MOVEs in progress (a leaf).
//! - `web`: the HTTPS door (DICOMweb, sign-in, forwarding).
//!
//! Policy:
//! - `auth`: client certificate, username + passcode (argon2id) and JWT credentials.
//! - `policy`: grants, limits and admission, lockout, the failed-login rule, the query guard.
//! - `config`: the TOML file format (`config::file`), its validation one section at a time
//!   (`config::validate`) into the runtime types (`config::runtime`).
//!
//! Operations:
//! - `service`: `pacsgate run` assembled: config in force, listeners, admin port, signals, drain.
//! - `listeners`: the listening sockets by configuration key, opened, moved and closed on reload.
//! - `admin`: the admin port (`/metrics`, `/healthz`, `/readyz`), bounded so it cannot starve the doors.
//! - `audit`, `metrics`, `logfmt`: the audit trail (file, syslog), Prometheus metrics, log-field quoting
//!   and the stable log targets (`logfmt::targets`).
//! - `check`: `pacsgate check` (config, files, reachability; exit 0/1/2).
//! - `procnet`: the kernel's TCP socket tables (LISTEN sockets, a loopback caller's UID), Linux only.
//!
//! Tools:
//! - `tools`: the `echo`, `find`, `probe` requestors (on `ul::requestor`) and their command lines
//!   (`tools::commands`); `tools::credentials` for `certs`, `token`, `hash-password`.
//! - `connect`: `pacsgate connect`, a local port that signs a viewer in and forwards to the gateway.
//! - `demo`: `pacsgate demo` and its in-process demo archive (`demo::archive`).
//! - `devcerts`: `pacsgate certs`, a development CA and certificates.
//!
//! Where a change goes (a new sign-in method, config key, DICOM check, requestor, a change to the relay's
//! hot path): ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod check;
pub mod config;
pub mod connect;
pub mod demo;
pub mod devcerts;
pub mod dimse;
pub mod gateway;
pub mod listeners;
pub mod logfmt;
pub mod metrics;
pub mod moves;
pub mod policy;
pub mod procnet;
pub mod relay;
pub mod service;
pub mod session;
pub mod tls;
pub mod tools;
pub mod ul;
pub mod web;
