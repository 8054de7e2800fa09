//! Shutdown: one small signal handed to every task, so that all of them stop in order.
//!
//! The daemon holds the [`Trigger`]; each task holds a [`Shutdown`] and selects on
//! [`Shutdown::recv`] beside its work. The order is: listeners stop accepting, in-flight
//! requests finish, the queue makes everything durable, the process exits 0.

use tokio::sync::watch;

/// Fires the shutdown for every [`Shutdown`] made from it.
pub struct Trigger(watch::Sender<bool>);

/// Listens for the shutdown. Cheap to clone.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and its first listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Resolves once the shutdown has fired (at once if it already has).
    pub async fn recv(&mut self) {
        // An error means the trigger is gone, which also means "stop".
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
