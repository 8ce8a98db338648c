//! The requests each user has in flight on the web door, at most `[http] max_requests_per_user`: a
//! place is taken once a request is authorized and given back when its answer's body has been sent
//! or dropped (the client gone), so that one user cannot hold every worker of the archive's HTTP
//! server with answers it never reads. A burst waits its turn (phase `request_slot`, bounded by
//! `[timeouts] upstream_response`) rather than being turned away at once.

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

type Entries = Arc<Mutex<HashMap<String, Entry>>>;

/// The places per user; an entry exists only while a request of theirs holds or waits for one.
#[derive(Debug, Default)]
pub(super) struct InFlight(Entries);

/// A request's claim on its user's entry, given back on drop.
#[derive(Debug)]
struct Claim {
    entries: Entries,
    user: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(&self.user) {
            e.requests = e.requests.saturating_sub(1);
            if e.requests == 0 {
                entries.remove(&self.user);
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
    /// A place for `user` among `limit` (the limit an entry was made with stays until it goes),
    /// now or within `wait`; `None` when none came free in time.
    pub(super) async fn take(&self, user: &str, limit: usize, wait: Duration) -> Option<Slot> {
        let places = {
            let mut entries = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let entry = entries.entry(user.to_string()).or_insert_with(|| Entry {
                places: Arc::new(Semaphore::new(limit)),
                requests: 0,
            });
            entry.requests += 1;
            entry.places.clone()
        };
        let claim = Claim {
            entries: self.0.clone(),
            user: user.to_string(),
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
        drop((a2, a3, b));
        assert!(
            f.0.lock().expect("lock").is_empty(),
            "no entry is kept once nothing holds or waits"
        );
    }
}
