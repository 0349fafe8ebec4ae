//! `run-command` and `spawn`: start a program for a plugin, in the job's
//! checkout, in the process sandbox (see `sandbox`), under the runner's
//! limits. [`spawn`] hands back a [`Process`] whose output arrives as it is
//! written; [`run`] is `spawn` read to the end.
//!
//! Every command runs with a cleared environment (the fixed list below, plus
//! `HOME` and a private `TMPDIR`), stdin closed (or fed the caller's input,
//! then closed), in its own session, and a
//! working directory that may not leave the checkout, not even through a
//! symbolic link. It has a wall-clock timeout after which everything it
//! started is killed, and when the program exits, whatever it left behind is
//! killed too, so a background child cannot keep the output pipes (and the
//! job) alive. Output is read concurrently from both pipes; `run` caps it,
//! keeping the head and the tail, so a chatty program costs bounded memory,
//! and a `Process` queues a few chunks, so a program that writes faster than
//! its reader reads waits for it.
//! Lines starting with `[kiln sandbox]` at the end of stderr say what the
//! sandbox lacked or what limit the command hit.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};

use crate::sandbox::{NOTE_PREFIX, Sandbox};

/// The environment every command gets, besides `HOME` (the checkout) and
/// `TMPDIR` (its private temporary directory).
const ENVIRONMENT: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("LANG", "C.UTF-8"),
    // The checkout belongs to the job; do not litter it with bytecode.
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("PYTHONIOENCODING", "utf-8"),
];

/// How long to keep reading the pipes after the command's processes are
/// gone. Only a process that escaped the sandbox can hold them open longer.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long the sandbox may take to stop a timed-out command before its
/// supervisor is killed outright.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A command as the plugin asked for it, before any check.
#[derive(Clone, Debug)]
pub struct Request {
    /// The program's bare name, as granted.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Working directory relative to the checkout (empty: the checkout).
    pub cwd: String,
    /// The caller's own time limit; zero means the runner's.
    pub timeout: Duration,
    /// What the program reads on stdin; `None` closes stdin at once.
    pub input: Option<Vec<u8>>,
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The exit code, or `None` when a signal ended the program.
    pub exit_code: Option<i32>,
    /// Whether the timeout ended it.
    pub timed_out: bool,
    /// Its standard output, capped.
    pub stdout: Vec<u8>,
    /// Its standard error, capped, with the sandbox's notes at the end.
    pub stderr: Vec<u8>,
}

/// Why a command was not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not allowed: program not granted, or a working directory outside the
    /// checkout.
    Denied(String),
    /// Allowed, but it could not be started.
    Failed(String),
}

/// The limits and grants that apply to one plugin's commands.
pub struct Limits<'a> {
    /// Programs this plugin may run: bare name to absolute path.
    pub granted: &'a BTreeMap<String, PathBuf>,
    /// The runner's cap on a command's wall-clock time.
    pub timeout: Duration,
    /// Bytes kept per stream.
    pub max_output: usize,
    /// Directories commands must never see, even where one lies beneath a
    /// directory their root binds (the runner's work and identity
    /// directories).
    pub hidden: &'a [PathBuf],
    /// Variables added to the fixed environment (a repository's `[env]`,
    /// checked by the caller); `HOME` and `TMPDIR` are set after them and win.
    pub env: &'a [(String, String)],
    /// Host directories the command's root also holds, each at its own
    /// path: a repository's environment while it is built (writable) and the
    /// wheels it is built from (read-only).
    pub binds: &'a [Bind],
}

/// A host directory a command sees at the same path (see [`Limits::binds`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// The directory (absolute).
    pub path: PathBuf,
    /// Whether the command may write beneath it.
    pub writable: bool,
}

/// Runs `request` in `checkout` (an absolute, canonical path) under
/// `limits`, in the runner's sandbox, to its end, and returns its capped
/// output.
pub async fn run(checkout: &Path, request: Request, limits: &Limits<'_>) -> Result<Output, Refusal> {
    run_in(Sandbox::global(), checkout, request, limits).await
}

