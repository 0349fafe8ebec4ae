//! The command line: every subcommand and flag, with environment-variable
//! fallbacks for the ones a deployment sets once.
//!
//! Help has one style, which the tests below check over the whole command
//! tree: every flag's doc comment starts with a one-line summary (what `-h`
//! shows; clap drops its trailing period), details go in later paragraphs
//! (shown by `--help` only), defaults are clap's `default_value`s so that
//! help prints them, value names say what a value is (`ADDR`, `DIR`,
//! `DURATION`, `SIZE`, `N`), and every command ends with examples that parse.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln_proto::ByteSize;

/// Kiln: a distributed continuous-integration system.
#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a distributed continuous-integration system",
    propagate_version = true,
    after_help = "\
Examples:
  kiln demo                          # the whole system on a sample repository
  kiln certs init --dir certs        # a CA and the dispatcher's certificates, to start a deployment

Run `kiln help COMMAND` (or `kiln COMMAND --help`) for a command's flags and examples."
)]
pub struct Cli {
    /// Log only warnings and errors (RUST_LOG overrides)
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make the certificate authority and peers' certificate bundles
    #[command(
        subcommand,
        after_help = "\
Examples:
  kiln certs init --dir certs --san ci.example.com
  kiln certs issue runner build-01"
    )]
    Certs(CertsCommand),
    /// Run the dispatcher: the hub that queues commits and hands them to runners
    #[command(after_help = "\
Examples:
  kiln dispatcher --identity certs/dispatcher --listen 0.0.0.0:7700 --state /var/lib/kiln
  kiln dispatcher --repo-owner /srv/git/project=watcher   # only observer `watcher` may submit it
  kiln dispatcher --http 0.0.0.0:7780 --https   # the dashboard on every address, Kiln certificates required")]
    Dispatcher(DispatcherArgs),
    /// Watch a repository and submit new commits to the dispatcher
    #[command(after_help = "\
Examples:
  kiln observer --identity certs/watcher --dispatcher ci.example.com:7700 --repo /srv/git/project --branch main
  kiln observer --identity certs/watcher --repo . --mode every --interval 30s")]
    Observer(ObserverArgs),
    /// Take jobs from the dispatcher and run their tests
    #[command(after_help = "\
Examples:
  kiln runner --identity certs/build-01 --dispatcher ci.example.com:7700 --work /var/cache/kiln
  kiln runner --identity certs/build-01 --slots 4 --allow-program sh --plugins /etc/kiln/plugins
  kiln runner --identity certs/build-01 --python /usr/bin/python3.11 --python /opt/python/3.12/bin/python3")]
    Runner(RunnerArgs),
    /// Print a commit's results (exit 0 passed, 1 failed, 2 otherwise)
    #[command(after_help = "\
Examples:
  kiln results --identity certs/me --dispatcher ci.example.com:7700     # the newest commit
  kiln results 3f2a9c1 --format json --wait 5m --identity certs/me      # one commit, as JSON, once it ends")]
    Results(ResultsArgs),
    /// Follow a commit live, then print its results (exit code as `kiln results`)
    #[command(after_help = "\
Examples:
  kiln watch --identity certs/me --dispatcher ci.example.com:7700       # the newest commit
  kiln watch 3f2a9c1 --identity certs/me                                 # one commit, until it ends")]
    Watch(WatchArgs),
    /// Show one test's outcome and duration on the newest commits that ran it
    #[command(after_help = "\
Examples:
  kiln history tests.test_math.MathTest.test_add --identity certs/me --dispatcher ci.example.com:7700
  kiln history tests.test_math.MathTest.test_add --limit 50 --format json --identity certs/me")]
    History(HistoryArgs),
    /// List the tests that failed and passed on one commit, or on the same code
    #[command(after_help = "\
Examples:
  kiln flaky --identity certs/me --dispatcher ci.example.com:7700        # the last 14 days
  kiln flaky --days 30 --format json --identity certs/me")]
    Flaky(FlakyArgs),
    /// Show what waits and why, the connected runners and the newest commits
    #[command(after_help = "\
Examples:
  kiln status --identity certs/me --dispatcher ci.example.com:7700
  kiln status --commits 30 --format json --identity certs/me")]
    Status(StatusArgs),
    /// List the connected runners: address, slots, what they run, sandbox warnings
    #[command(after_help = "\
