//! Who may use the tunnel: connect's local listeners (TCP on loopback, and a Unix domain socket of mode
//! 0600), and the owner (UID) of each connecting socket: SO_PEERCRED for the Unix socket, the kernel's
//! socket tables (/proc/net/tcp, /proc/net/tcp6) for TCP. Only the user who started connect, and the
//! UIDs given with --allow-user, are let through.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Why the owner of a connecting socket is not known.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("no socket {peer} -> {local} in the kernel's socket tables (the caller closed it?)")]
    NotFound { peer: SocketAddr, local: SocketAddr },
    #[error(
        "the socket {peer} -> {local} is no longer held by a process (TCP state {state:02X}, the caller \
         closed it): its owner is unknown"
    )]
    Orphaned {
        peer: SocketAddr,
        local: SocketAddr,
        state: u8,
    },
    #[error("the peer credentials of the Unix socket: {0}")]
    PeerCred(std::io::Error),
    #[error("cannot tell who runs connect: {0}")]
    OwnUid(String),
}

/// The users who may use the tunnel: the one who started it, and any --allow-user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callers {
    pub owner: u32,
    pub allowed: BTreeSet<u32>,
}

impl Callers {
    pub fn new(owner: u32, allow: &[u32]) -> Callers {
        Callers {
            owner,
            allowed: allow.iter().copied().collect(),
        }
    }

    pub fn admits(&self, uid: u32) -> bool {
        uid == self.owner || self.allowed.contains(&uid)
    }

    /// For the start-up line: "0" or "1000,1001,1002".
    pub fn describe(&self) -> String {
        let mut all: BTreeSet<u32> = self.allowed.clone();
        all.insert(self.owner);
        all.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    }
}

/// The effective UID of this process (the owner of the sockets it creates), from /proc/self/status.
pub fn own_uid() -> Result<u32, OwnerError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| OwnerError::OwnUid(format!("/proc/self/status: {e}")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .ok_or_else(|| OwnerError::OwnUid("/proc/self/status has no Uid line".into()))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// What the kernel's socket tables say about the caller's end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableRow {
    /// A socket still held by a process: its UID is the owner's.
    Owned(u32),
    /// Only an orphan is left (TIME_WAIT, or FIN_WAIT/CLOSING after close()): the kernel prints UID 0
    /// and inode 0 for it, which says nothing about who sent what is already queued. `state` is the
    /// st column.
    Orphaned(u8),
}

/// States (the st column, `include/net/tcp_states.h`) in which the caller's end of a connection still
/// belongs to a process, so its UID is the one of the user who opened it: ESTABLISHED, and the half-closed
/// FIN_WAIT1/FIN_WAIT2 of a caller that called shutdown(SHUT_WR) but keeps the socket. A time-wait socket
/// (TIME_WAIT, or FIN_WAIT2 after close()) is printed as UID 0, inode 0; an orphan (closed by its process)
/// has inode 0 too: the inode is checked as well.
const OWNED_STATES: [u8; 3] = [0x01, 0x04, 0x05];

/// The line of `table` whose local address is `peer` and remote address `local` (the caller's end of a
/// loopback connection to us): its UID when the socket is still held by a process (a state of
/// [`OWNED_STATES`] and a non-zero inode), otherwise orphaned.
fn owner_in(
    table: impl BufRead,
    peer: SocketAddr,
    local: SocketAddr,
) -> std::io::Result<Option<TableRow>> {
    let mut orphan = None;
    for row in crate::procnet::rows(table) {
        let row = row?;
        if canonical(row.local) != peer || canonical(row.remote) != local {
            continue;
        }
        if OWNED_STATES.contains(&row.state) && row.inode != 0 {
            return Ok(Some(TableRow::Owned(row.uid)));
        }
        orphan = Some(TableRow::Orphaned(row.state));
    }
    Ok(orphan)
}

/// The owner of the socket at `peer` that is connected to our `local` (both on this machine).
pub fn tcp_owner(peer: SocketAddr, local: SocketAddr) -> Result<u32, OwnerError> {
    let (peer, local) = (canonical(peer), canonical(local));
    let mut orphan = None;
    for path in crate::procnet::TABLES {
        let table = match crate::procnet::open(path) {
            Ok(t) => t,
            // A kernel without IPv6 has no tcp6.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.ends_with('6') => continue,
            Err(source) => return Err(OwnerError::Read { path, source }),
        };
        match owner_in(table, peer, local) {
            Ok(Some(TableRow::Owned(uid))) => return Ok(uid),
            Ok(Some(TableRow::Orphaned(state))) => orphan = Some(state),
            Ok(None) => {}
            Err(source) => return Err(OwnerError::Read { path, source }),
        }
    }
    Err(match orphan {
        Some(state) => OwnerError::Orphaned { peer, local, state },
        None => OwnerError::NotFound { peer, local },
    })
}

/// A local client's connection, over TCP or the Unix domain socket.
pub enum LocalStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for LocalStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            LocalStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LocalStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            LocalStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            LocalStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            LocalStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A connection just accepted: the stream, who is calling (for the log), and the caller's UID.
pub struct Caller {
    pub stream: LocalStream,
    pub peer: String,
    pub uid: Result<u32, OwnerError>,
}

/// connect's local listeners.
pub struct Listeners {
    pub tcp: TcpListener,
    pub unix: Option<(UnixListener, PathBuf)>,
}

