//! `[[role]]`, `[[user]]`, `[auth.jwt]`, `[limits]` and `[[device]]`: who may come in, and how much.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::Ctx;
use super::network::{address_list, check_ae_title, covers_everything};
use crate::config::credentials::{
    EXAMPLE_PASSWORD_HASH, MAX_LEEWAY_SECONDS, check_hash_format, check_login_name,
};
use crate::config::file::{FileDevice, FileJwt, FileLimits, FileRole, FileUnrestricted, FileUser};
use crate::config::{
    ConfigError, Device, Jwt, JwtKeySource, Limits, Operation, QueryModel, Rate, Role,
    Unrestricted, User,
};

pub(super) fn validate_roles(
    cx: &Ctx,
    list: Vec<FileRole>,
) -> Result<HashMap<String, Role>, ConfigError> {
    let mut roles = HashMap::new();
    for (i, r) in list.into_iter().enumerate() {
        let mut allow = BTreeSet::new();
        for op in &r.allow {
            let op = Operation::parse(op).ok_or_else(|| {
                cx.invalid(
                    &format!("role[{i}].allow"),
                    format!("unknown operation {op:?}; expected echo, find, get, move, store or worklist"),
                )
            })?;
            allow.insert(op);
        }
        if roles.contains_key(&r.name) {
            return Err(cx.invalid(
                &format!("role[{i}].name"),
                format!("role {:?} is defined twice", r.name),
            ));
        }
        for dest in &r.move_destinations {
            check_ae_title(dest)
                .map_err(|m| cx.invalid(&format!("role[{i}].move_destinations"), m))?;
        }
        if r.max_query_results == Some(0) {
            return Err(cx.invalid(
                &format!("role[{i}].max_query_results"),
                "must be at least 1".into(),
            ));
        }
        let unrestricted = unrestricted(cx, i, r.unrestricted_queries)?;
        roles.insert(
            r.name.clone(),
            Role {
                name: r.name,
                allow,
                move_destinations: r.move_destinations,
                unrestricted_queries: unrestricted != Unrestricted::None,
                unrestricted,
                query_min_chars: r.query_min_chars,
                max_query_results: r.max_query_results,
            },
        );
    }
    Ok(roles)
}

/// `role[i].unrestricted_queries`: `true`, `false` or a list of query models.
fn unrestricted(cx: &Ctx, i: usize, value: FileUnrestricted) -> Result<Unrestricted, ConfigError> {
    Ok(match value {
        FileUnrestricted::All(false) => Unrestricted::None,
        FileUnrestricted::All(true) => Unrestricted::All,
        FileUnrestricted::Models(names) => {
            let mut models = BTreeSet::new();
            for name in &names {
                let model = QueryModel::ALL
                    .into_iter()
                    .find(|m| m.name() == name)
                    .ok_or_else(|| {
                        cx.invalid(
                            &format!("role[{i}].unrestricted_queries"),
                            format!(
                                "unknown query model {name:?} (use \"patient\", \"study\", or true for all)"
                            ),
                        )
                    })?;
                models.insert(model);
            }
            if models.is_empty() {
                Unrestricted::None
            } else {
                Unrestricted::Models(models)
            }
        }
    })
}

pub(super) fn validate_users(
    cx: &Ctx,
    list: Vec<FileUser>,
    roles: &HashMap<String, Role>,
) -> Result<HashMap<String, User>, ConfigError> {
    let mut users = HashMap::new();
    for (i, u) in list.into_iter().enumerate() {
        if u.name.is_empty() {
            return Err(cx.invalid(&format!("user[{i}].name"), "is empty".into()));
        }
        if let Some(hash) = &u.password_hash {
            check_password_user(cx, i, &u.name, hash)?;
        }
        known_roles(
            cx,
            &format!("user[{i}].roles"),
            || format!("user {:?}", u.name),
            &u.roles,
            roles,
        )?;
        if users.contains_key(&u.name) {
            return Err(cx.invalid(
                &format!("user[{i}].name"),
                format!("user {:?} is defined twice", u.name),
            ));
        }
        users.insert(
            u.name.clone(),
            User {
                name: u.name,
                password_hash: u.password_hash,
                roles: u.roles,
            },
        );
    }
    Ok(users)
}

