//! `GetStatus`: the pipeline's status composed from the store (positions, log, versions, dead
//! letters), the projector's applied offsets, rebuild progress and the broker's watermarks.

use touchline_core::EventStore as _;
use touchline_proto::v1;

use super::wire::{count, wire_rebuild, wire_replay};
use super::{AdminService, STATUS_TIMEOUT};
use crate::Error;

impl AdminService {
    /// The pipeline's status (also what `/metrics` reports as lag). Blocks on the broker for up
    /// to a few seconds: call it off the async threads.
    ///
    /// # Errors
    /// When the store fails.
    pub fn status(&self) -> Result<v1::GetStatusResponse, Error> {
        let context = &self.context;
        let store = &context.store;
        let stored = store.positions(&context.stream)?;
        let applied = context.applied.borrow().clone();
        // Each partition's, as far as its leader answers.
        let marks = context
            .probe
            .watermarks_each(&context.partitions, STATUS_TIMEOUT);
        let partitions = context
            .partitions
            .iter()
            .map(|partition| {
                let (low, high) = marks.get(partition).copied().unwrap_or((-1, -1));
                let log_end = stored.get(partition).map_or(0, |p| p.next_offset);
                let projected = applied.get(partition).copied().unwrap_or(0);
                v1::PartitionStatus {
                    partition: *partition,
                    low_watermark: low,
                    high_watermark: high,
                    log_end_offset: log_end,
                    projected_offset: projected,
                    // What is left to read: records below the low watermark are gone (retention)
                    // and cannot be read any more.
                    lag: if high < 0 {
                        -1
                    } else {
                        (high - projected.max(low)).max(0)
                    },
                }
            })
            .collect();
        let rebuilds = context.rebuilds.progress();
        let projections = store
            .projection_versions()
            .into_iter()
            .map(|(projection, versions)| {
                let mut list = vec![v1::ProjectionVersion {
                    version: versions.active,
                    state: v1::VersionState::Active.into(),
                }];
                list.extend(versions.building.map(|version| v1::ProjectionVersion {
                    version,
                    state: v1::VersionState::Building.into(),
                }));
                list.extend(
                    versions
                        .dropping
                        .iter()
                        .map(|version| v1::ProjectionVersion {
                            version: *version,
                            state: v1::VersionState::Dropping.into(),
                        }),
                );
                v1::ProjectionStatus {
                    name: projection.name().to_owned(),
                    active_version: versions.active,
                    versions: list,
                    last_rebuild: rebuilds.get(&projection).map(wire_rebuild),
                }
            })
            .collect();
        let replays = self.replays();
        Ok(v1::GetStatusResponse {
            cluster_id: context.stream.cluster_id.clone(),
            topic: context.stream.topic.clone(),
            kafka_reachable: !marks.is_empty(),
            projector_state: if context.projector_stopped.is_cancelled() {
                "stopped"
            } else {
                "running"
            }
            .to_owned(),
            partitions,
            log_events: count(store.log_len()),
            log_durable_events: store.durable_sequence(),
            store_bytes: store.size_on_disk()?,
            projections,
            dead_letters: count(store.dead_letter_count()),
            replay_running: replays.running,
            caught_up: context.caught_up.load(std::sync::atomic::Ordering::Acquire),
            backup_running: self.backups.running(),
            last_backup: self.backups.last().map(|written| v1::LastBackup {
                taken_at: Some(touchline_proto::convert::timestamp(written.taken_at)),
                events: written.events,
                bytes: written.bytes,
            }),
            replay: replays
                .last
                .as_ref()
                .map(|progress| wire_replay(&progress.borrow())),
        })
    }
}
