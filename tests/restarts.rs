//! Restarts as an operator makes them: a clean stop duplicates nothing.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{batch, numbered, post, Daemon, Reply, Upstream};

const KEY: &str = "KEY_restarts";

/// Every `SIGTERM` reaches its drain deadline with batches in flight (upstream takes each at
/// once and answers 600 ms later, the drain allows 100 ms): those batches are waited for and
/// settled, not abandoned and sent again at the next start. Over three stops, no call
/// reaches upstream twice, and every call does reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_during_a_drain_send_no_call_twice() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(|_| Reply::After(Duration::from_millis(600), 200)).await;
    let url = upstream.url();
    let args = |drain: &'static str| {
        vec![
            "--upstream",
            &url,
            "--drain-timeout-ms",
            drain,
            "--max-batch-events",
            "50",
            "--flush-interval-ms",
            "10",
            "--upstream-concurrency",
            "2",
        ]
    };
    let mut sent = 0;
    for round in 0..3 {
        let daemon = Daemon::start(dir.path(), &args("100"));
        let before = upstream.requests().len();
        for _ in 0..3 {
            let calls: Vec<_> = (sent..sent + 100).map(numbered).collect();
            sent += 100;
            let answer = daemon
                .send(&post("/v1/batch", Some(KEY), batch(calls).as_bytes()))
                .await;
            assert_eq!(answer.status, 200, "round {round}");
        }
        // A batch is in flight (upstream has it, and answers in 600 ms): stop now.
        upstream
            .wait_until("a batch in flight", |requests| requests.len() > before)
            .await;
        assert!(daemon.terminate().success(), "round {round}");
    }
    let daemon = Daemon::start(dir.path(), &args("30000"));
    upstream.wait_delivered(sent).await;
    assert!(daemon.terminate().success());

    let mut times: HashMap<String, usize> = HashMap::new();
    for call in upstream.delivered() {
        *times
            .entry(call["messageId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = times.iter().filter(|(_, &n)| n > 1).collect();
    assert_eq!(times.len(), sent, "every call reaches upstream");
    assert!(
        twice.is_empty(),
        "{} calls were sent twice, e.g. {:?}",
        twice.len(),
        twice.first()
    );
}

/// Restarts behind sockets the service manager holds (here the test holds them, as systemd
/// does, and passes them with `LISTEN_FDS`): writers on keep-alive connections send calls
/// without pause through five restarts. No connection is refused (a connection the old
/// process closes is opened again, and a call it did not answer is sent again); every call
/// answered 200 is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_behind_held_sockets_refuse_no_connection() {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    let url = upstream.url();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let socket_path = dir.path().join("grouprelay.sock");
    let unix = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let sockets = [tcp.as_raw_fd(), unix.as_raw_fd()];
    let data = dir.path().join("data");
    let args = ["--upstream", url.as_str(), "--drain-timeout-ms", "200"];
    let mut daemon = Daemon::start_with_sockets(&data, &args, &sockets);
    assert_eq!(daemon.addr, addr, "the daemon serves the passed TCP socket");
    // Without --listen it binds nothing of its own (not the default 127.0.0.1:8788).
    let listening = daemon.log_text().matches("listening on").count();
    assert_eq!(listening, 2, "{}", daemon.log_text());

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut writers = Vec::new();
    for w in 0..4 {
        let (acknowledged, refused, stop, progress) = (
            acknowledged.clone(),
            refused.clone(),
            stop.clone(),
            progress.clone(),
        );
        writers.push(tokio::spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("w{w}-{n}");
                let body = numbered(&id).to_string();
                let request = hyper::Request::post(format!("http://{addr}/v1/group"))
                    .header(
                        "authorization",
                        common::basic_auth(KEY).split_once(": ").unwrap().1,
                    )
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                match client.request(request).await {
                    Ok(response) if response.status() == 200 => {
                        acknowledged.lock().unwrap().push(format!("m{id}"));
                        progress.notify_waiters();
                        n += 1;
                    }
                    Ok(response) => panic!("{id}: answered {}", response.status()),
                    Err(e) => {
                        let chain = format!("{e:?}");
                        if chain.contains("ConnectionRefused") {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        // Not answered (the old process closed the connection): send again.
                    }
                }
            }
        }));
    }
    for restart in 0..5 {
        // Let calls flow, then restart under them.
        let target = acknowledged.lock().unwrap().len() + 200;
        while acknowledged.lock().unwrap().len() < target {
            let notified = progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if acknowledged.lock().unwrap().len() >= target {
                break;
            }
            notified.await;
        }
        assert!(daemon.terminate().success(), "restart {restart}");
        daemon = Daemon::start_with_sockets(&data, &args, &sockets);
        let over_unix = common::send_unix(&socket_path, &common::get("/health")).await;
        assert_eq!(over_unix.status, 200, "the passed Unix socket is served");
    }
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged: std::collections::HashSet<String> =
        acknowledged.lock().unwrap().iter().cloned().collect();
    assert!(acknowledged.len() >= 1000, "{} calls", acknowledged.len());
    upstream.wait_delivered_ids(&acknowledged).await;
    assert_eq!(refused.load(Ordering::SeqCst), 0, "connections refused");
    assert!(daemon.terminate().success());
    assert!(
        socket_path.exists(),
        "the passed socket file is left in place"
    );
}

/// Start-up refusals in plain words, printed once: a second grouprelay on the same data dir
/// names the directory and the first one's pid (not sled's lock error); a port in use is
/// found before the queue is opened, and named.
#[test]
fn a_second_grouprelay_or_a_port_in_use_is_named_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let first = Daemon::start(dir.path(), &[]);

    let second = Daemon::try_start_with_env(dir.path(), &[], &[])
        .err()
        .expect("refused");
    let expected = format!(
        "another grouprelay is using {} (pid {})",
        dir.path().display(),
        first.pid()
    );
    assert_eq!(second.matches(&expected).count(), 1, "{second}");
    assert!(!second.contains("could not acquire lock"), "{second}");

    let other = tempfile::tempdir().unwrap();
    let port = first.addr.to_string();
    let busy = Daemon::try_start_with_env(other.path(), &["--listen", &port], &[])
        .err()
        .expect("refused");
    assert!(
        busy.contains(&format!("cannot listen on http://{port}")),
        "{busy}"
    );
    assert!(
        !busy.contains("queue open"),
        "the port is tried first: {busy}"
    );
}

/// A passed TCP socket beyond loopback is held to the rule `--listen` is: refused (exit 2,
/// naming `--listen`) unless `--allow-remote`.
#[test]
fn a_passed_socket_beyond_loopback_needs_allow_remote() {
    use std::os::fd::AsRawFd;

    let dir = tempfile::tempdir().unwrap();
    let remote = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let sockets = [remote.as_raw_fd()];
    let refused = Daemon::try_start_with_sockets(dir.path(), &[], &sockets)
        .err()
        .expect("refused");
    assert!(refused.contains("exit status: 2"), "{refused}");
    assert!(
        refused.contains("--listen: the passed socket 0.0.0.0:"),
        "{refused}"
    );
    let daemon = Daemon::start_with_sockets(dir.path(), &["--allow-remote"], &sockets);
    assert_eq!(daemon.addr.port(), remote.local_addr().unwrap().port());
    assert!(daemon.terminate().success());
}
