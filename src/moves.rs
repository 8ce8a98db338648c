//! The registry of C-MOVEs in progress: each association's session registers the moves it lets
//! through ([`MoveRegistry`]), and the return path claims one for each sub-operation association
//! that arrives ([`MovesInProgress::claim`]): the oldest move to that `[[destination]]` whose archive
//! this is (its `ae_title` as calling AE, from one of the addresses it connects back from). Also the
//! outgoing TLS to destinations, built with each configuration. A leaf: the return path itself is
//! `gateway::return_path`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_rustls::TlsConnector;

use crate::config::{Config, unmapped};
use crate::tls::{self, TlsError};

/// The archive one association's C-MOVEs go to, and so the only peer their results may come back from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnPeer {
    /// The upstream's `called_ae`, for the log.
    pub upstream: String,
    /// The calling AE title its sub-operation associations carry: the upstream's `ae_title`.
    pub ae_title: String,
    /// The addresses it connects back from.
    pub addresses: Vec<ipnet::IpNet>,
}

impl ReturnPeer {
    fn admits(&self, address: IpAddr, calling_ae: &str) -> bool {
        let address = unmapped(address);
        calling_ae == self.ae_title && self.addresses.iter().any(|n| n.contains(&address))
    }
}

/// A C-MOVE that a user started and the gateway let through.
#[derive(Debug, Clone)]
pub struct PendingMove {
    pub id: u64,
    pub destination: String,
    pub user: String,
    pub calling_ae: String,
    pub message_id: u16,
    /// Where its sub-operations may come from; `None`: from nowhere.
    pub from: Option<ReturnPeer>,
    /// The association that began it.
    owner: u64,
}

/// The C-MOVEs in progress, shared by every association and the return listener.
#[derive(Debug, Default)]
pub struct MovesInProgress {
    book: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    next_id: u64,
    moves: Vec<PendingMove>,
}

/// What the return listener may do with an association request.
#[derive(Debug)]
pub enum Claim {
    /// The move it belongs to.
    Admitted(PendingMove),
    /// No C-MOVE to this destination is in progress.
    NoMove,
    /// Moves to this destination are in progress, but none from this calling AE at this address.
    NotTheirArchive { expected: Vec<String> },
}

impl MovesInProgress {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registry one association's session uses: its moves come back only from `from`.
    pub fn for_upstream(self: &Arc<Self>, from: ReturnPeer) -> MoveRegistry {
        let owner = {
            let mut b = self.book();
            b.next_id += 1;
            b.next_id
        };
        MoveRegistry {
            moves: self.clone(),
            owner,
            from: Some(from),
        }
    }

    /// The oldest move in progress to `destination` whose archive connects from `address` as `calling_ae`.
    pub fn claim(&self, destination: &str, address: IpAddr, calling_ae: &str) -> Claim {
        let b = self.book();
        let mut to_destination = b
            .moves
            .iter()
            .filter(|m| m.destination == destination)
            .peekable();
        if to_destination.peek().is_none() {
            return Claim::NoMove;
        }
        let mut expected = Vec::new();
        for m in to_destination {
            match &m.from {
                Some(from) if from.admits(address, calling_ae) => {
                    return Claim::Admitted(m.clone());
                }
                Some(from) => expected.push(format!(
                    "{:?} from {}",
                    from.ae_title,
                    nets(&from.addresses)
                )),
                None => {}
            }
        }
        expected.dedup();
        Claim::NotTheirArchive { expected }
    }

    /// Moves in progress (for tests and the log).
    pub fn len(&self) -> usize {
        self.book().moves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn begin(&self, owner: u64, from: Option<ReturnPeer>, m: NewMove<'_>) -> u64 {
        let mut b = self.book();
        b.next_id += 1;
        let id = b.next_id;
        b.moves.push(PendingMove {
            id,
            destination: m.destination.to_string(),
            user: m.user.to_string(),
            calling_ae: m.calling_ae.to_string(),
            message_id: m.message_id,
            from,
            owner,
        });
        id
    }

    fn end(&self, owner: u64, id: u64) {
        self.book()
            .moves
            .retain(|m| !(m.id == id && m.owner == owner));
    }

    fn end_all(&self, owner: u64) {
        self.book().moves.retain(|m| m.owner != owner);
    }
}

struct NewMove<'a> {
    destination: &'a str,
    user: &'a str,
    calling_ae: &'a str,
    message_id: u16,
}

fn nets(list: &[ipnet::IpNet]) -> String {
    let v: Vec<String> = list.iter().map(|n| n.to_string()).collect();
    if v.is_empty() {
        "nowhere".into()
    } else {
        v.join(", ")
    }
}

