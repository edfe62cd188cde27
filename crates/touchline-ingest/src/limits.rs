//! Admission control: a token bucket per partner (events per second with a burst), a cap on the
//! `PublishStream` calls one partner keeps open, and the `grpc-timeout` of a call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use touchline_core::PartnerId;

/// Token buckets, one per partner, refilled continuously.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<PartnerId, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    /// Takes `cost` tokens from `partner`'s bucket (rate `rate` per second, capacity `burst`). A
    /// batch larger than the burst passes when the bucket is full, and leaves it in debt: every
    /// event is charged.
    ///
    /// # Errors
    /// How long to wait until the bucket holds `cost` tokens (a full bucket for a batch larger
    /// than the burst); nothing is taken then.
    pub fn try_take(
        &self,
        partner: &PartnerId,
        rate: f64,
        burst: f64,
        cost: usize,
    ) -> Result<(), Duration> {
        self.refilled(partner, rate, burst, cost, |tokens, cost| {
            let needed = cost.min(burst);
            if *tokens >= needed {
                *tokens -= cost;
                Ok(())
            } else {
                Err(wait_for(needed - *tokens, rate))
            }
        })
    }

    /// Takes `cost` tokens from `partner`'s bucket whether it holds them or not (it may go into
    /// debt) and returns how long to wait until they are paid for: zero when the bucket held them,
    /// and the whole debt, however long (a partner far over its rate would otherwise get through
    /// faster than it). Callers that wait are served in the order they took, and
    /// [`Self::try_take`] refuses while the bucket is in debt.
    pub fn take_owing(&self, partner: &PartnerId, rate: f64, burst: f64, cost: usize) -> Duration {
        self.refilled(partner, rate, burst, cost, |tokens, cost| {
            *tokens -= cost;
            if *tokens >= 0.0 {
                Duration::ZERO
            } else {
                paid_in(-*tokens, rate)
            }
        })
    }

    /// Gives back `cost` tokens taken for a batch that was then dropped unpublished (its stream
    /// ended first), up to the bucket's capacity.
    pub fn refund(&self, partner: &PartnerId, rate: f64, burst: f64, cost: usize) {
        self.refilled(partner, rate, burst, cost, |tokens, cost| {
            *tokens = (*tokens + cost).min(burst);
        });
    }

    /// Refills `partner`'s bucket for the time since it was last used, then lets `take` take
    /// `cost` from its tokens.
    #[allow(clippy::cast_precision_loss, reason = "batch sizes are far below 2^52")]
    fn refilled<R>(
        &self,
        partner: &PartnerId,
        rate: f64,
        burst: f64,
        cost: usize,
        take: impl FnOnce(&mut f64, f64) -> R,
    ) -> R {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.entry(partner.clone()).or_insert(Bucket {
            tokens: burst,
            refilled_at: now,
        });
        let elapsed = now.duration_since(bucket.refilled_at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refilled_at = now;
        take(&mut bucket.tokens, cost as f64)
    }
}

/// How long `tokens` take to come back at `rate` per second, at least 1 ms
/// ([`Duration::MAX`] for what no duration holds).
fn paid_in(tokens: f64, rate: f64) -> Duration {
    let seconds = (tokens / rate.max(f64::MIN_POSITIVE)).max(0.001);
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

/// How long to wait before trying again to take `tokens` at `rate` per second: as
/// [`paid_in`], at most an hour (a refused call's `RetryInfo`, not a wait of the server's).
fn wait_for(tokens: f64, rate: f64) -> Duration {
    paid_in(tokens, rate).min(Duration::from_secs(3600))
}

/// Open `PublishStream` calls per partner.
#[derive(Debug, Default, Clone)]
pub struct StreamCounter {
    open: Arc<Mutex<HashMap<PartnerId, usize>>>,
}

/// Holds one call slot of a partner; frees it when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    counter: StreamCounter,
    partner: PartnerId,
}

