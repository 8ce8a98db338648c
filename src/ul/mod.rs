//! The DICOM upper layer (PS3.8), shared by the gateway, the command-line tools, `pacsgate connect`
//! and the demo archive:
//! - `pdu.rs`: PDU framing (`read_pdu`, `PduReader` with pooled buffers), A-ASSOCIATE-RJ and A-ABORT
//! - `pdata.rs`: PDV items checked in one pass (`PdvSpans`, `PData`), read, and written (`PDataWriter`)
//! - `association.rs`: A-ASSOCIATE-RQ / -AC items, the one Maximum Length reader, User Identity
//! - `requestor.rs`: the one requestor (exchange, messages, release, abort)
//! - `io.rs`: the flushed write, the last PDU before a close, the bounded A-ASSOCIATE-RQ read
//! - here: the Implementation Class UID and version names, the requestors' `MAX_PDU_LENGTH`
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