/// One association's C-MOVEs. Made by [`MovesInProgress::for_upstream`] with the archive the
/// association was relayed to, so that only that archive can deliver the results; the moves it
/// began end when it is dropped (the association is over). `Default` makes a registry of its own
/// whose moves no return association can claim.
#[derive(Debug, Default)]
pub struct MoveRegistry {
    moves: Arc<MovesInProgress>,
    owner: u64,
    from: Option<ReturnPeer>,
}

impl MoveRegistry {
    /// A C-MOVE to `destination` passed to the archive: its sub-operations may now come back.
    pub fn begin(&self, destination: &str, user: &str, calling_ae: &str, message_id: u16) -> u64 {
        self.moves.begin(
            self.owner,
            self.from.clone(),
            NewMove {
                destination,
                user,
                calling_ae,
                message_id,
            },
        )
    }

    /// The move's final response passed: no more sub-operations for it.
    pub fn end(&self, id: u64) {
        self.moves.end(self.owner, id);
    }
}

impl Drop for MoveRegistry {
    fn drop(&mut self) {
        self.moves.end_all(self.owner);
    }
}

/// Outgoing TLS to destinations, built once per configuration.
#[derive(Clone, Default)]
pub struct DestinationConnectors {
    tls: HashMap<String, (TlsConnector, rustls::pki_types::ServerName<'static>)>,
}

impl DestinationConnectors {
    pub fn new(config: &Config) -> Result<DestinationConnectors, TlsError> {
        let mut tls = HashMap::new();
        for d in &config.destinations {
            if let Some(t) = &d.tls {
                let client =
                    tls::client_config(&t.ca, t.certificate.as_deref(), t.private_key.as_deref())?;
                let name = rustls::pki_types::ServerName::try_from(t.server_name.clone()).map_err(
                    |e| TlsError::Setup {
                        path: t.ca.clone(),
                        message: format!(
                            "destination {} server name {:?}: {e}",
                            d.ae_title, t.server_name
                        ),
                    },
                )?;
                tls.insert(d.ae_title.clone(), (TlsConnector::from(client), name));
            }
        }
        Ok(DestinationConnectors { tls })
    }

    /// The TLS connector and server name for the destination `ae_title`; `None`: plain TCP.
    pub fn tls_for(
        &self,
        ae_title: &str,
    ) -> Option<&(TlsConnector, rustls::pki_types::ServerName<'static>)> {
        self.tls.get(ae_title)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orthanc() -> ReturnPeer {
        ReturnPeer {
            upstream: "ARCHIVE".into(),
            ae_title: "ORTHANC".into(),
            addresses: vec!["127.0.0.1/32".parse().expect("net")],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn moves_are_claimed_by_destination_and_archive_until_they_end() {
        let moves = Arc::new(MovesInProgress::default());
        let local = ip("127.0.0.1");
        assert!(matches!(
            moves.claim("VIEWER", local, "ORTHANC"),
            Claim::NoMove
        ));
        let alice = moves.for_upstream(orthanc());
        let bob = moves.for_upstream(orthanc());
        let a = alice.begin("VIEWER", "alice", "WS1", 3);
        let _b = bob.begin("VIEWER", "bob", "WS2", 9);
        match moves.claim("VIEWER", local, "ORTHANC") {
            Claim::Admitted(m) => assert_eq!(m.user, "alice"),
            other => panic!("{other:?}"),
        }
        // IPv4-mapped is the same address.
        assert!(matches!(
            moves.claim("VIEWER", ip("::ffff:127.0.0.1"), "ORTHANC"),
            Claim::Admitted(_)
        ));
        alice.end(a);
        match moves.claim("VIEWER", local, "ORTHANC") {
            Claim::Admitted(m) => assert_eq!(m.user, "bob"),
            other => panic!("{other:?}"),
        }
        drop(bob);
        assert!(moves.is_empty(), "a dropped registry ends its moves");
    }

    #[test]
    fn another_calling_ae_or_address_is_not_the_archive() {
        let moves = Arc::new(MovesInProgress::default());
        let session = moves.for_upstream(orthanc());
        session.begin("VIEWER", "alice", "WS1", 3);
        for (address, calling) in [("127.0.0.1", "INTRUDER"), ("127.0.0.2", "ORTHANC")] {
            assert!(
                matches!(
                    moves.claim("VIEWER", ip(address), calling),
                    Claim::NotTheirArchive { .. }
                ),
                "{calling} at {address}"
            );
        }
        // A registry made without an archive registers moves nobody can claim.
        let unbound = MoveRegistry::default();
        unbound.begin("VIEWER", "alice", "WS1", 4);
        assert!(matches!(
            unbound.moves.claim("VIEWER", ip("127.0.0.1"), "ORTHANC"),
            Claim::NotTheirArchive { .. }
        ));
    }
}