/// [`run`] in a given sandbox (tests use ones without some mechanisms).
pub(crate) async fn run_in(
    sandbox: &Sandbox,
    checkout: &Path,
    request: Request,
    limits: &Limits<'_>,
) -> Result<Output, Refusal> {
    let mut process = spawn_in(sandbox, checkout, request, limits, false).await?;
    let mut stdout = Capped::new(limits.max_output);
    let mut stderr = Capped::new(limits.max_output);
    loop {
        match process.next().await {
            Event::Stdout(bytes) => stdout.push(&bytes),
            Event::Stderr(bytes) => stderr.push(&bytes),
            Event::Exited(exit) => {
                return Ok(Output {
                    exit_code: exit.exit_code,
                    timed_out: exit.timed_out,
                    stdout: stdout.to_bytes(),
                    stderr: stderr.to_bytes(),
                });
            }
        }
    }
}

/// What a started program did next (see [`Process::next`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Bytes it wrote to stdout; never empty.
    Stdout(Vec<u8>),
    /// Bytes it wrote to stderr; never empty. The sandbox's notes come last.
    Stderr(Vec<u8>),
    /// It ended and everything it started is gone.
    Exited(Exit),
}

/// How a program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or `None` when a signal ended the program.
    pub exit_code: Option<i32>,
    /// Whether the timeout ended it.
    pub timed_out: bool,
}

/// A program started by [`spawn`]. Its output arrives through
/// [`Process::next`] as it is written; dropping the handle kills the program
/// and everything it started.
pub struct Process {
    events: mpsc::Receiver<Event>,
    /// Dropping (or sending on) this tells the supervisor to kill.
    kill: Option<oneshot::Sender<()>>,
    exit: Option<Exit>,
    supervisor: tokio::task::JoinHandle<()>,
    /// More for its stdin, while that is open ([`spawn_open`]); dropping it
    /// closes stdin.
    input: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Time added to its limit ([`Process::extend`]).
    extend: mpsc::UnboundedSender<Duration>,
}

/// How many chunks of output may wait for the reader before the program's
/// writes block: backpressure instead of unbounded memory.
const QUEUED_CHUNKS: usize = 16;

impl Process {
    /// Waits for the program's next output or its end. After
    /// [`Event::Exited`], returns that again.
    pub async fn next(&mut self) -> Event {
        if let Some(exit) = self.exit {
            return Event::Exited(exit);
        }
        let event = self.events.recv().await.unwrap_or(
            // The supervisor always sends `Exited` last; it cannot be gone
            // without it unless its runtime is shutting down.
            Event::Exited(Exit { exit_code: None, timed_out: false }),
        );
        if let Event::Exited(exit) = event {
            self.exit = Some(exit);
        }
        event
    }

    /// Kills the program and everything it started; [`Process::next`] then
    /// delivers what was written and the exit.
    pub fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }

    /// Writes `data` to the program's stdin after what it was given before;
    /// whether stdin is still open ([`spawn_open`]) for it. A program that
    /// stops reading makes later writes fail, which is its business.
    pub fn write(&mut self, data: Vec<u8>) -> bool {
        self.input.as_ref().is_some_and(|input| input.send(data).is_ok())
    }

    /// Closes the program's stdin once what was written has been delivered.
    pub fn close_input(&mut self) {
        self.input = None;
    }

    /// Adds `by` to the program's time limit (more work was handed to it).
    pub fn extend(&self, by: Duration) {
        let _ = self.extend.send(by);
    }

    /// Kills the program, if it still runs, and returns once it and
    /// everything it started are gone. (Dropping a `Process` kills too, but
    /// does not wait.)
    pub async fn finish(self) {
        let Process { events, kill, supervisor, .. } = self;
        // Nobody reads any more: the supervisor's sends fail at once.
        drop(events);
        drop(kill);
        let _ = supervisor.await;
    }
}

