//! `[gateway]`, `[timeouts]`, `[tls]`, `[[upstream]]`, `[[destination]]`, the return path and the
//! listeners: where the gateway listens and whom it connects to.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::Ctx;
use crate::config::file::{FileDestination, FileGateway, FileTimeouts, FileTls, FileUpstream};
use crate::config::{ConfigError, Destination, DestinationTls, Role, Timeouts, Tls, Upstream};

/// The largest AE title the standard allows.
const AE_TITLE_MAX: usize = 16;

/// `[gateway]`: the main listener and the PDU bounds (the other listeners come later, in file order).
pub(super) struct GatewayBounds {
    pub(super) listen: SocketAddr,
    pub(super) max_pdu_length: u32,
    pub(super) max_association_request_length: u32,
}

pub(super) fn validate_gateway(cx: &Ctx, g: &FileGateway) -> Result<GatewayBounds, ConfigError> {
    let listen = cx.listen("gateway.listen", &g.listen)?;
    check_ae_title(&g.ae_title).map_err(|m| cx.invalid("gateway.ae_title", m))?;
    let max_pdu_length = g.max_pdu_length;
    if !(4096..=16 * 1024 * 1024).contains(&max_pdu_length) {
        return Err(cx.invalid(
            "gateway.max_pdu_length",
            format!("{max_pdu_length} is outside 4096..=16777216"),
        ));
    }
    let max_rq = g.max_association_request_length;
    if !(1024..=1024 * 1024).contains(&max_rq) {
        return Err(cx.invalid(
            "gateway.max_association_request_length",
            format!("{max_rq} is outside 1024..=1048576"),
        ));
    }
    Ok(GatewayBounds {
        listen,
        max_pdu_length,
        max_association_request_length: max_rq,
    })
}

pub(super) fn validate_timeouts(cx: &Ctx, t: &FileTimeouts) -> Result<Timeouts, ConfigError> {
    Ok(Timeouts {
        tls_handshake: cx.secs("timeouts.tls_handshake", t.tls_handshake)?,
        association_request: cx.secs("timeouts.association_request", t.association_request)?,
        upstream_connect: cx.secs("timeouts.upstream_connect", t.upstream_connect)?,
        upstream_response: cx.secs("timeouts.upstream_response", t.upstream_response)?,
        idle: cx.secs("timeouts.idle", t.idle)?,
        shutdown_grace: cx.secs("timeouts.shutdown_grace", t.shutdown_grace)?,
    })
}

pub(super) fn validate_tls(cx: &Ctx, t: FileTls) -> Result<Tls, ConfigError> {
    let tls = Tls {
        certificate: cx.resolve(&t.certificate),
        private_key: cx.resolve(&t.private_key),
        client_ca: t.client_ca.as_deref().map(|p| cx.resolve(p)),
        require_client_certificate: t.require_client_certificate,
        client_identity: t.client_identity,
        client_crl: t.client_crl.iter().map(|p| cx.resolve(p)).collect(),
    };
    if !tls.client_crl.is_empty() && tls.client_ca.is_none() {
        return Err(cx.invalid(
            "tls.client_crl",
            "is set but tls.client_ca is not: there are no client certificates to revoke".into(),
        ));
    }
    if tls.require_client_certificate && tls.client_ca.is_none() {
        return Err(cx.invalid(
            "tls.require_client_certificate",
            "is true but tls.client_ca is not set: there is nothing to verify client certificates against".into(),
        ));
    }
    Ok(tls)
}

pub(super) fn validate_upstreams(
    cx: &Ctx,
    list: Vec<FileUpstream>,
) -> Result<Vec<Upstream>, ConfigError> {
    if list.is_empty() {
        return Err(cx.invalid(
            "upstream",
            "no [[upstream]] is configured: every association would be rejected".into(),
        ));
    }
    let mut upstreams = Vec::new();
    for (i, u) in list.into_iter().enumerate() {
        let key = |k: &str| format!("upstream[{i}].{k}");
        check_ae_title(&u.called_ae).map_err(|m| cx.invalid(&key("called_ae"), m))?;
        check_ae_title(&u.ae_title).map_err(|m| cx.invalid(&key("ae_title"), m))?;
        if u.address
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(cx.invalid(&key("address"), format!("{:?} is not host:port", u.address)));
        }
        if upstreams
            .iter()
            .any(|o: &Upstream| o.called_ae == u.called_ae)
        {
            return Err(cx.invalid(
                &key("called_ae"),
                format!("{:?} is mapped twice", u.called_ae),
            ));
        }
        let return_addresses = u
            .return_addresses
            .as_deref()
            .map(|list| address_list(list).map_err(|m| cx.invalid(&key("return_addresses"), m)))
            .transpose()?;
        upstreams.push(Upstream {
            called_ae: u.called_ae,
            address: u.address,
            ae_title: u.ae_title,
            return_addresses,
        });
    }
    Ok(upstreams)
}

