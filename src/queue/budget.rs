//! The byte budget: how many bytes of stored records count against `--max-queue-bytes`, and
//! the only code that changes that count.
//!
//! A request *reserves* its records' bytes before it writes (refused whole if they would
//! pass the limit); a write that fails *releases* them; settling or purging *frees* what the
//! removed records held; a few things are *added* whatever the limit (a chunk's own overhead
//! once written, a dead letter, a quarantined chunk: they take disk all the same). After a
//! clean close the count is stored and taken as is at the next open; after a crash it is
//! counted again from the database, the same way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::error::QueueError;
use super::keys::CHUNK_PREFIX;
use super::layout::{CLEAN_CLOSE_KEY, DEAD_TREE, QUARANTINE_TREE, QUEUE_TREE, REJECTED_TREE};

/// Bytes counted against the limit for each stored value besides its own (its key, roughly).
pub(crate) const KEY_OVERHEAD: u64 = 16;

/// What a stored value of `len` bytes counts against the limit.
pub(crate) fn stored_size(len: usize) -> u64 {
    len as u64 + KEY_OVERHEAD
}

pub(crate) struct Budget {
    stored: AtomicU64,
    limit: u64,
    /// The last reservation was refused: the queue counts as full (for `/ready`) until
    /// space is freed, even if what is left would take a smaller request.
    at_limit: AtomicBool,
}

impl Budget {
    pub(crate) fn new(stored: u64, limit: u64) -> Budget {
        Budget {
            stored: AtomicU64::new(stored),
            limit,
            at_limit: AtomicBool::new(false),
        }
    }

    /// The bytes counted now.
    pub(crate) fn stored(&self) -> u64 {
        self.stored.load(Ordering::SeqCst)
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether the queue counts as full: at the limit, or its last reservation refused.
    pub(crate) fn is_full(&self) -> bool {
        self.stored() >= self.limit || self.at_limit.load(Ordering::SeqCst)
    }

    /// Takes `size` bytes of the limit, or refuses without touching anything.
    pub(crate) fn reserve(&self, size: u64) -> Result<(), QueueError> {
        let limit = self.limit;
        let reserved = self
            .stored
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |stored| {
                stored.checked_add(size).filter(|&total| total <= limit)
            })
            .map(|_| ())
            .map_err(|stored| QueueError::Full { stored, limit });
        self.at_limit.store(reserved.is_err(), Ordering::SeqCst);
        reserved
    }

    /// Counts bytes whatever the limit: they are on disk all the same.
    pub(crate) fn add(&self, bytes: u64) {
        self.stored.fetch_add(bytes, Ordering::SeqCst);
    }

    /// Gives back bytes reserved or added for records that are not (or no longer) stored,
    /// never below zero (a count that wrapped would refuse every append for good).
    pub(crate) fn release(&self, bytes: u64) {
        let _ = self
            .stored
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_sub(bytes))
            });
    }

    /// Gives back the bytes of records removed for good (delivered, purged): space that new
    /// calls may take, so the queue no longer counts as full for a refused reservation.
    pub(crate) fn free(&self, bytes: u64) {
        self.release(bytes);
        if bytes > 0 {
            self.at_limit.store(false, Ordering::SeqCst);
        }
    }
}

/// Bytes counted against the limit at open. After a clean `close` the count it recorded is
/// exact and is taken (and the mark removed, so that a crash from now on is noticed); after a
/// crash, or for an older database, the stored values are counted again ([`recount`]).
pub(crate) fn at_open(meta: &sled::Tree, db: &sled::Db) -> Result<u64, QueueError> {
    let recorded = meta
        .remove(CLEAN_CLOSE_KEY)?
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
        .map(u64::from_be_bytes);
    if let Some(bytes) = recorded {
        return Ok(bytes);
    }
    recount(db)
}

/// The bytes the stored values hold against the limit, counted from the database the way
/// the running count counts them: chunks, dead letters, rejected calls and quarantined
/// chunks, each with its key's overhead, and not the counters or the done-bits.
pub(crate) fn recount(db: &sled::Db) -> Result<u64, QueueError> {
    let mut stored = 0;
    for value in db
        .open_tree(QUEUE_TREE)?
        .scan_prefix([CHUNK_PREFIX])
        .values()
    {
        stored += stored_size(value?.len());
    }
    for name in [DEAD_TREE, REJECTED_TREE, QUARANTINE_TREE] {
        for value in db.open_tree(name)?.iter().values() {
            stored += stored_size(value?.len());
        }
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_reservation_leaves_the_count_and_marks_full_until_space_is_freed() {
        let budget = Budget::new(90, 100);
        assert!(budget.reserve(20).is_err());
        assert_eq!(budget.stored(), 90);
        assert!(budget.is_full());
        budget.release(5);
        assert!(budget.is_full(), "a release is not space freed");
        budget.free(5);
        assert!(!budget.is_full());
        budget.reserve(20).unwrap();
        assert_eq!(budget.stored(), 100);
    }

    #[test]
    fn the_count_never_goes_below_zero() {
        let budget = Budget::new(10, 100);
        budget.release(25);
        assert_eq!(budget.stored(), 0);
        budget.add(7);
        assert_eq!(budget.stored(), 7);
    }
}