/// Starts `request` in `checkout` (an absolute, canonical path) under
/// `limits`, in the runner's sandbox, and returns at once.
pub async fn spawn(checkout: &Path, request: Request, limits: &Limits<'_>) -> Result<Process, Refusal> {
    spawn_in(Sandbox::global(), checkout, request, limits, false).await
}

/// [`spawn`], leaving the program's stdin open after the request's input:
/// the caller writes more with [`Process::write`] and closes it with
/// [`Process::close_input`] (or by dropping the process).
pub async fn spawn_open(checkout: &Path, request: Request, limits: &Limits<'_>) -> Result<Process, Refusal> {
    spawn_in(Sandbox::global(), checkout, request, limits, true).await
}

/// [`spawn`] in a given sandbox; `open`: see [`spawn_open`].
pub(crate) async fn spawn_in(
    sandbox: &Sandbox,
    checkout: &Path,
    request: Request,
    limits: &Limits<'_>,
    open: bool,
) -> Result<Process, Refusal> {
    let Some(program) = limits.granted.get(&request.program) else {
        let granted: Vec<&str> = limits.granted.keys().map(String::as_str).collect();
        return Err(Refusal::Denied(format!(
            "program `{}` is not granted to this plugin (granted: {})",
            request.program,
            if granted.is_empty() { "none".to_owned() } else { granted.join(", ") }
        )));
    };
    let cwd = working_directory(checkout, &request.cwd)?;
    // The checkout is the repository's content: a symbolic link in it must
    // not lead the command out of it.
    let cwd = tokio::fs::canonicalize(&cwd)
        .await
        .map_err(|e| Refusal::Failed(format!("working directory `{}`: {e}", request.cwd)))?;
    if !cwd.starts_with(checkout) {
        return Err(Refusal::Denied(format!("working directory `{}` leads outside the checkout", request.cwd)));
    }
    // A zero timeout means "no limit of my own": the runner's applies.
    let timeout = if request.timeout.is_zero() { limits.timeout } else { request.timeout.min(limits.timeout) };

    let mut confinement = sandbox
        .prepare(checkout, &cwd, program, limits.hidden, limits.binds)
        .map_err(|e| Refusal::Failed(format!("could not set up the sandbox for {}: {e}", program.display())))?;
    let mut command = Command::new(program);
    command
        .args(&request.args)
        .current_dir(&cwd)
        .env_clear()
        .envs(ENVIRONMENT.iter().copied())
        .envs(limits.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("HOME", confinement.home())
        .env("TMPDIR", confinement.tmp_dir())
        .stdin(if request.input.is_some() || open { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // If the supervisor is dropped (its runtime is going away), tokio
        // kills and reaps the child; dropping `confinement` does the rest.
        .kill_on_drop(true);
    confinement.install(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| Refusal::Failed(format!("could not start {} in {}: {e}", program.display(), cwd.display())))?;
    // Closes the parent's copies of what the child needed (cgroup files, the
    // Landlock ruleset).
    drop(command);
    confinement.started(child.id());
    let (events, receiver) = mpsc::channel(QUEUED_CHUNKS);
    let (kill, killed) = oneshot::channel();
    let (input, more) = mpsc::unbounded_channel();
    if let Some(first) = request.input {
        let _ = input.send(first);
    }
    let (extend, extended) = mpsc::unbounded_channel();
    // Fed by its own task, which ends when stdin is closed: a program that
    // exits while its stdin is open must not wait for the feeder.
    tokio::spawn(feed(child.stdin.take(), more));
    let supervisor = tokio::spawn(async move {
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let streams = Streams { stdout, stderr };
        supervise(child, confinement, streams, (timeout, extended), events, killed).await;
    });
    let input = open.then_some(input);
    Ok(Process { events: receiver, kill: Some(kill), exit: None, supervisor, input, extend })
}

/// A started child's output pipes.
struct Streams {
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
}

/// Owns a started child until it is gone: forwards its output, enforces the
/// timeout, kills on request (or when the [`Process`] is dropped), cleans up
/// what it left behind, and sends the sandbox's notes and the exit last.
async fn supervise(
    mut child: Child,
    confinement: crate::sandbox::Confinement,
    streams: Streams,
    (timeout, mut extended): (Duration, mpsc::UnboundedReceiver<Duration>),
    events: mpsc::Sender<Event>,
    mut killed: oneshot::Receiver<()>,
) {
    // Whether stderr's last byte was a line end, for the notes that follow.
    let stderr_at_line_start = std::sync::atomic::AtomicBool::new(true);
    let Streams { stdout, stderr } = streams;
    let reading = async {
        tokio::join!(
            forward(stdout, &events, Event::Stdout, None),
            forward(stderr, &events, Event::Stderr, Some(&stderr_at_line_start))
        )
    };
    tokio::pin!(reading);
    let mut read_all = false;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut timed_out = false;
    let mut stopping = false;
    let status = loop {
        tokio::select! {
            _ = &mut reading, if !read_all => read_all = true,
            status = child.wait() => break status,
            Some(by) = extended.recv(), if !stopping => {
                let until = deadline.deadline() + by;
                deadline.as_mut().reset(until);
            }
            _ = &mut killed, if !stopping => {
                stopping = true;
                confinement.stop();
                deadline.as_mut().reset(tokio::time::Instant::now() + STOP_GRACE);
            }
            () = &mut deadline => {
                if stopping {
                    // The sandbox did not stop it in time (it always
                    // should): kill the child itself.
                    let _ = child.start_kill();
                    deadline.as_mut().reset(tokio::time::Instant::now() + STOP_GRACE);
                } else {
                    timed_out = true;
                    stopping = true;
                    confinement.stop();
                    deadline.as_mut().reset(tokio::time::Instant::now() + STOP_GRACE);
                }
            }
        }
    };
    // The program is gone; so must be anything it left behind.
    let notes = confinement.finish().await;
    if !read_all {
        // Whatever is still buffered in the pipes arrives right away; a
        // process that escaped could hold them open forever.
        let _ = tokio::time::timeout(DRAIN_GRACE, &mut reading).await;
    }
    let mut note_text = String::new();
    for note in notes {
        if note_text.is_empty() && !stderr_at_line_start.load(std::sync::atomic::Ordering::Relaxed) {
            note_text.push('\n');
        }
        note_text.push_str(&format!("{NOTE_PREFIX} {note}\n"));
    }
    if !note_text.is_empty() {
        let _ = events.send(Event::Stderr(note_text.into_bytes())).await;
    }
    let exit = match status {
        Ok(status) => Exit { exit_code: status.code(), timed_out },
        Err(e) => {
            let message = format!("{NOTE_PREFIX} could not wait for the program: {e}\n");
            let _ = events.send(Event::Stderr(message.into_bytes())).await;
            Exit { exit_code: None, timed_out }
        }
    };
    let _ = events.send(Event::Exited(exit)).await;
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

/// Reads `pipe` to its end, sending each chunk as an event; stops early if
/// nobody listens any more. `line_start` (for stderr) records whether the
/// last byte sent ended a line.
async fn forward(
    pipe: Option<impl AsyncRead + Unpin>,
    events: &mpsc::Sender<Event>,
    event: fn(Vec<u8>) -> Event,
    line_start: Option<&std::sync::atomic::AtomicBool>,
) {
    let Some(mut pipe) = pipe else { return };
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(flag) = line_start {
                    flag.store(buffer[n - 1] == b'\n', std::sync::atomic::Ordering::Relaxed);
                }
                if events.send(event(buffer[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes what arrives on `input` to the program's stdin, in order, and
/// closes it when `input` closes. A program that stops reading (or exits)
/// early ends the writes with an error, which is its business.
async fn feed(pipe: Option<impl AsyncWrite + Unpin>, mut input: mpsc::UnboundedReceiver<Vec<u8>>) {
    let Some(mut pipe) = pipe else { return };
    while let Some(data) = input.recv().await {
        if pipe.write_all(&data).await.is_err() {
            return;
        }
    }
    let _ = pipe.shutdown().await;
}

/// A byte buffer that keeps at most a fixed number of bytes: the first half
/// and the last half of what was pushed, and how much was cut in between.
pub struct Capped {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_cap: usize,
    tail_cap: usize,
    cut: u64,
}

impl Capped {
    /// A buffer keeping at most `max` bytes.
    pub fn new(max: usize) -> Capped {
        let head_cap = max / 2;
        Capped { head: Vec::new(), tail: VecDeque::new(), head_cap, tail_cap: max - head_cap, cut: 0 }
    }

    /// Appends `data`, cutting from the middle beyond the cap.
    pub fn push(&mut self, mut data: &[u8]) {
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
    pub fn to_bytes(&self) -> Vec<u8> {
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

    #[tokio::test]
    async fn the_input_is_the_programs_stdin_and_without_it_stdin_is_closed() {
        let checkout = tempfile::tempdir().unwrap();
        let checkout = std::fs::canonicalize(checkout.path()).unwrap();
        let granted = BTreeMap::from([("sh".to_owned(), PathBuf::from("/bin/sh"))]);
        let limits = Limits {
            granted: &granted,
            timeout: Duration::from_secs(10),
            max_output: 4 << 20,
            hidden: &[],
            env: &[],
            binds: &[],
        };
        // More than a pipe holds, so the writer must run while the output is read.
        let input: Vec<u8> = (0..200_000u32).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        let request = |input: Option<Vec<u8>>| Request {
            program: "sh".to_owned(),
            args: vec!["-c".to_owned(), "cat".to_owned()],
            cwd: String::new(),
            timeout: Duration::ZERO,
            input,
        };
        let out = run(&checkout, request(Some(input.clone())), &limits).await.unwrap();
        assert_eq!(out.exit_code, Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout == input, "{} bytes back of {}", out.stdout.len(), input.len());
        let out = run(&checkout, request(None), &limits).await.unwrap();
        assert_eq!((out.exit_code, out.stdout.as_slice()), (Some(0), &b""[..]));
    }

    /// What a spawned program wrote on stdout, and how it ended.
    async fn drain(process: &mut Process) -> (Vec<u8>, Exit) {
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), process.next()).await.unwrap() {
                Event::Stdout(bytes) => out.extend(bytes),
                Event::Stderr(_) => {}
                Event::Exited(exit) => return (out, exit),
            }
        }
    }

    #[tokio::test]
    async fn an_open_stdin_takes_writes_until_closed_and_more_time_extends_the_limit() {
        let checkout = tempfile::tempdir().unwrap();
        let checkout = std::fs::canonicalize(checkout.path()).unwrap();
        let granted = BTreeMap::from([("sh".to_owned(), PathBuf::from("/bin/sh"))]);
        let limits =
            |timeout| Limits { granted: &granted, timeout, max_output: 1024, hidden: &[], env: &[], binds: &[] };
        let request = |script: &str| Request {
            program: "sh".to_owned(),
            args: vec!["-c".to_owned(), script.to_owned()],
            cwd: String::new(),
            timeout: Duration::ZERO,
            input: Some(b"one\n".to_vec()),
        };
        // Each line written later is read after the first, and closing
        // stdin ends `cat`.
        let mut process = spawn_open(&checkout, request("cat"), &limits(Duration::from_secs(60))).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), process.next()).await.unwrap();
        assert_eq!(first, Event::Stdout(b"one\n".to_vec()));
        assert!(process.write(b"two\n".to_vec()));
        process.close_input();
        assert!(!process.write(b"three\n".to_vec()), "a write after closing must fail");
        let (out, exit) = drain(&mut process).await;
        assert_eq!((out.as_slice(), exit), (&b"two\n"[..], Exit { exit_code: Some(0), timed_out: false }));
        // A plain spawn's stdin is closed after its input.
        let mut process = spawn(&checkout, request("cat"), &limits(Duration::from_secs(60))).await.unwrap();
        assert!(!process.write(b"two\n".to_vec()));
        assert_eq!(drain(&mut process).await.0, b"one\n");
        // A limit of 1 s, extended by 2 s: a 2 s program ends on its own.
        let mut process =
            spawn_open(&checkout, request("sleep 2; echo slept"), &limits(Duration::from_secs(1))).await.unwrap();
        process.extend(Duration::from_secs(2));
        let (out, exit) = drain(&mut process).await;
        assert_eq!((out.as_slice(), exit.timed_out), (&b"slept\n"[..], false));
        // Without the extension it runs out of time.
        let mut process =
            spawn_open(&checkout, request("sleep 2; echo slept"), &limits(Duration::from_secs(1))).await.unwrap();
        let (out, exit) = drain(&mut process).await;
        assert_eq!((out.as_slice(), exit.timed_out), (&b""[..], true));
    }

    #[tokio::test]
    async fn a_spawned_program_streams_and_is_killed_on_request() {
        let checkout = tempfile::tempdir().unwrap();
        let checkout = std::fs::canonicalize(checkout.path()).unwrap();
        let granted = BTreeMap::from([("sh".to_owned(), PathBuf::from("/bin/sh"))]);
        let limits = Limits {
            granted: &granted,
            timeout: Duration::from_secs(60),
            max_output: 1024,
            hidden: &[],
            env: &[],
            binds: &[],
        };
        let request = Request {
            program: "sh".to_owned(),
            args: vec!["-c".to_owned(), "echo first; exec sleep 30".to_owned()],
            cwd: String::new(),
            timeout: Duration::ZERO,
            input: None,
        };
        let mut process = spawn(&checkout, request, &limits).await.unwrap();
        // The line arrives while the program still runs (it sleeps 30 s).
        let first = tokio::time::timeout(Duration::from_secs(10), process.next()).await.unwrap();
        assert_eq!(first, Event::Stdout(b"first\n".to_vec()));
        process.kill();
        let exit = loop {
            match tokio::time::timeout(Duration::from_secs(10), process.next()).await.unwrap() {
                Event::Exited(exit) => break exit,
                Event::Stderr(_) => {}
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(exit, Exit { exit_code: None, timed_out: false });
        assert_eq!(process.next().await, Event::Exited(exit), "the exit repeats");
    }

    #[tokio::test]
    async fn a_symbolic_link_does_not_lead_the_command_out() {
        let checkout = tempfile::tempdir().unwrap();
        let checkout = std::fs::canonicalize(checkout.path()).unwrap();
        std::os::unix::fs::symlink("/", checkout.join("out")).unwrap();
        std::fs::create_dir(checkout.join("sub")).unwrap();
        let granted = BTreeMap::from([("sh".to_owned(), PathBuf::from("/bin/sh"))]);
        let limits = Limits {
            granted: &granted,
            timeout: Duration::from_secs(10),
            max_output: 1024,
            hidden: &[],
            env: &[],
            binds: &[],
        };
        let request = |cwd: &str| Request {
            program: "sh".to_owned(),
            args: vec!["-c".to_owned(), "pwd".to_owned()],
            cwd: cwd.to_owned(),
            timeout: Duration::ZERO,
            input: None,
        };
        let refused = run(&checkout, request("out"), &limits).await;
        assert!(matches!(&refused, Err(Refusal::Denied(why)) if why.contains("leads outside")), "{refused:?}");
        let out = run(&checkout, request("sub"), &limits).await.unwrap();
        // In a root of its own, the checkout is at a fixed path.
        let expected = match crate::probe().get(crate::Mechanism::MountIsolation).map(|m| m.coverage) {
            Some(crate::Coverage::Missing) => checkout.join("sub"),
            _ => PathBuf::from("/checkout/sub"),
        };
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected.to_string_lossy());
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