pub(super) fn validate_destinations(
    cx: &Ctx,
    list: Vec<FileDestination>,
) -> Result<Vec<Destination>, ConfigError> {
    let mut destinations: Vec<Destination> = Vec::new();
    for (i, d) in list.into_iter().enumerate() {
        let key = |k: &str| format!("destination[{i}].{k}");
        check_ae_title(&d.ae_title).map_err(|m| cx.invalid(&key("ae_title"), m))?;
        let host = match d.address.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                h.trim_matches(['[', ']']).to_string()
            }
            _ => {
                return Err(
                    cx.invalid(&key("address"), format!("{:?} is not host:port", d.address))
                );
            }
        };
        if destinations.iter().any(|o| o.ae_title == d.ae_title) {
            return Err(cx.invalid(
                &key("ae_title"),
                format!("{:?} is defined twice", d.ae_title),
            ));
        }
        let tls = match d.tls {
            None => None,
            Some(t) => {
                if t.certificate.is_some() != t.private_key.is_some() {
                    return Err(cx.invalid(
                        &key("tls"),
                        "certificate and private_key go together".into(),
                    ));
                }
                Some(DestinationTls {
                    ca: cx.resolve(&t.ca),
                    certificate: t.certificate.as_deref().map(|p| cx.resolve(p)),
                    private_key: t.private_key.as_deref().map(|p| cx.resolve(p)),
                    server_name: t.server_name.unwrap_or(host),
                })
            }
        };
        destinations.push(Destination {
            ae_title: d.ae_title,
            address: d.address,
            tls,
        });
    }
    Ok(destinations)
}

/// Every role's move destinations are `[[destination]]` entries (results come back through the gateway).
pub(super) fn check_move_destinations(
    cx: &Ctx,
    roles: &HashMap<String, Role>,
    destinations: &[Destination],
) -> Result<(), ConfigError> {
    for role in roles.values() {
        for dest in &role.move_destinations {
            if !destinations.iter().any(|d| &d.ae_title == dest) {
                return Err(cx.invalid(
                    "role.move_destinations",
                    format!(
                        "role {:?} lists {dest:?}, which no [[destination]] defines: C-MOVE results must come back through the gateway",
                        role.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `[gateway] return_listen` and `return_allowed_addresses`: the archive's sub-operations come back here.
pub(super) struct ReturnPath {
    pub(super) listen: Option<SocketAddr>,
    pub(super) allowed_addresses: Option<Vec<ipnet::IpNet>>,
}

pub(super) fn validate_return_path(
    cx: &Ctx,
    g: &FileGateway,
    destinations: &[Destination],
) -> Result<ReturnPath, ConfigError> {
    let listen = cx.optional_listen("gateway.return_listen", g.return_listen.as_deref())?;
    if !destinations.is_empty() && listen.is_none() {
        return Err(cx.invalid(
            "gateway.return_listen",
            "[[destination]] entries need a return_listen for the archive's sub-operations".into(),
        ));
    }
    let allowed_addresses = g
        .return_allowed_addresses
        .as_deref()
        .map(|list| {
            address_list(list).map_err(|m| cx.invalid("gateway.return_allowed_addresses", m))
        })
        .transpose()?;
    Ok(ReturnPath {
        listen,
        allowed_addresses,
    })
}

/// No two listeners on the same port: the second one named is the error's key.
pub(super) fn check_listeners<const N: usize>(
    cx: &Ctx,
    listeners: [(&str, Option<SocketAddr>); N],
) -> Result<(), ConfigError> {
    let listeners: Vec<(&str, SocketAddr)> = listeners
        .into_iter()
        .filter_map(|(key, a)| a.map(|a| (key, a)))
        .collect();
    for (i, (first, a)) in listeners.iter().enumerate() {
        if let Some((second, b)) = listeners[i + 1..]
            .iter()
            .find(|(_, b)| same_listener(*a, *b))
        {
            return Err(cx.invalid(
                second,
                format!(
                    "{b} is the address {first} ({a}) listens on too: give each listener its own port"
                ),
            ));
        }
    }
    Ok(())
}

/// Would two listeners collide at bind: the same port (not 0) and the same address, or either on
/// every address (`0.0.0.0` / `[::]`, which on Linux also takes the other family's port)?
fn same_listener(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
/// A list of addresses and CIDR blocks that admit peers without credentials (`[[device]]`, the return
/// path): parsed, IPv4-mapped IPv6 blocks written as the IPv4 blocks they are (peers are compared as
/// IPv4), and refused when together they cover every address of a family.
pub(super) fn address_list(list: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    let mut nets = Vec::new();
    for a in list {
        let net = a
            .parse::<ipnet::IpNet>()
            .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| format!("{a:?} is not an address or CIDR block"))?;
        nets.push(unmap(net));
    }
    if let Some(all) = covers_everything(&nets) {
        return Err(format!(
            "{list:?} covers {all}, every address there is: name the hosts or networks that may connect"
        ));
    }
    Ok(nets)
}

/// An IPv4-mapped IPv6 block (`::ffff:10.0.0.0/104`) as the IPv4 block it stands for; others truncated
/// to their network address.
fn unmap(net: ipnet::IpNet) -> ipnet::IpNet {
    if let ipnet::IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return ipnet::IpNet::V4(v4.trunc());
    }
    net.trunc()
}

/// `Some("0.0.0.0/0")` or `Some("::/0")` when the blocks, merged, cover a whole address family.
pub(super) fn covers_everything(nets: &[ipnet::IpNet]) -> Option<String> {
    let merged = ipnet::IpNet::aggregate(&nets.iter().map(|n| unmap(*n)).collect::<Vec<_>>());
    merged
        .iter()
        .find(|n| n.prefix_len() == 0)
        .map(|n| n.to_string())
}

/// An AE title: 1 to 16 characters of the ISO 646 basic set, no backslash or control characters.
pub(super) fn check_ae_title(ae: &str) -> Result<(), String> {
    if ae.trim().is_empty() || ae.len() > AE_TITLE_MAX {
        return Err(format!("{ae:?} must be 1 to {AE_TITLE_MAX} characters"));
    }
    if ae != ae.trim() {
        return Err(format!("{ae:?} has leading or trailing spaces"));
    }
    if !ae
        .chars()
        .all(|c| c.is_ascii_graphic() && c != '\\' || c == ' ')
    {
        return Err(format!("{ae:?} has characters an AE title cannot hold"));
    }
    Ok(())
}
