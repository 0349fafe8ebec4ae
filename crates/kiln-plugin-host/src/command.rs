//! `run-command`: starts a program for a plugin, in the job's checkout, under
//! the runner's limits.
//!
//! Every command runs in its own process group with a cleared environment,
//! stdin closed, and a wall-clock timeout after which the whole group gets
//! SIGKILL. When the program exits, the rest of its group is killed too, so a
//! background child cannot keep the output pipes (and the job) alive. Output
//! is read concurrently from both pipes and capped, keeping the head and the
//! tail, so a chatty program costs bounded memory. A program that escapes its
//! group (`setsid`) is out of reach here; that needs a cgroup or a PID
//! namespace.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// The environment every command gets, besides `HOME` (the checkout).
const ENVIRONMENT: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("LANG", "C.UTF-8"),
    // The checkout belongs to the job; do not litter it with bytecode.
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("PYTHONIOENCODING", "utf-8"),
];

/// How long to keep reading the pipes after the program's group is gone.
/// Only a process that escaped the group can hold them open longer.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// A command as the plugin asked for it, before any check.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub program: String,
    pub args: Vec<String>,
    pub cwd: String,
    pub timeout: Duration,
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Output {
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why a command was not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not allowed: program not granted, or a working directory outside the
    /// checkout.
    Denied(String),
    /// Allowed, but it could not be started.
    Failed(String),
}

/// The limits and grants that apply to one plugin's commands.
pub(crate) struct Limits<'a> {
    /// Programs this plugin may run: bare name to absolute path.
    pub granted: &'a BTreeMap<String, PathBuf>,
    /// The runner's cap on a command's wall-clock time.
    pub timeout: Duration,
    /// Bytes kept per stream.
    pub max_output: usize,
}

/// Runs `request` in `checkout` (an absolute path) under `limits`.
pub(crate) async fn run(checkout: &Path, request: Request, limits: &Limits<'_>) -> Result<Output, Refusal> {
    let Some(program) = limits.granted.get(&request.program) else {
        let granted: Vec<&str> = limits.granted.keys().map(String::as_str).collect();
        return Err(Refusal::Denied(format!(
            "program `{}` is not granted to this plugin (granted: {})",
            request.program,
            if granted.is_empty() { "none".to_owned() } else { granted.join(", ") }
        )));
    };
    let cwd = working_directory(checkout, &request.cwd)?;
    // A zero timeout means "no limit of my own": the runner's applies.
    let timeout = if request.timeout.is_zero() { limits.timeout } else { request.timeout.min(limits.timeout) };

    let mut command = Command::new(program);
    command
        .args(&request.args)
        .current_dir(&cwd)
        .env_clear()
        .envs(ENVIRONMENT.iter().copied())
        .env("HOME", checkout)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // If this future is dropped (the job was cancelled), tokio kills and
        // reaps the program; `GroupGuard` takes care of the rest of its group.
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| Refusal::Failed(format!("could not start {} in {}: {e}", program.display(), cwd.display())))?;
    let guard = child.id().map(GroupGuard);

    let mut stdout = Capped::new(limits.max_output);
    let mut stderr = Capped::new(limits.max_output);
    let (status, timed_out) = {
        let stdout_pipe = child.stdout.take();
        let stderr_pipe = child.stderr.take();
        let reading = async { tokio::join!(drain(stdout_pipe, &mut stdout), drain(stderr_pipe, &mut stderr)) };
        let waiting = async {
            let ended = match tokio::time::timeout(timeout, child.wait()).await {
                Ok(status) => (status, false),
                Err(_) => {
                    if let Some(guard) = &guard {
                        guard.kill();
                    }
                    (child.wait().await, true)
                }
            };
            // The program is gone; so must be anything it left behind in its
            // group, which may still hold the pipes open. (The group id could
            // in theory be reused once the group is empty, but only by a
            // process that made itself a group leader in the microseconds
            // since; a cgroup per command would close that gap.)
            if let Some(guard) = &guard {
                guard.kill();
            }
            ended
        };
        tokio::pin!(reading, waiting);
        let mut read_all = false;
        let ended = loop {
            tokio::select! {
                _ = &mut reading, if !read_all => read_all = true,
                ended = &mut waiting => break ended,
            }
        };
        if !read_all {
            // Whatever is still buffered in the pipes arrives right away; a
            // process that left the group could hold them open forever.
            let _ = tokio::time::timeout(DRAIN_GRACE, &mut reading).await;
        }
        ended
    };
    if let Some(guard) = guard {
        guard.disarm();
    }
    let status = status.map_err(|e| Refusal::Failed(format!("could not wait for {}: {e}", program.display())))?;
    Ok(Output { exit_code: status.code(), timed_out, stdout: stdout.to_bytes(), stderr: stderr.to_bytes() })
}

