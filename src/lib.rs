//! pacsgate: an authenticating DICOM gateway in front of a legacy PACS.
//!
//! The data path, in the order an association meets it:
//! - `server`: accept loop; per association TLS handshake, A-ASSOCIATE-RQ, called AE, authentication,
//!   upstream connect, the archive's answer, then the relay; one log line per association.
//! - `tls`: rustls server config (TLS 1.2/1.3, ECDHE + AEAD) and certificate loading.
//! - `pdu`: bounded PDU framing and the rejection / abort PDUs the gateway sends itself.
//! - `association`: parse the request, strip User Identity, rewrite AE titles and maximum PDU lengths.
//! - `auth`: client certificate, username + passcode (argon2id) and JWT credentials.
//! - `relay`: whole PDUs both ways, P-DATA offered to an `Inspector` (the seam for DIMSE policy).
//! - `config`: the TOML file format and its validation.
//! - `listeners`: the listening sockets by configuration key, opened, moved and closed on reload.
//! - `admin`: the admin port (`/metrics`, `/healthz`, `/readyz`), bounded so it cannot starve the doors.
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
pub mod relay;
pub mod service;
pub mod session;
pub mod tls;
pub mod tools;
pub mod ul;
pub mod web;
