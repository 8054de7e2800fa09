//! Writers loading a daemon until it is killed: concurrent requests over TCP, the daemon
//! killed with SIGKILL once enough are answered, and the calls answered 200 collected.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::daemon::Daemon;
use super::http::exchange;

/// Runs `writers` tasks, each sending its requests one after another, until the daemon stops
/// answering; kills the daemon with SIGKILL once `kill_after` requests have been answered 200,
/// and returns the ids of the calls in the requests answered 200 (acknowledged), in no order.
///
/// `request(w, i)` is writer `w`'s `i`th request: the ids of its calls, and its bytes. Any
/// answer but 200 fails the test; a request the kill cut short is not acknowledged.
pub async fn acknowledged_until_killed(
    daemon: Daemon,
    writers: usize,
    kill_after: usize,
    request: impl Fn(usize, usize) -> (Vec<String>, Vec<u8>) + Send + Sync + 'static,
) -> Vec<String> {
    let request = Arc::new(request);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let reached = Arc::new(tokio::sync::Notify::new());
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (request, acked) = (request.clone(), acked.clone());
            let (count, reached) = (count.clone(), reached.clone());
            let addr = daemon.addr;
            tokio::spawn(async move {
                for i in 0.. {
                    let (ids, bytes) = request(w, i);
                    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                        return;
                    };
                    match exchange(stream, &bytes).await {
                        Ok(response) if response.status == 200 => {
                            acked.lock().unwrap().extend(ids);
                            if count.fetch_add(1, Ordering::SeqCst) + 1 == kill_after {
                                reached.notify_one();
                            }
                        }
                        Ok(response) => panic!(
                            "unexpected status {}: {}",
                            response.status,
                            String::from_utf8_lossy(&response.body)
                        ),
                        // The daemon died mid-request: not acknowledged.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(120), reached.notified())
        .await
        .expect("the writers never reached the kill point (did one panic?)");
    daemon.kill();
    for task in tasks {
        task.await.unwrap();
    }
    let acknowledged = std::mem::take(&mut *acked.lock().unwrap());
    acknowledged
}