impl Listeners {
    /// The next connection on either listener, with its caller's UID looked up.
    pub async fn accept(&self) -> std::io::Result<Caller> {
        let unix = async {
            match &self.unix {
                Some((l, path)) => l.accept().await.map(|(s, _)| (s, path)),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.tcp.accept() => {
                let (stream, peer) = r?;
                let local = stream.local_addr();
                let uid = match local {
                    Ok(local) => tokio::task::spawn_blocking(move || tcp_owner(peer, local))
                        .await
                        .unwrap_or_else(|e| Err(OwnerError::OwnUid(e.to_string()))),
                    Err(e) => Err(OwnerError::PeerCred(e)),
                };
                Ok(Caller { stream: LocalStream::Tcp(stream), peer: peer.to_string(), uid })
            }
            r = unix => {
                let (stream, path) = r?;
                let uid = stream.peer_cred().map(|c| c.uid()).map_err(OwnerError::PeerCred);
                Ok(Caller {
                    stream: LocalStream::Unix(stream),
                    peer: format!("unix:{}", path.display()),
                    uid,
                })
            }
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Bind the Unix domain socket at `path`, mode 0600. A socket left by an earlier run is replaced;
/// anything else at that path (a file, a symlink, a folder) is refused.
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket: choose another --socket path",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    // SO_PEERCRED is checked on every connection: the mode keeps other users from connecting at all.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procnet::parse_address;

    #[test]
    fn kernel_addresses_parse() {
        let a = parse_address("0100007F:2B6A").expect("v4");
        assert_eq!(a, "127.0.0.1:11114".parse().expect("addr"));
        let a = parse_address("00000000000000000000000001000000:2B6A").expect("v6");
        assert_eq!(a, "[::1]:11114".parse().expect("addr"));
        let mapped = parse_address("0000000000000000FFFF00000100007F:0050").expect("mapped");
        assert_eq!(canonical(mapped), "127.0.0.1:80".parse().expect("addr"));
        assert!(parse_address("zz:1").is_none());
    }

    #[test]
    fn the_callers_end_gives_the_uid() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:2B6A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0\n\
   1: 0100007F:2B6A 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0\n\
   2: 0100007F:D431 0100007F:2B6A 01 00000000:00000000 00:00000000 00000000  1001        0 3 1 0\n";
        let peer = "127.0.0.1:54321".parse().expect("addr");
        let local = "127.0.0.1:11114".parse().expect("addr");
        assert_eq!(
            owner_in(table.as_bytes(), peer, local).expect("read"),
            Some(TableRow::Owned(1001))
        );
        let other = "127.0.0.1:54322".parse().expect("addr");
        assert_eq!(
            owner_in(table.as_bytes(), other, local).expect("read"),
            None
        );
    }

    #[test]
    fn a_closed_callers_socket_has_no_owner() {
        // What the kernel prints once the caller sent its request and called close(): a time-wait socket
        // (TIME_WAIT, or FIN_WAIT2 as its substate), UID 0 and inode 0; an orphaned full socket (FIN_WAIT1,
        // CLOSING) keeps its UID but has inode 0.
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let peer = "127.0.0.1:54321".parse().expect("addr");
        let local = "127.0.0.1:11114".parse().expect("addr");
        for (st, uid, inode) in [
            ("06", 0, 0),
            ("05", 0, 0),
            ("04", 1001, 0),
            ("0B", 1001, 0),
            ("07", 0, 0),
        ] {
            let table = format!(
                "{header}   0: 0100007F:D431 0100007F:2B6A {st} 00000000:00000000 03:00000F9F 00000000 {uid:>5}        0 {inode} 3 0000000000000000\n"
            );
            assert_eq!(
                owner_in(table.as_bytes(), peer, local).expect("read"),
                Some(TableRow::Orphaned(u8::from_str_radix(st, 16).expect("hex"))),
                "{table}"
            );
        }
        // Half-closed (shutdown(SHUT_WR)) but still held: the UID is the caller's.
        let table = format!(
            "{header}   0: 0100007F:D431 0100007F:2B6A 05 00000000:00000000 00:00000000 00000000  1001        0 4242 1 0\n"
        );
        assert_eq!(
            owner_in(table.as_bytes(), peer, local).expect("read"),
            Some(TableRow::Owned(1001))
        );
        // A line cut short says nothing.
        let table = format!("{header}   0: 0100007F:D431 0100007F:2B6A 01 00000000:00000000\n");
        assert_eq!(owner_in(table.as_bytes(), peer, local).expect("read"), None);
    }

    #[test]
    fn a_real_caller_that_sent_and_closed_is_unknown() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        let (stream, peer) = listener.accept().expect("accept");
        client.write_all(b"A-ASSOCIATE-RQ and more").expect("write");
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let owner = tcp_owner(peer, stream.local_addr().expect("local"));
        assert!(
            matches!(owner, Err(OwnerError::Orphaned { .. })),
            "{owner:?}"
        );
    }

    #[tokio::test]
    async fn a_real_loopback_connection_is_ours() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let uid = tcp_owner(peer, stream.local_addr().expect("local")).expect("owner");
        assert_eq!(uid, own_uid().expect("own uid"));
        let callers = Callers::new(uid, &[]);
        assert!(callers.admits(uid) && !callers.admits(uid + 1));
    }
}
