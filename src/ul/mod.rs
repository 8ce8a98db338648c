//! The DICOM upper layer (PS3.8): PDU framing and the association items, shared by the gateway,
//! the command-line tools, `pacsgate connect` and the demo archive.
pub mod association;
pub mod pdu;
