//! The errors the plugin host reports to its caller.
//!
//! A misbehaving plugin *during a run* is not an error here: it becomes
//! `error` test results. These are the failures the runner must act on:
//! configuration at start-up, a plugin file that cannot be loaded, a checkout
//! that cannot be opened. wasmtime's errors are kept as the `source`, boxed, so
//! no wasmtime type crosses the crate's API.

use std::path::PathBuf;

/// A boxed cause, so that wasmtime's error type stays inside this crate.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the plugin host could not do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// An allowed program was given as a path or an empty name.
    #[error("resolve program `{name}`: expected a bare program name such as `python3`")]
    ProgramName {
        /// The name as given.
        name: String,
    },
    /// An allowed program is not an executable file in any `PATH` directory.
    #[error("resolve program `{name}`: not found on PATH; install it or remove it from the allowed programs")]
    ProgramNotFound {
        /// The name looked for.
        name: String,
    },
    /// An allowed program was found but its real path could not be determined.
    #[error("resolve program `{name}` at {}: {detail}", path.display())]
    ProgramUnresolvable {
        /// The name looked for.
        name: String,
        /// Where it was found on `PATH`.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The WebAssembly engine could not be configured.
    #[error("set up the WebAssembly engine")]
    Engine(#[source] BoxError),
    /// A helper thread (the epoch ticker, or the one that calls `info`)
    /// could not be started.
    #[error("start a plugin host thread")]
    Thread(#[source] std::io::Error),
    /// A plugin file could not be read.
    #[error("read plugin {}", path.display())]
    ReadPlugin {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a WebAssembly component wasmtime can compile.
    #[error("load {origin}: {reason}")]
    Compile {
        /// Which plugin (built-in name or file path).
        origin: String,
        /// What the bytes are instead, and what to do about it.
        reason: String,
        /// wasmtime's reason, when the bytes look like a component (for
        /// other bytes the reason says all there is to say).
        #[source]
        source: Option<BoxError>,
    },
    /// The component does not implement the `kiln:executor` world: it lacks
    /// the export, or it needs imports the host does not provide.
    #[error("load {origin}: it is not a Kiln executor plugin ({reason})")]
    NotAPlugin {
        /// Which plugin.
        origin: String,
        /// What is missing.
        reason: String,
    },
    /// The plugin was built against a contract version this host cannot run.
    #[error(
        "load {origin}: it was built for kiln:executor@{found}, and this runner implements \
         kiln:executor@{supported}; rebuild the plugin against a compatible version"
    )]
    IncompatibleContract {
        /// Which plugin.
        origin: String,
        /// The contract version the plugin targets.
        found: String,
        /// The contract version the host implements.
        supported: String,
    },
    /// Instantiating the plugin or calling its `info` export failed.
    #[error("load {origin}: {detail}")]
    Info {
        /// Which plugin.
        origin: String,
        /// What went wrong, including the trap if it trapped.
        detail: String,
    },
    /// The plugin describes itself inconsistently (e.g. an invalid claim).
    #[error("load {origin}: {detail}")]
    BadInfo {
        /// Which plugin.
        origin: String,
        /// What is wrong with its `info`.
        detail: String,
    },
    /// Two plugins have the same name.
    #[error("load {origin}: a plugin named `{name}` is already loaded")]
    DuplicateName {
        /// Which plugin.
        origin: String,
        /// The name they share.
        name: String,
    },
    /// The compile cache directory could not be created.
    #[error("create the plugin compile cache {}", path.display())]
    Cache {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The job's checkout could not be opened for the plugin.
    #[error("open the checkout {} for plugins", path.display())]
    Checkout {
        /// The checkout directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The receiver of the test results was dropped, so the run was stopped.
    #[error("deliver test results: the receiving end of the channel was dropped")]
    ReportClosed,
}
