//! A small DICOM association requestor for pacsgate's own tools: TCP or TLS, a User Identity,
//! C-ECHO and C-FIND, every wait bounded and named, and rejections decoded into words.
//!
//! It speaks PDUs itself (dicom-ul's PDU types and `write_pdu`, pacsgate's bounded framing and
//! DIMSE codec) rather than using dicom-ul's client association, because a diagnostic tool has to
//! report A-ASSOCIATE-RJ and A-ABORT codes that dicom-ul's strict reader refuses, must cap a JWT
//! before `write_pdu` truncates its 16-bit length, and the probe needs the raw first bytes of a
//! server that does not speak DICOM at all.

use crate::tls::{ClientBuildError, ServerVerification};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, PresentationContextResultReason, UserIdentity,
    UserIdentityType, UserVariableItem, write_pdu,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ToolError;
use crate::dimse::{self, Command, command_field, status};
use crate::ul::association::{DICOM_APPLICATION_CONTEXT, UpstreamAnswer, parse_answer};
use crate::ul::pdata::{self, PDataWriter};
use crate::ul::pdu::{self, PduError};

/// Verification SOP class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Study Root Query/Retrieve Information Model - FIND.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
/// Patient Root Query/Retrieve Information Model - FIND.
pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";

use crate::ul::IMPLEMENTATION_CLASS_UID;
pub use crate::ul::MAX_PDU_LENGTH;
/// Implementation Version Name of the command-line tools.
const IMPLEMENTATION_VERSION_NAME: &str = "PACSGATE-TOOLS";
/// Largest A-ASSOCIATE-AC / -RJ we read.
const MAX_ANSWER_LENGTH: u32 = 64 * 1024;
/// Largest identifier (C-FIND response data set) we keep.
const MAX_IDENTIFIER_LENGTH: usize = 4 * 1024 * 1024;
/// The longest primary field of a User Identity: its length is 16 bits, and the whole sub-item
/// (with the secondary field) must fit in a 16-bit item length.
const MAX_IDENTITY_FIELD: usize = 60 * 1024;

/// Any byte stream an association can run over: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Who we say we are in the A-ASSOCIATE-RQ.
#[derive(Clone, Default)]
pub enum Identity {
    /// No User Identity sub-item.
    #[default]
    None,
    /// Type 2: username and passcode.
    Password { user: String, password: String },
    /// Type 5: a JSON Web Token.
    Jwt(String),
}

impl std::fmt::Debug for Identity {
    /// Never shows a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::None => f.write_str("no user identity"),
            Identity::Password { user, .. } => write!(f, "user {user:?} with a password"),
            Identity::Jwt(_) => f.write_str("a JWT"),
        }
    }
}

impl Identity {
    fn sub_item(&self) -> Result<Option<UserIdentity>, ToolError> {
        let (kind, primary, secondary) = match self {
            Identity::None => return Ok(None),
            Identity::Password { user, password } => (
                UserIdentityType::UsernamePassword,
                user.as_bytes(),
                password.as_bytes(),
            ),
            Identity::Jwt(token) => (UserIdentityType::Jwt, token.as_bytes(), &b""[..]),
        };
        if primary.len() + secondary.len() > MAX_IDENTITY_FIELD {
            return Err(ToolError::Usage(format!(
                "the user identity is {} bytes; a DICOM User Identity holds at most {MAX_IDENTITY_FIELD}",
                primary.len() + secondary.len()
            )));
        }
        Ok(Some(UserIdentity::new(
            true,
            kind,
            primary.to_vec(),
            secondary.to_vec(),
        )))
    }
}

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

/// An A-ASSOCIATE-RJ: result, source and reason (PS3.8 9.3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub result: u8,
    pub source: u8,
    pub reason: u8,
}