/// The checkout joined with a plugin's relative working directory, which may
/// not leave the checkout.
fn working_directory(checkout: &Path, cwd: &str) -> Result<PathBuf, Refusal> {
    let relative = Path::new(cwd);
    if !relative.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(Refusal::Denied(format!(
            "working directory `{cwd}` must be relative to the checkout, without `..`"
        )));
    }
    Ok(checkout.join(relative))
}

/// Reads `pipe` to its end into `into`.
async fn drain(pipe: Option<impl AsyncRead + Unpin>, into: &mut Capped) {
    let Some(mut pipe) = pipe else { return };
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => into.push(&buffer[..n]),
        }
    }
}

/// Kills a command's process group when dropped, unless disarmed: a job
/// cancelled mid-command must not leave the command's children running.
struct GroupGuard(u32);

impl GroupGuard {
    fn kill(&self) {
        kill_process_group(self.0);
    }

    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends SIGKILL to every process in the group `pgid`.
#[expect(unsafe_code, reason = "libc::kill is the only way to signal a process group from std/tokio")]
fn kill_process_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    // Never signal group 0 (our own) or -1 (every process we may signal).
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and has no memory-safety
    // preconditions. A negative pid addresses the process group; an error
    // (ESRCH: the group is already empty) needs no handling.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// A byte buffer that keeps at most a fixed number of bytes: the first half
/// and the last half of what was pushed, and how much was cut in between.
pub(crate) struct Capped {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_cap: usize,
    tail_cap: usize,
    cut: u64,
}

impl Capped {
    pub(crate) fn new(max: usize) -> Capped {
        let head_cap = max / 2;
        Capped { head: Vec::new(), tail: VecDeque::new(), head_cap, tail_cap: max - head_cap, cut: 0 }
    }

    pub(crate) fn push(&mut self, mut data: &[u8]) {
        let to_head = data.len().min(self.head_cap - self.head.len());
        self.head.extend_from_slice(&data[..to_head]);
        data = &data[to_head..];
        if data.len() >= self.tail_cap {
            self.cut += (self.tail.len() + data.len() - self.tail_cap) as u64;
            self.tail.clear();
            self.tail.extend(&data[data.len() - self.tail_cap..]);
        } else {
            let overflow = (self.tail.len() + data.len()).saturating_sub(self.tail_cap);
            self.tail.drain(..overflow);
            self.cut += overflow as u64;
            self.tail.extend(data);
        }
    }

    /// The kept bytes, with a marker where bytes were cut.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = self.head.clone();
        if self.cut > 0 {
            bytes.extend_from_slice(format!("\n[... {} bytes cut ...]\n", self.cut).as_bytes());
        }
        bytes.extend(&self.tail);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_keeps_everything_below_the_cap() {
        let mut c = Capped::new(10);
        c.push(b"hello");
        c.push(b"world");
        assert_eq!(c.to_bytes(), b"helloworld");
    }

    #[test]
    fn capped_keeps_head_and_tail() {
        let mut c = Capped::new(6);
        for chunk in [&b"abcd"[..], b"efgh", b"ij", b"klmnop"] {
            c.push(chunk);
        }
        assert_eq!(String::from_utf8(c.to_bytes()).unwrap(), "abc\n[... 10 bytes cut ...]\nnop");
        let mut c = Capped::new(6);
        c.push(b"abcdefghijklmnop");
        assert_eq!(String::from_utf8(c.to_bytes()).unwrap(), "abc\n[... 10 bytes cut ...]\nnop");
    }

    #[test]
    fn working_directory_stays_inside() {
        let root = Path::new("/checkout");
        assert_eq!(working_directory(root, "").unwrap(), root);
        assert_eq!(working_directory(root, "a/./b").unwrap(), root.join("a/b"));
        for bad in ["..", "a/../..", "/etc"] {
            assert!(matches!(working_directory(root, bad), Err(Refusal::Denied(_))), "{bad}");
        }
    }
}
