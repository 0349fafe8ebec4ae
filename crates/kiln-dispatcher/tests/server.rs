//! The dispatcher in-process on 127.0.0.1 with freshly generated
//! certificates: who may connect, who may ask what, and what hostile bytes do;
//! whose source a runner may fetch, whose repository an observer may touch,
//! and which commits supersede which.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on any unexpected error")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_dispatcher::{Config, Dispatcher};
use kiln_git::ObjectStore;
use kiln_net::{Bundle, CloseCode, Connection, Listener, NetConfig, RecvStream, RequestError, SendStream, connect};
use kiln_proto::wire::{ALPN, Assignment, Control, Held, Registration, Reply, Request, Supersede};
use kiln_proto::{CommitId, CommitStatus, Role};
use tokio_util::sync::CancellationToken;

struct Server {
    dir: tempfile::TempDir,
    addr: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        kiln_net::certs::init(&certs, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        Server::start_in(dir).await
    }

    /// Starts a dispatcher on the certificates and state already in `dir`.
    async fn start_in(dir: tempfile::TempDir) -> Server {
        let certs = dir.path().join("certs");
        let bundle = Bundle::load(&certs.join("dispatcher")).unwrap();
        let listener = Listener::bind(&bundle, "127.0.0.1:0".parse().unwrap(), NetConfig::default()).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let config = Config {
            state_dir: dir.path().join("state"),
            max_pack_bytes: 1 << 20,
            git_limits: kiln_git::Limits::default(),
            job_timeout: Duration::from_secs(60),
            resume_grace: Duration::from_secs(20),
            retry_failed: 0,
            repo_owners: Vec::new(),
        };
        let token = shutdown.clone();
        let task = tokio::spawn(async move { Dispatcher::run(listener, config, token).await.unwrap() });
        Server { dir, addr, shutdown, task }
    }

    fn bundle(&self, role: Role, name: &str) -> Bundle {
        let certs = self.dir.path().join("certs");
        if !certs.join(name).exists() {
            kiln_net::certs::issue(&certs, role, name).unwrap();
        }
        Bundle::load(&certs.join(name)).unwrap()
    }

    async fn client(&self, role: Role, name: &str) -> Connection {
        connect(&self.bundle(role, name), &self.addr, NetConfig::default()).await.unwrap()
    }

    async fn stop(self) {
        self.stop_keeping_state().await;
    }

    /// Stops the dispatcher and hands back its directory, for a restart.
    async fn stop_keeping_state(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.unwrap().unwrap();
        self.dir
    }
}

/// An admin request that must still be answered: the dispatcher is alive for others.
async fn still_serves(admin: &Connection) {
    let (_, _, reply) = admin.request(&Request::GetResults { commit: None }).await.unwrap();
    assert_eq!(reply, Reply::Report(None));
}

async fn closed_with(conn: &Connection, code: CloseCode) -> String {
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("connection not closed");
    assert!(reason.contains(&code.to_string()), "{reason}");
    reason
}

