//! Test support: runs commands through the same code as `run-command`,
//! with chosen limits and without chosen mechanisms, so that tests can show
//! both what a mechanism prevents and what happens without it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::command::{self, Limits, Refusal, Request};
pub use crate::sandbox::Options;
use crate::sandbox::SandboxReport;

/// How a command ended (`run-command`'s result).
#[derive(Clone, Debug)]
pub struct Output {
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A freshly probed sandbox.
pub struct Sandbox(crate::sandbox::Sandbox);

impl Sandbox {
    pub fn new(options: Options) -> Sandbox {
        Sandbox(crate::sandbox::Sandbox::new(options))
    }

    pub fn report(&self) -> &SandboxReport {
        self.0.report()
    }

    /// Runs `program` with `args` in `checkout` as `run-command` would.
    pub async fn run(
        &self,
        checkout: &Path,
        program: &Path,
        args: &[&str],
        timeout: Duration,
        max_output: usize,
    ) -> Result<Output, String> {
        self.run_hiding(checkout, program, args, timeout, max_output, &[]).await
    }

    /// [`Sandbox::run`], with `hidden` directories the command must not
    /// see.
    pub async fn run_hiding(
        &self,
        checkout: &Path,
        program: &Path,
        args: &[&str],
        timeout: Duration,
        max_output: usize,
        hidden: &[PathBuf],
    ) -> Result<Output, String> {
        let checkout = std::fs::canonicalize(checkout).map_err(|e| e.to_string())?;
        let granted: BTreeMap<String, PathBuf> = BTreeMap::from([("program".to_owned(), program.to_owned())]);
        let request = Request {
            program: "program".to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            cwd: String::new(),
            timeout,
            input: None,
        };
        let limits = Limits { granted: &granted, timeout, max_output, hidden, env: &[], binds: &[] };
        match command::run_in(&self.0, &checkout, request, &limits).await {
            Ok(out) => Ok(Output {
                exit_code: out.exit_code,
                timed_out: out.timed_out,
                stdout: out.stdout,
                stderr: out.stderr,
            }),
            Err(Refusal::Denied(why) | Refusal::Failed(why)) => Err(why),
        }
    }
}
