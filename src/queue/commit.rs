//! Group commit: one task makes the queue durable for every writer waiting on it.
//!
//! A writer inserts its calls, then waits for the first flush that *starts* after its insert.
//! One committer task runs flushes back to back while anyone waits, so 64 concurrent requests
//! share a handful of flushes instead of running 64 in series. A flush is sled's `flush()`
//! (which writes with `sync_file_range`, enough to survive `kill -9`) followed by an
//! `fdatasync` of sled's data file (what survives power loss; see `docs/sled.md`). The
//! *blob* files sled writes for log messages over a quarter of a segment need nothing here:
//! the patched sled syncs each one, and its name, before it writes a pointer to it.
//! Only this task ever flushes: sled has lost-wakeup bugs with several flushes in flight.
//!
//! In `fsync` mode the appender hands each written request's answer to the committer
//! ([`GroupCommit::answer_after_flush`]), which sends it when the next flush to start has
//! finished: one wake-up per request instead of one for the write and one for the flush.
//! So the answers' types ([`AppendError`], [`Reply`]) live here, and the appender imports
//! them: imports run appender → committer, never back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

use super::error::QueueError;

/// How long a writer waits for its answer (written, then in `fsync` mode flushed) before
/// giving up with an error.
pub(crate) const FLUSH_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// How long the database stays clean before the log segment buffers sled keeps for reuse
/// (up to four, 2 MiB each) are freed. Long enough that a lull between requests keeps them.
const RELEASE_BUFFERS_AFTER: Duration = Duration::from_secs(1);

/// In `interval` mode, how often at most readers are told of calls written since they were
/// last told: a wake-up per write would cost the forwarder more than it reads when requests
/// are small, and in this time one connection writes far less than sled's cache holds.
const ANNOUNCE_WRITES_EVERY: Duration = Duration::from_millis(5);

/// Why an append did not succeed.
#[derive(Debug)]
pub(crate) enum AppendError {
    /// Nothing of the request was written, and its bytes are no longer counted.
    NotWritten(QueueError),
    /// Written, or perhaps written (the write was interrupted), but not known to be
    /// durable; its bytes stay counted.
    NotDurable(Arc<str>),
}

/// How a request learns its append's outcome: in `interval` mode once written, in `fsync`
/// mode once a flush has covered it (the committer sends it then).
pub(crate) type Reply = oneshot::Sender<Result<(), AppendError>>;

/// What the flushes so far achieved.
#[derive(Debug, Clone)]
struct Flushed {
    /// The latest finished flush.
    generation: u64,
    /// The latest flush that succeeded: everything inserted before it started is durable.
    last_ok: u64,
    /// Why the latest flush failed, if it did.
    error: Option<Arc<str>>,
}

/// Shared between writers and the committer task.
pub(crate) struct GroupCommit {
    /// The generation the next flush to start will have.
    next_generation: AtomicU64,
    wake: Notify,
    /// Told when the database turns dirty, so that an idle committer sleeps without ticking.
    dirtied: Notify,
    /// Set by writers in `interval` mode; the periodic flush skips a clean database.
    dirty: AtomicBool,
    stopping: AtomicBool,
    flushed: watch::Receiver<Flushed>,
    /// Every queue id below this is durable (in `fsync` mode readers hand out only those).
    durable_end: AtomicU64,
    /// Woken when `durable_end` moves, and in `interval` mode after writes (at most every
    /// [`ANNOUNCE_WRITES_EVERY`]): there are new calls to read (the queue's, shared by every
    /// database a rebuild swaps in).
    advanced: Arc<Notify>,
    /// Told of each write in `interval` mode; the announcer passes it on to `advanced`.
    written: Arc<Notify>,
    announcer: tokio::task::AbortHandle,
    /// Answers of written requests, sent once the next flush to start has finished; `None`
    /// once the committer has stopped.
    answers: Mutex<Option<Vec<Reply>>>,
}

