//! The admin commands against a running daemon's admin socket: `status`, and `dead
//! list/show/replay/purge`, including a dead letter replayed and delivered; the calls'
//! listeners refuse `/admin/`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;

use common::{group, post, run_output, Daemon, Reply, Upstream};

/// Runs `grouprelay ARGS` off the async runtime (the stand-in upstream lives on it).
async fn grouprelay(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        run_output(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_dead_letters_list_show_replay_and_purge() {
    // Upstream refuses the "poison" calls until told otherwise: dead letters to manage.
    let (upstream, forgiving) = Upstream::refusing_poison().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("grouprelay.sock");
    let unix_url = format!("unix:{}", socket.display());
    let data = dir.path().join("data");
    let daemon = Daemon::start(
        &data,
        &[
            "--upstream",
            &upstream.url(),
            "--flush-interval-ms",
            "5",
            "--listen",
            &unix_url,
        ],
    );
    let url = format!("unix:{}", data.join("admin.sock").display());
    for (i, user) in ["poison", "ok", "poison"].iter().enumerate() {
        let call = group(user).untyped().id(format!("m-{i}"));
        let response = daemon
            .send(&post("/v1/group", Some("KEYAsecretpart"), &call.bytes()))
            .await;
        assert_eq!(response.status, 200);
    }
    daemon
        .wait_for_log_count("moved to the dead-letter store", 2)
        .await;

    let (code, out, err) = grouprelay(&["status", "--url", &url]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": up"), "{out}");
    assert!(out.contains("queue: 0 calls"), "{out}");
    assert!(
        out.contains("dead letters: 2 (rejected_by_upstream 2)"),
        "{out}"
    );
    assert!(out.contains("upstream: healthy"), "{out}");

    // The calls' listeners, TCP and Unix, send the operator to the admin socket.
    for calls_url in [format!("http://{}", daemon.addr), unix_url.clone()] {
        let (code, _, err) = grouprelay(&["dead", "list", "--url", &calls_url]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("403") && err.contains("admin.sock"), "{err}");
    }

    let (code, out, err) = grouprelay(&["dead", "list", "--url", &url]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let fields: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(fields[1], "m-0");
    assert_eq!(fields[2], "KEYA…", "only the key's first four characters");
    assert_eq!(fields[3], "rejected_by_upstream");
    assert!(!out.contains("secretpart"));
    let first_id = fields[0].to_owned();
    let second_id = lines[1].split('\t').next().unwrap().to_owned();

    let (code, out, err) =
        grouprelay(&["dead", "list", "--reason", "expired", "--url", &url]).await;
    assert_eq!((code, out.as_str()), (0, ""));
    assert!(err.contains("no dead letters"), "{err}");
    let (code, out, _) = grouprelay(&["dead", "list", "--limit", "1", "--url", &url]).await;
    assert_eq!((code, out.lines().count()), (0, 1));

    let (code, out, err) = grouprelay(&["dead", "show", &first_id, "--url", &url]).await;
    assert_eq!(code, 0, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["call"]["messageId"], "m-0");
    assert_eq!(shown["status"], 400);
    assert_eq!(shown["write_key"], "KEYA…");
    let (code, _, err) = grouprelay(&["dead", "show", "999999", "--url", &url]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");

    // Replay one: upstream takes it now, with the same messageId.
    forgiving.store(true, Ordering::SeqCst);
    let (code, out, err) = grouprelay(&["dead", "replay", &first_id, "--url", &url]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "replayed 1 dead letter");
    upstream
        .wait_until("the replayed call delivered", |requests| {
            requests
                .iter()
                .any(|r| r.answered == 200 && r.calls().iter().any(|c| c["messageId"] == "m-0"))
        })
        .await;
    let (_, out, _) = grouprelay(&["dead", "list", "--url", &url]).await;
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with(&second_id));

    // Purge the rest; a replay with nothing named is refused.
    let (code, _, err) = grouprelay(&["dead", "replay", "--url", &url]).await;
    assert_eq!(code, 2, "{err}");
    let (code, out, err) = grouprelay(&["dead", "purge", "--all", "--url", &url]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "purged 1 dead letter");
    let (_, out, _) = grouprelay(&["dead", "list", "--url", &url]).await;
    assert!(out.is_empty(), "{out}");

    assert!(daemon.terminate().success());
    let (code, out, _) = grouprelay(&["status", "--url", &url]).await;
    assert_eq!(code, 1);
    assert!(out.contains("down"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_upstream_backing_off() {
    let upstream = Upstream::start(|_| Reply::Status(503)).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--upstream",
            &upstream.url(),
            "--flush-interval-ms",
            "5",
            "--write-key",
            "K",
        ],
    );
    let response = daemon
        .send(&post("/v1/group", None, br#"{"userId":"u","groupId":"g"}"#))
        .await;
    assert_eq!(response.status, 200);
    daemon.wait_for_log("retrying").await;
    // Without --admin-group, the admin socket is its owner's alone.
    let mode = std::fs::metadata(daemon.admin_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // No --url: the command finds the admin socket where `run` with the same settings (here
    // the data dir, from its variable) puts it.
    let found = tokio::task::spawn_blocking({
        let data_dir = dir.path().to_owned();
        move || {
            // An empty config file: this host's /etc/grouprelay must not matter here.
            let config = data_dir.join("empty.toml");
            std::fs::write(&config, "").unwrap();
            std::process::Command::new(common::BIN)
                .arg("status")
                .env("GROUPRELAY_DATA_DIR", &data_dir)
                .env("GROUPRELAY_CONFIG", &config)
                .env_remove("GROUPRELAY_URL")
                .env_remove("RUNTIME_DIRECTORY")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&found.stdout).into_owned();
    let err = String::from_utf8_lossy(&found.stderr);
    assert!(found.status.success(), "{out}{err}");
    assert!(out.contains("queue: 1 call ("), "{out}");
    assert!(out.contains("upstream: backing off until"), "{out}");
    assert!(out.contains("503"), "{out}");
    daemon.terminate();
}

/// With `--allow-remote`, the Tracking API answers other hosts, and the admin endpoints send
/// every TCP client, remote or loopback, to the admin socket. (Needs an address beyond
/// loopback on this host; skipped with a message without one.)
#[tokio::test]
async fn admin_endpoints_refuse_clients_beyond_loopback() {
    // The host's own outward address: the source a UDP socket would use (nothing is sent).
    let Some(outward) = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    else {
        eprintln!("skipped: this host has no address beyond loopback");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--allow-remote", "--listen", "0.0.0.0:0"]);
    let log = daemon.log_text();
    let port: u16 = log
        .split("listening on http://0.0.0.0:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .expect("the 0.0.0.0 listener's port");
    let remote = std::net::SocketAddr::new(outward, port);
    let status = common::send_tcp(remote, &common::get("/admin/status")).await;
    assert_eq!(status.status, 403);
    assert_eq!(status.json()["code"], "admin_not_here");
    assert_eq!(
        common::send_tcp(remote, &common::get("/health"))
            .await
            .status,
        200
    );
    // From loopback too: the admin API is on its socket alone.
    let local = daemon.send(&common::get("/admin/status")).await;
    assert_eq!(
        (local.status, local.json()["code"].clone()),
        (403, "admin_not_here".into())
    );
    daemon.terminate();
}
