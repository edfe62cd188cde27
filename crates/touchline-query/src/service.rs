//! The `TimelineService` gRPC implementation. Store reads run on the blocking pool (a page may
//! scan up to thousands of entries), a bounded number at once ([`StoreReads`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use tonic::{Request, Response, Status};
use touchline_core::{
    CustomerId, EventStore, EventType, PartnerId, TimelineFilter, TimelineQuery, UnixNanos,
};
use touchline_projection::projector::Served;
use touchline_proto::convert::{TimelineEntryEncoder, journey_stage, wire_summary};
use touchline_proto::encoded::{self, timeline_service_server};
use touchline_proto::v1;

use crate::reads::StoreReads;
use crate::watch::{CursorError, Feed, Watch, Watchers, decode_cursor};
use crate::{Error, Result, metrics, page_token};

/// Entries per page when the request does not say.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// `WatchTimeline` calls open at once, by default: each holds a task, an inbox of its customer's
/// entries and up to 256 queued messages for its client.
pub const DEFAULT_MAX_WATCHES: usize = 1024;
/// How long `GetCustomerSummary` waits for the projector's flusher to make what it read durable
/// before it flushes the store itself (a projector that stopped flushing, or no feed to hear it).
const SUMMARY_FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long `GetCustomerSummary` waits, beyond [`SUMMARY_FLUSH_WAIT`], for its own flush of the
/// store (and for the one before it) before it answers `UNAVAILABLE` (`STORE_FLUSH_STALLED`).
const SUMMARY_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves timelines and summaries from a store. Cheap to clone.
#[derive(Clone)]
pub struct TimelineService {
    reads: StoreReads,
    feed: Option<Feed>,
    /// The watchers of `feed`: one reading of it, routed by customer.
    watchers: Option<Watchers>,
    /// A slot per running watcher (its task, inbox and queue), held until the watcher ends.
    watches: Arc<tokio::sync::Semaphore>,
    /// A permit per `WatchTimeline` response stream, held until the stream is dropped: twice the
    /// watchers' slots, so that a stream whose watcher ended while its client read nothing
    /// (what was queued stays for the client) still counts, and such streams cannot pile up
    /// without bound.
    watch_streams: Arc<tokio::sync::Semaphore>,
    /// How long a watcher waits for its client to take a message.
    watch_stall: std::time::Duration,
    shutdown: CancellationToken,
    /// The customers this node answers for.
    served: Arc<Served>,
    /// The check a call passed when it came: asked again while a `WatchTimeline` runs.
    authorize: Option<crate::admin::Authorize>,
    /// Held by the one flush of the store that summaries start at a time, until the flush
    /// returns: a flush that never returns holds one blocking thread, not one per call.
    flush_gate: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for TimelineService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TimelineService")
            .field("served", &self.served)
            .field("authorize", &self.authorize.is_some())
            .finish_non_exhaustive()
    }
}