Examples:
  kiln runners --identity certs/me --dispatcher ci.example.com:7700
  kiln runners --format json --identity certs/me")]
    Runners(RunnersArgs),
    /// Stop testing a commit: queued work is dropped, running tests are killed
    #[command(after_help = "\
Examples:
  kiln cancel 3f2a9c1 --identity certs/me --dispatcher ci.example.com:7700")]
    Cancel(CancelArgs),
    /// Make a running observer look for new commits now (for git hooks)
    #[command(after_help = "\
Examples:
  kiln notify --repo /srv/git/project    # in a post-commit or post-receive hook")]
    Notify(NotifyArgs),
    /// Run the whole system on a sample repository and show the results
    #[command(after_help = "\
Examples:
  kiln demo
  kiln demo --dir /tmp/kiln-demo --runners 3 --verbose   # keep the demo's files to look at")]
    Demo(DemoArgs),
    /// Check, create or run executor plugins
    #[command(
        subcommand,
        after_help = "\
Examples:
  kiln plugin check my_plugin.wasm
  kiln plugin run --dir ~/src/project"
    )]
    Plugin(PluginCommand),
}

/// `kiln certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a certificate authority and the dispatcher's bundle (DIR/dispatcher)
    ///
    /// The CA is valid ten years and kept in DIR/ca, where `kiln certs issue`
    /// finds it. The dispatcher's certificate names the host names and
    /// addresses given with `--san`.
    #[command(after_help = "\
Examples:
  kiln certs init --dir certs --san ci.example.com --san 10.0.0.5   # CA + certs/dispatcher")]
    Init {
        /// Where certificates are written
        #[arg(long, value_name = "DIR", default_value = "certs")]
        dir: PathBuf,
        /// A host name or IP address the dispatcher is reached by (repeatable)
        #[arg(long = "san", value_name = "NAME_OR_IP", default_values = ["localhost", "127.0.0.1"])]
        sans: Vec<String>,
        /// How many days the dispatcher's certificate is valid
        ///
        /// From 1 to 3650. The CA itself is valid ten years.
        #[arg(long, value_name = "DAYS", default_value_t = kiln_net::certs::DEFAULT_VALID_DAYS, value_parser = valid_days)]
        valid_days: u32,
    },
    /// Issue a bundle (DIR/NAME) for a runner, observer or admin
    ///
    /// DIR/NAME holds ca.pem, cert.pem and key.pem; copy it to the peer's machine.
    #[command(after_help = "\
Examples:
  kiln certs issue runner build-01            # certs/build-01, to copy to the runner's machine
  kiln certs issue admin me --valid-days 30   # short-lived certificates limit a stolen key")]
    Issue {
        /// The peer's role
        role: RoleArg,
        /// The peer's name, unique in this deployment
        name: String,
        /// Where certificates are (DIR/ca) and are written
        #[arg(long, value_name = "DIR", default_value = "certs")]
        dir: PathBuf,
        /// How many days the certificate is valid
        ///
        /// From 1 to 3650. Short-lived certificates limit what a stolen key is worth.
        #[arg(long, value_name = "DAYS", default_value_t = kiln_net::certs::DEFAULT_VALID_DAYS, value_parser = valid_days)]
        valid_days: u32,
    },
    /// Issue a new dispatcher bundle (DIR/dispatcher) from the existing CA
    ///
    /// For when the old certificate expires, or the dispatcher moves; move the
    /// old bundle away first.
    #[command(after_help = "\
Examples:
  kiln certs dispatcher --san ci.example.com   # move the old certs/dispatcher away first")]
    Dispatcher {
        /// Where certificates are (DIR/ca) and are written
        #[arg(long, value_name = "DIR", default_value = "certs")]
        dir: PathBuf,
        /// A host name or IP address the dispatcher is reached by (repeatable)
        #[arg(long = "san", value_name = "NAME_OR_IP", default_values = ["localhost", "127.0.0.1"])]
        sans: Vec<String>,
        /// How many days the certificate is valid
        ///
        /// From 1 to 3650.
        #[arg(long, value_name = "DAYS", default_value_t = kiln_net::certs::DEFAULT_VALID_DAYS, value_parser = valid_days)]
        valid_days: u32,
    },
}

