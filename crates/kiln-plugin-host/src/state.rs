//! What one plugin call's store holds, and the host functions (`run-command`,
//! `spawn`/`spawn-open` and its `process`, `report`, `file-done`,
//! `next-files`, `log`) the plugin calls through it.
//!
//! A store lives for exactly one call (`info` at load, or `run` for one job),
//! so nothing a plugin does can leak into the next call or another job.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kiln_proto::{Escaped, Outcome, TestResult};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use wasmtime::component::Resource;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxView, WasiView};

use crate::HostEvent;
use crate::bindings::kiln::executor::{host, types};
use kiln_proto::{MAX_TEST_ID_BYTES as MAX_ID_BYTES, MAX_TEST_MESSAGE_BYTES as MAX_MESSAGE_BYTES};
use kiln_sandbox::{self as command, Capped, Refusal};

/// Longest `log` line forwarded to tracing.
const MAX_LOG_BYTES: usize = 4 * 1024;
/// How much of what the plugin itself printed is kept, to explain a crash.
const GUEST_OUTPUT_BYTES: usize = 8 * 1024;

/// The data of a plugin's store.
pub(crate) struct HostState {
    /// The plugin's WASI view: at most the checkout, read-only.
    wasi: WasiCtx,
    /// WASI's resources (open files, streams).
    table: ResourceTable,
    /// The memory limit, and whether the plugin ran into it.
    pub(crate) limiter: MemoryLimiter,
    /// Table indexes of the programs the plugin spawned and has not dropped.
    spawned: Vec<u32>,
    /// Everything about this call.
    pub(crate) call: Call,
}

impl HostState {
    pub(crate) fn new(wasi: WasiCtx, max_memory: usize, call: Call) -> HostState {
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(max_memory),
            spawned: Vec::new(),
            call,
        }
    }

    /// Kills every program the plugin spawned and did not drop (it trapped,
    /// or ran out of time), and waits until they are gone: a call's programs
    /// never outlive it.
    pub(crate) async fn reap(&mut self) {
        for rep in std::mem::take(&mut self.spawned) {
            if let Ok(process) = self.table.delete(Resource::<Spawned>::new_own(rep)) {
                process.0.finish().await;
            }
        }
    }
}

/// One call of a plugin: who it is, what it may do, and what it did.
pub(crate) struct Call {
    /// The plugin's name, for logs and messages.
    pub plugin: Arc<str>,
    /// Programs it may run: bare name to absolute path.
    pub granted: Arc<BTreeMap<String, PathBuf>>,
    /// The runner's cap on one command's wall-clock time.
    pub command_timeout: Duration,
    /// Bytes kept per command output stream.
    pub max_output: usize,
    /// Directories commands must not see (the policy's).
    pub hidden: Arc<[PathBuf]>,
    /// The job being run; `None` while the plugin is loaded (`info`), when
    /// it may neither run commands nor report.
    pub job: Option<Job>,
    /// How much of the call's time limit (the policy's per file, times the
    /// files it was given) the plugin has used.
    pub clock: CallClock,
    /// What the plugin printed on stdout/stderr (bounded).
    pub output: GuestOutput,
}

/// Measures a call's time against its limit: wall-clock time since the call
/// started, minus the time spent inside `run-command` (which the command
/// timeout bounds instead). Shared between the store (which marks commands)
/// and the watchers that enforce the limit.
#[derive(Clone)]
pub(crate) struct CallClock(Arc<Mutex<ClockState>>);

struct ClockState {
    /// The limit: grows as `next-files` hands the call more files.
    limit: Duration,
    started: Instant,
    /// Time spent in commands that have ended.
    in_commands: Duration,
    /// When the command running now started.
    command_since: Option<Instant>,
}

impl CallClock {
    pub(crate) fn start(limit: Duration) -> CallClock {
        CallClock(Arc::new(Mutex::new(ClockState {
            limit,
            started: Instant::now(),
            in_commands: Duration::ZERO,
            command_since: None,
        })))
    }