impl GroupCommit {
    /// Starts the committer. Besides flushing for waiting writers, it flushes every `period`
    /// when something was marked dirty: the `interval` durability mode relies on this alone,
    /// and removals of delivered calls use it so that a restart does not resend them.
    ///
    /// `before_flush` runs just before each flush (the queue records its counters there) and
    /// returns the end of the queue ids that the flush will cover; `after_flush` gets that
    /// end once the flush has succeeded.
    pub(crate) fn start(
        db: sled::Db,
        period: Duration,
        advanced: Arc<Notify>,
        before_flush: Box<dyn Fn() -> u64 + Send + Sync>,
        after_flush: Box<dyn Fn(u64) + Send + Sync>,
    ) -> (Arc<GroupCommit>, JoinHandle<()>) {
        let (tx, rx) = watch::channel(Flushed {
            generation: 0,
            last_ok: 0,
            error: None,
        });
        let written = Arc::new(Notify::new());
        let announcer = tokio::spawn(announce(written.clone(), advanced.clone())).abort_handle();
        let shared = Arc::new(GroupCommit {
            next_generation: AtomicU64::new(1),
            wake: Notify::new(),
            dirtied: Notify::new(),
            dirty: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            flushed: rx,
            // Everything found on disk at open is durable.
            durable_end: AtomicU64::new(before_flush()),
            advanced,
            written,
            announcer,
            answers: Mutex::new(Some(Vec::new())),
        });
        let task = tokio::spawn(committer(
            shared.clone(),
            db,
            period,
            Hooks {
                before_flush,
                after_flush,
            },
            tx,
        ));
        (shared, task)
    }

    /// Waits until everything inserted before this call is durable on disk.
    pub(crate) async fn durable(&self) -> Result<(), Arc<str>> {
        let target = self.next_generation.load(Ordering::SeqCst);
        self.wake.notify_one();
        let mut flushed = self.flushed.clone();
        // After an I/O error (a full disk, say) sled's flush can wait forever: answer the
        // writer with an error in bounded time rather than hang its request.
        let done = tokio::time::timeout(
            FLUSH_WAIT_LIMIT,
            flushed.wait_for(|f| f.generation >= target),
        )
        .await
        .map_err(|_| {
            Arc::<str>::from(format!(
                "no flush finished within {} s",
                FLUSH_WAIT_LIMIT.as_secs()
            ))
        })?
        .map_err(|_| Arc::<str>::from("the committer has stopped"))?;
        // Any successful flush that started after the insert covers it, even if a later
        // one failed.
        match &done.error {
            _ if done.last_ok >= target => Ok(()),
            Some(error) => Err(error.clone()),
            None => Err(Arc::from("no flush covered the insert")),
        }
    }

    /// Sends each reply once a flush that starts after this call has finished: `Ok` if it
    /// succeeded. The caller has written what the replies are for.
    pub(crate) fn answer_after_flush(&self, replies: impl IntoIterator<Item = Reply>) {
        let mut replies = replies.into_iter().peekable();
        if replies.peek().is_none() {
            return;
        }
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        match answers.as_mut() {
            Some(answers) => answers.extend(replies),
            None => {
                for reply in replies {
                    let _ = reply.send(Err(stopped()));
                }
                return;
            }
        }
        drop(answers);
        self.wake.notify_one();
    }