impl Rejection {
    /// The codes in words, e.g. "rejected permanently by the service provider (ACSE): no reason given".
    pub fn words(&self) -> String {
        let result = match self.result {
            1 => "rejected permanently",
            2 => "rejected transiently",
            _ => "rejected (unknown result)",
        };
        let (source, reason) = match (self.source, self.reason) {
            (1, r) => (
                "by the called application (service user)",
                match r {
                    1 => "no reason given",
                    2 => "application context name not supported",
                    3 => "calling AE title not recognized",
                    7 => "called AE title not recognized",
                    _ => "reserved reason",
                },
            ),
            (2, r) => (
                "by the service provider (ACSE)",
                match r {
                    1 => "no reason given",
                    2 => "protocol version not supported",
                    _ => "reserved reason",
                },
            ),
            (3, r) => (
                "by the service provider (presentation)",
                match r {
                    1 => "temporary congestion",
                    2 => "local limit exceeded",
                    _ => "reserved reason",
                },
            ),
            _ => ("by an unknown source", "unknown reason"),
        };
        format!("{result} {source}: {reason}")
    }

    /// What pacsgate means by these codes, when it is pacsgate that answered.
    pub fn pacsgate_hint(&self) -> Option<&'static str> {
        Some(match (self.result, self.source, self.reason) {
            (1, 2, 1) => "missing, wrong or expired credentials (or a user without a role)",
            (1, 1, 7) => "the called AE title maps to no archive (--aec)",
            (1, 1, 3) => "the calling AE title is not allowed (--aet)",
            (2, 3, 1) => "the archive behind the gateway is unreachable or silent",
            (2, 3, 2) => {
                "a rate limit, a lockout after failed logins, or the gateway is at capacity"
            }
            _ => return None,
        })
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "A-ASSOCIATE-RJ {}/{}/{}: {}",
            self.result,
            self.source,
            self.reason,
            self.words()
        )
    }
}

/// An A-ABORT: source and reason (PS3.8 9.3.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abort {
    pub source: u8,
    pub reason: u8,
}

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match self.source {
            0 => "the peer application (service user)",
            2 => "the peer's service provider",
            _ => "an unknown source",
        };
        let reason = match (self.source, self.reason) {
            (2, 1) => ": unrecognized PDU",
            (2, 2) => ": unexpected PDU",
            (2, 4) => ": unrecognized PDU parameter",
            (2, 5) => ": unexpected PDU parameter",
            (2, 6) => ": invalid PDU parameter",
            _ => "",
        };
        write!(
            f,
            "A-ABORT {}/{} from {source}{reason}",
            self.source, self.reason
        )
    }
}

/// What to put in the A-ASSOCIATE-RQ.
#[derive(Debug, Clone)]
pub struct Request {
    pub calling_ae: String,
    pub called_ae: String,
    pub identity: Identity,
    /// Abstract syntaxes to propose, one presentation context each.
    pub abstract_syntaxes: Vec<&'static str>,
    /// Bound on every wait of the association.
    pub timeout: Duration,
}

/// A presentation context the acceptor accepted.
#[derive(Debug, Clone)]
pub struct AcceptedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// An established association.
pub struct Association {
    stream: Box<dyn Stream>,
    pub contexts: Vec<AcceptedContext>,
    /// The largest PDU body the acceptor takes.
    peer_max_pdu: u32,
    next_message_id: u16,
    timeout: Duration,
    /// The acceptor confirmed the User Identity (sub-item 0x59 in the A-ASSOCIATE-AC).
    pub identity_confirmed: bool,
    pending: VecDeque<OwnedPdv>,
}

struct OwnedPdv {
    context: u8,
    is_command: bool,
    is_last: bool,
    data: Vec<u8>,
}

/// A DIMSE message as received.
pub struct Message {
    pub context: u8,
    pub command: Command,
    pub data: Option<Vec<u8>>,
}

