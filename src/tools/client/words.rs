//! A-ASSOCIATE-RJ, A-ABORT and DIMSE statuses in words, as the tools show them.

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