#[tokio::test]
async fn an_observer_cannot_take_jobs_and_others_carry_on() {
    let server = Server::start().await;
    let admin = server.client(Role::Admin, "admin").await;
    let observer = server.client(Role::Observer, "obs").await;
    match observer
        .request(&Request::Register(Registration { slots: 1, held: vec![], sandbox_gaps: vec![], pythons: vec![] }))
        .await
    {
        Err(RequestError::Refused(reason)) => assert!(reason.contains("may not register as a runner"), "{reason}"),
        Err(RequestError::Connection(reason)) => assert!(reason.contains("unauthorized"), "{reason}"),
        other => panic!("observer registered: {other:?}"),
    }
    let reason = closed_with(&observer, CloseCode::Unauthorized).await;
    assert!(reason.contains("observer obs may not register as a runner"), "{reason}");
    // A runner may not read results either.
    let runner = server.client(Role::Runner, "r1").await;
    assert!(runner.request(&Request::GetResults { commit: None }).await.is_err());
    closed_with(&runner, CloseCode::Unauthorized).await;
    still_serves(&admin).await;
    server.stop().await;
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_peer() {
    let server = Server::start().await;
    let admin = server.client(Role::Admin, "admin").await;

    let garbage = server.client(Role::Runner, "garbage").await;
    let (mut send, _recv) = garbage.open().await.unwrap();
    send.send_raw(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await.unwrap();
    closed_with(&garbage, CloseCode::Protocol).await;

    let huge = server.client(Role::Runner, "huge").await;
    let (mut send, _recv) = huge.open().await.unwrap();
    // Announces 4 GiB; must be refused from the prefix alone.
    send.send_raw(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let reason = closed_with(&huge, CloseCode::Protocol).await;
    assert!(reason.contains("exceeds the limit"), "{reason}");

    let truncated = server.client(Role::Runner, "truncated").await;
    let (mut send, _recv) = truncated.open().await.unwrap();
    send.send_raw(&[0, 0, 0, 10, 1]).await.unwrap();
    send.finish();
    closed_with(&truncated, CloseCode::Protocol).await;

    still_serves(&admin).await;
    server.stop().await;
}

/// A raw rustls client config, for peers `kiln_net::connect` would never build.
fn raw_client(roots_from: &Bundle, with_cert: Option<&Bundle>) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(roots_from.ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut crypto = match with_cert {
        Some(b) => builder.with_client_auth_cert(vec![b.cert.clone()], b.key.clone_key()).unwrap(),
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap()))
}

/// Connects and tries one request; returns the error the peer saw.
async fn attempt(server: &Server, config: quinn::ClientConfig) -> String {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = match endpoint.connect(server.addr.parse().unwrap(), "127.0.0.1").unwrap().await {
        Ok(conn) => conn,
        Err(e) => return format!("{e:?}"),
    };
    // The server's refusal may only show on the first stream.
    let result = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&kiln_proto::frame::encode(&Request::GetResults { commit: None }).unwrap()).await?;
        let mut buf = [0u8; 1];
        recv.read_exact(&mut buf).await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;
    match result {
        Ok(()) => "request answered".to_owned(),
        Err(e) => format!("{e:?}"),
    }
}

#[tokio::test]
async fn clients_without_a_kiln_certificate_are_refused_at_the_handshake() {
    let server = Server::start().await;
    let admin = server.bundle(Role::Admin, "admin");

    // No client certificate at all.
    let err = attempt(&server, raw_client(&admin, None)).await;
    // TLS alert 116 (certificate_required) travels as QUIC crypto error 0x174.
    assert!(err.contains("crypto(74)") && err.contains("peer sent no certificates"), "{err}");

    // A certificate from another CA (with the same names and role).
    let other = tempfile::tempdir().unwrap();
    kiln_net::certs::init(other.path(), &[]).unwrap();
    let foreign = Bundle::load(&kiln_net::certs::issue(other.path(), Role::Admin, "admin").unwrap()).unwrap();
    let err = attempt(&server, raw_client(&admin, Some(&foreign))).await;
    // Both CAs are named "Kiln CA", so the chain is found and its signature fails.
    assert!(err.contains("invalid peer certificate: BadSignature"), "{err}");

    // The dispatcher's own client helper words it for people.
    let err = connect(&foreign, &server.addr, NetConfig::default()).await;
    let err = match err {
        Ok(conn) => conn.request(&Request::GetResults { commit: None }).await.unwrap_err().to_string(),
        Err(e) => kiln_proto::error_chain(&e),
    };
    assert!(err.contains("TLS handshake was refused"), "{err}");

    // And a proper admin is answered.
    assert_eq!(attempt(&server, raw_client(&admin, Some(&admin))).await, "request answered");
    server.stop().await;
}

/// A git repository made with the `git` CLI, in `dir/name`.
struct GitRepo {
    path: PathBuf,
}

impl GitRepo {
    fn new(dir: &Path, name: &str) -> GitRepo {
        let repo = GitRepo { path: dir.join(name) };
        std::fs::create_dir_all(&repo.path).unwrap();
        repo.git(&["init", "--quiet", "--initial-branch=main"]);
        repo
    }

    fn git(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=Kiln Test", "-c", "user.email=test@kiln.invalid", "-c", "commit.gpgsign=false"])
            .args(args)
            .current_dir(&self.path)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Writes the test file `tests/test_<file>.py` and commits it (amending
    /// the last commit if `amend`): every commit has something to split.
    fn commit(&self, file: &str, amend: bool) -> CommitId {
        std::fs::create_dir_all(self.path.join("tests")).unwrap();
        std::fs::write(self.path.join(format!("tests/test_{file}.py")), file).unwrap();
        self.git(&["add", "--all"]);
        let mut args = vec!["commit", "--quiet", "-m", file];
        if amend {
            args.push("--amend");
        }
        self.git(&args);
        self.git(&["rev-parse", "HEAD"]).parse().unwrap()
    }
}

/// Submits `commit` of `repo` on `main` under the name `name`, sending a pack if asked.
async fn submit(
    observer: &Connection,
    repo: &GitRepo,
    name: &str,
    commit: CommitId,
    supersede: Supersede,
) -> Result<Reply, RequestError> {
    let request = Request::Submit { repo: name.into(), branch: "main".into(), commit, supersede };
    let (mut send, mut recv, reply) = observer.request(&request).await?;
    let Reply::SendPack { haves } = reply else { return Ok(reply) };
    let pack = ObjectStore::open(&repo.path).unwrap().pack(&commit, &haves).unwrap();
    send.send_pack(&pack).await.unwrap();
    send.finish();
    Ok(recv.expect::<Reply>().await.unwrap())
}

/// A registered runner with the assignment it was given; the streams stay
/// open as long as this lives.
struct Registered {
    conn: Connection,
    assignment: Assignment,
    _control: SendStream,
    job: (SendStream, RecvStream),
}

impl Registered {
    async fn new(server: &Server, name: &str) -> Registered {
        let conn = server.client(Role::Runner, name).await;
        let registration = Registration { slots: 1, held: vec![], sandbox_gaps: vec![], pythons: vec![] };
        let (control, _, reply) = conn.request(&Request::Register(registration)).await.unwrap();
        assert_eq!(reply, Reply::Registered { idle_timeout_ms: 15_000 });
        let (send, mut recv) = tokio::time::timeout(Duration::from_secs(5), conn.accept()).await.unwrap().unwrap();
        let assignment: Assignment = recv.expect().await.unwrap();
        Registered { conn, assignment, _control: control, job: (send, recv) }
    }

    fn lease(&self) -> Held {
        Held { job: self.assignment.job, attempt: self.assignment.attempt }
    }
}

/// Asks for a commit's source; returns the pack's size, or the refusal.
async fn fetch(conn: &Connection, lease: Held, commit: CommitId) -> Result<usize, String> {
    match conn.request(&Request::FetchSource { lease, commit, haves: vec![] }).await {
        Ok((_, mut recv, Reply::Source)) => Ok(recv.recv_pack(1 << 20).await.unwrap().len()),
        Ok((_, _, other)) => panic!("unexpected reply {other:?}"),
        Err(e) => Err(e.to_string()),
    }
}

async fn status(admin: &Connection, commit: CommitId) -> CommitStatus {
    match admin.request(&Request::GetResults { commit: Some(commit) }).await.unwrap().2 {
        Reply::Report(Some(report)) => report.status,
        other => panic!("no report for {commit}: {other:?}"),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn only_the_lease_holder_gets_a_commits_source() {
    let server = Server::start().await;
    let repo = GitRepo::new(server.dir.path(), "repo");
    let (first, second) = (repo.commit("a", false), repo.commit("b", false));
    let observer = server.client(Role::Observer, "obs").await;
    for commit in [first, second] {
        assert_eq!(submit(&observer, &repo, "repo", commit, Supersede::Nothing).await.unwrap(), Reply::Queued);
    }
    let holder = Registered::new(&server, "r1").await;
    assert_eq!(holder.assignment.commit, first);
    let other = Registered::new(&server, "r2").await;
    assert_eq!(other.assignment.commit, second);

    // A runner that never registered, presenting the holder's lease.
    let stranger = server.client(Role::Runner, "r9").await;
    let refused = fetch(&stranger, holder.lease(), first).await.unwrap_err();
    assert!(refused.contains("may not fetch the source") || refused.contains("unauthorized"), "{refused}");
    let reason = closed_with(&stranger, CloseCode::Unauthorized).await;
    assert!(reason.contains("holds no lease"), "{reason}");

    // A registered runner asking for a commit it was not assigned, under its own lease.
    fetch(&other.conn, other.lease(), first).await.unwrap_err();
    closed_with(&other.conn, CloseCode::Unauthorized).await;

    // The holder gets its pack, before and after the others were turned away.
    assert!(fetch(&holder.conn, holder.lease(), first).await.unwrap() > 0);
    assert_eq!(status(&server.client(Role::Admin, "admin").await, first).await, CommitStatus::Running);

    // The state directory and what is in it are private.
    let state = server.dir.path().join("state");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("results")), 0o700);
    for file in ["kiln.db", "kiln.db-wal", "kiln.db-shm"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
    let results = state.join(format!("results/{first}.json"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !results.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mode(&results), 0o600);
    assert_eq!(mode(&state.join(format!("results/{first}.xml"))), 0o600);
    drop(holder);
    server.stop().await;
}

#[tokio::test]
async fn a_repository_belongs_to_the_observer_that_first_submitted_it() {
    let server = Server::start().await;
    let admin = server.client(Role::Admin, "admin").await;
    let repo = GitRepo::new(server.dir.path(), "repo");
    let first = repo.commit("a", false);
    let owner = server.client(Role::Observer, "watcher").await;
    assert_eq!(submit(&owner, &repo, "/srv/project", first, Supersede::CancelRunning).await.unwrap(), Reply::Queued);
    let runner = Registered::new(&server, "r1").await;
    assert_eq!(runner.assignment.commit, first);

    // Another observer watching another repository under the same name: its
    // newer commit would cancel the running one. Refused, naming both.
    let unrelated = GitRepo::new(server.dir.path(), "elsewhere");
    let theirs = unrelated.commit("x", false);
    let intruder = server.client(Role::Observer, "intruder").await;
    let refused = submit(&intruder, &unrelated, "/srv/project", theirs, Supersede::CancelRunning).await;
    let reason = closed_with(&intruder, CloseCode::Unauthorized).await;
    assert!(
        reason.contains("repository /srv/project belongs to observer watcher, not intruder"),
        "{reason} ({refused:?})"
    );
    assert_eq!(status(&admin, first).await, CommitStatus::Running);

    // Nor may it read the repository's branch tips.
    let intruder = server.client(Role::Observer, "intruder").await;
    let tip = intruder.request(&Request::BranchTip { repo: "/srv/project".into(), branch: "main".into() }).await;
    assert!(tip.is_err(), "{tip:?}");
    closed_with(&intruder, CloseCode::Unauthorized).await;

    // The owner carries on, and the binding survives a restart.
    let (_, _, tip) =
        owner.request(&Request::BranchTip { repo: "/srv/project".into(), branch: "main".into() }).await.unwrap();
    assert_eq!(tip, Reply::Tip(Some(first)));
    drop(runner);
    let dir = server.stop_keeping_state().await;
    let server = Server::start_in(dir).await;
    let intruder = server.client(Role::Observer, "intruder").await;
    let refused = submit(&intruder, &unrelated, "/srv/project", theirs, Supersede::Nothing).await;
    assert!(refused.is_err(), "{refused:?}");
    closed_with(&intruder, CloseCode::Unauthorized).await;
    server.stop().await;
}

#[tokio::test]
async fn only_a_descendant_supersedes_a_running_commit() {
    let server = Server::start().await;
    let admin = server.client(Role::Admin, "admin").await;
    let repo = GitRepo::new(server.dir.path(), "repo");
    repo.commit("base", false);
    let running = repo.commit("a", false);
    let observer = server.client(Role::Observer, "obs").await;
    assert_eq!(submit(&observer, &repo, "repo", running, Supersede::CancelRunning).await.unwrap(), Reply::Queued);
    let mut runner = Registered::new(&server, "r1").await;
    assert_eq!(runner.assignment.commit, running);

    // History rewritten on the same branch by the same observer: the running
    // commit is not an ancestor of the new head, so it keeps running.
    let rewritten = repo.commit("a2", true);
    assert_eq!(submit(&observer, &repo, "repo", rewritten, Supersede::CancelRunning).await.unwrap(), Reply::Queued);
    assert_eq!(status(&admin, running).await, CommitStatus::Running);
    assert_eq!(status(&admin, rewritten).await, CommitStatus::Queued);

    // A commit that descends from the running one cancels it.
    repo.git(&["reset", "--quiet", "--hard", running.as_str()]);
    let descendant = repo.commit("b", false);
    assert_eq!(submit(&observer, &repo, "repo", descendant, Supersede::CancelRunning).await.unwrap(), Reply::Queued);
    assert_eq!(status(&admin, running).await, CommitStatus::Cancelled);
    let control = tokio::time::timeout(Duration::from_secs(5), runner.job.1.recv::<Control>()).await.unwrap();
    assert!(matches!(control, Ok(Some(Control::Cancel { .. }))), "{control:?}");
    // The rewritten head is no ancestor of the descendant either: not
    // skipped (it may have taken the freed slot by now).
    let left = status(&admin, rewritten).await;
    assert!(matches!(left, CommitStatus::Queued | CommitStatus::Running), "{left:?}");
    drop(runner);
    server.stop().await;
}

#[tokio::test]
async fn an_older_looser_state_directory_is_tightened_at_start() {
    let dir = tempfile::tempdir().unwrap();
    kiln_net::certs::init(&dir.path().join("certs"), &["127.0.0.1".into()]).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("results")).unwrap();
    let old = state.join("results/0123456789abcdef0123456789abcdef01234567.json");
    std::fs::write(&old, "{}").unwrap();
    for (path, mode) in [(&state, 0o755), (&state.join("results"), 0o755), (&old, 0o644)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let server = Server::start_in(dir).await;
    // Answered: the start-up is over.
    still_serves(&server.client(Role::Admin, "admin").await).await;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("results")), 0o700);
    assert_eq!(mode(&old), 0o600);
    assert_eq!(mode(&state.join("kiln.db")), 0o600);
    server.stop().await;
}

#[tokio::test]
async fn a_second_connection_with_a_runners_name_is_refused_unless_it_holds_the_runners_lease() {
    let server = Server::start().await;
    let repo = GitRepo::new(server.dir.path(), "repo");
    let commit = repo.commit("a", false);
    let observer = server.client(Role::Observer, "obs").await;
    assert_eq!(submit(&observer, &repo, "repo", commit, Supersede::Nothing).await.unwrap(), Reply::Queued);
    let first = Registered::new(&server, "twin").await;
    let register =
        |held: Vec<Held>| Request::Register(Registration { slots: 1, held, sandbox_gaps: vec![], pythons: vec![] });

    // Another runner with the same certificate: told who holds the name, and closed.
    let other = server.client(Role::Runner, "twin").await;
    let (_, _, reply) = other.request(&register(vec![])).await.unwrap();
    let Reply::NameInUse(clash) = reply else { panic!("{reply:?}") };
    assert_eq!(clash.name, "twin");
    assert!(clash.address.starts_with("127.0.0.1:") && clash.since_unix_ms > 0, "{clash:?}");
    closed_with(&other, CloseCode::NameInUse).await;
    assert!(fetch(&first.conn, first.lease(), commit).await.is_ok(), "the holder is undisturbed");

    // The same runner back on a new connection, naming its lease: it takes over.
    let again = server.client(Role::Runner, "twin").await;
    let (_control, _, reply) = again.request(&register(vec![first.lease()])).await.unwrap();
    assert_eq!(reply, Reply::Registered { idle_timeout_ms: 15_000 });
    closed_with(&first.conn, CloseCode::Replaced).await;
    server.stop().await;
}

/// Bytes this process has passed to `write`-like system calls so far
/// (`wchar` in `/proc/self/io`): the SQLite file, its WAL and the result files.
fn bytes_written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// The cost of recording a large commit: 5,000 tests in 500 files through
/// the real dispatcher (QUIC, core, SQLite file, result files). It checks
/// that the cost grows with the tests, not with files × tests (rewriting
/// every result file on every file done wrote 417 MB here, about 83 KB a
/// test), and prints the time and bytes written that BENCHMARKS.md quotes:
/// `cargo nextest run -p kiln-dispatcher --no-capture record_5000_tests`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_5000_tests_in_500_files() {
    use kiln_proto::wire::JobEvent;
    use kiln_proto::{Outcome, TestResult};

    let (files, per_file) = (500, 10);
    let server = Server::start().await;
    let repo = GitRepo::new(server.dir.path(), "repo");
    std::fs::create_dir_all(repo.path.join("tests")).unwrap();
    for f in 1..files {
        std::fs::write(repo.path.join(format!("tests/test_{f:03}.py")), "").unwrap();
    }
    // test_000.py: `commit` names its file tests/test_<name>.py.
    let commit = repo.commit("000", false);
    let observer = server.client(Role::Observer, "obs").await;
    assert_eq!(submit(&observer, &repo, "repo", commit, Supersede::Nothing).await.unwrap(), Reply::Queued);
    let mut runner = Registered::new(&server, "r1").await;
    let admin = server.client(Role::Admin, "admin").await;
    let (before, started) = (bytes_written(), std::time::Instant::now());
    // The commit comes in batches, each on its own stream: run each one's files.
    let mut ran = 0;
    loop {
        let send = &mut runner.job.0;
        for file in runner.assignment.files.clone() {
            let f = &file["tests/test_".len()..file.len() - 3];
            for t in 0..per_file {
                let result = TestResult {
                    id: format!("tests.test_{f}.Case.test_{t}"),
                    file: file.clone(),
                    outcome: if t == 0 { Outcome::Fail } else { Outcome::Pass },
                    duration_ms: 3,
                    message: if t == 0 {
                        "Traceback (most recent call last):\nAssertionError".into()
                    } else {
                        String::new()
                    },
                    runner: None,
                    flaky: false,
                    earlier: Vec::new(),
                    python: None,
                };
                send.send(&JobEvent::Test(result)).await.unwrap();
            }
            send.send(&JobEvent::FileDone { file }).await.unwrap();
            ran += 1;
        }
        send.send(&JobEvent::Finished { error: None }).await.unwrap();
        send.finish();
        let _ = runner.job.1.recv::<Control>().await;
        if ran == files {
            break;
        }
        let (send, mut recv) =
            tokio::time::timeout(Duration::from_secs(5), runner.conn.accept()).await.unwrap().unwrap();
        runner.assignment = recv.expect().await.unwrap();
        runner.job = (send, recv);
    }
    let recorded = started.elapsed();
    assert_eq!(status(&admin, commit).await, CommitStatus::Failed);
    // The final result files are in place once the commit is final.
    let json = server.dir.path().join(format!("state/results/{commit}.json"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done = std::fs::read_to_string(&json).is_ok_and(|j| j.contains("\"failed\"") && j.contains("test_499"));
        if done {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the final result files never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (elapsed, written) = (started.elapsed(), bytes_written() - before);
    let final_size =
        std::fs::metadata(&json).unwrap().len() + std::fs::metadata(json.with_extension("xml")).unwrap().len();
    println!(
        "recorded {} tests in {files} files: events accepted in {recorded:?}, final results on disk after {elapsed:?}; \
         {:.1} MB written ({:.1} MB of final result files)",
        files * per_file,
        written as f64 / 1e6,
        final_size as f64 / 1e6
    );
    // About 12 KB a test today (mostly SQLite's WAL, one transaction per
    // event); a cost that grows with files × tests is several times that.
    let tests = (files * per_file) as u64;
    assert!(written < 30_000 * tests, "{written} bytes written for {tests} tests: more than 30 KB a test");
    server.stop().await;
}
