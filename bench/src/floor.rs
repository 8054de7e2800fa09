//! The stack's floor: the simplest durable relay on hyper and sled, as a server of its own,
//! so that the benchmark shows how much of grouprelay's cost is the stack and how much ours.
//!
//! Per request it reads the body, checks it is a Group call (or a batch of them) with its ids
//! (serde into borrowed fields, nothing copied), inserts the body into sled under the next id,
//! and answers `200 {"success":true}`. In `fsync` mode it answers only after a flush that
//! started after the insert has finished: sled's `flush()` and an `fdatasync` of its file,
//! one flush at a time shared by every waiting request (group commit). In `interval` mode it
//! answers at once and lets sled's background flusher write every 500 ms. In `parse` mode it
//! only checks the body and stores nothing: the step between the baseline and `interval`.
//!
//! It leaves out all that grouprelay does beyond that: no forwarding (nothing is ever read
//! back or removed), no ids or timestamps added to the call, no writeKey, no metrics, no byte
//! accounting, no free-space checks, and sled's blob files (where it writes leaves over a
//! quarter of a segment, as a few 70 KB batch bodies make) are not synced. So it flatters the
//! stack: what this row costs above the baseline, a relay on hyper and sled pays at least
//! (unless it stores several requests per insert, as grouprelay does).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{watch, Notify};

/// The fields a Group call must have, borrowed from the body.
#[derive(Deserialize)]
struct Call<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(rename = "groupId", borrow)]
    group_id: Option<&'a RawValue>,
    #[serde(rename = "userId", borrow)]
    user_id: Option<&'a RawValue>,
    #[serde(rename = "anonymousId", borrow)]
    anonymous_id: Option<&'a RawValue>,
    #[serde(rename = "messageId", borrow)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
}

impl Call<'_> {
    fn valid(&self) -> bool {
        let _ = (&self.kind, &self.message_id, &self.traits);
        self.group_id.is_some() && (self.user_id.is_some() || self.anonymous_id.is_some())
    }
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<Call<'a>>,
}

fn valid(path: &str, body: &[u8]) -> bool {
    if path == "/v1/batch" {
        serde_json::from_slice::<Batch>(body).is_ok_and(|b| b.batch.iter().all(Call::valid))
    } else {
        serde_json::from_slice::<Call>(body).is_ok_and(|c| c.valid())
    }
}

/// One flush at a time, shared by every request waiting when it starts.
struct GroupCommit {
    db: sled::Db,
    file: Arc<std::fs::File>,
    /// The generation the next flush to start will have.
    next: AtomicU64,
    wake: Notify,
    done: watch::Receiver<u64>,
}

impl GroupCommit {
    fn start(db: sled::Db, file: std::fs::File) -> Arc<GroupCommit> {
        let (tx, rx) = watch::channel(0);
        let commit = Arc::new(GroupCommit {
            db,
            file: Arc::new(file),
            next: AtomicU64::new(1),
            wake: Notify::new(),
            done: rx,
        });
        let committer = commit.clone();
        tokio::spawn(async move {
            loop {
                committer.wake.notified().await;
                let generation = committer.next.fetch_add(1, Ordering::SeqCst);
                let (db, file) = (committer.db.clone(), committer.file.clone());
                tokio::task::spawn_blocking(move || {
                    db.flush().expect("sled flush");
                    file.sync_data().expect("fdatasync");
                })
                .await
                .expect("flush task");
                tx.send_replace(generation);
            }
        });
        commit
    }

    async fn durable(&self) {
        let target = self.next.load(Ordering::SeqCst);
        self.wake.notify_one();
        let mut done = self.done.clone();
        done.wait_for(|g| *g >= target).await.expect("committer");
    }
}

struct Floor {
    /// `None` in `parse` mode.
    db: Option<sled::Db>,
    commit: Option<Arc<GroupCommit>>,
    next_id: AtomicU64,
}

impl Floor {
    async fn handle(&self, path: &str, body: Bytes) -> (u16, &'static [u8]) {
        if !valid(path, &body) {
            return (400, br#"{"error":"invalid"}"#);
        }
        let Some(db) = &self.db else {
            return (200, br#"{"success":true}"#);
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        db.insert(id.to_be_bytes(), &body[..]).expect("sled insert");
        if let Some(commit) = &self.commit {
            commit.durable().await;
        }
        (200, br#"{"success":true}"#)
    }
}

/// Runs the floor server in `mode` (`fsync`, `interval` or `parse`) on a sled database in
/// `dir`.
pub async fn serve(mode: &str, dir: &Path, unix: PathBuf) {
    let (store, fsync) = match mode {
        "fsync" => (true, true),
        "interval" => (true, false),
        "parse" => (false, false),
        other => panic!("unknown mode {other}"),
    };
    let db = store.then(|| {
        sled::Config::new()
            .path(dir)
            .cache_capacity(64 << 20)
            .flush_every_ms(if fsync { None } else { Some(500) })
            .open()
            .expect("open sled")
    });
    let commit = db.as_ref().filter(|_| fsync).map(|db| {
        let file = std::fs::File::open(dir.join("db")).expect("open sled's file");
        GroupCommit::start(db.clone(), file)
    });
    let floor = Arc::new(Floor {
        db,
        commit,
        next_id: AtomicU64::new(0),
    });
    crate::servers::serve(unix, move |req: hyper::Request<hyper::body::Incoming>| {
        let floor = floor.clone();
        async move {
            let path = req.uri().path().to_owned();
            let body = crate::servers::read_body(req.into_body()).await;
            let (status, answer) = floor.handle(&path, body).await;
            let mut response = hyper::Response::new(Full::new(Bytes::from_static(answer)));
            *response.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, std::convert::Infallible>(response)
        }
    })
    .await;
}
