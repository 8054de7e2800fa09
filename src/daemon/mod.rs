//! The daemon: binds the listeners, opens the queue, serves until shutdown, then closes in
//! order. While it runs, [`supervise`] keeps systemd and the log informed.

mod supervise;

use std::sync::Arc;

use crate::config::{self, Config, ConfigError};
use crate::forward::upstream::Upstream;
use crate::forward::{self, Forwarder};
use crate::http::{AdminAccess, Api};
use crate::human::{bytes, count};
use crate::notify::Notifier;
use crate::queue::{Queue, QueueError};
use crate::server::operator::{AdminSocket, Group};
use crate::server::{self, Inherited, Listener};
use crate::shutdown::{self, Shutdown};
use supervise::{status_line, supervise};

/// Why the daemon could not run.
#[derive(Debug)]
pub enum DaemonError {
    /// A setting that cannot be used (exit status 2).
    Config(ConfigError),
    /// Anything else that stops start-up or shutdown (exit status 1).
    Runtime(String),
}

impl std::fmt::Display for DaemonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DaemonError::Config(e) => e.fmt(f),
            DaemonError::Runtime(e) => f.write_str(e),
        }
    }
}

/// Runs grouprelay until `shutdown` fires. The order matters: the listeners are bound (or
/// taken from the service manager) first, so a port in use stops start-up before anything
/// else, but accept nothing until the queue is open and the forwarder is delivering the
/// backlog; on shutdown the listeners stop and answer what is in flight, then the forwarder
/// drains for up to `drain_timeout` and settles its batches in flight, then the queue is made
/// durable and closed.
pub async fn run(
    config: Config,
    inherited: Vec<Inherited>,
    shutdown: Shutdown,
) -> Result<(), DaemonError> {
    // Listening first: a port in use is reported before anything else starts, and clients
    // that connect while the queue opens wait in the backlog.
    let listeners = listen(&config, inherited).await?;
    let data_dir = config.queue.data_dir.clone();
    let durability = config.queue.durability;
    config::create_data_dir(&data_dir).map_err(DaemonError::Config)?;
    let queue = Queue::open(config.queue.clone()).map_err(|e| {
        DaemonError::Runtime(match e {
            QueueError::InUse { .. } => e.to_string(),
            e => format!("cannot open the queue in {}: {e}", data_dir.display()),
        })
    })?;
    tracing::info!(
        data_dir = %data_dir.display(),
        stored_bytes = queue.stored_bytes(),
        durability = ?durability,
        "queue open"
    );
    // After the queue: a second grouprelay on this data dir is named as such by the queue's
    // lock before it could touch the first one's admin socket.
    let (admin_listener, admin_access) = admin_socket(&config)?;

    let upstream = Upstream::new(&config.upstream)
        .map_err(|e| DaemonError::Runtime(format!("upstream {}: {e}", config.upstream.url)))?;
    // What stopping may take the forwarder: the drain, then settling the batches in flight.
    let forwarder_stop =
        config.forward.drain_timeout + config.upstream.timeout + forward::SETTLE_MARGIN;
    let upstream_proxy = upstream.proxy().map(str::to_owned);
    let forwarder = Forwarder::new(queue.clone(), upstream, config.forward);
    let upstream_health = forwarder.health();
    let (stop_forwarding, forwarding_shutdown) = shutdown::channel();
    let forwarding = forward::run_on_own_thread(forwarder, forwarding_shutdown)
        .map_err(|e| DaemonError::Runtime(format!("cannot start the forwarder: {e}")))?;
    tracing::info!(
        upstream = %config.upstream.url,
        proxy = %upstream_proxy.as_deref().unwrap_or("none"),
        "forwarding"
    );

    tracing::info!("grouprelay ready");
    let notifier = Arc::new(Notifier::from_env());
    notifier.notify(&format!("READY=1\nSTATUS={}", status_line(&queue)));
    let supervision = tokio::spawn(supervise(
        notifier.clone(),
        queue.clone(),
        shutdown.clone(),
        forwarder_stop,
    ));
    let api = Arc::new(Api::new(
        queue.clone(),
        config.ingest,
        upstream_health,
        admin_access,
    ));
    let mut listeners = listeners;
    listeners.push(admin_listener);
    server::run(listeners, api, config.server, shutdown).await;
    tracing::info!("listeners stopped");
    stop_forwarding.fire();
    match forwarding.await {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => tracing::error!(error = %panic, "the forwarder failed"),
        Err(_) => tracing::error!("the forwarder failed"),
    }
    queue
        .close()
        .await
        .map_err(|e| DaemonError::Runtime(format!("final flush failed: {e}")))?;
    supervision.abort();
    tracing::info!(
        stored_bytes = queue.stored_bytes(),
        "stopped; {} left queued ({} stored)",
        count(queue.counts().pending, "call"),
        bytes(queue.stored_bytes())
    );
    Ok(())
}

/// The admin socket, bound: mode 0600, or 0660 with `--admin-group` as its group.
fn admin_socket(config: &Config) -> Result<(Listener, AdminAccess), DaemonError> {
    let group = match &config.admin.group {
        Some(name) => Some(Group::named(name).map_err(DaemonError::Runtime)?),
        None => None,
    };
    let socket = AdminSocket {
        path: config.admin.path(&config.queue.data_dir),
        group,
    };
    let listener = socket.bind().map_err(|e| {
        DaemonError::Runtime(format!(
            "cannot listen on the admin socket {}: {e}",
            socket.path.display()
        ))
    })?;
    tracing::info!(path = %socket.path.display(), "admin API on its socket");
    let access = AdminAccess {
        socket: socket.path.clone(),
        who_may: config.admin.who_may(),
    };
    Ok((Listener::Admin(listener, Arc::new(socket)), access))
}

/// The listeners: the sockets the service manager passed, held to the loopback rule like
/// `--listen`, and the addresses to bind.
async fn listen(config: &Config, inherited: Vec<Inherited>) -> Result<Vec<Listener>, DaemonError> {
    if let Some(remote) = inherited.iter().find(|socket| !socket.addr.is_local()) {
        if !config.allow_remote {
            return Err(DaemonError::Config(ConfigError {
                setting: "--listen".into(),
                problem: format!(
                    "the passed socket {} is not a loopback address; pass --allow-remote to listen on it",
                    remote.addr.as_setting()
                ),
            }));
        }
    }
    if !inherited.is_empty() {
        tracing::info!(
            sockets = inherited.len(),
            "serving the sockets the service manager passed"
        );
    }
    let listeners = server::open(&config.listen, config.listen_given, inherited)
        .await
        .map_err(DaemonError::Runtime)?;
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("listening on {addr}");
        }
    }
    Ok(listeners)
}