/// Send the A-ASSOCIATE-RQ and read the answer.
pub async fn associate(conn: Connection, request: &Request) -> Result<Association, ToolError> {
    let mut stream = conn.stream;
    let mut user_variables = vec![
        UserVariableItem::MaxLength(MAX_PDU_LENGTH),
        UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
        UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
    ];
    if let Some(id) = request.identity.sub_item()? {
        user_variables.push(UserVariableItem::UserIdentityItem(id));
    }
    let presentation_contexts = request
        .abstract_syntaxes
        .iter()
        .zip((1u8..).step_by(2))
        .map(|(syntax, id)| PresentationContextProposed {
            id,
            abstract_syntax: syntax.to_string(),
            transfer_syntaxes: vec![
                EXPLICIT_VR_LITTLE_ENDIAN.uid().to_string(),
                IMPLICIT_VR_LITTLE_ENDIAN.uid().to_string(),
            ],
        })
        .collect();
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: request.calling_ae.clone(),
        called_ae_title: request.called_ae.clone(),
        application_context_name: DICOM_APPLICATION_CONTEXT.to_string(),
        presentation_contexts,
        user_variables,
    });
    let mut bytes = Vec::new();
    write_pdu(&mut bytes, &rq).map_err(|e| ToolError::Protocol(format!("A-ASSOCIATE-RQ: {e}")))?;
    write_all(
        &mut stream,
        &bytes,
        request.timeout,
        "sending the A-ASSOCIATE-RQ",
    )
    .await?;

    let mut buf = Vec::new();
    let pdu_type = bounded(
        request.timeout,
        "the A-ASSOCIATE-AC or -RJ",
        pdu::read_pdu(&mut stream, &mut buf, MAX_ANSWER_LENGTH),
    )
    .await?
    .map_err(|e| answer_error(e, "waiting for the A-ASSOCIATE-AC"))?;
    match pdu_type {
        pdu::A_ASSOCIATE_RJ => {
            let code = |i: usize| buf.get(i).copied().unwrap_or(0);
            return Err(ToolError::Rejected(Rejection {
                result: code(7),
                source: code(8),
                reason: code(9),
            }));
        }
        pdu::A_ABORT => return Err(ToolError::Aborted(abort_of(&buf))),
        pdu::A_ASSOCIATE_AC => {}
        other => {
            return Err(ToolError::Protocol(format!(
                "expected an A-ASSOCIATE-AC or -RJ, got PDU type {other:#04x}"
            )));
        }
    }
    let ac = match parse_answer(&buf) {
        Ok(UpstreamAnswer::Accepted(ac)) => ac,
        Ok(UpstreamAnswer::Refused { .. }) => {
            return Err(ToolError::Protocol("unexpected answer".into()));
        }
        Err(e) => return Err(ToolError::Protocol(e.to_string())),
    };
    let rq_contexts = match &rq {
        Pdu::AssociationRQ(rq) => &rq.presentation_contexts,
        _ => return Err(ToolError::Protocol("internal: not a request".into())),
    };
    let contexts: Vec<AcceptedContext> = ac
        .presentation_contexts
        .iter()
        .filter(|c| c.reason == PresentationContextResultReason::Acceptance)
        .filter_map(|c| {
            let proposed = rq_contexts.iter().find(|p| p.id == c.id)?;
            Some(AcceptedContext {
                id: c.id,
                abstract_syntax: proposed.abstract_syntax.clone(),
                transfer_syntax: c.transfer_syntax.trim_end_matches('\0').to_string(),
            })
        })
        .collect();
    let peer_max_pdu = crate::ul::association::peer_max_length(&ac.user_variables, MAX_PDU_LENGTH);
    let identity_confirmed = ac
        .user_variables
        .iter()
        .any(|v| matches!(v, UserVariableItem::Unknown(0x59, _)));
    Ok(Association {
        stream,
        contexts,
        peer_max_pdu,
        next_message_id: 1,
        timeout: request.timeout,
        identity_confirmed,
        pending: VecDeque::new(),
    })
}

fn abort_of(buf: &[u8]) -> Abort {
    Abort {
        source: buf.get(8).copied().unwrap_or(0),
        reason: buf.get(9).copied().unwrap_or(0),
    }
}

/// A failure reading the association answer, with what the first byte suggests.
fn answer_error(e: PduError, phase: &'static str) -> ToolError {
    match e {
        // 0x15 is a TLS alert record, 0x16 a TLS handshake record: a TLS port read as plain DICOM.
        PduError::UnknownType(t @ (0x15 | 0x16)) => ToolError::NotDicom(format!(
            "the server answered with a TLS record (first byte {t:#04x}): this port expects TLS"
        )),
        PduError::UnknownType(t) => ToolError::NotDicom(format!(
            "the server answered with something that is not DICOM (first byte {t:#04x})"
        )),
        PduError::Closed => ToolError::Closed { phase },
        PduError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ToolError::Closed { phase }
        }
        other => ToolError::Protocol(format!("{phase}: {other}")),
    }
}