    /// The time that counts against the call's limit so far.
    pub(crate) fn used(&self) -> Duration {
        let state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let in_command = state.command_since.map_or(Duration::ZERO, |since| now - since);
        (now - state.started).saturating_sub(state.in_commands + in_command)
    }

    /// The call's time limit now.
    pub(crate) fn limit(&self) -> Duration {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).limit
    }

    /// Whether the call has used up its time limit.
    pub(crate) fn exceeded(&self) -> bool {
        self.used() >= self.limit()
    }

    fn extend(&self, by: Duration) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        state.limit = state.limit.saturating_add(by);
    }

    /// Stops the clock until the returned guard is dropped (also when a
    /// cancelled call drops it mid-command).
    fn pause(&self) -> ClockPause {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).command_since = Some(Instant::now());
        ClockPause(self.clone())
    }
}

struct ClockPause(CallClock);

impl Drop for ClockPause {
    fn drop(&mut self) {
        let mut state = self.0.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(since) = state.command_since.take() {
            state.in_commands += since.elapsed();
        }
    }
}

/// What a `run` call (one batch) needs to know about the job, and what it
/// reported.
pub(crate) struct Job {
    /// The batch's files, for log lines and `file-done`.
    pub files: Vec<String>,
    /// Files the plugin said are complete; their `FileDone` has been sent.
    pub done: HashSet<String>,
    /// The cap on a spawned program's wall-clock time: the per-file limit
    /// times the batch's files.
    pub spawn_timeout: Duration,
    /// The per-file limit of a spawned program: each file `next-files`
    /// hands out extends the running programs' cap by it.
    pub file_timeout: Duration,
    /// The per-file limit of the call, which extends its limit likewise.
    pub call_timeout: Duration,
    /// Where `next-files` waits for more files (see
    /// [`crate::PluginHost::run_with`]); `None`: no more will come.
    pub more: Option<mpsc::UnboundedReceiver<Vec<String>>>,
    /// The checkout (absolute), where commands run.
    pub checkout: PathBuf,
    /// Where results go.
    pub report: mpsc::UnboundedSender<HostEvent>,
    /// Test ids already reported in this run (across plugins): a repeated id
    /// keeps its first result, as the contract says.
    pub seen: HashSet<String>,
    /// Files that got at least one result from this plugin.
    pub files_with_results: HashSet<String>,
    /// Set when the receiver is gone: the plugin is then stopped.
    pub closed: bool,
    /// Variables added to every command's environment (see [`crate::RunSettings`]).
    pub env: Arc<[(String, String)]>,
}

