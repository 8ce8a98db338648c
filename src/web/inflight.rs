//! The requests each user has in flight on the web door, at most `[http] max_requests_per_user`: a
//! place is taken once a request is authorized and given back when its answer's body has been sent
//! or dropped (the client gone), so that one user cannot hold every worker of the archive's HTTP
//! server with answers it never reads. A burst waits its turn (phase `request_slot`, bounded by
//! `[timeouts] upstream_response`, at most [`MAX_WAITING`] waiting) rather than being turned
//! away at once. Entries are per user and limit: after a reload that changes the limit, new
//! requests count against the new one while the old ones finish.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One user's places, and how many requests hold or wait for one (the entry goes at zero).
#[derive(Debug)]
struct Entry {
    places: Arc<Semaphore>,
    requests: usize,
}

/// How many requests of one user may wait for a place; more are refused at once.
const MAX_WAITING: usize = 256;

/// A user name and the limit in force when the entry was made.
type Key = (String, usize);
type Entries = Arc<Mutex<HashMap<Key, Entry>>>;

/// The places per user; an entry exists only while a request of theirs holds or waits for one.
#[derive(Debug, Default)]
pub(super) struct InFlight(Entries);

/// A request's claim on its user's entry, given back on drop.
#[derive(Debug)]
struct Claim {
    entries: Entries,
    key: Key,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(&self.key) {
            e.requests = e.requests.saturating_sub(1);
            if e.requests == 0 {
                entries.remove(&self.key);
            }
        }
    }
}

/// One request's place, held until the answer is done with.
#[derive(Debug)]
pub(super) struct Slot {
    _place: OwnedSemaphorePermit,
    _claim: Claim,
}

impl InFlight {
    /// A place for `user` among `limit`, now or within `wait`; `None` when none came free in
    /// time, or at once when [`MAX_WAITING`] requests of theirs are waiting already.
    pub(super) async fn take(&self, user: &str, limit: usize, wait: Duration) -> Option<Slot> {
        let key: Key = (user.to_string(), limit);
        let places = {
            let mut entries = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
                places: Arc::new(Semaphore::new(limit)),
                requests: 0,
            });
            if entry.requests >= limit.saturating_add(MAX_WAITING) {
                return None;
            }
            entry.requests += 1;
            entry.places.clone()
        };
        let claim = Claim {
            entries: self.0.clone(),
            key,
        };
        match tokio::time::timeout(wait, places.acquire_owned()).await {
            Ok(Ok(place)) => Some(Slot {
                _place: place,
                _claim: claim,
            }),
            // Never closed; if it were, no place.
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

/// A response body that holds its request's place until it is done with.
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

    /// Polls `f` once; true when it is still pending (it has registered as a waiter).
    async fn futures_poll_pending<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx).is_pending())).await
    }

    #[tokio::test]
    async fn places_are_per_user_a_burst_waits_and_nothing_is_kept() {
        let f = InFlight::default();
        let short = Duration::from_millis(50);
        let a1 = f.take("alice", 2, short).await.expect("first");
        let a2 = f.take("alice", 2, short).await.expect("second");
        assert!(f.take("alice", 2, short).await.is_none(), "a third in time");
        let b = f
            .take("bob", 2, short)
            .await
            .expect("another user's own places");
        // A third that waits gets the place the first gives back.
        let waiting = f.take("alice", 2, Duration::from_secs(5));
        let (a3, ()) = tokio::join!(waiting, async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a1);
        });
        let a3 = a3.expect("the place that came free");
        // MAX_WAITING waiting already: one more is refused without waiting.
        let long = Duration::from_secs(30);
        let mut waiters: Vec<_> = (0..MAX_WAITING)
            .map(|_| Box::pin(f.take("alice", 2, long)))
            .collect();
        for w in &mut waiters {
            assert!(futures_poll_pending(w).await, "a waiter got a place");
        }
        let at_once = std::time::Instant::now();
        assert!(f.take("alice", 2, long).await.is_none());
        assert!(at_once.elapsed() < Duration::from_secs(5), "it waited");
        drop(waiters);
        drop((a2, a3, b));
        assert!(
            f.0.lock().expect("lock").is_empty(),
            "no entry is kept once nothing holds or waits"
        );
    }
}
