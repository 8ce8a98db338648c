//! TCP and TLS for the tools' requestor: the TLS client settings (verified, or accept-any for the
//! probe), and the bounded TCP connect and TLS handshake.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::Stream;
use crate::tls::{ClientBuildError, ServerVerification};
use crate::tools::ToolError;

/// TLS client settings: the CA that must have signed the server certificate, an optional client
/// certificate, and the name the server certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    /// A client certificate is presented.
    pub client_certificate: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn tls_setup(path: &Path, e: impl std::fmt::Display) -> ToolError {
    ToolError::TlsSetup(format!("{}: {e}", path.display()))
}

impl TlsClient {
    /// Verify the server against `ca`; present `client` (certificate, key) when given.
    /// `server_name` is a DNS name or an IP address.
    pub fn new(
        ca: &Path,
        client: Option<(&Path, &Path)>,
        server_name: &str,
    ) -> Result<TlsClient, ToolError> {
        let roots = crate::tls::load_roots("CA", ca)?;
        let client_auth = match client {
            None => None,
            Some((cert, key)) => Some((
                crate::tls::load_certificates("client certificate", cert)?,
                crate::tls::load_private_key(key)?,
            )),
        };
        let config = crate::tls::build_client_config(ServerVerification::Roots(roots), client_auth)
            .map_err(|e| match (e, client) {
                (ClientBuildError::ClientAuth(e), Some((cert, key))) => {
                    tls_setup(key, format!("unusable with {}: {e}", cert.display()))
                }
                (ClientBuildError::Versions(e) | ClientBuildError::ClientAuth(e), _) => {
                    tls_setup(ca, e)
                }
            })?;
        Ok(TlsClient {
            config: Arc::new(config),
            server_name: server_name_of(server_name)?,
            client_certificate: client.is_some(),
        })
    }

    /// For the probe only: complete a handshake with any server certificate, to learn whether the
    /// port speaks TLS. Nothing secret is ever sent over such a connection.
    pub fn accept_any_server(server_name: &str) -> Result<TlsClient, ToolError> {
        let verifier = Arc::new(AnyServer(provider()));
        let config = crate::tls::build_client_config(ServerVerification::Custom(verifier), None)
            .map_err(
                |(ClientBuildError::Versions(e) | ClientBuildError::ClientAuth(e))| {
                    ToolError::TlsSetup(e.to_string())
                },
            )?;
        Ok(TlsClient {
            config: Arc::new(config),
            server_name: server_name_of(server_name)?,
            client_certificate: false,
        })
    }
}

fn server_name_of(name: &str) -> Result<ServerName<'static>, ToolError> {
    let name = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(name.to_string())
        .map_err(|_| ToolError::Usage(format!("{name:?} is not a host name or IP address")))
}

/// A certificate verifier that accepts every server (signatures are still checked, so the
/// handshake itself is sound). Used by `probe` to detect TLS, never to send credentials.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An open connection, ready for an A-ASSOCIATE-RQ.
pub struct Connection {
    pub stream: Box<dyn Stream>,
    pub peer: SocketAddr,
    /// "TLS 1.3" / "TLS 1.2" when TLS is in use.
    pub tls_version: Option<String>,
}

/// Open TCP (and TLS when `tls` is given) to `address` (host:port), each phase within `timeout`.
pub async fn connect(
    address: &str,
    tls: Option<&TlsClient>,
    timeout: Duration,
) -> Result<Connection, ToolError> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(ToolError::Connect {
                address: address.to_string(),
                source,
            });
        }
        Err(_) => {
            return Err(ToolError::Timeout {
                phase: "TCP connect",
                after: timeout,
            });
        }
    };
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().map_err(|source| ToolError::Connect {
        address: address.to_string(),
        source,
    })?;
    let Some(tls) = tls else {
        return Ok(Connection {
            stream: Box::new(tcp),
            peer,
            tls_version: None,
        });
    };
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let stream = match tokio::time::timeout(
        timeout,
        connector.connect(tls.server_name.clone(), tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(ToolError::TlsHandshake {
                address: address.to_string(),
                message: e.to_string(),
            });
        }
        Err(_) => {
            return Err(ToolError::Timeout {
                phase: "TLS handshake",
                after: timeout,
            });
        }
    };
    let tls_version = stream.get_ref().1.protocol_version().map(|v| match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3".to_string(),
        rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2".to_string(),
        other => format!("{other:?}"),
    });
    Ok(Connection {
        stream: Box::new(stream),
        peer,
        tls_version,
    })
}
