//! Egress through a real forward proxy (tinyproxy) and TLS with an extra CA: calls reach
//! upstream through the proxy the settings or the variables name, a refusing proxy or an
//! untrusted certificate keeps them queued (retried, never dead-lettered), and the proxy's
//! password appears nowhere: not in logs at trace level, not in `validate`, not in status.

mod common;

use common::{
    group, post, run_output, tinyproxy, Access, Daemon, Reply, TestCa, TinyProxy, Upstream,
};

const KEY: &str = "KEY_proxy";
const USER: &str = "relay";
const PASSWORD: &str = "pr0xy-s3cret-word";

/// Sends one call with this messageId.
async fn send_one(daemon: &Daemon, id: &str) {
    let body = group(format!("u-{id}")).id(id).to_string();
    let answer = daemon
        .send(&post("/v1/group", Some(KEY), body.as_bytes()))
        .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
}

/// The password, or the Basic encoding of the credentials, anywhere in `text`.
fn leaks_password(text: &str) -> bool {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    text.contains(PASSWORD) || text.contains(&encoded)
}

fn daemon_args<'a>(upstream: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--upstream", upstream, "--retry-max-interval-ms", "500"];
    args.extend_from_slice(extra);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_through_an_authenticating_proxy_from_the_variables() {
    let Some(binary) = tinyproxy() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = ca.write_ca(dir.path());
    let upstream = Upstream::start_tls(ca.server.clone(), |_| Reply::Status(200)).await;
    let proxy = TinyProxy::start(&binary, dir.path(), Access::Password(USER, PASSWORD));
    let proxy_url = proxy.url(Some((USER, PASSWORD)));
    let url = upstream.url();
    let data = dir.path().join("data");
    let daemon = Daemon::start_with_env(
        &data,
        &daemon_args(&url, &["--upstream-ca-file", ca_file.to_str().unwrap()]),
        &[("HTTPS_PROXY", &proxy_url), ("RUST_LOG", "trace")],
    );
    send_one(&daemon, "through-connect").await;
    upstream.wait_delivered(1).await;
    // It went through the proxy, as a CONNECT tunnel to the stand-in.
    proxy.wait_for_log(&format!("CONNECT {}", upstream.addr));
    // The proxy in use is shown, without its password.
    let status = run_output(&["status", "--url", &daemon.admin_url()]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains(&format!("through the proxy http://{}", proxy.addr)),
        "{status}"
    );
    let admin = daemon
        .send_admin(&common::get("/admin/status"))
        .await
        .json();
    assert_eq!(admin["upstream"]["proxy"], format!("http://{}", proxy.addr));
    daemon.wait_for_log("forwarding").await;
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("proxy=http://{}", proxy.addr)),
        "{log}"
    );
    for (what, text) in [
        ("the log", &log),
        ("status", &status),
        ("/admin/status", &admin.to_string()),
    ] {
        assert!(
            !leaks_password(text),
            "the proxy password is in {what}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upstream_through_the_setting_in_absolute_form() {
    let Some(binary) = tinyproxy() else { return };
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    let proxy = TinyProxy::start(&binary, dir.path(), Access::Password(USER, PASSWORD));
    let proxy_url = proxy.url(Some((USER, PASSWORD)));
    let url = upstream.url();
    let daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        &daemon_args(&url, &["--upstream-proxy", &proxy_url]),
        // The setting wins over the variables.
        &[("HTTP_PROXY", "http://127.0.0.1:9"), ("RUST_LOG", "trace")],
    );
    send_one(&daemon, "absolute-form").await;
    upstream.wait_delivered(1).await;
    proxy.wait_for_log(&format!("POST http://{}/v1/batch", upstream.addr));
    assert!(!leaks_password(&daemon.log_text()), "{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_and_none_go_direct() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    let url = upstream.url();
    let dead_proxy = "http://127.0.0.1:9";
    // What, extra flags, environment.
    type Bypass<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let bypasses: [Bypass; 3] = [
        (
            "NO_PROXY names the host",
            vec![],
            vec![
                ("HTTP_PROXY", dead_proxy),
                ("NO_PROXY", "example.com,127.0.0.1"),
            ],
        ),
        (
            "no_proxy is *",
            vec![],
            vec![("http_proxy", dead_proxy), ("no_proxy", "*")],
        ),
        (
            "--upstream-proxy none",
            vec!["--upstream-proxy", "none"],
            vec![("HTTP_PROXY", dead_proxy)],
        ),
    ];
    for (n, (what, extra, env)) in bypasses.into_iter().enumerate() {
        let daemon = Daemon::start_with_env(
            &dir.path().join(format!("data-{n}")),
            &daemon_args(&url, &extra),
            &env,
        );
        send_one(&daemon, &format!("direct-{n}")).await;
        upstream.wait_delivered(n + 1).await;
        assert!(
            daemon.log_text().contains("proxy=none"),
            "{what}: {}",
            daemon.log_text()
        );
        daemon.terminate();
    }
}

/// A proxy that refuses (wrong credentials, an ACL, nothing listening) is a failure to reach
/// upstream: the call stays queued and is retried, and the log says what the proxy did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_proxy_keeps_the_calls_queued() {
    let Some(binary) = tinyproxy() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = ca.write_ca(dir.path());
    let tls_upstream = Upstream::start_tls(ca.server.clone(), |_| Reply::Status(200)).await;
    let http_upstream = Upstream::start(|_| Reply::Status(200)).await;
    let wants_password = TinyProxy::start(&binary, dir.path(), Access::Password(USER, PASSWORD));
    let denies = TinyProxy::start(&binary, dir.path(), Access::Denied);
    let no_credentials = wants_password.url(None);
    let wrong_password = wants_password.url(Some((USER, "wrong")));
    let denied = denies.url(None);
    let (tls_url, http_url) = (tls_upstream.url(), http_upstream.url());
    let ca_path = ca_file.to_str().unwrap();
    let cases: [(&str, &str, &str, &str); 5] = [
        (
            "CONNECT without credentials",
            &tls_url,
            &no_credentials,
            "proxy authorization required",
        ),
        // tinyproxy does not answer this one with 407, and hyper-util's tunnel tells only 407
        // apart from other refusals.
        (
            "CONNECT with a wrong password",
            &tls_url,
            &wrong_password,
            "through the proxy",
        ),
        (
            "CONNECT refused by the ACL",
            &tls_url,
            &denied,
            "through the proxy",
        ),
        (
            "absolute form without credentials",
            &http_url,
            &no_credentials,
            "407",
        ),
        (
            "absolute form refused by the ACL",
            &http_url,
            &denied,
            "403",
        ),
    ];
    for (n, (what, url, proxy, said)) in cases.into_iter().enumerate() {
        let data = dir.path().join(format!("data-{n}"));
        let daemon = Daemon::start(
            &data,
            &daemon_args(
                url,
                &["--upstream-proxy", proxy, "--upstream-ca-file", ca_path],
            ),
        );
        send_one(&daemon, &format!("refused-{n}")).await;
        daemon.wait_for_log_count("retrying", 2).await;
        let log = daemon.log_text();
        assert!(
            log.contains(said),
            "{what}: the log should say {said:?}:\n{log}"
        );
        let stats = daemon.send(&common::get("/stats")).await.json();
        assert_eq!(stats["pending"], 1, "{what}: {stats}");
        assert_eq!(stats["dead_total"], 0, "{what}: {stats}");
        daemon.terminate();
    }
    assert!(tls_upstream.requests().is_empty() && http_upstream.requests().is_empty());
}