impl TimelineService {
    /// A service without live timelines (`WatchTimeline` answers UNIMPLEMENTED), serving as many
    /// store reads at once as the cores.
    #[must_use]
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            reads: StoreReads::new(store, 0),
            feed: None,
            watchers: None,
            watches: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_WATCHES)),
            watch_streams: Arc::new(tokio::sync::Semaphore::new(2 * DEFAULT_MAX_WATCHES)),
            watch_stall: crate::watch::STALLED_AFTER,
            shutdown: CancellationToken::new(),
            served: Arc::default(),
            authorize: None,
            flush_gate: Arc::default(),
        }
    }

    /// Asks `authorize` again, every second, of the calls' credentials while a `WatchTimeline`
    /// runs: a token revoked meanwhile ends the watch with the check's error, as it would refuse
    /// a new call. The same check must guard every call (an interceptor).
    #[must_use]
    pub fn with_authorizer(mut self, authorize: crate::admin::Authorize) -> Self {
        self.authorize = Some(authorize);
        self
    }

    /// Serves only the customers of the partitions in `owned` (of the topic's `partitions`, the
    /// count ingest computes a customer's partition over): others are answered
    /// `FAILED_PRECONDITION` (`CUSTOMER_NOT_HERE`, with the customer's partition) rather than as
    /// customers without touchpoints. Empty `owned`: every customer.
    #[must_use]
    pub fn with_owned_partitions(mut self, partitions: i32, owned: &[i32]) -> Self {
        self.served = Arc::new(Served::new(partitions, owned));
        self
    }

    /// Refuses a customer whose partition this node does not own: its store has none of that
    /// customer's touchpoints, whatever the customer has elsewhere.
    fn served_here(&self, customer: &CustomerId) -> Result<()> {
        match self.served.elsewhere(customer) {
            None => Ok(()),
            Some(partition) => Err(Error::NotHere {
                customer_id: customer.to_string(),
                partition,
                owned: self.served.owned(),
            }),
        }
    }

    /// Serves live timelines from `feed` (the store's durable entries); watchers end when
    /// `shutdown` is cancelled, so that a graceful shutdown does not wait for them.
    #[must_use]
    pub fn with_feed(mut self, feed: Feed, shutdown: CancellationToken) -> Self {
        self.watchers = Some(Watchers::new(&feed));
        self.feed = Some(feed);
        self.shutdown = shutdown;
        self
    }

    /// At most `max` `WatchTimeline` watchers running at once, and twice that many response
    /// streams open (a watcher that ended as lagged leaves its stream to its client, with what
    /// was queued); more calls are refused with `RESOURCE_EXHAUSTED` (`TOO_MANY_WATCHES`) until
    /// one ends.
    #[must_use]
    pub fn with_max_watches(mut self, max: usize) -> Self {
        let max = max.min(tokio::sync::Semaphore::MAX_PERMITS / 2);
        self.watches = Arc::new(tokio::sync::Semaphore::new(max));
        self.watch_streams = Arc::new(tokio::sync::Semaphore::new(2 * max));
        self
    }

    /// A watcher whose client takes no message for `stall` (with its queue full) ends as lagged
    /// ([`crate::watch::STALLED_AFTER`] by default).
    #[must_use]
    pub fn with_watch_stall(mut self, stall: std::time::Duration) -> Self {
        self.watch_stall = stall;
        self
    }

    /// At most `concurrency` store reads at once (0: as many as the cores).
    #[must_use]
    pub fn with_read_concurrency(mut self, concurrency: usize) -> Self {
        self.reads = StoreReads::new(Arc::clone(self.reads.store()), concurrency);
        self
    }

    /// The tonic server for this service.
    #[must_use]
    pub fn into_server(self) -> timeline_service_server::TimelineServiceServer<Self> {
        timeline_service_server::TimelineServiceServer::new(self)
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

fn customer_id(value: String) -> Result<CustomerId> {
    CustomerId::parse(value).map_err(|error| invalid("customer_id", format!("customer_id {error}")))
}

/// Turns a request for `customer_id` (parsed from it first, to check that this node serves the
/// customer before anything else) into a store query, checking every other field.
fn timeline_query(
    customer_id: CustomerId,
    request: v1::GetTimelineRequest,
) -> Result<TimelineQuery> {
    let page_size = match usize::try_from(request.page_size).unwrap_or(usize::MAX) {
        0 => DEFAULT_PAGE_SIZE,
        size if size > MAX_PAGE_SIZE => {
            return Err(invalid(
                "page_size",
                format!("page_size is at most {MAX_PAGE_SIZE}"),
            ));
        }
        size => size,
    };
    // Bounds far out (9999-12-31 as an open end, say) are taken as the earliest or latest instant.
    let bound = |at: prost_types::Timestamp, field: &'static str| {
        UnixNanos::bound_from_parts(at.seconds, at.nanos)
            .ok_or_else(|| invalid(field, format!("{field} is not a valid timestamp")))
    };
    // Compared as sent: two bounds past 2262 are both the latest instant, and may be inverted.
    let inverted = matches!(
        (&request.from, &request.to),
        (Some(from), Some(to)) if (from.seconds, from.nanos) > (to.seconds, to.nanos)
    );
    let from = request.from.map(|at| bound(at, "from")).transpose()?;
    let to = request.to.map(|at| bound(at, "to")).transpose()?;
    if inverted {
        return Err(invalid("to", "to is before from"));
    }
    let partners = request
        .partner_ids
        .into_iter()
        .map(|partner| {
            PartnerId::parse(partner)
                .map_err(|error| invalid("partner_ids", format!("partner id {error}")))
        })
        .collect::<Result<BTreeSet<_>>>()?;
    let stages = request
        .stages
        .into_iter()
        .map(|number| {
            journey_stage(number)
                .ok_or_else(|| invalid("stages", format!("stage {number} is not a journey stage")))
        })
        .collect::<Result<BTreeSet<_>>>()?;
    let event_types = request
        .types
        .into_iter()
        .map(|name| match EventType::parse(name.as_str()) {
            Ok(_) => Ok(name),
            Err(error) => Err(invalid("types", format!("event type {error}"))),
        })
        .collect::<Result<BTreeSet<_>>>()?;
    let filter = TimelineFilter {
        from,
        to,
        partners,
        event_types,
        stages,
    };
    let after = if request.page_token.is_empty() {
        None
    } else {
        let filters = page_token::filter_fingerprint(&filter);
        Some(
            page_token::decode(&customer_id, filters, &request.page_token).ok_or_else(|| {
                invalid(
                    "page_token",
                    "page_token was not issued for this customer and these filters",
                )
            })?,
        )
    };
    Ok(TimelineQuery {
        customer_id,
        page_size,
        after,
        filter,
        // Set when the store is read: what is durable then.
        up_to_sequence: None,
    })
}

