//! `pacsgate demo`: the gateway in front of an embedded in-memory archive, on loopback, with dev certificates.

pub mod archive;
