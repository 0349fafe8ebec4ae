//! Runs Kiln's executor plugins: WebAssembly components built for
//! wasm32-wasip2 against the `kiln:executor` contract (plugins/wit).
//!
//! Key decision: a plugin is untrusted code that gets nothing by default. Each
//! call runs in a fresh store whose only capabilities are the job's checkout,
//! read-only at `/checkout`, and the host imports: `run-command` and `spawn`
//! (only for programs both the plugin asked for and the runner's [`Policy`]
//! allows, started with a cleared environment, a timeout that kills the whole
//! process group, and capped or streamed output), `report`, `file-done` and
//! `log`. A plugin that traps, runs
//! out of time or memory, or returns an error becomes `error` results for the
//! files it did not report on, and the host carries on serving.
//!
//! Only this crate names wasmtime: its types and errors stay behind
//! [`PluginHost`] and [`HostError`].
//!
//! Layout: `host` loads and runs plugins; `state` is what a plugin's store
//! holds and the host functions it calls, `run-command` and `spawn` among
//! them, which start programs through `kiln-sandbox` (see its docs for what
//! it enforces); `event` is what a run sends the runner; `policy` resolves
//! the allowed programs; `claims` matches files to plugins; `cache` keeps
//! compiled plugins on disk; `bindings` is generated from the WIT. `host`
//! uses `state`, never the reverse.

mod bindings;
mod cache;
mod claims;
mod error;
mod event;
mod files;
mod host;
mod policy;
mod state;

pub use cache::Compilation;
pub use error::HostError;
pub use event::HostEvent;
pub use files::{TestFiles, test_files};
pub use host::{CONTRACT_VERSION, PluginHost, PluginSummary, RunSettings};
pub use policy::Policy;
