//! Tags: the sets of keys cached under a tag, recorded as values are
//! stored, and invalidated together (`invalidate_tag`, `#[cache_evict]`
//! with `tags`). This module owns the algorithm (record lifetimes,
//! batching, the drain that bounds an invalidation's work); the backends
//! keep only their storage primitives (`tag`, `drain_tag`, `tagged`,
//! `untag` of [`Backend`]).
//!
//! A tag's name is rendered by `encoding::key::tag`, the one function the
//! attribute's templates and the public `tag(…)` share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;

use crate::backend::Backend;
use crate::encoding::key::{companion_key, internal_key};
use crate::engine::store::Inner;
use crate::error::{Error, Result};
use crate::observe::stats::Event;

/// How many keys of a tag one round of `invalidate_tag` handles.
pub(crate) const TAG_BATCH: usize = 500;
/// A bound on the rounds of one `invalidate_tag` (50 million keys), against
/// other invalidations of the same tag keeping its drain busy for ever.
const MAX_TAG_ROUNDS: usize = 100_000;
/// How long an invalidation waits, in all, for the cluster slot of its
/// tag's set to finish moving between nodes (moving the set aside touches
/// two keys of that slot, which a migrating slot refuses).
const MIGRATION_WAIT: Duration = Duration::from_secs(5);

impl Inner {
    /// The key of the set of keys cached under `tag`.
    pub(crate) fn tag_key(&self, tag: &str) -> String {
        internal_key(self.settings.namespace.as_deref(), "tag", tag)
    }

    /// Records `key` under each of `tags` for a value that lives `ttl`
    /// from now. The record lives `invalidation_window` longer: a value
    /// stored up to that long after its record (a slow computation) is
    /// still reached by its tags, as long as its own store may still be
    /// refused by an invalidation.
    pub(crate) async fn tag(&self, key: &str, tags: &[String], ttl: Duration) -> Result<()> {
        self.tag_many(&[key.to_owned()], tags, ttl).await
    }

    /// [`Inner::tag`] for each of `keys`, in one round trip (on a cluster,
    /// one per tag, in parallel).
    pub(crate) async fn tag_many(
        &self,
        keys: &[String],
        tags: &[String],
        ttl: Duration,
    ) -> Result<()> {
        let tag_keys: Vec<String> = tags.iter().map(|tag| self.tag_key(tag)).collect();
        if tag_keys.is_empty() {
            return Ok(());
        }
        let ttl = ttl.saturating_add(self.settings.invalidation_window);
        // At most TAG_BATCH members per script, so that no one call works
        // for long; the calls go out together. On a cluster, each tag's set
        // lives in a slot of its own: one call per set, each under the
        // breaker of its master.
        let sets: Vec<&[String]> = if self.backend.is_cluster() {
            tag_keys.iter().map(std::slice::from_ref).collect()
        } else {
            vec![&tag_keys]
        };
        try_join_all(keys.chunks(TAG_BATCH).flat_map(|chunk| {
            sets.iter()
                .map(move |&set| self.guarded_at(&set[0], self.backend.tag(chunk, set, ttl)))
        }))
        .await?;
        Ok(())
    }

    /// Invalidates every key recorded under `tag`; how many keys it
    /// invalidated. The tag set is first moved aside (constant time), so
    /// that the work is bounded by the keys recorded before the call, not
    /// by the records that callers of a hot tag make meanwhile (those
    /// belong to computations that start after it, and a computation that
    /// started before it cannot store over its tombstones). Then in batches
    /// of [`TAG_BATCH`] keys, each a few round trips bounded by
    /// `op_timeout`, so that no single Redis command works for long,
    /// however large the tag: read a batch of members, put a tombstone on
    /// each, drop them from the moved set. An invalidation that fails
    /// leaves the rest of the moved set, and the next one drains it first
    /// (as does one that starts while another drains).
    pub(crate) async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        let tag_key = self.tag_key(tag);
        let drain_key = companion_key(self.settings.namespace.as_deref(), &tag_key, "drain");
        let tombstone: Arc<[u8]> = self.settings.codec.encode_tombstone().into();
        let window = self.settings.invalidation_window;
        let mut invalidated = 0;
        let mut moved = false;
        let mut rounds = 0usize;
        let migrated_by = Instant::now() + MIGRATION_WAIT;
        let result = loop {
            if !moved {
                let drain = || self.backend.drain_tag(&tag_key, &drain_key);
                match self
                    .guarded_through_migration(&tag_key, migrated_by, drain)
                    .await
                {
                    Ok(now) => moved = now,
                    Err(err) => break Err(err),
                }
            }
            let batch = match self
                .guarded_at(&drain_key, self.backend.tagged(&drain_key, TAG_BATCH))
                .await
            {
                Ok(batch) => batch,
                Err(err) => break Err(err),
            };
            rounds += 1;
            if batch.is_empty() {
                // Drained: done if this call's set was in it; else the
                // earlier drain is over and this call's set moves next.
                if moved {
                    break Ok(invalidated);
                }
                if rounds > MAX_TAG_ROUNDS {
                    // The tag is not named: it may hold user input.
                    break Err(Error::Redis(
                        "tag not invalidated: other invalidations of it kept its drain busy".into(),
                    ));
                }
                continue;
            }
            // Every member, even one whose record expired: its value may
            // outlive the record, and a tombstone where nothing is costs
            // only the invalidation window.
            let live: Vec<(String, Arc<[u8]>)> = batch
                .iter()
                .map(|(key, _)| (key.clone(), tombstone.clone()))
                .collect();
            let tombstones = self.set_many(&live, window).await;
            // Even if a write failed: some tombstones may have landed.
            for (key, _) in &live {
                self.wrote(key);
            }
            if let Some(Err(err)) = tombstones.into_iter().find(Result::is_err) {
                break Err(err);
            }
            invalidated += live.len() as u64;
            if let Err(err) = self
                .guarded_at(&drain_key, self.backend.untag(&drain_key, &batch))
                .await
            {
                break Err(err);
            }
            if moved && batch.len() < TAG_BATCH {
                break Ok(invalidated);
            }
            if rounds > MAX_TAG_ROUNDS {
                break Err(Error::Redis(
                    "tag only partly invalidated: its drain never emptied".into(),
                ));
            }
        };
        for _ in 0..invalidated {
            self.count(None, Event::invalidations);
        }
        result
    }
}