impl StreamCounter {
    /// A slot for one more stream of `partner`, unless it already has `max` open.
    #[must_use]
    pub fn try_open(&self, partner: &PartnerId, max: usize) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(partner.clone()).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(StreamSlot {
            counter: self.clone(),
            partner: partner.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .counter
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.partner) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.partner);
            }
        }
    }
}

/// Server-wide in-flight slots one partner may hold at once, for its unary calls and its stream
/// batches together: a semaphore per partner (partners are those of the partners file, so the
/// map is bounded by it). Unary calls that find none free are refused; stream batches wait.
#[derive(Debug, Clone)]
pub struct PartnerPermits {
    max: usize,
    semaphores: Arc<Mutex<HashMap<PartnerId, Arc<Semaphore>>>>,
}

impl PartnerPermits {
    /// `max` slots per partner, never all of the server's `slots` when there are more than one,
    /// so that another partner always finds one.
    #[must_use]
    pub fn new(max: usize, slots: usize) -> Self {
        Self {
            max: max.min(slots.saturating_sub(1).max(1)).max(1),
            semaphores: Arc::default(),
        }
    }

    /// How many slots one partner may hold.
    #[must_use]
    pub fn max(&self) -> usize {
        self.max
    }

    fn semaphore(&self, partner: &PartnerId) -> Arc<Semaphore> {
        let mut semaphores = self
            .semaphores
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            semaphores
                .entry(partner.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max))),
        )
    }

    /// `partner`'s semaphore, and how many permits it has in all.
    #[must_use]
    pub fn of(&self, partner: &PartnerId) -> (Arc<Semaphore>, usize) {
        (self.semaphore(partner), self.max)
    }

    /// One of `partner`'s slots, if one is free now.
    #[must_use]
    pub fn try_take(&self, partner: &PartnerId) -> Option<OwnedSemaphorePermit> {
        self.semaphore(partner).try_acquire_owned().ok()
    }

    /// One of `partner`'s slots, once one is free (in the order asked); `None` only if its
    /// semaphore were closed, which nothing does.
    pub async fn take(&self, partner: &PartnerId) -> Option<OwnedSemaphorePermit> {
        self.semaphore(partner).acquire_owned().await.ok()
    }
}

