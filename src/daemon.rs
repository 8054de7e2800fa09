//! The daemon: opens the queue, binds the listeners, serves until shutdown, then closes in order.

use std::sync::Arc;

use crate::config::{self, Config, ConfigError};
use crate::ingest::Ingest;
use crate::queue::{Queue, QueueOptions};
use crate::server::{self, Listener};
use crate::shutdown::Shutdown;

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

/// Runs grouprelay until `shutdown` fires. The order matters: the queue is open before any
/// listener accepts, and it is closed (made durable) only after every listener has stopped
/// and every in-flight request has been answered.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), DaemonError> {
    config::create_data_dir(&config.data_dir).map_err(DaemonError::Config)?;
    let options = QueueOptions {
        durability: config.durability,
        max_bytes: config.max_queue_bytes,
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
        queued = queue.len(),
        durability = ?config.durability,
        "queue open"
    );

    let mut listeners = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        let listener = Listener::bind(addr)
            .await
            .map_err(|e| DaemonError::Runtime(format!("cannot listen on {addr}: {e}")))?;
        let bound = listener.local_addr().unwrap_or_else(|_| addr.clone());
        tracing::info!("listening on {bound}");
        listeners.push(listener);
    }

    let ingest = Arc::new(Ingest::new(
        queue.clone(),
        config.write_key.clone(),
        config.max_body_bytes,
    ));
    server::run(listeners, ingest, shutdown).await;
    tracing::info!("listeners stopped; flushing the queue");
    queue
        .close()
        .await
        .map_err(|e| DaemonError::Runtime(format!("final flush failed: {e}")))?;
    tracing::info!(queued = queue.len(), "stopped");
    Ok(())
}