async fn bounded<T>(
    timeout: Duration,
    phase: &'static str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ToolError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ToolError::Timeout {
            phase,
            after: timeout,
        })
}

async fn write_all(
    stream: &mut Box<dyn Stream>,
    bytes: &[u8],
    timeout: Duration,
    phase: &'static str,
) -> Result<(), ToolError> {
    bounded(timeout, phase, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await?
    .map_err(|e| ToolError::Protocol(format!("{phase}: {e}")))
}

/// The request command set of a DIMSE-C request (PS3.7 9.3), Implicit VR Little Endian.
pub fn request_command(field: u16, sop_class: &str, message_id: u16, with_data: bool) -> Vec<u8> {
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        us(tags::COMMAND_FIELD, field),
        us(tags::MESSAGE_ID, message_id),
        us(
            tags::COMMAND_DATA_SET_TYPE,
            if with_data {
                0x0001
            } else {
                dimse::NO_DATA_SET
            },
        ),
    ];
    if field != command_field::C_ECHO_RQ {
        elements.push(us(tags::PRIORITY, 0));
    }
    dimse::encode_command(elements)
}

/// Encode an identifier in a context's transfer syntax (Implicit or Explicit VR Little Endian).
pub fn encode_identifier(
    obj: &InMemDicomObject,
    transfer_syntax: &str,
) -> Result<Vec<u8>, ToolError> {
    let ts = if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN.uid() {
        IMPLICIT_VR_LITTLE_ENDIAN.erased()
    } else if transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN.uid() {
        EXPLICIT_VR_LITTLE_ENDIAN.erased()
    } else {
        return Err(ToolError::Protocol(format!(
            "the acceptor chose transfer syntax {transfer_syntax}, which was not proposed"
        )));
    };
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts)
        .map_err(|e| ToolError::Usage(format!("cannot encode the query keys: {e}")))?;
    Ok(out)
}

/// The end of a C-FIND: the final status and how many matches arrived.
#[derive(Debug, Clone)]
pub struct FindOutcome {
    pub status: u16,
    pub error_comment: String,
    pub matches: usize,
    /// We sent a C-CANCEL because the caller had enough.
    pub cancelled: bool,
}

impl Association {
    /// The accepted context for an abstract syntax.
    pub fn context_for(&self, abstract_syntax: &str) -> Option<&AcceptedContext> {
        self.contexts
            .iter()
            .find(|c| c.abstract_syntax == abstract_syntax)
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }

    /// Send one DIMSE message, split to the acceptor's maximum PDU length.
    pub async fn send_message(
        &mut self,
        context: u8,
        command: &[u8],
        data: Option<&[u8]>,
    ) -> Result<(), ToolError> {
        let mut writer = PDataWriter::new(self.peer_max_pdu);
        writer.push(context, true, true, command);
        if let Some(data) = data {
            writer.push(context, false, true, data);
        }
        let bytes = writer.into_bytes();
        write_all(&mut self.stream, &bytes, self.timeout, "sending a request").await
    }

    async fn next_pdv(&mut self, phase: &'static str) -> Result<OwnedPdv, ToolError> {
        loop {
            if let Some(pdv) = self.pending.pop_front() {
                return Ok(pdv);
            }
            let mut buf = Vec::new();
            let pdu_type = bounded(
                self.timeout,
                phase,
                pdu::read_pdu(&mut self.stream, &mut buf, MAX_PDU_LENGTH),
            )
            .await?
            .map_err(|e| answer_error(e, phase))?;
            match pdu_type {
                pdu::P_DATA_TF => {
                    pdata::check_pdv_items(&buf).map_err(ToolError::Protocol)?;
                    self.pending
                        .extend(pdata::pdv_items(&buf).map(|p| OwnedPdv {
                            context: p.presentation_context_id,
                            is_command: p.is_command,
                            is_last: p.is_last,
                            data: p.data.to_vec(),
                        }));
                }
                pdu::A_ABORT => return Err(ToolError::Aborted(abort_of(&buf))),
                other => {
                    return Err(ToolError::Protocol(format!(
                        "unexpected PDU type {other:#04x} while {phase}"
                    )));
                }
            }
        }
    }

