//! The DICOM upper layer (PS3.8): PDU framing and the association items, shared by the gateway,
//! the command-line tools, `pacsgate connect` and the demo archive.
pub mod association;
pub mod io;
pub mod pdata;
pub mod pdu;
pub mod requestor;

/// Implementation Class UID (PS3.7 D.3.3.2) every pacsgate requestor and the demo acceptor announce;
/// the Implementation Version Name stays per component (PACSGATE-TOOLS, PACSGATE-CONNECT, PACSGATE-DEMO).
pub const IMPLEMENTATION_CLASS_UID: &str = "1.2.826.0.1.3680043.10.1234.0.2";

/// What pacsgate's requestors (tools, connect) announce as their Maximum Length (PS3.8 D.1) and the
/// largest P-DATA-TF they read.
pub const MAX_PDU_LENGTH: u32 = 256 * 1024;