/// A validity in days: 1 to 3650 (the CA's own lifetime).
fn valid_days(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(d @ 1..=3650) => Ok(d),
        _ => Err(format!("`{s}` is not a number of days from 1 to 3650")),
    }
}

/// A duration: `5s`, `2m`, `1h 30m`, or a plain number of seconds.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    if let Ok(seconds) = s.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration ({e}); for example 5s, 2m or 1h"))
}

/// The role of a client certificate.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    /// Takes jobs and reports results.
    Runner,
    /// Submits commits.
    Observer,
    /// Reads results and cancels commits.
    Admin,
}

/// Flags every client shares.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The certificate bundle directory (ca.pem, cert.pem, key.pem)
    ///
    /// Made by `kiln certs issue ROLE NAME` (DIR/NAME).
    #[arg(long, value_name = "DIR", env = "KILN_IDENTITY")]
    pub identity: PathBuf,
    /// The dispatcher's address
    #[arg(long, value_name = "HOST:PORT", env = "KILN_DISPATCHER", default_value = "127.0.0.1:7700")]
    pub dispatcher: String,
    /// How long the dispatcher may be silent before the connection is dead
    ///
    /// A duration such as 5s, 2m or 1h 30m, or a number of seconds.
    /// Keep-alives go every third of it, or of the dispatcher's own if that
    /// is shorter (a runner learns it when it registers).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "15s")]
    pub idle_timeout: Duration,
}

/// The caps on uncompressed git objects, shared by the dispatcher, observer and runner.
#[derive(Debug, Args)]
pub struct GitLimitsArgs {
    /// The largest uncompressed file (git object) accepted or sent
    ///
    /// A size such as 512, 64KiB, 100MiB or 2GiB. A process needs about this
    /// much memory (a few times over at most) for one object.
    #[arg(long, value_name = "SIZE", env = "KILN_MAX_BLOB_SIZE", default_value_t = ByteSize(kiln_git::Limits::default().max_blob))]
    pub max_blob_size: ByteSize,
    /// The largest total of the files one commit checks out to
    ///
    /// A size such as 512, 64KiB, 100MiB or 2GiB.
    #[arg(long, value_name = "SIZE", env = "KILN_MAX_TREE_SIZE", default_value_t = ByteSize(kiln_git::Limits::default().max_tree))]
    pub max_tree_size: ByteSize,
    /// The largest total of the uncompressed objects of one git pack
    ///
    /// A size such as 512, 64KiB, 100MiB or 2GiB. A first submission carries
    /// the whole history, hence a cap larger than the tree's.
    #[arg(long, value_name = "SIZE", env = "KILN_MAX_PACK_EXPANSION", default_value_t = ByteSize(kiln_git::Limits::default().max_pack_expansion))]
    pub max_pack_expansion: ByteSize,
}

impl GitLimitsArgs {
    /// The settings these flags say.
    pub fn limits(&self) -> kiln_git::Limits {
        kiln_git::Limits {
            max_blob: self.max_blob_size.bytes(),
            max_tree: self.max_tree_size.bytes(),
            max_pack_expansion: self.max_pack_expansion.bytes(),
        }
    }
}