impl Job {
    /// Sends `event` to the runner. When nobody listens any more, the
    /// plugin is stopped (the error traps it) rather than run tests whose
    /// results would be thrown away.
    fn send(&mut self, event: HostEvent) -> wasmtime::Result<()> {
        if self.report.send(event).is_err() {
            self.closed = true;
            return Err(wasmtime::Error::msg("the runner stopped listening for results"));
        }
        Ok(())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for HostState {}

/// A program a plugin started with `spawn`: what the `process` resource's
/// handle stands for in the store's table. (The generated `host::Process` is
/// only a marker type, so handles are converted by their index.)
pub(crate) struct Spawned(command::Process);

fn spawned(handle: &Resource<host::Process>) -> Resource<Spawned> {
    Resource::new_borrow(handle.rep())
}

impl host::HostProcess for HostState {
    async fn next(&mut self, process: Resource<host::Process>) -> wasmtime::Result<host::ProcessEvent> {
        // Waiting for a program is not the plugin computing.
        let _paused = self.call.clock.pause();
        let process = self.table.get_mut(&spawned(&process))?;
        Ok(match process.0.next().await {
            command::Event::Stdout(bytes) => host::ProcessEvent::Stdout(bytes),
            command::Event::Stderr(bytes) => host::ProcessEvent::Stderr(bytes),
            command::Event::Exited(exit) => {
                tracing::debug!(plugin = %self.call.plugin, exit_code = ?exit.exit_code, timed_out = exit.timed_out, "spawned program ended");
                host::ProcessEvent::Exited(host::ExitStatus { exit_code: exit.exit_code, timed_out: exit.timed_out })
            }
        })
    }

    async fn kill(&mut self, process: Resource<host::Process>) -> wasmtime::Result<()> {
        self.table.get_mut(&spawned(&process))?.0.kill();
        Ok(())
    }

    async fn write(&mut self, process: Resource<host::Process>, data: Vec<u8>) -> wasmtime::Result<bool> {
        Ok(self.table.get_mut(&spawned(&process))?.0.write(data))
    }

    async fn close_input(&mut self, process: Resource<host::Process>) -> wasmtime::Result<()> {
        self.table.get_mut(&spawned(&process))?.0.close_input();
        Ok(())
    }

    async fn drop(&mut self, process: Resource<host::Process>) -> wasmtime::Result<()> {
        // Dropping the handle kills the program and what it started; the
        // call goes on once they are gone.
        let rep = process.rep();
        self.spawned.retain(|r| *r != rep);
        self.table.delete(Resource::<Spawned>::new_own(rep))?.0.finish().await;
        Ok(())
    }
}

impl host::Host for HostState {
    async fn run_command(
        &mut self,
        cmd: host::Command,
        input: Vec<u8>,
    ) -> wasmtime::Result<Result<host::CommandOutput, host::CommandError>> {
        let _paused = self.call.clock.pause();
        let (checkout, request) = match self.request(cmd, input) {
            Ok(ready) => ready,
            Err(denied) => return Ok(Err(denied)),
        };
        let program = request.program.clone();
        let result = command::run(&checkout, request, &self.limits(self.call.command_timeout)).await;
        Ok(self.explain_refusal(&program, result).map(|out| {
            tracing::debug!(plugin = %self.call.plugin, exit_code = ?out.exit_code, timed_out = out.timed_out, "command ended");
            host::CommandOutput { exit_code: out.exit_code, timed_out: out.timed_out, stdout: out.stdout, stderr: out.stderr }
        }))
    }

    async fn spawn(
        &mut self,
        cmd: host::Command,
        input: Vec<u8>,
    ) -> wasmtime::Result<Result<Resource<host::Process>, host::CommandError>> {
        self.start(cmd, input, false).await
    }

    async fn spawn_open(
        &mut self,
        cmd: host::Command,
        input: Vec<u8>,
    ) -> wasmtime::Result<Result<Resource<host::Process>, host::CommandError>> {
        self.start(cmd, input, true).await
    }

    async fn next_files(&mut self) -> wasmtime::Result<Vec<String>> {
        let Some(job) = &mut self.call.job else { return Ok(Vec::new()) };
        if job.more.is_none() {
            return Ok(Vec::new());
        }
        // Every file given so far is done now, whether the plugin said so
        // or not: the runner may end their batch.
        let undone: Vec<String> = job.files.iter().filter(|f| !job.done.contains(*f)).cloned().collect();
        for file in undone {
            job.done.insert(file.clone());
            job.send(HostEvent::FileDone(file))?;
        }
        job.send(HostEvent::Idle)?;
        // Waiting for the runner is not the plugin computing.
        let _paused = self.call.clock.pause();
        let Some(more) = job.more.as_mut() else { return Ok(Vec::new()) };
        let Some(files) = more.recv().await else {
            job.more = None;
            return Ok(Vec::new());
        };
        let count = u32::try_from(files.len()).unwrap_or(u32::MAX);
        let (file_timeout, call_timeout) = (job.file_timeout, job.call_timeout);
        for rep in &self.spawned {
            if let Ok(process) = self.table.get(&Resource::<Spawned>::new_borrow(*rep)) {
                process.0.extend(file_timeout.saturating_mul(count));
            }
        }
        job.spawn_timeout = job.spawn_timeout.saturating_add(file_timeout.saturating_mul(count));
        self.call.clock.extend(call_timeout.saturating_mul(count));
        tracing::debug!(plugin = %self.call.plugin, files = files.len(), "more files for the running plugin");
        job.files.extend(files.iter().cloned());
        Ok(files)
    }

    async fn file_done(&mut self, file: String) -> wasmtime::Result<()> {
        let Some(job) = &mut self.call.job else {
            tracing::warn!(plugin = %self.call.plugin, "ignoring `file-done` outside `run`");
            return Ok(());
        };
        if !job.files.contains(&file) {
            tracing::warn!(plugin = %self.call.plugin, file = %Escaped(&file), "ignoring `file-done` for a file not in the batch");
            return Ok(());
        }
        if job.done.insert(file.clone()) {
            job.send(HostEvent::FileDone(file))?;
        }
        Ok(())
    }

    async fn report(&mut self, result: types::TestResult) -> wasmtime::Result<()> {
        let Some(job) = &mut self.call.job else {
            tracing::warn!(plugin = %self.call.plugin, "ignoring a result reported outside `run`");
            return Ok(());
        };
        let id = truncate(result.id, MAX_ID_BYTES);
        if !job.seen.insert(id.clone()) {
            tracing::debug!(plugin = %self.call.plugin, id, "dropping a repeated test id");
            return Ok(());
        }
        if job.done.contains(&result.file) {
            tracing::warn!(plugin = %self.call.plugin, id = %Escaped(&id), file = %Escaped(&result.file), "dropping a result for a file already marked done");
            return Ok(());
        }
        job.files_with_results.insert(result.file.clone());
        // What the dispatcher adds (the runner, flakiness) it sets when it records the result.
        let result = TestResult::new(
            id,
            truncate(result.file, MAX_ID_BYTES),
            outcome(result.outcome),
            result.duration_ms,
            truncate(result.message, MAX_MESSAGE_BYTES),
        );
        job.send(HostEvent::Test(result))
    }

    async fn log(&mut self, message: String) -> wasmtime::Result<()> {
        tracing::info!(plugin = %self.call.plugin, "{}", truncate(message, MAX_LOG_BYTES));
        Ok(())
    }
}

impl HostState {
    /// `spawn`, or with `open` `spawn-open`.
    async fn start(
        &mut self,
        cmd: host::Command,
        input: Vec<u8>,
        open: bool,
    ) -> wasmtime::Result<Result<Resource<host::Process>, host::CommandError>> {
        let (checkout, request) = match self.request(cmd, input) {
            Ok(ready) => ready,
            Err(denied) => return Ok(Err(denied)),
        };
        let program = request.program.clone();
        let timeout = self.call.job.as_ref().map_or(self.call.command_timeout, |job| job.spawn_timeout);
        let limits = self.limits(timeout);
        let result = if open {
            command::spawn_open(&checkout, request, &limits).await
        } else {
            command::spawn(&checkout, request, &limits).await
        };
        match self.explain_refusal(&program, result) {
            Ok(process) => {
                let rep = self.table.push(Spawned(process))?.rep();
                self.spawned.push(rep);
                Ok(Ok(Resource::new_own(rep)))
            }
            Err(error) => Ok(Err(error)),
        }
    }

    /// request: the checkout to run it in, and the request.
    fn request(&self, cmd: host::Command, input: Vec<u8>) -> Result<(PathBuf, command::Request), host::CommandError> {
        let Some(job) = &self.call.job else {
            return Err(host::CommandError::Denied("commands can only be run during `run`".to_owned()));
        };
        let request = command::Request {
            program: cmd.program,
            args: cmd.args,
            cwd: cmd.cwd,
            // The sandbox caps it at the limit it is given.
            timeout: Duration::from_millis(cmd.timeout_ms),
            input: Some(input),
        };
        tracing::debug!(plugin = %self.call.plugin, program = %request.program, args = ?request.args, "running command");
        Ok((job.checkout.clone(), request))
    }

    /// The sandbox's limits for one of this plugin's commands.
    fn limits(&self, timeout: Duration) -> command::Limits<'_> {
        command::Limits {
            granted: &self.call.granted,
            timeout,
            max_output: self.call.max_output,
            hidden: &self.call.hidden,
            env: self.call.job.as_ref().map_or(&[], |job| &job.env),
            binds: &[],
        }
    }

    /// Logs why a command was refused and turns the refusal into the error
    /// the plugin sees.
    fn explain_refusal<T>(&self, program: &str, result: Result<T, Refusal>) -> Result<T, host::CommandError> {
        let files = self.call.job.as_ref().map(|job| job.files.join(", ")).unwrap_or_default();
        result.map_err(|refusal| match refusal {
            Refusal::Denied(why) if !self.call.granted.contains_key(program) => {
                // The one place a program the runner does not allow is a warning:
                // a file that needs it (at start-up, it is only an info line).
                tracing::warn!(
                    plugin = %self.call.plugin,
                    files = %Escaped(&files),
                    program = %Escaped(program),
                    "{} needs program `{}`, which is not allowed here (allow it with --allow-program {})",
                    Escaped(&files),
                    Escaped(program),
                    Escaped(program)
                );
                host::CommandError::Denied(why)
            }
            Refusal::Denied(why) => {
                tracing::warn!(plugin = %self.call.plugin, "command denied: {why}");
                host::CommandError::Denied(why)
            }
            Refusal::Failed(why) => {
                tracing::warn!(plugin = %self.call.plugin, "command failed to start: {why}");
                host::CommandError::Failed(why)
            }
        })
    }
}

fn outcome(outcome: types::Outcome) -> Outcome {
    match outcome {
        types::Outcome::Pass => Outcome::Pass,
        types::Outcome::Fail => Outcome::Fail,
        types::Outcome::Error => Outcome::Error,
        types::Outcome::Skip => Outcome::Skip,
        types::Outcome::Xfail => Outcome::Xfail,
        types::Outcome::Xpass => Outcome::Xpass,
    }
}

/// `text`, or its head and tail with a marker if longer than `max` bytes;
/// never longer than `max` (the dispatcher refuses what is).
pub(crate) fn truncate(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    // Room for the marker, and for the replacement characters a cut
    // character may turn into.
    let mut capped = Capped::new(max.saturating_sub(64));
    capped.push(text.as_bytes());
    String::from_utf8_lossy(&capped.to_bytes()).into_owned()
}

/// The store's resource limiter: wasmtime's [`StoreLimits`] with a record of
/// whether the plugin hit the memory limit, so that the trap that usually
/// follows (an allocation failure aborts a Rust guest) can be explained.
pub(crate) struct MemoryLimiter {
    inner: StoreLimits,
    max_memory: usize,
    /// Whether a memory growth was refused for going over the limit.
    pub exceeded: bool,
}

impl MemoryLimiter {
    fn new(max_memory: usize) -> MemoryLimiter {
        MemoryLimiter { inner: StoreLimitsBuilder::new().memory_size(max_memory).build(), max_memory, exceeded: false }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.exceeded = true;
        }
        self.inner.memory_growing(current, desired, maximum)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The plugin's stdout and stderr: a bounded buffer (head and tail) that
/// never refuses a write, so a chatty plugin cannot fail on printing, and
/// whose content explains a crash (a Rust guest prints its panic message
/// before it aborts).
#[derive(Clone)]
pub(crate) struct GuestOutput(Arc<Mutex<Capped>>);

impl GuestOutput {
    pub(crate) fn new() -> GuestOutput {
        GuestOutput(Arc::new(Mutex::new(Capped::new(GUEST_OUTPUT_BYTES))))
    }

    /// What the plugin printed (bounded), as text.
    pub(crate) fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner).to_bytes();
        String::from_utf8_lossy(&bytes).trim_end().to_owned()
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_head_and_tail() {
        assert_eq!(truncate("short".to_owned(), 10), "short");
        let cut = truncate("abcdefghij".repeat(20), 100);
        assert_eq!(cut, "abcdefghijabcdefgh\n[... 164 bytes cut ...]\ncdefghijabcdefghij");
        for text in ["x".repeat(MAX_MESSAGE_BYTES * 3), "\u{1F600}".repeat(MAX_MESSAGE_BYTES)] {
            assert!(truncate(text, MAX_MESSAGE_BYTES).len() <= MAX_MESSAGE_BYTES);
        }
    }
}