#[tonic::async_trait]
impl timeline_service_server::TimelineService for TimelineService {
    type WatchTimelineStream = crate::watch::WatchStream;

    async fn get_timeline(
        &self,
        request: Request<v1::GetTimelineRequest>,
    ) -> Result<Response<encoded::TimelinePage>, Status> {
        let started = Instant::now();
        let result = self.timeline_page(request).await;
        metrics::observe("GetTimeline", started);
        result
    }

    async fn get_customer_summary(
        &self,
        request: Request<v1::GetCustomerSummaryRequest>,
    ) -> Result<Response<v1::CustomerSummary>, Status> {
        let started = Instant::now();
        let result = self.customer_summary(request).await;
        metrics::observe("GetCustomerSummary", started);
        result
    }

    async fn watch_timeline(
        &self,
        request: Request<v1::WatchTimelineRequest>,
    ) -> Result<Response<Self::WatchTimelineStream>, Status> {
        let still_allowed = self
            .authorize
            .as_ref()
            .map(|authorize| crate::StillAllowed::of_call(authorize, request.metadata()));
        let request = request.into_inner();
        let customer = customer_id(request.customer_id)?;
        self.served_here(&customer)?;
        let after = if request.cursor.is_empty() {
            0
        } else {
            decode_cursor(&customer, self.reads.store().log_id(), &request.cursor).map_err(
                |error| match error {
                    CursorError::NotForCustomer => {
                        invalid("cursor", "cursor was not issued for this customer")
                    }
                    CursorError::OtherLog => invalid(
                        "cursor",
                        "cursor is a position in another node's log (or in this node's before its store was reset); watch again without a cursor",
                    ),
                },
            )?
        };
        let Some(watchers) = &self.watchers else {
            return Err(Status::unimplemented(
                "this node does not serve live timelines",
            ));
        };
        // A cursor holds a sequence of the log that issued it, which was durable then; one past
        // this log's end (a cursor of the first format, which does not name its log) comes from
        // another log, and would silently skip this log's entries up to it.
        if after > self.reads.store().durable_sequence() {
            return Err(Status::from(invalid(
                "cursor",
                "cursor is past the end of this node's log: it was issued by another node, or before this node's store was reset; watch again without a cursor",
            )));
        }
        let too_many = |what: &str| Error::Rejected {
            code: tonic::Code::ResourceExhausted,
            reason: "TOO_MANY_WATCHES",
            message: format!(
                "every {what} (query.max-watches): try again later, or another replica"
            ),
        };
        // Held by the response stream: until the client goes or has read it to its end.
        let open = Arc::clone(&self.watch_streams)
            .try_acquire_owned()
            .map_err(|_| too_many("live timeline stream this node keeps at once is open, twice its watchers, counting those whose watcher ended while the client read nothing"))?;
        // Held by the watcher's task: until its client goes, stalls, or the watch ends.
        let slot = Arc::clone(&self.watches)
            .try_acquire_owned()
            .map_err(|_| too_many("live timeline this node serves at once is open"))?;
        let live = watchers.subscribe(customer.clone());
        let watch = Watch {
            reads: self.reads.clone(),
            customer,
            after,
            live,
            shutdown: self.shutdown.clone(),
            still_allowed,
            stalled_after: self.watch_stall,
        };
        Ok(Response::new(watch.stream(Some(slot), open)))
    }
}