/// `kiln dispatcher`
#[derive(Debug, Args)]
pub struct DispatcherArgs {
    /// The dispatcher's certificate bundle (made by `kiln certs init`)
    #[arg(long, value_name = "DIR", env = "KILN_IDENTITY", default_value = "certs/dispatcher")]
    pub identity: PathBuf,
    /// The UDP address to listen on
    #[arg(long, value_name = "ADDR", env = "KILN_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// The state directory: git mirror, database and results files
    #[arg(long, value_name = "DIR", env = "KILN_STATE", default_value = "kiln-state")]
    pub state: PathBuf,
    /// How long a silent peer has before it is dead and its work requeued
    ///
    /// A duration such as 5s, 2m or 1h 30m, or a number of seconds. Runners
    /// send a keep-alive every third of it; each costs the dispatcher some
    /// CPU (with 1,000 runners, keep-alives every second took 4 % of a core).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "15s")]
    pub idle_timeout: Duration,
    /// The largest (compressed) git pack accepted from an observer, in MiB
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_pack_mib: u64,
    #[command(flatten)]
    pub git_limits: GitLimitsArgs,
    /// How long one commit's tests may run before they are stopped
    ///
    /// A commit that outruns it ends as `error`.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1h")]
    pub job_timeout: Duration,
    /// After a restart, how long runners have to reclaim their work
    ///
    /// Work not claimed by the runner that was doing it within this time is
    /// handed to other runners.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "20s")]
    pub resume_grace: Duration,
    /// Only observer OBSERVER may submit repository REPO (repeatable)
    ///
    /// OBSERVER is the name in the observer's certificate; REPO is the
    /// repository as that observer names it (its `--repo` path). Wins over the
    /// default, which binds a repository to the first observer that submits it.
    #[arg(long = "repo-owner", value_name = "REPO=OBSERVER", value_parser = parse_repo_owner)]
    pub repo_owners: Vec<(String, String)>,
    /// Run a test file with a failing test up to N more times before its failure counts
    ///
    /// Each retry goes to another runner when one has a free slot. A test
    /// that failed and then passed is recorded as passed and `flaky` (with
    /// its earlier runs); one that fails every time fails its commit.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10))]
    pub retry_failed: u32,
    /// Serve the web dashboard, JSON API and metrics over HTTP on ADDR
    ///
    /// Off unless given; `--http` alone serves on 127.0.0.1:7780. Plain HTTP
    /// on loopback addresses only: any other address needs --https.
    #[arg(long, value_name = "ADDR", env = "KILN_HTTP", num_args = 0..=1, default_missing_value = "127.0.0.1:7780")]
    pub http: Option<SocketAddr>,
    /// Serve the dashboard over HTTPS, requiring a Kiln client certificate
    ///
    /// The dispatcher's certificate (--identity) serves it, and a client must
    /// present a certificate from the same CA (`kiln certs issue`), checked as
    /// QUIC checks it: any role may read; cancelling needs admin. Needed for a
    /// non-loopback --http address.
    #[arg(long, requires = "http")]
    pub https: bool,
}

/// Parses `--repo-owner REPO=OBSERVER` (split at the last `=`, so a path may hold one).
fn parse_repo_owner(s: &str) -> Result<(String, String), String> {
    match s.rsplit_once('=') {
        Some((repo, observer)) if !repo.is_empty() && !observer.is_empty() => {
            Ok((repo.to_owned(), observer.to_owned()))
        }
        _ => Err(format!("expected REPO=OBSERVER, e.g. /srv/git/project=watcher, not `{s}`")),
    }
}

/// `kiln observer`
#[derive(Debug, Args)]
pub struct ObserverArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The repository to watch
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// A branch to watch (repeatable; default: the branch HEAD names)
    ///
    /// Without it the observer watches the branch the repository's HEAD names,
    /// as `git init` or a clone left it. A branch that does not exist yet is
    /// watched for.
    #[arg(long = "branch", value_name = "BRANCH")]
    pub branches: Vec<String>,
    /// How often to look for new commits
    ///
    /// A duration such as 5s, 2m or 1h 30m, or a number of seconds. `kiln
    /// notify` makes the observer look at once.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "5s")]
    pub interval: Duration,
    /// Which commits to test: the newest of each branch, or every one
    ///
    /// `latest`: a newer commit skips older ones still queued and cancels
    /// older ones running (if it descends from them). `every`: every new
    /// commit is tested, in order.
    #[arg(long, value_enum, default_value = "latest")]
    pub mode: ModeArg,
    /// In `latest` mode, let a superseded commit's running tests finish
    #[arg(long)]
    pub keep_running: bool,
    /// The Unix socket `kiln notify` pokes (default: in the repository's git directory)
    ///
    /// The default is kiln-observer.sock in the repository's git directory.
    #[arg(long, value_name = "PATH")]
    pub notify_socket: Option<PathBuf>,
    #[command(flatten)]
    pub git_limits: GitLimitsArgs,
}

/// Which commits the observer submits.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    /// The newest commit of each branch.
    Latest,
    /// Every new commit, in order.
    Every,
}

/// `kiln watch`
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The commit (its id, or a unique prefix of 7 or more digits; default: the newest)
    pub commit: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print each test's message whole at the end, not only its first and last lines
    #[arg(long, short)]
    pub verbose: bool,
}

