//! Bounded PDU framing over async streams (PS3.8 section 9): 6-byte header, a length checked before allocating.

use tokio::io::{AsyncRead, AsyncReadExt};

pub const PDU_HEADER_LENGTH: usize = 6;

pub const A_ASSOCIATE_RQ: u8 = 0x01;
pub const A_ASSOCIATE_AC: u8 = 0x02;
pub const A_ASSOCIATE_RJ: u8 = 0x03;
pub const P_DATA_TF: u8 = 0x04;
pub const A_RELEASE_RQ: u8 = 0x05;
pub const A_RELEASE_RP: u8 = 0x06;
pub const A_ABORT: u8 = 0x07;

/// Control PDUs other than the association request and answer are tiny; anything larger is hostile.
const CONTROL_PDU_LIMIT: u32 = 64;

/// What went wrong while reading a PDU.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("connection closed")]
    Closed,
    #[error("PDU type {pdu_type:#04x} declares {length} bytes, over the limit of {limit}")]
    TooLarge {
        pdu_type: u8,
        length: u32,
        limit: u32,
    },
    #[error("unknown PDU type {0:#04x}")]
    UnknownType(u8),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The largest body a PDU of this type may have, given the limit for P-DATA-TF and association PDUs.
fn limit_for(pdu_type: u8, data_limit: u32) -> Result<u32, PduError> {
    match pdu_type {
        A_ASSOCIATE_RQ | A_ASSOCIATE_AC | A_ASSOCIATE_RJ | P_DATA_TF => Ok(data_limit),
        A_RELEASE_RQ | A_RELEASE_RP | A_ABORT => Ok(CONTROL_PDU_LIMIT),
        other => Err(PduError::UnknownType(other)),
    }
}

/// Read one whole PDU, header and body, into `buf` (cleared first) and return its type.
/// A body longer than `limit` is refused before anything is allocated for it.
pub async fn read_pdu<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: u32,
) -> Result<u8, PduError> {
    let mut header = [0u8; PDU_HEADER_LENGTH];
    // A clean close between PDUs is not an error of the peer's framing.
    let n = reader.read(&mut header).await?;
    if n == 0 {
        return Err(PduError::Closed);
    }
    reader.read_exact(&mut header[n..]).await?;
    let pdu_type = header[0];
    let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    let allowed = limit_for(pdu_type, limit)?;
    if length > allowed {
        return Err(PduError::TooLarge {
            pdu_type,
            length,
            limit: allowed,
        });
    }
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(PDU_HEADER_LENGTH + length as usize, 0);
    reader.read_exact(&mut buf[PDU_HEADER_LENGTH..]).await?;
    Ok(pdu_type)
}

/// A-ASSOCIATE-RJ with the given result, source and reason (PS3.8 9.3.4).
pub fn associate_rj(result: u8, source: u8, reason: u8) -> [u8; 10] {
    [A_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, result, source, reason]
}

/// A-ABORT from the service provider (source 2) with the given reason (PS3.8 9.3.8).
pub fn abort(reason: u8) -> [u8; 10] {
    [A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, reason]
}

/// A-RELEASE-RP.
pub const RELEASE_RP: [u8; 10] = [A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0];

/// Why an association is rejected, with the codes PS3.8 9.3.4 defines for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 1/2/1: permanent, service-provider (ACSE), no reason given: failed or missing credentials.
    NotAuthenticated,
    /// 1/1/7: permanent, service-user, called AE title not recognized.
    CalledAeNotRecognized,
    /// 1/2/2: permanent, service-provider (ACSE), protocol version not supported.
    ProtocolVersion,
    /// 1/1/2: permanent, service-user, application context name not supported.
    ApplicationContext,
    /// 1/1/1: permanent, service-user, no reason given: e.g. a return-path association nobody asked for.
    NotExpected,
    /// 2/3/1: transient, service-provider (presentation), temporary congestion: the archive is unreachable.
    UpstreamUnavailable,
    /// 2/3/2: transient, service-provider (presentation), local limit exceeded.
    LocalLimitExceeded,
}

impl Rejection {
    pub fn codes(self) -> (u8, u8, u8) {
        match self {
            Rejection::NotAuthenticated => (1, 2, 1),
            Rejection::CalledAeNotRecognized => (1, 1, 7),
            Rejection::ProtocolVersion => (1, 2, 2),
            Rejection::ApplicationContext => (1, 1, 2),
            Rejection::NotExpected => (1, 1, 1),
            Rejection::UpstreamUnavailable => (2, 3, 1),
            Rejection::LocalLimitExceeded => (2, 3, 2),
        }
    }

    /// A short fixed name (metrics label, audit rule).
    pub fn name(self) -> &'static str {
        match self {
            Rejection::NotAuthenticated => "not_authenticated",
            Rejection::CalledAeNotRecognized => "called_ae_unknown",
            Rejection::ProtocolVersion => "protocol_version",
            Rejection::ApplicationContext => "application_context",
            Rejection::NotExpected => "not_expected",
            Rejection::UpstreamUnavailable => "upstream_unavailable",
            Rejection::LocalLimitExceeded => "local_limit",
        }
    }

    pub fn pdu(self) -> [u8; 10] {
        let (result, source, reason) = self.codes();
        associate_rj(result, source, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_whole_pdu_is_read() {
        let bytes = [A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0xff];
        let mut buf = Vec::new();
        let mut r = &bytes[..];
        assert_eq!(
            read_pdu(&mut r, &mut buf, 1024).await.expect("pdu"),
            A_RELEASE_RQ
        );
        assert_eq!(buf.len(), 10);
        assert_eq!(r, &[0xff]);
    }

    #[tokio::test]
    async fn a_huge_length_is_refused_before_allocating() {
        let bytes = [P_DATA_TF, 0, 0xff, 0xff, 0xff, 0xff];
        let mut buf = Vec::new();
        let err = read_pdu(&mut &bytes[..], &mut buf, 65536)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                PduError::TooLarge {
                    length: 0xffff_ffff,
                    ..
                }
            ),
            "{err}"
        );
        assert!(buf.capacity() < 1024);
    }

    #[tokio::test]
    async fn truncation_and_unknown_types_are_errors() {
        let mut buf = Vec::new();
        let truncated = [P_DATA_TF, 0, 0, 0, 0, 10, 1, 2];
        assert!(matches!(
            read_pdu(&mut &truncated[..], &mut buf, 1024).await,
            Err(PduError::Io(_))
        ));
        let unknown = [0x09, 0, 0, 0, 0, 0];
        assert!(matches!(
            read_pdu(&mut &unknown[..], &mut buf, 1024).await,
            Err(PduError::UnknownType(9))
        ));
        assert!(matches!(
            read_pdu(&mut &[][..], &mut buf, 1024).await,
            Err(PduError::Closed)
        ));
    }

    #[test]
    fn rejection_codes_follow_the_notes() {
        assert_eq!(
            Rejection::NotAuthenticated.pdu(),
            [3, 0, 0, 0, 0, 4, 0, 1, 2, 1]
        );
        assert_eq!(Rejection::CalledAeNotRecognized.codes(), (1, 1, 7));
        assert_eq!(Rejection::LocalLimitExceeded.codes(), (2, 3, 2));
    }
}
