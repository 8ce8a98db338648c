//! The move-as-get buffer: what connect holds for local clients (C-MOVE identifiers, command
//! fragments, failed-instance lists), counted against a cap per association (--move-buffer) and one
//! for all associations together (--move-buffer-total).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::dimse;

/// Default of --move-buffer: bytes held for one association.
pub const DEFAULT_BUFFER: usize = 1 << 20;
/// Default of --move-buffer-total: bytes held for all associations together.
pub const DEFAULT_BUFFER_TOTAL: usize = 16 << 20;
/// The smallest buffer accepted: one whole command set.
pub const MIN_BUFFER: usize = dimse::MAX_COMMAND_LENGTH;

/// How many bytes move-as-get may hold for local clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    pub per_association: usize,
    pub total: usize,
}

impl Default for BufferLimits {
    fn default() -> BufferLimits {
        BufferLimits {
            per_association: DEFAULT_BUFFER,
            total: DEFAULT_BUFFER_TOTAL,
        }
    }
}

/// The account of everything move-as-get holds, for the whole process.
#[derive(Debug)]
pub struct Buffer {
    limits: BufferLimits,
    held: AtomicUsize,
}

/// A reservation would pass a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Exceeded {
    #[error("the move-as-get buffer of this association ({0} bytes, --move-buffer) is full")]
    Association(usize),
    #[error("the move-as-get buffer of all associations ({0} bytes, --move-buffer-total) is full")]
    Total(usize),
}

impl Buffer {
    pub fn new(limits: BufferLimits) -> Arc<Buffer> {
        Arc::new(Buffer {
            limits,
            held: AtomicUsize::new(0),
        })
    }

    /// Bytes held now, by all associations.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// A new association's account.
    pub fn association(self: &Arc<Buffer>) -> Account {
        Account {
            buffer: self.clone(),
            held: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Add `n` to `counter` unless that passes `limit`.
fn add_within(counter: &AtomicUsize, n: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
            h.checked_add(n).filter(|t| *t <= limit)
        })
        .is_ok()
}

/// One association's share of the [`Buffer`].
#[derive(Debug, Clone)]
pub struct Account {
    buffer: Arc<Buffer>,
    held: Arc<AtomicUsize>,
}

impl Account {
    /// Nothing reserved yet; grow it as bytes arrive.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            account: self.clone(),
            bytes: 0,
        }
    }

    fn take(&self, n: usize) -> Result<(), Exceeded> {
        let limits = self.buffer.limits;
        if !add_within(&self.held, n, limits.per_association) {
            return Err(Exceeded::Association(limits.per_association));
        }
        if !add_within(&self.buffer.held, n, limits.total) {
            self.held.fetch_sub(n, Ordering::SeqCst);
            return Err(Exceeded::Total(limits.total));
        }
        Ok(())
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::SeqCst);
        self.buffer.held.fetch_sub(n, Ordering::SeqCst);
    }
}

/// Bytes held for one purpose (an identifier, a command), given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    account: Account,
    bytes: usize,
}

impl Reservation {
    /// Hold `n` more bytes, or say which cap that would pass (holding nothing more).
    pub fn grow(&mut self, n: usize) -> Result<(), Exceeded> {
        self.account.take(n)?;
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.account.give_back(self.bytes);
    }
}