/// `kiln history`
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The test's id, as in results (e.g. `tests.test_math.MathTest.test_add`)
    pub test: String,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only commits of this repository (as its observer names it)
    #[arg(long, value_name = "PATH")]
    pub repo: Option<String>,
    /// How many of the newest runs to show (at most 100)
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub limit: u32,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub format: DataFormat,
}

/// `kiln status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// How many of the newest commits to show (at most 50)
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub commits: u32,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub format: DataFormat,
}

/// `kiln runners`
#[derive(Debug, Args)]
pub struct RunnersArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub format: DataFormat,
}

/// `kiln flaky`
#[derive(Debug, Args)]
pub struct FlakyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// How many days back to look
    ///
    /// From 1 to 3650.
    #[arg(long, value_name = "DAYS", default_value_t = 14, value_parser = valid_days)]
    pub days: u32,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub format: DataFormat,
}

/// How a list the dispatcher keeps is printed.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DataFormat {
    /// For people.
    Text,
    /// JSON, for programs.
    Json,
}

/// `kiln cancel`
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The commit: its id, or a unique prefix of at least 7 digits
    pub commit: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `kiln notify`
#[derive(Debug, Args)]
pub struct NotifyArgs {
    /// The watched repository
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub repo: PathBuf,
    /// The observer's socket, if not the default for `--repo`
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// `kiln runner`
#[derive(Debug, Args)]
pub struct RunnerArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Where the runner keeps its object cache and job checkouts
    #[arg(long, value_name = "DIR", env = "KILN_WORK", default_value = "kiln-work")]
    pub work: PathBuf,
    /// How many test files to run at once [default: the CPUs this process may use]
    ///
    /// The default counts the CPUs the runner may use (its CPU affinity and
    /// its cgroup's CPU quota), not only the cores the machine has.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub slots: Option<u32>,
    /// A directory of extra executor plugins (*.wasm)
    ///
    /// They are loaded after the built-ins, in file-name order; a file more
    /// than one plugin claims goes to the first loaded.
    #[arg(long, value_name = "DIR")]
    pub plugins: Option<PathBuf>,
    /// A program plugins may run (repeatable)
    ///
    /// Each is resolved to an absolute path at start-up. Add `sh` for TAP
    /// shell scripts.
    #[arg(long = "allow-program", value_name = "NAME", default_values = ["python3"])]
    pub allow_programs: Vec<String>,
    /// Python interpreters for the matrix (repeatable) [default: python3 on PATH]
    ///
    /// An absolute path, `*` and `?` matching within one component, for
    /// example /opt/python/*/bin/python3. Each match is asked its exact
    /// version once at start-up and reported to the dispatcher: a commit
    /// whose kiln.toml asks for versions = ["3.12"] runs here only if one is
    /// a 3.12. A pattern that matches nothing, or a match that is not a
    /// Python, stops the runner. Quote a pattern, so that the shell leaves
    /// it to Kiln.
    #[arg(long = "python", value_name = "GLOB")]
    pub pythons: Vec<String>,
    /// The wall-clock limit for one command a plugin runs
    ///
    /// A duration such as 5s, 2m or 1h 30m, or a number of seconds.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "10m")]
    pub command_timeout: Duration,
    /// The longest per-file limit a repository's `[limits] file-timeout` may set
    ///
    /// A kiln.toml asking for more gets this, and a warning in the commit's
    /// results. Without a file-timeout, --command-timeout applies.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1h")]
    pub max_file_timeout: Duration,
    /// The one package index environments may download wheels from [default: none]
    ///
    /// For a repository whose kiln.toml installs packages. Only wheels are
    /// downloaded (no sdist is built), outside the sandbox and running no
    /// repository code; the install itself runs in the sandbox, offline.
    /// Without it (and without --find-links) such a commit ends as `error`.
    /// For example https://pypi.org/simple.
    #[arg(long, value_name = "URL")]
    pub index_url: Option<String>,
    /// A directory of wheels environments may install from (read-only, offline)
    #[arg(long, value_name = "DIR")]
    pub find_links: Option<PathBuf>,
    /// How many repository environments to keep; the least recently used go first
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub env_cache_size: u32,
    /// The `uv` binary that installs environments
    ///
    /// Default: the one next to python3, or else the one on PATH.
    #[arg(long, value_name = "PATH")]
    pub uv: Option<PathBuf>,
    #[command(flatten)]
    pub git_limits: GitLimitsArgs,
    /// The uid and gid commands run as when the runner runs as root
    ///
    /// Pick one that no account on this machine uses.
    #[arg(long, value_name = "ID", env = "KILN_SANDBOX_ID", default_value_t = kiln_sandbox::SANDBOX_ID)]
    pub sandbox_id: u32,
}

