//! Files holding secrets (private keys, the configuration file with password hashes) that other
//! local users can read or write: their mode, the folders above them, and their POSIX ACLs.

use std::path::{Path, PathBuf};

/// A file holding a secret that local users other than the owner and the group can read or write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadableFile {
    /// What it is: `tls.private_key`, `destination[0].tls.private_key`, or the configuration file.
    pub what: String,
    pub file: PathBuf,
    /// Its permission bits.
    pub mode: u32,
    /// It carries a POSIX access ACL giving a named user or group read or write access
    /// (`setfacl -m u:NAME:r`; `ls -l` shows `+` after the mode).
    pub acl: bool,
}

impl ReadableFile {
    /// One sentence: which file, its mode, and the fix.
    pub fn describe(&self) -> String {
        if self.acl {
            return format!(
                "{} {} carries a POSIX ACL that lets named users or groups read or write it (mode {:o}+; getfacl shows them): \
                 remove it with setfacl -b; 640 is safe only when the file's group is the service's group (chown root:pacsgate)",
                self.what,
                self.file.display(),
                self.mode & 0o777
            );
        }
        format!(
            "{} {} can be read by other users (mode {:o}, in folders they can enter): chmod o-rwx it; \
             640 is safe only when the file's group is the service's group (chown root:pacsgate)",
            self.what,
            self.file.display(),
            self.mode & 0o777
        )
    }
}

/// The extended attribute holding a file's POSIX access ACL (Linux; absent when the ACL is just the mode).
const ACL_ACCESS: &str = "system.posix_acl_access";
/// `ACL_USER` and `ACL_GROUP`: the entries naming a user or group beyond owner, group and others.
const ACL_NAMED_USER: u16 = 0x02;
const ACL_NAMED_GROUP: u16 = 0x08;

/// Does `path` carry a POSIX access ACL whose named user or group entries hold any of `bits`
/// (`0o4` read, `0o2` write, `0o1` search)? The attribute is the kernel's `posix_acl_xattr` layout: a
/// 4-byte version, then 8-byte entries (tag u16, permissions u16, id u32, little-endian). Fail closed:
/// an attribute that cannot be read (other than "not supported" or "absent") or does not parse counts.
fn acl_grants(path: &Path, bits: u16) -> bool {
    let value = match xattr::get(path, ACL_ACCESS) {
        Ok(None) => return false,
        Ok(Some(v)) => v,
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => return false,
        Err(e) if e.raw_os_error() == Some(61) => return false, // ENODATA: no ACL
        Err(_) => return true,
    };
    let Some(entries) = value.get(4..) else {
        return true;
    };
    if entries.len() % 8 != 0 {
        return true;
    }
    entries.chunks_exact(8).any(|e| {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        (tag == ACL_NAMED_USER || tag == ACL_NAMED_GROUP) && perm & bits != 0
    })
}

/// Can users other than the owner and the group read or write `file`? When its mode lets "others"
/// in and every folder above it lets them pass (`o+x`, or a folder ACL giving a named user or group
/// search): a key in a 700 folder is safe. A file whose POSIX ACL gives a named user or group read or
/// write counts wherever it is (its mode bits do not tell who that is). A file that cannot be inspected
/// is left to the loader that reads it (which names the error). `(mode, acl)`.
pub(super) fn readable_by_others(file: &Path) -> Option<(u32, bool)> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file).ok()?.permissions().mode();
    if acl_grants(file, 0o6) {
        return Some((mode, true));
    }
    if mode & 0o006 == 0 {
        return None;
    }
    let real = std::fs::canonicalize(file).ok()?;
    for folder in real.ancestors().skip(1) {
        let m = std::fs::metadata(folder).ok()?.permissions().mode();
        if m & 0o001 == 0 && !acl_grants(folder, 0o1) {
            return None;
        }
    }
    Some((mode, false))
}
