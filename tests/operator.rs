//! Who may use the admin API (`src/server/operator.rs`): users made for the test (it runs as
//! root, as CI does): one in the admin group, one not. The calls' listeners send everyone to
//! the admin socket; on the socket, its mode keeps the non-member out, and so do the peer's
//! credentials once the mode is loosened by hand; root and the member list, show, replay and
//! purge dead letters.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;

use common::{group, post, Daemon, Upstream, BIN};

/// A group and two users made for the test, removed when dropped.
struct Accounts {
    group: String,
    member: String,
    outsider: String,
}

impl Accounts {
    fn create() -> Accounts {
        let tag = std::process::id();
        let accounts = Accounts {
            group: format!("gr-adm-{tag}"),
            member: format!("gr-op-{tag}"),
            outsider: format!("gr-no-{tag}"),
        };
        run_ok("groupadd", &[&accounts.group]);
        for (user, groups) in [
            (&accounts.member, accounts.group.as_str()),
            (&accounts.outsider, ""),
        ] {
            let mut args = vec!["-M", "-N", "-s", "/usr/sbin/nologin"];
            if !groups.is_empty() {
                args.extend(["-G", groups]);
            }
            args.push(user);
            run_ok("useradd", &args);
        }
        accounts
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in [&self.member, &self.outsider] {
            let _ = Command::new("userdel").arg(user).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A user's uid, primary gid and groups, from the system's databases.
fn ids(user: &str) -> (u32, u32, Vec<u32>) {
    let number = |flag: &str| -> String {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let groups = number("-G")
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    (
        number("-u").parse().unwrap(),
        number("-g").parse().unwrap(),
        groups,
    )
}

/// Runs the admin command `args` as `user` (with the user's groups), telling it the admin
/// group through the variable the packaged config would set.
fn grouprelay_as(binary: &Path, user: &str, admin_group: &str, args: &[&str]) -> Output {
    let (uid, gid, groups) = ids(user);
    let mut command = Command::new(binary);
    command
        .args(args)
        .env("GROUPRELAY_ADMIN_GROUP", admin_group)
        .env("HOME", "/")
        .current_dir("/");
    // SAFETY: setgroups, setgid and setuid are async-signal-safe; they run in the child
    // before exec, in the order that lets root give up its privileges.
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.output().unwrap()
}

async fn as_user(binary: &Path, user: &str, admin_group: &str, args: &[&str]) -> (i32, String) {
    let (binary, user, admin_group) = (binary.to_owned(), user.to_owned(), admin_group.to_owned());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        grouprelay_as(&binary, &user, &admin_group, &args)
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A directory anyone may enter, holding a copy of the binary the test users can run (the
/// build's own directory may be closed to them).
fn open_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.path().join("grouprelay");
    std::fs::copy(BIN, &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, binary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_root_and_the_admin_group_use_the_admin_api() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to make users (CI runs as root)");
        return;
    }
    let accounts = Accounts::create();
    let (open, binary) = open_dir();
    let socket = open.path().join("admin").join("admin.sock");
    let admin_url = format!("unix:{}", socket.display());
    // Upstream refuses the "poison" calls until told otherwise: dead letters to manage.
    let (upstream, forgiving) = Upstream::refusing_poison().await;
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        data.path(),
        &[
            "--upstream",
            &upstream.url(),
            "--flush-interval-ms",
            "5",
            "--write-key",
            "K",
            "--admin-listen",
            &admin_url,
            "--admin-group",
            &accounts.group,
        ],
    );
    std::fs::set_permissions(
        socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    for (i, user) in ["poison", "poison", "poison"].iter().enumerate() {
        let call = group(user).untyped().id(format!("m-{i}"));
        assert_eq!(
            daemon
                .send(&post("/v1/group", None, &call.bytes()))
                .await
                .status,
            200
        );
    }
    daemon
        .wait_for_log_count("moved to the dead-letter store", 3)
        .await;

    // The socket: 0660, the admin group's.
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let gid = Command::new("getent")
        .args(["group", &accounts.group])
        .output()
        .unwrap();
    let gid: u32 = String::from_utf8_lossy(&gid.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(meta.gid(), gid);

    let group = accounts.group.as_str();
    let tcp_url = format!("http://{}", daemon.addr);
    // Over TCP, anyone is sent to the admin socket.
    let (code, out) = as_user(
        &binary,
        &accounts.outsider,
        group,
        &["status", "--url", &tcp_url],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("403") && out.contains(&socket.display().to_string()),
        "{out}"
    );
    // On the admin socket, the mode keeps the outsider out, and the command says who may.
    let list = ["dead", "list", "--url", &admin_url];
    let outsider_lists = || as_user(&binary, &accounts.outsider, group, &list);
    let (code, out) = outsider_lists().await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("run as root or as a member of {group}")),
        "{out}"
    );
    // Loosened by hand, the socket still refuses the outsider: its credentials.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, out) = outsider_lists().await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("403") && out.contains(&format!("member of {group}")),
        "{out}"
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).unwrap();

    // The member lists, shows, replays and purges.
    let member = accounts.member.as_str();
    let (code, out) = as_user(
        &binary,
        member,
        group,
        &["dead", "list", "--url", &admin_url],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let ids_listed: Vec<String> = out
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_owned())
        .collect();
    assert_eq!(ids_listed.len(), 3, "{out}");
    let (code, out) = as_user(
        &binary,
        member,
        group,
        &["dead", "show", &ids_listed[0], "--url", &admin_url],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("m-0"), "{out}");
    forgiving.store(true, Ordering::SeqCst);
    let (code, out) = as_user(
        &binary,
        member,
        group,
        &["dead", "replay", &ids_listed[0], "--url", &admin_url],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    upstream
        .wait_until("the replayed call delivered", |requests| {
            requests
                .iter()
                .any(|r| r.answered == 200 && r.calls().iter().any(|c| c["messageId"] == "m-0"))
        })
        .await;
    let (code, out) = as_user(
        &binary,
        member,
        group,
        &["dead", "purge", &ids_listed[1], "--url", &admin_url],
    )
    .await;
    assert_eq!((code, out.trim()), (0, "purged 1 dead letter"));

    // And root: status, and the last dead letter purged.
    let status = common::send_unix(&socket, &common::get("/admin/status")).await;
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["dead"]["rejected_by_upstream"], 3);
    let purged = common::send_unix(
        &socket,
        &post("/admin/dead/purge", None, br#"{"all":true}"#),
    )
    .await;
    assert_eq!(
        purged.status,
        200,
        "{}",
        String::from_utf8_lossy(&purged.body)
    );
    assert!(daemon.terminate().success());
    assert!(!socket.exists(), "the admin socket is removed on stop");
}