/// `kiln results`
#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// The commit (its id, or a unique prefix of 7 or more digits; default: the newest)
    pub commit: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Wait up to this long for the commit's testing to end
    ///
    /// A duration such as 5s, 2m or 1h 30m, or a number of seconds. Without
    /// it the results are printed as they stand.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub wait: Option<Duration>,
    /// Print each test's message whole, not only its first and last lines
    #[arg(long, short)]
    pub verbose: bool,
}

/// How `kiln results` prints.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// One JSON document, for programs (`kiln results`: the one the dispatcher stores).
    Json,
    /// JUnit XML, for tools that read it (`kiln results`: the dispatcher's `results/<commit>.xml`).
    Junit,
}

/// `kiln demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to put the demo's files (default: a temporary directory)
    ///
    /// The demo's certificates, repository, state and logs; a temporary
    /// directory is removed at the end.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// How many runners to start
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub runners: u32,
    /// Print each test's message whole, not only its first and last lines
    #[arg(long, short)]
    pub verbose: bool,
    /// Keep the cluster and its dashboard running after the demo, until Ctrl-C
    #[arg(long)]
    pub serve: bool,
}

/// `kiln plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a plugin (.wasm) as a runner would and describe it, or say why it cannot
    #[command(after_help = "\
Examples:
  kiln plugin check my_plugin.wasm   # can a runner load it? name, version, contract, claims, programs")]
    Check {
        /// The plugin file
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Create a plugin crate on the Kiln plugin SDK that passes `kiln plugin check`
    #[command(after_help = "\
Examples:
  kiln plugin new my-framework                       # in ./my-framework; see plugins/TUTORIAL.md
  kiln plugin new my-framework --path ~/src/my-plugin")]
    New {
        /// The plugin's name (and its crate's)
        ///
        /// Lowercase letters, digits, `-` and `_`, starting with a letter.
        name: String,
        /// Where to create the crate (default: ./NAME)
        ///
        /// It must not exist, or be an empty directory.
        #[arg(long, value_name = "DIR")]
        path: Option<PathBuf>,
        /// The kiln-plugin-sdk crate (default: found in a Kiln checkout)
        ///
        /// plugins/kiln-plugin-sdk in the Kiln repository, looked for above the
        /// new crate and in the checkout this binary was built from.
        #[arg(long, value_name = "DIR")]
        sdk: Option<PathBuf>,
    },
    /// Run a directory's tests with the plugins, as a runner would, with no dispatcher
    ///
    /// The tests under DIR/tests are run and each result printed (exit 0 all
    /// passed, 1 a test failed, 2 otherwise).
    #[command(after_help = "\
Examples:
  kiln plugin run --dir ~/src/project                     # as a runner would, no dispatcher
  kiln plugin run --allow-program sh --format json        # TAP shell scripts too; one JSON document")]
    Run(RunArgs),
}

