//! The daemon: opens the queue, binds the listeners, serves until shutdown, then closes in order.

use std::sync::Arc;

use crate::config::{self, Config, ConfigError};
use crate::forward::upstream::Upstream;
use crate::forward::{ForwardSettings, Forwarder};
use crate::ingest::Ingest;
use crate::notify::Notifier;
use crate::queue::{Queue, QueueOptions};
use crate::server::{self, Listener, ServerSettings};
use crate::shutdown::{self, Shutdown};

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

/// Runs grouprelay until `shutdown` fires. The order matters: the queue is open and the
/// forwarder is delivering the backlog before any listener accepts; on shutdown the
/// listeners stop and answer what is in flight, then the forwarder drains for up to
/// `drain_timeout`, then the queue is made durable and closed.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), DaemonError> {
    config::create_data_dir(&config.data_dir).map_err(DaemonError::Config)?;
    let options = QueueOptions {
        durability: config.durability,
        max_bytes: config.max_queue_bytes,
        min_free_bytes: config.min_free_disk_bytes,
        sync_interval: config.sync_interval,
        ..QueueOptions::new(&config.data_dir)
    };
    let queue = Queue::open(options).map_err(|e| {
        DaemonError::Runtime(format!(
            "cannot open the queue in {}: {e}",
            config.data_dir.display()
        ))
    })?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        stored_bytes = queue.stored_bytes(),
        durability = ?config.durability,
        "queue open"
    );

    let upstream = Upstream::new(
        &config.upstream,
        config.upstream_gzip,
        config.upstream_timeout,
    )
    .map_err(|e| DaemonError::Runtime(format!("upstream {}: {e}", config.upstream)))?;
    let forwarder = Forwarder::new(
        queue.clone(),
        upstream,
        ForwardSettings {
            max_batch_events: config.max_batch_events,
            flush_interval: config.flush_interval,
            concurrency: config.upstream_concurrency,
            retry_max_interval: config.retry_max_interval,
            max_age: config.max_age,
            drain_timeout: config.drain_timeout,
        },
    );
    let upstream_health = forwarder.health();
    let (stop_forwarding, forwarding_shutdown) = shutdown::channel();
    let forwarding = tokio::spawn(forwarder.run(forwarding_shutdown));
    tracing::info!(upstream = %config.upstream, "forwarding");

    let mut listeners = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        let listener = Listener::bind(addr)
            .await
            .map_err(|e| DaemonError::Runtime(format!("cannot listen on {addr}: {e}")))?;
        let bound = listener.local_addr().unwrap_or_else(|_| addr.clone());
        tracing::info!("listening on {bound}");
        listeners.push(listener);
    }

    tracing::info!("grouprelay ready");
    let notifier = Arc::new(Notifier::from_env());
    notifier.notify(&format!("READY=1\nSTATUS={}", status_line(&queue)));
    let supervision = tokio::spawn(supervise(
        notifier.clone(),
        queue.clone(),
        shutdown.clone(),
        config.drain_timeout,
    ));
    let ingest = Arc::new(Ingest::new(queue.clone(), &config, upstream_health));
    let settings = ServerSettings {
        header_read_timeout: config.header_read_timeout,
        max_connections: config.max_connections,
    };
    server::run(listeners, ingest, settings, shutdown).await;
    tracing::info!("listeners stopped");
    stop_forwarding.fire();
    if let Err(e) = forwarding.await {
        tracing::error!(error = %e, "the forwarder failed");
    }
    queue
        .close()
        .await
        .map_err(|e| DaemonError::Runtime(format!("final flush failed: {e}")))?;
    supervision.abort();
    tracing::info!(stored_bytes = queue.stored_bytes(), "stopped");
    Ok(())
}

/// What `systemctl status` shows.
fn status_line(queue: &Queue) -> String {
    let counts = queue.counts();
    format!(
        "{} calls queued ({} bytes stored), {} delivered",
        counts.pending,
        queue.stored_bytes(),
        counts.delivered
    )
}

/// Keeps systemd informed while the daemon runs: the queue depth in `STATUS=` every few
/// seconds, `WATCHDOG=1` from this event loop when `WatchdogSec=` is set (so a stuck runtime
/// gets restarted), and `STOPPING=1` with more time for the drain once shutdown begins.
async fn supervise(
    notifier: Arc<Notifier>,
    queue: Queue,
    mut shutdown: Shutdown,
    drain_timeout: std::time::Duration,
) {
    const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
    let watchdog = Notifier::watchdog_interval();
    let tick = watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY));
    let mut ticker = tokio::time::interval(tick);
    let mut stopping = false;
    let mut last_status = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.recv(), if !stopping => {
                stopping = true;
                // In-flight requests (up to 10 s), the drain, the final flush (5 s), the
                // committer's stop (5 s), and a margin.
                let extend = drain_timeout + std::time::Duration::from_secs(25);
                notifier.notify(&format!(
                    "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS=stopping: draining {} queued calls upstream",
                    extend.as_micros(),
                    queue.counts().pending
                ));
                continue;
            }
        }
        if watchdog.is_some() {
            notifier.notify("WATCHDOG=1");
        }
        if !stopping && last_status.elapsed() >= STATUS_EVERY {
            last_status = tokio::time::Instant::now();
            notifier.notify(&format!("STATUS={}", status_line(&queue)));
        }
    }
}
