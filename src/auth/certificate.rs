//! Client certificates: the names a verified certificate carries (subject CN, SAN DNS names and e-mails),
//! all of them or only the field `[tls] client_identity` pins.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::ClientIdentity;

/// The names that may identify a user, from a certificate rustls has already verified against `client_ca`.
/// The subject's common name comes first, then SAN DNS names and e-mail addresses.
pub fn names(der: &[u8]) -> Vec<String> {
    names_for(der, None)
}

/// The names of one field (`Some`), or of every field in the order of [`names`] (`None`).
/// With a field pinned, a certificate whose other fields happen to spell a user name does not sign that user in.
pub fn names_for(der: &[u8], field: Option<ClientIdentity>) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let wants = |f: ClientIdentity| field.is_none_or(|pinned| pinned == f);
    let mut names: Vec<String> = Vec::new();
    if wants(ClientIdentity::Cn) {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_string)),
        );
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) if wants(ClientIdentity::SanDns) => {
                    names.push(n.to_string())
                }
                GeneralName::RFC822Name(n) if wants(ClientIdentity::SanEmail) => {
                    names.push(n.to_string())
                }
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

    fn certificate() -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["alice.example".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "bob@example.org".try_into().expect("e-mail"),
        ));
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn common_name_and_san_are_read() {
        assert_eq!(
            names(&certificate()),
            vec![
                "alice".to_string(),
                "alice.example".to_string(),
                "bob@example.org".to_string()
            ]
        );
        assert!(names(b"not a certificate").is_empty());
    }

    #[test]
    fn a_pinned_field_is_the_only_one_read() {
        let der = certificate();
        assert_eq!(names_for(&der, Some(ClientIdentity::Cn)), vec!["alice"]);
        assert_eq!(
            names_for(&der, Some(ClientIdentity::SanDns)),
            vec!["alice.example"]
        );
        assert_eq!(
            names_for(&der, Some(ClientIdentity::SanEmail)),
            vec!["bob@example.org"]
        );
    }
}