impl TimelineService {
    /// Waits until the log is durable through `sequence`: the projector's flusher gets there
    /// within a batch or two, and each of its flushes is heard on the feed (a flush raises the
    /// durable sequence before it tells the feed, so subscribing after the first look misses
    /// none). Past [`SUMMARY_FLUSH_WAIT`], or without a feed, the store is flushed here (a flush
    /// covers everything applied before it starts). After a failed write the store refuses the
    /// flush, so a read of what that write may have left visible fails (`STORE_FAILED`).
    async fn durable_through(&self, sequence: u64) -> std::result::Result<(), Status> {
        use tokio::sync::broadcast::error::RecvError;
        let store = self.reads.store();
        if store.durable_sequence() >= sequence {
            return Ok(());
        }
        if let Some(mut flushes) = self.feed.as_ref().map(Feed::subscribe) {
            let deadline = tokio::time::Instant::now() + SUMMARY_FLUSH_WAIT;
            while store.durable_sequence() < sequence {
                match tokio::time::timeout_at(deadline, flushes.recv()).await {
                    Ok(Ok(_) | Err(RecvError::Lagged(_))) => {}
                    Ok(Err(RecvError::Closed)) | Err(_) => break,
                }
            }
        }
        if store.durable_sequence() >= sequence {
            return Ok(());
        }
        // Without a read permit: this waits behind the projector's flush, not beside the reads.
        // One flush at a time from here, its task holding the gate until the flush returns, and
        // calls that wait at once share it (each checks again when its turn comes). A store whose
        // flush does not return (sled 0.34 can wait for ever in a flush after it failed to create
        // a file) then holds one blocking thread, and the calls give up at their limit.
        let stalled = || {
            Status::from(Error::Rejected {
                code: tonic::Code::Unavailable,
                reason: "STORE_FLUSH_STALLED",
                message: format!(
                    "the store's flush has not completed within {} s: the summary cannot be served durable; see the node's log",
                    SUMMARY_FLUSH_LIMIT.as_secs()
                ),
            })
        };
        let deadline = tokio::time::Instant::now() + SUMMARY_FLUSH_LIMIT;
        let gate = tokio::time::timeout_at(deadline, Arc::clone(&self.flush_gate).lock_owned())
            .await
            .map_err(|_| stalled())?;
        if store.durable_sequence() >= sequence {
            return Ok(());
        }
        let store = Arc::clone(store);
        let flush = tokio::task::spawn_blocking(move || {
            let _gate = gate;
            store.flush_through(sequence)
        });
        tokio::time::timeout_at(deadline, flush)
            .await
            .map_err(|_| stalled())?
            .map_err(Error::from)?
            .map_err(Error::from)?;
        Ok(())
    }

    async fn timeline_page(
        &self,
        request: Request<v1::GetTimelineRequest>,
    ) -> Result<Response<encoded::TimelinePage>, Status> {
        let mut request = request.into_inner();
        // Whether this node serves the customer comes first: a router learns where to go even
        // when another field is wrong (as for the other calls).
        let customer = customer_id(std::mem::take(&mut request.customer_id))?;
        self.served_here(&customer)?;
        let mut query = timeline_query(customer, request)?;
        let filters = page_token::filter_fingerprint(&query.filter);
        let (customer_id, entries, next) = self
            .reads
            .run(move |store| {
                // Durable entries only, as WatchTimeline sends them.
                query.up_to_sequence = Some(store.durable_sequence());
                // Each entry written for the wire from the stored one as it is read, into one
                // buffer for the page: no entry is decoded into strings of its own (decoding,
                // converting and encoding them took about a quarter of a read's CPU,
                // BENCHMARKS.md).
                let mut encoder = TimelineEntryEncoder::default();
                let mut encoded = Vec::new();
                let mut ends = Vec::new();
                let next = store.timeline_views(&query, &mut |entry| {
                    encoder.encode(entry, &mut encoded);
                    ends.push(encoded.len());
                })?;
                let encoded = bytes::Bytes::from(encoded);
                let mut start = 0;
                let entries = ends
                    .into_iter()
                    .map(|end| {
                        let entry = encoded.slice(start..end);
                        start = end;
                        entry
                    })
                    .collect();
                Ok((query.customer_id, entries, next))
            })
            .await?;
        Ok(Response::new(encoded::TimelinePage {
            entries,
            next_page_token: next
                .map(|cursor| page_token::encode(&customer_id, filters, cursor))
                .unwrap_or_default(),
        }))
    }