/// `kiln plugin run`
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The repository (working tree) whose tests to run
    ///
    /// It is used in place, as a runner uses its checkout.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Output format
    ///
    /// `text` prints each result as it comes; `json` and `junit` print one document at the end.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// A program plugins may run (repeatable)
    ///
    /// Each is resolved to an absolute path at start-up.
    #[arg(long = "allow-program", value_name = "NAME", default_values = ["python3"])]
    pub allow_programs: Vec<String>,
    /// A directory of extra executor plugins (*.wasm)
    ///
    /// They are loaded after the built-ins, in file-name order.
    #[arg(long, value_name = "DIR")]
    pub plugins: Option<PathBuf>,
    /// The wall-clock limit for one command a plugin runs
    ///
    /// A duration such as 5s, 2m or 1h 30m, or a number of seconds.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "10m")]
    pub command_timeout: std::time::Duration,
    /// How many test files to run at once [default: the CPUs this process may use]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub slots: Option<u32>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// The command lines of the README's "Using Kiln" block, without their comments.
    fn readme_commands() -> Vec<String> {
        let readme = include_str!("../../../README.md");
        let section = readme.split_once("\n## Using Kiln\n").expect("README has a Using Kiln section").1;
        let section = section.split_once("\n## ").map_or(section, |(section, _next)| section);
        // Every ```sh block of the section: the odd pieces between fences.
        section
            .split("```")
            .skip(1)
            .step_by(2)
            .filter_map(|block| block.strip_prefix("sh\n"))
            .flat_map(example_commands)
            .collect()
    }

    /// The `kiln …` command lines of a text (a README block or a command's
    /// after-help), without their `# comments`.
    fn example_commands(text: &str) -> Vec<String> {
        text.lines()
            .map(|line| line.split_once(" #").map_or(line, |(command, _comment)| command).trim())
            .filter(|line| line.starts_with("kiln "))
            .map(str::to_owned)
            .collect()
    }

    /// Every command of the tree with its path (`["kiln", "certs", "init"]`), parents first.
    fn all_commands() -> Vec<(Vec<String>, clap::Command)> {
        fn walk(path: Vec<String>, command: &clap::Command, out: &mut Vec<(Vec<String>, clap::Command)>) {
            out.push((path.clone(), command.clone()));
            for sub in command.get_subcommands() {
                let mut sub_path = path.clone();
                sub_path.push(sub.get_name().to_owned());
                walk(sub_path, sub, out);
            }
        }
        // Built, as for printing help: global flags propagated, and clap's own
        // `help` subcommands added (which are clap's to describe, so left out).
        let mut cli = Cli::command();
        cli.build();
        let mut out = Vec::new();
        walk(vec!["kiln".to_owned()], &cli, &mut out);
        out.retain(|(path, _command)| !path[1..].iter().any(|sub| sub == "help"));
        out
    }

    /// The longest one-line summary: it fits on a line of `-h` next to its flag.
    const SUMMARY_MAX: usize = 80;

    /// What a summary must look like: one line, not empty, short, no trailing
    /// period (clap drops it from a doc comment's first paragraph; a summary
    /// written by hand must match).
    fn summary_problem(summary: Option<String>) -> Option<String> {
        let Some(summary) = summary.filter(|s| !s.trim().is_empty()) else {
            return Some("has no help: add a doc comment whose first line is a one-line summary".to_owned());
        };
        if summary.contains('\n') {
            Some(format!("summary is more than one line (put details in a later paragraph): {summary:?}"))
        } else if summary.ends_with('.') {
            Some(format!("summary ends with a period: {summary:?}"))
        } else if summary.chars().count() > SUMMARY_MAX {
            Some(format!("summary is over {SUMMARY_MAX} characters (move details to a later paragraph): {summary:?}"))
        } else {
            None
        }
    }

    /// Value names that say what a value is; clap's default (the flag's name
    /// in capitals, like `<IDLE_TIMEOUT>`) says nothing the flag does not.
    const VALUE_NAMES: &[&str] = &[
        "ADDR",
        "HOST:PORT",
        "URL",
        "DIR",
        "FILE",
        "PATH",
        "DURATION",
        "SIZE",
        "N",
        "DAYS",
        "NAME",
        "NAME_OR_IP",
        "ID",
        "BRANCH",
        "REPO=OBSERVER",
        "GLOB",
    ];

    /// `-h` and `--help` have one style over the whole command tree (see the module docs).
    #[test]
    fn help_has_one_style_everywhere() {
        let mut problems = Vec::new();
        for (path, command) in all_commands() {
            let name = path.join(" ");
            if path.len() > 1
                && let Some(problem) = summary_problem(command.get_about().map(ToString::to_string))
            {
                problems.push(format!("`{name}`: {problem}"));
            }
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let flag = arg.get_long().map_or_else(|| id.to_uppercase(), |long| format!("--{long}"));
                if let Some(problem) = summary_problem(arg.get_help().map(ToString::to_string)) {
                    problems.push(format!("`{name} {flag}`: {problem}"));
                }
                let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
                let is_enum = !arg.get_possible_values().is_empty();
                if arg.get_long().is_some() && takes_value && !is_enum {
                    let value_names = arg.get_value_names().unwrap_or_default();
                    if !value_names.iter().all(|v| VALUE_NAMES.contains(&v.as_str())) || value_names.is_empty() {
                        problems.push(format!(
                            "`{name} {flag}`: value name {value_names:?} is not one of {VALUE_NAMES:?} (set `value_name`)"
                        ));
                    }
                }
            }
        }
        let top = Cli::command().get_after_help().map(ToString::to_string).unwrap_or_default();
        if !top.contains("kiln help COMMAND") {
            problems.push("`kiln`: the after-help does not point to `kiln help COMMAND`".to_owned());
        }
        assert!(problems.is_empty(), "help out of style:\n{}", problems.join("\n"));
    }

    /// Every command's help ends with examples, and each one parses as that command.
    #[test]
    fn every_command_has_examples_that_parse() {
        let mut problems = Vec::new();
        for (path, command) in all_commands() {
            let name = path.join(" ");
            let after_help = command.get_after_help().map(ToString::to_string).unwrap_or_default();
            if !after_help.starts_with("Examples:\n") {
                problems.push(format!("`{name}`: its after_help does not start with `Examples:`"));
            }
            let examples = example_commands(&after_help);
            if examples.is_empty() {
                problems.push(format!("`{name}`: no `kiln …` example in its after_help"));
            }
            for example in examples {
                assert!(!example.contains(['"', '\'', '\\']), "quotes in an example: {example}");
                if let Err(e) = Cli::try_parse_from(example.split_whitespace()) {
                    problems.push(format!("`{name}`: the example `{example}` does not parse:\n{e}"));
                    continue;
                }
                // The subcommand path the example runs, e.g. `kiln certs init`.
                let matches = Cli::command().get_matches_from(example.split_whitespace());
                let mut ran = vec!["kiln".to_owned()];
                let mut m = &matches;
                while let Some((sub, sub_matches)) = m.subcommand() {
                    ran.push(sub.to_owned());
                    m = sub_matches;
                }
                if !ran.starts_with(&path) {
                    problems.push(format!("`{name}`: the example `{example}` runs `{}`", ran.join(" ")));
                }
            }
        }
        assert!(problems.is_empty(), "examples missing or wrong:\n{}", problems.join("\n"));
    }

    #[test]
    fn every_command_in_the_readme_parses() {
        let commands = readme_commands();
        assert!(commands.len() >= 10, "{commands:?}");
        for command in commands {
            // Plain words only; a quoted example would need a real shell splitter here.
            assert!(!command.contains(['"', '\'', '\\']), "quotes in a README example: {command}");
            if let Err(e) = Cli::try_parse_from(command.split_whitespace()) {
                panic!("README.md's `{command}` does not parse:\n{e}");
            }
        }
    }

    #[test]
    fn durations_take_units_or_plain_seconds() {
        assert_eq!(duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(duration("1h 30m"), Ok(Duration::from_secs(5400)));
        let err = duration("5 parsecs").unwrap_err();
        assert!(err.contains("`5 parsecs` is not a duration") && err.contains("for example 5s"), "{err}");
        let cli = Cli::try_parse_from(["kiln", "results", "--wait", "5", "--identity", "certs/me"]).unwrap();
        let Command::Results(args) = cli.command else { panic!("not results") };
        assert_eq!(args.wait, Some(Duration::from_secs(5)));
    }

    #[test]
    fn repo_owner_splits_at_the_last_equals_sign() {
        assert_eq!(parse_repo_owner("/srv/git/project=watcher"), Ok(("/srv/git/project".into(), "watcher".into())));
        assert_eq!(parse_repo_owner("/srv/a=b/c=watcher"), Ok(("/srv/a=b/c".into(), "watcher".into())));
        for bad in ["/srv/git/project", "=watcher", "/srv/git/project="] {
            assert!(parse_repo_owner(bad).unwrap_err().contains("expected REPO=OBSERVER"), "{bad}");
        }
        let cli =
            Cli::try_parse_from(["kiln", "dispatcher", "--repo-owner", "/a=w1", "--repo-owner", "/b=w2"]).unwrap();
        let Command::Dispatcher(args) = cli.command else { panic!("not the dispatcher") };
        assert_eq!(args.repo_owners, vec![("/a".into(), "w1".into()), ("/b".into(), "w2".into())]);
    }
}
