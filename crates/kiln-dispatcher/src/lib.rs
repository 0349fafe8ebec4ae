//! The Kiln dispatcher: the hub every other process connects to.
//!
//! It accepts QUIC connections from peers holding a certificate signed by the
//! Kiln CA, authorizes each request by the role in that certificate, keeps a
//! git mirror fed by observers, queues submitted commits, hands them to
//! registered runners as leases, serves runners the source they need, and
//! stores per-commit results as files.
//!
//! Layout: [`state`] is the scheduling state machine (no I/O); [`core`] is
//! the one task that owns it, storing each event's changes through a
//! [`store::Store`] ([`db`]: SQLite) before acting on them and publishing
//! them on [`stream`]; [`results`] writes the results directory from that
//! stream; [`history`] reads each test's history and flakiness from the
//! state; [`server`] owns sockets, tasks and the mirror; [`private`] keeps
//! the state directory's files readable by the dispatcher's user only;
//! [`view`] is the read side the dashboard uses (it never makes the owner
//! wait); [`control`] says which role each request needs and carries the
//! one action the dashboard may take (cancel) to the owner by the path
//! `kiln cancel` takes.

pub mod control;
pub mod core;
pub mod db;
pub mod history;
pub mod private;
pub mod results;
pub mod server;
pub mod state;
pub mod store;
pub mod stream;
pub mod view;

pub use server::{Config, Dispatcher, StartError};
