//! Starts the programs Kiln's executor plugins ask for (`run-command`) as
//! confined processes, and says at start-up which confinement this machine
//! provides.
//!
//! Key decision: a test command is hostile code. It gets a cleared
//! environment, the job's checkout and nothing else the runner holds, and
//! every mechanism in [`sandbox`]'s table that the kernel and the runner's
//! privileges allow; what is missing is never silent ([`probe`], and a line
//! at the end of the command's stderr).
//!
//! This crate knows nothing of WebAssembly: `kiln-plugin-host` calls [`run`]
//! and [`spawn`] on a plugin's behalf.
//!
//! Layout: `command` checks a request (granted program, working directory),
//! starts it, and streams its output ([`Process`]) or collects it capped;
//! `sandbox` prepares each command's confinement and probes the machine;
//! `sandbox::sys` holds every system call made between `fork` and `exec`,
//! and all of the crate's `unsafe`; `sandbox::cgroup` manages the
//! per-command cgroups; `testing` builds sandboxes without chosen
//! mechanisms, for tests. Modules depend downwards only: `testing` on
//! `command`, `command` on `sandbox`.

mod command;
pub mod sandbox;
#[doc(hidden)]
pub mod testing;

pub use command::{Bind, Capped, Event, Exit, Limits, Output, Process, Refusal, Request, run, spawn, spawn_open};
pub use sandbox::{
    Coverage, Mechanism, MechanismReport, SANDBOX_ID, SandboxIdError, SandboxLimits, SandboxReport, command_user,
    probe, use_sandbox_id,
};