    /// Read one whole DIMSE message (command set and, if announced, its data set).
    pub async fn read_message(&mut self, phase: &'static str) -> Result<Message, ToolError> {
        let mut command_bytes = Vec::new();
        let context;
        loop {
            let pdv = self.next_pdv(phase).await?;
            if !pdv.is_command {
                return Err(ToolError::Protocol(
                    "a data set fragment arrived where a command set was expected".into(),
                ));
            }
            if command_bytes.len() + pdv.data.len() > dimse::MAX_COMMAND_LENGTH {
                return Err(ToolError::Protocol("command set too large".into()));
            }
            command_bytes.extend_from_slice(&pdv.data);
            if pdv.is_last {
                context = pdv.context;
                break;
            }
        }
        let command = dimse::decode_command(&command_bytes)?;
        if !command.has_data_set {
            return Ok(Message {
                context,
                command,
                data: None,
            });
        }
        let mut data = Vec::new();
        loop {
            let pdv = self.next_pdv(phase).await?;
            if pdv.is_command || pdv.context != context {
                return Err(ToolError::Protocol(
                    "expected a data set fragment on the same presentation context".into(),
                ));
            }
            if data.len() + pdv.data.len() > MAX_IDENTIFIER_LENGTH {
                return Err(ToolError::Protocol(format!(
                    "a response data set exceeds {MAX_IDENTIFIER_LENGTH} bytes"
                )));
            }
            data.extend_from_slice(&pdv.data);
            if pdv.is_last {
                break;
            }
        }
        Ok(Message {
            context,
            command,
            data: Some(data),
        })
    }

    /// C-ECHO: the response status.
    pub async fn echo(&mut self) -> Result<u16, ToolError> {
        let context = self
            .context_for(VERIFICATION)
            .ok_or(ToolError::ContextRejected("Verification (C-ECHO)"))?
            .id;
        let id = self.message_id();
        let command = request_command(command_field::C_ECHO_RQ, VERIFICATION, id, false);
        self.send_message(context, &command, None).await?;
        loop {
            let message = self.read_message("waiting for the C-ECHO response").await?;
            let c = &message.command;
            if c.field == command_field::C_ECHO_RQ | command_field::RESPONSE && c.responded_to == id
            {
                return c
                    .status
                    .ok_or_else(|| ToolError::Protocol("C-ECHO response without status".into()));
            }
        }
    }

    /// C-FIND with `identifier` on the context of `model`; `on_match` gets each pending
    /// identifier and returns false to stop (a C-CANCEL is sent, and the rest is drained).
    pub async fn find(
        &mut self,
        model: &'static str,
        identifier: &InMemDicomObject,
        mut on_match: impl FnMut(InMemDicomObject) -> bool,
    ) -> Result<FindOutcome, ToolError> {
        let context = self
            .context_for(model)
            .ok_or(ToolError::ContextRejected("the C-FIND information model"))?
            .clone();
        let data = encode_identifier(identifier, &context.transfer_syntax)?;
        let id = self.message_id();
        let command = request_command(command_field::C_FIND_RQ, model, id, true);
        self.send_message(context.id, &command, Some(&data)).await?;
        let mut matches = 0usize;
        let mut cancelled = false;
        loop {
            let message = self.read_message("waiting for C-FIND responses").await?;
            let c = &message.command;
            if c.field != command_field::C_FIND_RQ | command_field::RESPONSE || c.responded_to != id
            {
                continue;
            }
            let status = c
                .status
                .ok_or_else(|| ToolError::Protocol("C-FIND response without status".into()))?;
            if !status::is_pending(status) {
                return Ok(FindOutcome {
                    status,
                    error_comment: dimse::attribute(&c.object, tags::ERROR_COMMENT),
                    matches,
                    cancelled,
                });
            }
            matches += 1;
            if cancelled {
                continue;
            }
            let Some(bytes) = message.data else {
                continue;
            };
            let object = dimse::decode_identifier(&bytes, &context.transfer_syntax)?;
            if !on_match(object) {
                cancelled = true;
                let cancel = dimse::c_cancel(id);
                self.send_message(context.id, &cancel, None).await?;
            }
        }
    }