/// Every role a `[[user]]` or `[[device]]` names is a `[[role]]`; `holder` says who, for the error.
fn known_roles(
    cx: &Ctx,
    key: &str,
    holder: impl Fn() -> String,
    named: &[String],
    roles: &HashMap<String, Role>,
) -> Result<(), ConfigError> {
    match named.iter().find(|r| !roles.contains_key(*r)) {
        Some(role) => Err(cx.invalid(
            key,
            format!(
                "{} names role {role:?}, which no [[role]] defines",
                holder()
            ),
        )),
        None => Ok(()),
    }
}

/// A password user: a name a login can produce, an argon2id hash, and not the example's published one.
fn check_password_user(cx: &Ctx, i: usize, name: &str, hash: &str) -> Result<(), ConfigError> {
    check_login_name(name).map_err(|m| {
        cx.invalid(
            &format!("user[{i}].name"),
            format!("user {name:?} cannot sign in with a password: {m}"),
        )
    })?;
    check_hash_format(hash).map_err(|m| {
        cx.invalid(
            &format!("user[{i}].password_hash"),
            format!("user {name:?}: {m}"),
        )
    })?;
    if hash == EXAMPLE_PASSWORD_HASH {
        return Err(cx.invalid(
            &format!("user[{i}].password_hash"),
            format!(
                "user {name:?} has the example configuration's published hash (of \"change-me\"): anyone may sign in as them; \
                 make a hash of a real password with `pacsgate hash-password` and put it here"
            ),
        ));
    }
    Ok(())
}

pub(super) fn validate_jwt(cx: &Ctx, j: FileJwt) -> Result<Jwt, ConfigError> {
    let key = match (j.public_key, j.jwks) {
        (Some(p), None) => JwtKeySource::PublicKey(cx.resolve(&p)),
        (None, Some(p)) => JwtKeySource::Jwks(cx.resolve(&p)),
        _ => {
            return Err(cx.invalid("auth.jwt", "set exactly one of public_key or jwks".into()));
        }
    };
    let algorithms = j
        .algorithms
        .map(|list| jwt_algorithms(cx, list))
        .transpose()?;
    if j.issuer.is_empty() {
        return Err(cx.invalid("auth.jwt.issuer", "is empty".into()));
    }
    if j.audience.is_empty() {
        return Err(cx.invalid("auth.jwt.audience", "is empty".into()));
    }
    if j.leeway > MAX_LEEWAY_SECONDS {
        return Err(cx.invalid(
            "auth.jwt.leeway",
            format!(
                "{} s is more than the {} s allowed: a token would be accepted that long after it expired",
                j.leeway, MAX_LEEWAY_SECONDS
            ),
        ));
    }
    if j.max_lifetime == 0 {
        return Err(cx.invalid(
            "auth.jwt.max_lifetime",
            "is 0: no token could be accepted (seconds, default 86400 = 24 h)".into(),
        ));
    }
    Ok(Jwt {
        issuer: j.issuer,
        audience: j.audience,
        key,
        algorithms,
        roles_claim: j.roles_claim,
        leeway: j.leeway,
        max_lifetime: j.max_lifetime,
    })
}

/// `auth.jwt.algorithms`: public-key algorithms only, at least one.
fn jwt_algorithms(
    cx: &Ctx,
    list: Vec<String>,
) -> Result<Vec<jsonwebtoken::Algorithm>, ConfigError> {
    let mut out = Vec::new();
    for a in list {
        let alg: jsonwebtoken::Algorithm = a.parse().map_err(|_| {
            cx.invalid(
                "auth.jwt.algorithms",
                format!("unknown algorithm {a:?} (e.g. RS256, ES256, EdDSA)"),
            )
        })?;
        if matches!(
            alg,
            jsonwebtoken::Algorithm::HS256
                | jsonwebtoken::Algorithm::HS384
                | jsonwebtoken::Algorithm::HS512
        ) {
            return Err(cx.invalid(
                "auth.jwt.algorithms",
                format!("{a} is a shared-secret algorithm; use a public-key one"),
            ));
        }
        out.push(alg);
    }
    if out.is_empty() {
        return Err(cx.invalid("auth.jwt.algorithms", "is empty".into()));
    }
    Ok(out)
}

