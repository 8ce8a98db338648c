//! The requests each user has in flight on the web door, at most `[http] max_requests_per_user`: a
//! slot is taken once a request is authorized and given back when its answer's body has been sent
//! or dropped (the client gone), so that one user cannot hold every worker of the archive's HTTP
//! server with answers it never reads.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};

type Counts = Arc<Mutex<HashMap<String, usize>>>;

/// The count of requests in flight per user; an entry exists only while it is above zero.
#[derive(Debug, Default)]
pub(super) struct InFlight(Counts);

/// One request's place in its user's count, given back on drop.
#[derive(Debug)]
pub(super) struct Slot {
    counts: Counts,
    user: String,
}

impl InFlight {
    /// A slot for `user`, unless `limit` requests of theirs are in flight already.
    pub(super) fn take(&self, user: &str, limit: usize) -> Option<Slot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.get(user).copied().unwrap_or(0);
        if n >= limit {
            return None;
        }
        counts.insert(user.to_string(), n + 1);
        Some(Slot {
            counts: self.0.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match counts.get_mut(&self.user) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                counts.remove(&self.user);
            }
        }
    }
}

/// A response body that holds its request's slot until it is done with.
pub(super) struct WithSlot<B> {
    pub(super) body: B,
    pub(super) _slot: Slot,
}

impl<B: Body + Unpin> Body for WithSlot<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_user_and_given_back() {
        let f = InFlight::default();
        let a1 = f.take("alice", 2).expect("first");
        let a2 = f.take("alice", 2).expect("second");
        assert!(f.take("alice", 2).is_none(), "a third over the limit");
        let b = f.take("bob", 2).expect("another user's own count");
        drop(a1);
        let a3 = f.take("alice", 2).expect("a slot came back");
        drop((a2, a3, b));
        assert!(
            f.0.lock().expect("lock").is_empty(),
            "no entry is kept once nothing is in flight"
        );
    }
}