    /// A-RELEASE-RQ, then wait for the A-RELEASE-RP.
    pub async fn release(mut self) -> Result<(), ToolError> {
        let rq = [pdu::A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0];
        write_all(
            &mut self.stream,
            &rq,
            self.timeout,
            "sending the A-RELEASE-RQ",
        )
        .await?;
        loop {
            let mut buf = Vec::new();
            let t = bounded(
                self.timeout,
                "waiting for the A-RELEASE-RP",
                pdu::read_pdu(&mut self.stream, &mut buf, MAX_PDU_LENGTH),
            )
            .await?
            .map_err(|e| answer_error(e, "waiting for the A-RELEASE-RP"))?;
            match t {
                pdu::A_RELEASE_RP => break,
                // Late responses (e.g. after a C-CANCEL) may still arrive.
                pdu::P_DATA_TF => continue,
                pdu::A_ABORT => return Err(ToolError::Aborted(abort_of(&buf))),
                other => {
                    return Err(ToolError::Protocol(format!(
                        "expected an A-RELEASE-RP, got PDU type {other:#04x}"
                    )));
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.shutdown()).await;
        Ok(())
    }

    /// A-ABORT (service user), best effort.
    pub async fn abort(mut self) {
        let pdu = [pdu::A_ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0];
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.stream.write_all(&pdu).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// A status in words (PS3.7 annex C and the C-FIND statuses of PS3.4 C.4.1.1.4).
pub fn status_words(status: u16) -> &'static str {
    match status {
        0x0000 => "Success",
        0xFF00 | 0xFF01 => "Pending",
        0xFE00 => "Cancel",
        0x0001 => "Warning",
        0x0107 => "Warning: attribute list error",
        0x0116 => "Warning: attribute value out of range",
        0x0122 => "Refused: SOP class not supported",
        0x0124 => "Refused: not authorized",
        0x0210 => "Failure: duplicate invocation",
        0x0211 => "Failure: unrecognized operation",
        0x0212 => "Failure: mistyped argument",
        0xA700 => "Refused: out of resources",
        0xA701 => "Refused: out of resources, unable to calculate number of matches",
        0xA702 => "Refused: out of resources, unable to perform sub-operations",
        0xA801 => "Refused: move destination unknown",
        0xA900 => "Failed: identifier does not match SOP class",
        s if s & 0xF000 == 0xB000 => "Warning",
        s if s & 0xF000 == 0xC000 => "Failed: unable to process",
        _ => "Failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_read_as_words_with_pacsgate_hints() {
        let r = Rejection {
            result: 1,
            source: 2,
            reason: 1,
        };
        assert_eq!(
            r.to_string(),
            "A-ASSOCIATE-RJ 1/2/1: rejected permanently by the service provider (ACSE): no reason given"
        );
        assert!(r.pacsgate_hint().is_some_and(|h| h.contains("credentials")));
        let r = Rejection {
            result: 1,
            source: 1,
            reason: 7,
        };
        assert!(r.words().contains("called AE title not recognized"));
        assert!(
            Rejection {
                result: 9,
                source: 9,
                reason: 9
            }
            .pacsgate_hint()
            .is_none()
        );
    }

    #[test]
    fn request_commands_decode_with_the_gateway_codec() {
        let bytes = request_command(command_field::C_FIND_RQ, STUDY_ROOT_FIND, 7, true);
        let c = dimse::decode_command(&bytes).expect("decode");
        assert_eq!((c.field, c.message_id, c.has_data_set), (0x0020, 7, true));
        assert_eq!(c.affected_sop_class, STUDY_ROOT_FIND);
        let echo = dimse::decode_command(&request_command(0x0030, VERIFICATION, 1, false))
            .expect("decode");
        assert!(!echo.has_data_set);
    }

    #[test]
    fn an_oversized_token_is_refused_before_encoding() {
        let id = Identity::Jwt("x".repeat(70_000));
        assert!(matches!(id.sub_item(), Err(ToolError::Usage(_))));
        assert!(
            !format!(
                "{:?}",
                Identity::Password {
                    user: "u".into(),
                    password: "secret".into()
                }
            )
            .contains("secret")
        );
    }
}