/// The `grpc-timeout` of a call (`<digits><H|M|S|m|u|n>`), as a duration.
#[must_use]
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partner(id: &str) -> PartnerId {
        PartnerId::parse(id).expect("valid id")
    }

    #[test]
    fn buckets_allow_the_burst_then_ask_to_wait_and_are_per_partner() {
        let limiter = RateLimiter::default();
        let a = partner("a");
        assert!(limiter.try_take(&a, 10.0, 100.0, 60).is_ok());
        assert!(limiter.try_take(&a, 10.0, 100.0, 40).is_ok());
        let wait = limiter
            .try_take(&a, 10.0, 100.0, 20)
            .expect_err("empty bucket");
        assert!(
            wait > Duration::from_millis(1500) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        assert!(
            limiter.try_take(&partner("b"), 10.0, 100.0, 100).is_ok(),
            "another partner is unaffected"
        );
    }

    #[test]
    fn owing_takes_now_and_waits_in_turn_while_a_refusal_takes_nothing() {
        let limiter = RateLimiter::default();
        let a = partner("a");
        assert_eq!(limiter.take_owing(&a, 10.0, 100.0, 100), Duration::ZERO);
        let first = limiter.take_owing(&a, 10.0, 100.0, 20);
        let second = limiter.take_owing(&a, 10.0, 100.0, 20);
        assert!(
            first > Duration::from_millis(1900) && first <= Duration::from_secs(2),
            "{first:?}"
        );
        assert!(
            second > first + Duration::from_millis(1900),
            "the second waits behind the first: {first:?} then {second:?}"
        );
        // In debt: a plain take is refused (and takes nothing) until the debt is paid.
        let refused = limiter.try_take(&a, 10.0, 100.0, 1).expect_err("in debt");
        assert!(refused > second, "{refused:?}");
    }

    #[test]
    fn a_batch_larger_than_the_burst_passes_on_a_full_bucket_and_is_charged_whole() {
        let limiter = RateLimiter::default();
        let a = partner("a");
        // Rate 10/s, burst 10: a batch of 1,000 passes once, then the bucket owes 990 tokens.
        assert_eq!(limiter.try_take(&a, 10.0, 10.0, 1000), Ok(()));
        let wait = limiter
            .try_take(&a, 10.0, 10.0, 1000)
            .expect_err("the debt of the first batch");
        assert!(wait > Duration::from_secs(99), "{wait:?}");
        let one = limiter.try_take(&a, 10.0, 10.0, 1).expect_err("in debt");
        assert!(one > Duration::from_secs(98), "{one:?}");
        // A stream batch larger than the burst waits for all of its events too.
        let b = partner("b");
        let owed = limiter.take_owing(&b, 10.0, 10.0, 1000);
        assert!(owed > Duration::from_secs(98), "{owed:?}");
    }

    #[test]
    fn a_stream_owes_its_whole_debt_however_long() {
        // Rate 1/s: ten batches of 1,000 owe about 1,000 s more each, far past an hour (a cap
        // on the wait let a partner publish at several times its rate).
        let limiter = RateLimiter::default();
        let a = partner("a");
        let waits: Vec<Duration> = (0..10)
            .map(|_| limiter.take_owing(&a, 1.0, 1.0, 1000))
            .collect();
        for (n, wait) in (1_u64..).zip(&waits) {
            let owed = Duration::from_secs(n * 1000 - 1);
            assert!(
                *wait > owed - Duration::from_secs(1) && *wait <= owed,
                "batch {n}: {wait:?}"
            );
        }
        // The hint of a refused call stays at most an hour.
        let refused = limiter.try_take(&a, 1.0, 1.0, 1).expect_err("in debt");
        assert_eq!(refused, Duration::from_secs(3600));
        // A debt no duration holds.
        assert_eq!(paid_in(1.0, f64::MIN_POSITIVE), Duration::MAX);
    }

    #[test]
    fn a_refund_pays_back_what_a_dropped_batch_owed() {
        let limiter = RateLimiter::default();
        let a = partner("a");
        assert_eq!(limiter.take_owing(&a, 10.0, 100.0, 100), Duration::ZERO);
        let owed = limiter.take_owing(&a, 10.0, 100.0, 50);
        assert!(owed > Duration::from_secs(4), "{owed:?}");
        limiter.refund(&a, 10.0, 100.0, 50);
        let next = limiter.take_owing(&a, 10.0, 100.0, 10);
        assert!(next <= Duration::from_secs(1), "the debt is gone: {next:?}");
        // Never above the capacity.
        limiter.refund(&a, 10.0, 100.0, 100);
        limiter.refund(&a, 10.0, 100.0, 100);
        assert_eq!(limiter.try_take(&a, 10.0, 100.0, 100), Ok(()));
        assert!(limiter.try_take(&a, 10.0, 100.0, 1).is_err());
    }

    #[test]
    fn stream_slots_are_counted_per_partner_and_freed_on_drop() {
        let counter = StreamCounter::default();
        let a = partner("a");
        let first = counter.try_open(&a, 2);
        let second = counter.try_open(&a, 2);
        assert!(first.is_some() && second.is_some());
        assert!(counter.try_open(&a, 2).is_none());
        assert!(counter.try_open(&partner("b"), 2).is_some());
        drop(first);
        assert!(counter.try_open(&a, 2).is_some());
    }

    #[test]
    fn grpc_timeouts_are_parsed() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&metadata), None);
        for (value, expected) in [
            ("250m", Duration::from_millis(250)),
            ("3S", Duration::from_secs(3)),
            ("1H", Duration::from_secs(3600)),
            ("10u", Duration::from_micros(10)),
        ] {
            metadata.insert("grpc-timeout", value.parse().expect("valid"));
            assert_eq!(grpc_timeout(&metadata), Some(expected));
        }
        for value in ["", "m", "12x", "123456789S", "-1S"] {
            metadata.insert("grpc-timeout", value.parse().expect("valid"));
            assert_eq!(grpc_timeout(&metadata), None, "{value}");
        }
    }
}