pub(super) fn validate_limits(cx: &Ctx, l: FileLimits) -> Result<Limits, ConfigError> {
    let rate = |key: &str, per_minute: u32, burst: Option<u32>| -> Result<Rate, ConfigError> {
        let burst = burst.unwrap_or(per_minute.max(1));
        if per_minute > 0 && burst == 0 {
            return Err(cx.invalid(key, "burst must be at least 1".into()));
        }
        Ok(Rate { per_minute, burst })
    };
    if l.max_query_results == 0 {
        return Err(cx.invalid("limits.max_query_results", "must be at least 1".into()));
    }
    for (key, v) in [
        ("limits.max_associations", l.max_associations),
        (
            "limits.max_associations_per_user",
            l.max_associations_per_user,
        ),
        ("limits.max_pending_connections", l.max_pending_connections),
        (
            "limits.max_pending_per_address",
            l.max_pending_per_address.unwrap_or(1),
        ),
    ] {
        if v == 0 {
            return Err(cx.invalid(key, "must be at least 1".into()));
        }
    }
    // Default: an eighth of the pending slots, at most 32.
    let max_pending_per_address = l
        .max_pending_per_address
        .unwrap_or((l.max_pending_connections / 8).clamp(1, 32));
    if max_pending_per_address > l.max_pending_connections {
        return Err(cx.invalid(
            "limits.max_pending_per_address",
            format!(
                "{max_pending_per_address} is more than max_pending_connections ({}): one address could take every slot",
                l.max_pending_connections
            ),
        ));
    }
    Ok(Limits {
        associations: rate(
            "limits.associations_burst",
            l.associations_per_minute,
            l.associations_burst,
        )?,
        queries: rate(
            "limits.queries_burst",
            l.queries_per_minute,
            l.queries_burst,
        )?,
        retrievals: rate(
            "limits.retrievals_burst",
            l.retrievals_per_minute,
            l.retrievals_burst,
        )?,
        max_associations: l.max_associations,
        max_associations_per_user: l.max_associations_per_user,
        max_pending_connections: l.max_pending_connections,
        max_pending_per_address,
        max_query_results: l.max_query_results,
        failed_logins: l.failed_logins,
        failed_logins_per_address: l.failed_logins_per_address,
        failed_login_window: Duration::from_secs(l.failed_login_window.max(1)),
        lockout: Duration::from_secs(l.lockout_seconds),
    })
}

pub(super) fn validate_devices(
    cx: &Ctx,
    list: Vec<FileDevice>,
    roles: &HashMap<String, Role>,
) -> Result<Vec<Device>, ConfigError> {
    let mut devices = Vec::new();
    for (i, d) in list.into_iter().enumerate() {
        check_ae_title(&d.ae_title).map_err(|m| cx.invalid(&format!("device[{i}].ae_title"), m))?;
        if d.addresses.is_empty() {
            return Err(cx.invalid(
                &format!("device[{i}].addresses"),
                "is empty: a device must be bound to its addresses".into(),
            ));
        }
        let key = format!("device[{i}].addresses");
        let addresses = address_list(&d.addresses).map_err(|m| cx.invalid(&key, m))?;
        // With the entries of the same AE title before it: together they must not let that AE in from anywhere.
        let same_ae: Vec<ipnet::IpNet> = devices
            .iter()
            .filter(|o: &&Device| o.ae_title == d.ae_title)
            .flat_map(|o| o.addresses.iter().copied())
            .chain(addresses.iter().copied())
            .collect();
        if let Some(all) = covers_everything(&same_ae) {
            return Err(cx.invalid(
                &key,
                format!(
                    "device {:?}: together with the other [[device]] entries for this AE title the addresses cover {all}, every address there is: a device is let in by AE title and address, and an AE title is no secret",
                    d.ae_title
                ),
            ));
        }
        known_roles(
            cx,
            &format!("device[{i}].roles"),
            || format!("device {:?}", d.ae_title),
            &d.roles,
            roles,
        )?;
        devices.push(Device {
            ae_title: d.ae_title,
            addresses,
            roles: d.roles,
        });
    }
    Ok(devices)
}
