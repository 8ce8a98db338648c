//! Username + passcode (User Identity type 2, HTTP Basic) checked against argon2id PHC hashes; the
//! login-name rule and the hash format it re-exports live in config/credentials.rs.

use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};

pub use crate::config::{
    MAX_USER_NAME, NameError, check_hash_format, check_login_name, normalize_user,
};

/// Hash a password as an argon2id PHC string with the crate's recommended parameters.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Check a password against a PHC hash. Runs the full argon2 cost whatever the answer.
pub fn verify(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let h = hash_password("s3cret").expect("hash");
        assert!(check_hash_format(&h).is_ok());
        assert!(verify(&h, b"s3cret"));
        assert!(!verify(&h, b"s3creT"));
        assert!(!verify("garbage", b"s3cret"));
    }
}