    async fn customer_summary(
        &self,
        request: Request<v1::GetCustomerSummaryRequest>,
    ) -> Result<Response<v1::CustomerSummary>, Status> {
        let customer_id = customer_id(request.into_inner().customer_id)?;
        self.served_here(&customer_id)?;
        let lookup = customer_id.clone();
        // The summary refers to its first and last touch; they are read from the timeline.
        let found = self
            .reads
            .run(move |store| {
                let Some(summary) = store.summary(&lookup)? else {
                    return Ok(None);
                };
                let first = store.timeline_entry(&lookup, summary.first_touch.cursor())?;
                let last = store.timeline_entry(&lookup, summary.last_touch.cursor())?;
                Ok(Some((summary, first, last, store.visible_sequence())))
            })
            .await?;
        let (summary, first, last, visible) = found.ok_or(Error::CustomerNotFound {
            customer_id: customer_id.to_string(),
        })?;
        // A summary is rewritten in place by every batch that folds into it, so unlike timeline
        // entries it cannot be read as of the durable end of the log: what was read is served
        // once the log is durable as far as a read could see then (invariant 6; a crash could
        // take it back otherwise).
        self.durable_through(visible).await?;
        Ok(Response::new(wire_summary(
            &summary,
            first.as_ref(),
            last.as_ref(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(change: impl FnOnce(&mut v1::GetTimelineRequest)) -> Result<TimelineQuery> {
        let mut request = v1::GetTimelineRequest::default();
        change(&mut request);
        timeline_query(CustomerId::parse("alice").expect("valid id"), request)
    }

    fn refused_field(result: Result<TimelineQuery>) -> &'static str {
        match result {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn an_invalid_event_type_is_refused_and_a_valid_one_filters() {
        for bad in ["", "Delivery.Late", "x".repeat(65).as_str()] {
            assert_eq!(
                refused_field(query(|request| request.types = vec![bad.to_owned()])),
                "types"
            );
        }
        let filtered =
            query(|request| request.types = vec!["delivery.late".to_owned()]).expect("valid");
        assert!(filtered.filter.event_types.contains("delivery.late"));
    }

    #[test]
    fn bounds_far_out_are_the_earliest_and_latest_instants() {
        let at = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        let open = query(|request| {
            request.from = at(-62_135_596_800, 0); // 0001-01-01
            request.to = at(253_402_300_799, 999_999_999); // 9999-12-31
        })
        .expect("valid timestamps");
        assert_eq!(open.filter.from, Some(UnixNanos(i64::MIN)));
        assert_eq!(open.filter.to, Some(UnixNanos(i64::MAX)));
        let near = query(|request| request.to = at(1_800_000_000, 5)).expect("valid");
        assert_eq!(near.filter.to, Some(UnixNanos(1_800_000_000_000_000_005)));
        assert_eq!(
            refused_field(query(|request| request.to = at(253_402_300_800, 0))),
            "to"
        );
        // Inverted past 2262, where both are the latest instant.
        assert_eq!(
            refused_field(query(|request| {
                request.from = at(13_000_000_000, 0);
                request.to = at(10_000_000_000, 0);
            })),
            "to"
        );
        assert_eq!(
            refused_field(query(|request| request.from = at(0, -1))),
            "from"
        );
        assert_eq!(
            refused_field(query(|request| request.from = at(0, 1_000_000_000))),
            "from"
        );
    }
}