    fn take_answers(&self) -> Vec<Reply> {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        answers.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Queue ids below this are durable.
    pub(crate) fn durable_end(&self) -> u64 {
        self.durable_end.load(Ordering::SeqCst)
    }

    /// Calls became readable other than by a flush (`interval` mode shows calls once
    /// written): the readers are woken now, or if they were woken in the last
    /// [`ANNOUNCE_WRITES_EVERY`], once it has passed.
    pub(crate) fn announce_readable(&self) {
        self.written.notify_one();
    }

    /// Notes a change that the periodic flush must cover.
    pub(crate) fn mark_dirty(&self) {
        if !self.dirty.swap(true, Ordering::SeqCst) {
            self.dirtied.notify_one();
        }
    }

    /// Flushes completed so far (a flush that failed counts too).
    pub(crate) fn flushes(&self) -> u64 {
        self.flushed.borrow().generation
    }

    /// Asks the committer to run one last flush and stop.
    pub(crate) fn stop(&self) {
        self.announcer.abort();
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.announcer.abort();
    }
}

/// Wakes the readers after writes, at most once every [`ANNOUNCE_WRITES_EVERY`]: writes while
/// it sleeps leave one permit behind, taken as soon as it wakes.
async fn announce(written: Arc<Notify>, advanced: Arc<Notify>) {
    loop {
        written.notified().await;
        advanced.notify_waiters();
        tokio::time::sleep(ANNOUNCE_WRITES_EVERY).await;
    }
}

async fn committer(
    shared: Arc<GroupCommit>,
    db: sled::Db,
    period: Duration,
    hooks: Hooks,
    flushed: watch::Sender<Flushed>,
) {
    let Hooks {
        before_flush,
        after_flush,
    } = hooks;
    // However the committer ends (stopped, panicked, its runtime gone), every request waiting
    // on it is answered.
    let mut answering = Answering {
        shared: shared.clone(),
        taken: Vec::new(),
    };
    // The first tick a period from now: a fresh start has nothing to flush.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether sled's spare log buffers were handed back since the last flush (a flush follows
    // every write, in both modes).
    let mut released = false;
    loop {
        // Clean and not stopping: no tick until something is written (an idle daemon does
        // not wake every period); then the next periodic flush is a period away.
        let idle = !shared.dirty.load(Ordering::SeqCst) && !shared.stopping.load(Ordering::SeqCst);
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = shared.dirtied.notified(), if idle => {
                ticker.reset();
                continue;
            }
            // Clean for a while: the segment buffers sled keeps for reuse under load go back
            // to the allocator, so that an idle daemon does not hold them.
            _ = tokio::time::sleep(RELEASE_BUFFERS_AFTER), if idle && !released => {
                sled::release_spare_io_buffers();
                released = true;
                continue;
            }
            _ = ticker.tick(), if !idle => {
                if !shared.dirty.load(Ordering::SeqCst) && !shared.stopping.load(Ordering::SeqCst) {
                    continue;
                }
            }
        }
        let stopping = shared.stopping.load(Ordering::SeqCst);
        shared.dirty.store(false, Ordering::SeqCst);
        let generation = shared.next_generation.fetch_add(1, Ordering::SeqCst);
        // Ids below this were inserted before the flush starts, so it covers them; so are
        // the calls of the answers waiting now.
        answering.taken = shared.take_answers();
        let covered = before_flush();
        let error = flush(&db).await;
        released = false;
        if error.is_none() {
            after_flush(covered);
            if shared.durable_end.fetch_max(covered, Ordering::SeqCst) < covered {
                shared.advanced.notify_waiters();
            }
        }
        for reply in answering.taken.drain(..) {
            let _ = reply.send(match &error {
                None => Ok(()),
                Some(e) => Err(AppendError::NotDurable(e.clone())),
            });
        }
        flushed.send_modify(|f| {
            f.generation = generation;
            if error.is_none() {
                f.last_ok = generation;
            }
            f.error = error;
        });
        if stopping {
            break;
        }
    }
}

/// One sled flush and fdatasync of its files, off the async workers, timed; the error, if
/// it failed.
async fn flush(db: &sled::Db) -> Option<Arc<str>> {
    let started = std::time::Instant::now();
    let db = db.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
        db.flush().map_err(|e| format!("sled flush failed: {e}"))?;
        if crate::failpoint::skips("queue-skip-fdatasync") {
            return Ok(());
        }
        // Through sled, which counts it: a segment freed before it started can then be
        // reused without a sync of sled's own (`docs/sled.md`).
        db.sync_data()
            .map_err(|e| format!("fdatasync of the queue file failed: {e}"))
    })
    .await
    .unwrap_or_else(|e| Err(format!("flush task failed: {e}")));
    crate::metrics::metrics()
        .flush_seconds
        .observe(started.elapsed().as_secs_f64());
    result.err().map(|e| {
        tracing::error!(error = %e, "queue flush failed");
        Arc::<str>::from(e)
    })
}

/// The answers the committer owes: those of the flush under way, and, once it ends, those
/// still waiting (and any handed over later: [`GroupCommit::answer_after_flush`] answers them
/// at once).
struct Answering {
    shared: Arc<GroupCommit>,
    taken: Vec<Reply>,
}

impl Drop for Answering {
    fn drop(&mut self) {
        let left = self
            .shared
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        for reply in self.taken.drain(..).chain(left) {
            let _ = reply.send(Err(stopped()));
        }
    }
}

fn stopped() -> AppendError {
    AppendError::NotDurable(Arc::from("the committer has stopped"))
}

/// What the queue does around each flush (see [`GroupCommit::start`]).
struct Hooks {
    before_flush: Box<dyn Fn() -> u64 + Send + Sync>,
    after_flush: Box<dyn Fn(u64) + Send + Sync>,
}
