//! The kernel's TCP socket tables (`/proc/net/tcp`, `/proc/net/tcp6`; Linux only), read once here:
//! one row parser, bounded reads, and the LISTEN sockets of a port with the processes holding them.
//!
//! Used by `pacsgate check` (who already listens on a port), connect's owner check (the UID of a
//! loopback caller) and the integration tests (whether a process under test listens yet).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The IPv4 and the IPv6 table.
pub const TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// The st column of a listening socket (`TCP_LISTEN`, `include/net/tcp_states.h`).
pub const LISTEN: u8 = 0x0A;

/// At most this much of a table is read (a row is 150 bytes, 178 in tcp6: over 350 000 sockets);
/// a longer one is an error rather than a table cut in the middle of a row.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One row of a table: the columns pacsgate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The st column (`include/net/tcp_states.h`).
    pub state: u8,
    pub uid: u32,
    /// 0 for a socket no process holds any more (TIME_WAIT, an orphan).
    pub inode: u64,
}

/// One address of /proc/net/tcp{,6}: `0100007F:1F90` (the address as the kernel holds it, printed
/// as native-endian 32-bit words; the port in host order).
pub fn parse_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A row (not the header line): `None` when a column is missing or unreadable.
pub fn parse_row(line: &str) -> Option<Row> {
    let mut f = line.split_whitespace();
    let (_sl, local, remote) = (f.next()?, f.next()?, f.next()?);
    let (local, remote) = (parse_address(local)?, parse_address(remote)?);
    // st, tx:rx queue, tr:when, retrnsmt, uid, timeout, inode.
    let rest: Vec<&str> = f.take(7).collect();
    let [st, _queues, _timer, _retrnsmt, uid, _timeout, inode] = rest[..] else {
        return None;
    };
    Some(Row {
        local,
        remote,
        state: u8::from_str_radix(st, 16).ok()?,
        uid: uid.parse().ok()?,
        inode: inode.parse().ok()?,
    })
}

/// The rows of a table, its header line skipped and rows that do not parse left out.
pub fn rows(table: impl BufRead) -> impl Iterator<Item = std::io::Result<Row>> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| line.map(|l| parse_row(&l)).transpose())
}

/// A table opened for reading, at most [`MAX_TABLE_BYTES`] of it (reading on is an error).
pub fn open(path: &str) -> std::io::Result<impl BufRead> {
    let file = std::fs::File::open(path)?;
    Ok(BufReader::new(Bounded {
        inner: file,
        left: MAX_TABLE_BYTES,
    }))
}

/// A reader that fails instead of reading past its bound.
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return match self.inner.read(&mut [0u8; 1])? {
                0 => Ok(0),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("larger than {MAX_TABLE_BYTES} bytes"),
                )),
            };
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// The inodes of the sockets in LISTEN state on TCP `port` (IPv4 or IPv6, any address); a table that
/// cannot be read (no /proc, a kernel without IPv6) adds none.
pub fn listening_inodes(port: u16) -> HashSet<u64> {
    listening_where(|local| local.port() == port)
}

/// The inodes of the sockets in LISTEN state that keep `address` from being bound: on its port, at
/// its address or at a wildcard one (of either family: a dual-stack `[::]` holds IPv4 too), or at
/// any address when `address` is a wildcard itself.
pub fn listening_inodes_at(address: std::net::SocketAddr) -> HashSet<u64> {
    listening_where(|local| {
        local.port() == address.port()
            && (local.ip() == address.ip()
                || local.ip().is_unspecified()
                || address.ip().is_unspecified())
    })
}

fn listening_where(wanted: impl Fn(&std::net::SocketAddr) -> bool) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in TABLES {
        let Ok(reader) = open(table) else {
            continue;
        };
        for row in rows(reader) {
            let Ok(row) = row else {
                break;
            };
            if row.state == LISTEN && wanted(&row.local) {
                inodes.insert(row.inode);
            }
        }
    }
    inodes
}

/// Whether process `pid` holds one of the sockets `inodes` (its /proc/PID/fd links); false when they
/// cannot be read (another user's process without privileges).
pub fn holds_socket(pid: u32, inodes: &HashSet<u64>) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .ok()
            .and_then(|target| socket_inode(&target.to_string_lossy()))
            .is_some_and(|inode| inodes.contains(&inode))
    })
}

/// The inode of a file descriptor link `socket:[12345]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2B6A 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:C350 0100007F:2B6A 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0000000000000000 20 4 30 10 -1
   2: garbage
";

    #[test]
    fn rows_are_parsed_and_garbage_left_out() {
        let rows: Vec<Row> = rows(TABLE.as_bytes())
            .collect::<Result<_, _>>()
            .expect("read");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].local, "127.0.0.1:11114".parse().expect("addr"));
        assert_eq!(rows[0].state, LISTEN);
        assert_eq!((rows[0].uid, rows[0].inode), (1000, 4242));
        assert_eq!(rows[1].remote, "127.0.0.1:11114".parse().expect("addr"));
        assert_eq!(rows[1].state, 0x01);
        assert_eq!(parse_row("   0: 0100007F:2B6A 00000000:0000 0A"), None);
    }

    #[test]
    fn a_table_past_the_bound_is_an_error() {
        let mut r = Bounded {
            inner: &b"abcdef"[..],
            left: 3,
        };
        let mut buf = [0u8; 8];
        assert_eq!(r.read(&mut buf).expect("first"), 3);
        assert!(r.read(&mut buf).is_err());
        let mut exact = Bounded {
            inner: &b"abc"[..],
            left: 3,
        };
        assert_eq!(exact.read(&mut buf).expect("first"), 3);
        assert_eq!(exact.read(&mut buf).expect("end"), 0);
    }

    #[test]
    fn socket_links_give_their_inode() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn a_listener_blocks_its_own_address_and_the_wildcard_not_another() {
        let other = std::net::TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        let port = other.local_addr().expect("addr").port();
        let at = |a: &str| listening_inodes_at(format!("{a}:{port}").parse().expect("address"));
        assert_eq!(at("127.0.0.2").len(), 1);
        assert_eq!(at("0.0.0.0").len(), 1, "a wildcard bind is blocked by it");
        assert!(
            at("127.0.0.1").is_empty(),
            "another address on the port is free"
        );
        assert_eq!(listening_inodes(port), at("127.0.0.2"));
    }
}
