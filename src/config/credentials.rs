//! What a configured credential must look like: the one rule that turns a name a peer sent into a
//! login name (shared by every login, and checked against every configured password user), argon2id
//! PHC hashes, and the bounds of `[auth.jwt]`. `auth` verifies credentials against these; the
//! knowledge lives here so that `config` needs nothing from `auth`.

use argon2::password_hash::PasswordHash;

/// The longest login name, in bytes of UTF-8 after the padding is trimmed.
pub const MAX_USER_NAME: usize = 128;

/// Why the name a peer sent cannot be a login name. Such a login fails like a wrong password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("user name is empty")]
    Empty,
    #[error("user name is longer than {MAX_USER_NAME} bytes")]
    TooLong,
    #[error("user name is not valid UTF-8")]
    Encoding,
    #[error("user name contains a control character")]
    Control,
    #[error("user name begins with white space")]
    LeadingSpace,
}

/// The login name in `raw`, normalized once for the lock check, the password check, the failure
/// count, the audit and the log (policy::login). Trailing NUL and space bytes are trimmed: DICOM pads
/// a field to an even length with one of them (PS3.5 6.2), and `alice\0` is `alice`. Nothing else is
/// changed (no case folding, no Unicode normalization: names compare byte for byte with the
/// configuration); a name that is empty, over [`MAX_USER_NAME`] bytes, not UTF-8, with a control
/// character anywhere (C0, DEL, C1: a NUL inside the name, tab, newline) or leading white space is
/// refused: no configured password user can have such a name (config::validate checks).
pub fn normalize_user(raw: &[u8]) -> Result<String, NameError> {
    let end = raw
        .iter()
        .rposition(|b| !matches!(b, 0 | b' '))
        .map_or(0, |i| i + 1);
    let name = &raw[..end];
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_USER_NAME {
        return Err(NameError::TooLong);
    }
    let name = std::str::from_utf8(name).map_err(|_| NameError::Encoding)?;
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    if name.starts_with(char::is_whitespace) {
        return Err(NameError::LeadingSpace);
    }
    Ok(name.to_string())
}

/// A configured password user's name must be its own normalized form, or nobody could sign in as it.
pub fn check_login_name(name: &str) -> Result<(), String> {
    match normalize_user(name.as_bytes()) {
        Ok(n) if n == name => Ok(()),
        Ok(_) => Err("the name ends with spaces, which a login trims".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Refuse anything but an argon2id PHC string, so a plain-text password in the file is an error at load.
pub fn check_hash_format(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC hash string ({e})"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "algorithm {} is not argon2id; make one with `pacsgate hash-password`",
            parsed.algorithm
        ));
    }
    Ok(())
}

/// The `password_hash` shipped in config/pacsgate.toml (of "change-me"): published, so refused at load.
pub const EXAMPLE_PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$5I0q52ByG98xmUX5BNx18Q$UVj6MxF1qNOeN4ku7+xoQJBYzRNL66ox5xrpa/M0G4s";

/// The most clock skew `[auth.jwt] leeway` may allow, in seconds: beyond it an expired token stays
/// good for too long. Larger values are refused at load.
pub const MAX_LEEWAY_SECONDS: u64 = 300;

/// `[auth.jwt] max_lifetime` when the file does not say: 24 hours.
pub const DEFAULT_MAX_LIFETIME_SECONDS: u64 = 24 * 3600;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_trimmed_and_nothing_else_changes() {
        for padded in [
            &b"alice"[..],
            b"alice\0",
            b"alice ",
            b"alice\0 \0",
            b"alice   ",
        ] {
            assert_eq!(normalize_user(padded).as_deref(), Ok("alice"), "{padded:?}");
        }
        assert_eq!(
            normalize_user(b"Alice").as_deref(),
            Ok("Alice"),
            "case is kept"
        );
        assert_eq!(normalize_user(b"dr smith").as_deref(), Ok("dr smith"));
        assert_eq!(
            normalize_user("jos\u{e9}".as_bytes()).as_deref(),
            Ok("jos\u{e9}"),
            "NFC stays NFC"
        );
        assert_eq!(
            normalize_user("jose\u{301}".as_bytes()).as_deref(),
            Ok("jose\u{301}"),
            "NFD stays NFD: another name, which no lookup maps to the NFC one"
        );
    }

    #[test]
    fn names_that_cannot_be_users_are_refused() {
        let long = vec![b'x'; MAX_USER_NAME + 1];
        let cases: [(&[u8], NameError); 10] = [
            (b"", NameError::Empty),
            (b"\0\0 ", NameError::Empty),
            (&long, NameError::TooLong),
            (b"al\xffice", NameError::Encoding),
            (b"al\0ice", NameError::Control),
            (b"alice\n", NameError::Control),
            (b"alice\t", NameError::Control),
            ("alice\u{85}".as_bytes(), NameError::Control),
            (b" alice", NameError::LeadingSpace),
            ("\u{3000}alice".as_bytes(), NameError::LeadingSpace),
        ];
        for (raw, error) in cases {
            assert_eq!(normalize_user(raw), Err(error), "{raw:?}");
        }
        let at_bound = vec![b'x'; MAX_USER_NAME];
        assert!(normalize_user(&at_bound).is_ok());
        assert!(check_login_name("alice").is_ok());
        assert!(check_login_name("alice ").is_err());
        assert!(check_login_name(" alice").is_err());
    }

    #[test]
    fn other_algorithms_are_refused() {
        assert!(check_hash_format("plain").is_err());
        assert!(
            check_hash_format("$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$L6g4Dk2CwcNoL2hPDSOWbg")
                .is_err()
        );
    }
}
