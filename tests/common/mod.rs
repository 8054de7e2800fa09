//! Test helpers, one file a concept, all re-exported here for `common::…`: the real daemon,
//! a raw HTTP client, a stand-in upstream, the calls tests send, writers loading a daemon
//! until it is killed, the queue on disk and its books, `/proc`, seeds, a forward proxy, a
//! test CA, and a bound on steps that must not hang.
// Each test binary compiles these helpers anew and uses only some of them: what one binary
// leaves unused is not dead, and its re-export not unused.
#![allow(dead_code)]

mod books;
mod calls;
mod daemon;
mod disk;
mod hang;
mod http;
mod log;
mod proc;
mod proxy;
mod seed;
mod tls;
mod upstream;
mod writers;

#[allow(unused_imports)]
pub use books::{balanced, books, Books};
#[allow(unused_imports)]
pub use calls::{batch, call, group, message_ids, numbered, Group};
#[allow(unused_imports)]
pub use daemon::{run_output, run_to_exit, Daemon, BIN};
#[allow(unused_imports)]
pub use disk::{on_disk, open_again, sled_open_again, stopped_queue, OnDisk};
#[allow(unused_imports)]
pub use hang::HangGuard;
#[allow(unused_imports)]
pub use http::{
    basic_auth, basic_credentials, exchange, get, header, post, request, send_tcp, send_unix,
    Response,
};
#[allow(unused_imports)]
pub use log::Log;
#[allow(unused_imports)]
pub use proc::{peak_rss, rss, status_bytes};
#[allow(unused_imports)]
pub use proxy::{tinyproxy, Access, TinyProxy};
#[allow(unused_imports)]
pub use seed::{test_seed, Rng};
#[allow(unused_imports)]
pub use tls::TestCa;
#[allow(unused_imports)]
pub use upstream::{delivered_ids, Recorded, Reply, Upstream};
#[allow(unused_imports)]
pub use writers::acknowledged_until_killed;
