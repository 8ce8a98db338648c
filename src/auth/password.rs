//! Username + passcode (User Identity type 2) checked against argon2id PHC hashes.

use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};

/// Hash a password as an argon2id PHC string with the crate's recommended parameters.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
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

    #[test]
    fn other_algorithms_are_refused() {
        assert!(check_hash_format("plain").is_err());
        assert!(
            check_hash_format("$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$L6g4Dk2CwcNoL2hPDSOWbg")
                .is_err()
        );
    }
}