/// An upstream whose certificate is not trusted: pending, retried, never dead-lettered, and
/// the log says it is a certificate problem; the same upstream with `--upstream-ca-file`
/// gets the call. Directly, and through an open proxy (a CONNECT without credentials).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_retried_until_its_ca_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_file = ca.write_ca(dir.path());
    let ca_path = ca_file.to_str().unwrap();
    let upstream = Upstream::start_tls(ca.server.clone(), |_| Reply::Status(200)).await;
    let url = upstream.url();
    let open_proxy = tinyproxy().map(|binary| TinyProxy::start(&binary, dir.path(), Access::Open));
    let mut ways = vec![("directly", "none".to_owned())];
    ways.extend(
        open_proxy
            .as_ref()
            .map(|p| ("through an open proxy", p.url(None))),
    );
    for (n, (how, proxy)) in ways.iter().enumerate() {
        let data = dir.path().join(format!("data-{n}"));
        let daemon = Daemon::start(&data, &daemon_args(&url, &["--upstream-proxy", proxy]));
        send_one(&daemon, &format!("untrusted-{n}")).await;
        daemon.wait_for_log_count("retrying", 2).await;
        let log = daemon.log_text();
        assert!(log.contains("certificate is not trusted"), "{how}: {log}");
        let stats = daemon.send(&common::get("/stats")).await.json();
        assert_eq!(
            (stats["pending"].as_u64(), stats["dead_total"].as_u64()),
            (Some(1), Some(0)),
            "{how}"
        );
        daemon.terminate();

        let daemon = Daemon::start(
            &data,
            &daemon_args(
                &url,
                &["--upstream-proxy", proxy, "--upstream-ca-file", ca_path],
            ),
        );
        upstream.wait_delivered(n + 1).await;
        daemon.terminate();
    }
    if let Some(proxy) = open_proxy {
        proxy.wait_for_log(&format!("CONNECT {}", upstream.addr));
    }
}

#[test]
fn an_unusable_ca_file_or_proxy_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let missing = dir.path().join("missing.pem");
    let with_password = format!("http://{USER}:{PASSWORD}@127.0.0.1:3128");
    let cases: [(&[&str], String); 4] = [
        (
            &["--upstream-ca-file", not_pem.to_str().unwrap()],
            not_pem.display().to_string(),
        ),
        (
            &["--upstream-ca-file", missing.to_str().unwrap()],
            missing.display().to_string(),
        ),
        (
            &["--upstream-proxy", "socks5://127.0.0.1:1080"],
            "--upstream-proxy".into(),
        ),
        (
            &["--upstream-proxy", "https://127.0.0.1:3128"],
            "--upstream-proxy".into(),
        ),
    ];
    for (args, named) in cases {
        let out = run_output(&[&["validate"], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&named),
            "{args:?} should name {named}: {stderr}"
        );
    }
    // A good proxy URL validates, and nothing printed holds its password.
    let out = run_output(&["validate", "--upstream-proxy", &with_password]);
    assert!(out.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!leaks_password(&printed), "{printed}");
}
