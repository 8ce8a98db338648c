//! Client certificates: the names a verified certificate carries (subject CN, SAN DNS names and e-mails).

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The names that may identify a user, from a certificate rustls has already verified against `client_ca`.
/// The subject's common name comes first, then SAN DNS names and e-mail addresses.
pub fn names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::RFC822Name(n) => names.push(n.to_string()),
                _ => {}
            }
        }
    }
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_and_san_are_read() {
        let mut params =
            rcgen::CertificateParams::new(vec!["alice.example".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            names(cert.der()),
            vec!["alice".to_string(), "alice.example".to_string()]
        );
        assert!(names(b"not a certificate").is_empty());
    }
}
