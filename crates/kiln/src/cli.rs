//! The command line: every subcommand and flag, with environment-variable
//! fallbacks for the ones a deployment sets once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Kiln: a distributed continuous-integration system.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
pub struct Cli {
    /// Log only warnings and errors (RUST_LOG overrides).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make the certificate authority and peers' certificate bundles.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the dispatcher: the hub that queues commits and hands them to runners.
    Dispatcher(DispatcherArgs),
    /// Watch a repository and submit new commits to the dispatcher.
    Observer(ObserverArgs),
    /// Take jobs from the dispatcher and run their tests.
    Runner(RunnerArgs),
    /// Print the results of a commit (exit 0 passed, 1 failed, 2 otherwise).
    Results(ResultsArgs),
    /// Stop testing a commit: queued work is dropped, running tests are killed.
    Cancel(CancelArgs),
    /// Make a running observer look for new commits now (for git hooks).
    Notify(NotifyArgs),
    /// Run the whole system on a sample repository and show the results.
    Demo(DemoArgs),
    /// Check an executor plugin file, create a new plugin crate, or run the plugins on a local directory.
    #[command(subcommand)]
    Plugin(crate::plugin::PluginCommand),
}

/// `kiln certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a certificate authority and the dispatcher's bundle (DIR/dispatcher).
    Init {
        /// Where certificates are written.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// A host name or IP address the dispatcher is reached by (repeatable).
        #[arg(long = "san", value_name = "NAME_OR_IP", default_values = ["localhost", "127.0.0.1"])]
        sans: Vec<String>,
    },
    /// Issue a bundle (DIR/NAME: ca.pem, cert.pem, key.pem) for a runner, observer or admin.
    Issue {
        /// The peer's role.
        role: RoleArg,
        /// The peer's name, unique in this deployment.
        name: String,
        /// Where certificates are written.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

/// The role of a client certificate.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    /// Takes jobs and reports results.
    Runner,
    /// Submits commits.
    Observer,
    /// Reads results.
    Admin,
}

/// Flags every client shares.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The certificate bundle directory (ca.pem, cert.pem, key.pem).
    #[arg(long, env = "KILN_IDENTITY")]
    pub identity: PathBuf,
    /// The dispatcher's HOST:PORT.
    #[arg(long, env = "KILN_DISPATCHER", default_value = "127.0.0.1:7700")]
    pub dispatcher: String,
    /// How long without hearing from the dispatcher before the connection is dead.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub idle_timeout: Duration,
}

/// `kiln dispatcher`
#[derive(Debug, Args)]
pub struct DispatcherArgs {
    /// The dispatcher's certificate bundle (made by `kiln certs init`).
    #[arg(long, env = "KILN_IDENTITY", default_value = "certs/dispatcher")]
    pub identity: PathBuf,
    /// The UDP address to listen on.
    #[arg(long, env = "KILN_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// The state directory: git mirror and results files.
    #[arg(long, env = "KILN_STATE", default_value = "kiln-state")]
    pub state: PathBuf,
    /// How long a silent peer is given before it is declared dead and its work requeued.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub idle_timeout: Duration,
    /// The largest git pack accepted from an observer, in MiB.
    #[arg(long, default_value_t = 512)]
    pub max_pack_mib: u64,
    /// How long one commit's tests may run before they are stopped.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub job_timeout: Duration,
    /// After a restart, how long runners have to reconnect and claim the work
    /// they were doing before it is handed to other runners.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub resume_grace: Duration,
}

/// `kiln observer`
#[derive(Debug, Args)]
pub struct ObserverArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The repository to watch.
    #[arg(long)]
    pub repo: PathBuf,
    /// A branch to watch (repeatable).
    #[arg(long = "branch", default_values = ["main"])]
    pub branches: Vec<String>,
    /// How often to look for new commits.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub interval: Duration,
    /// `latest`: test the newest commit of each branch (older queued ones are
    /// skipped); `every`: test every new commit, in order.
    #[arg(long, value_enum, default_value = "latest")]
    pub mode: ModeArg,
    /// In `latest` mode, let running tests of a superseded commit finish
    /// instead of cancelling them.
    #[arg(long)]
    pub keep_running: bool,
    /// The Unix socket `kiln notify` pokes (default: kiln-observer.sock in the repository's git directory).
    #[arg(long)]
    pub notify_socket: Option<PathBuf>,
}

/// Which commits the observer submits.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    /// The newest commit of each branch.
    Latest,
    /// Every new commit, in order.
    Every,
}

/// `kiln cancel`
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The commit (full id).
    pub commit: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `kiln notify`
#[derive(Debug, Args)]
pub struct NotifyArgs {
    /// The watched repository.
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// The observer's socket, if not the default for `--repo`.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// `kiln runner`
#[derive(Debug, Args)]
pub struct RunnerArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Where the runner keeps its object cache and job checkouts.
    #[arg(long, env = "KILN_WORK", default_value = "kiln-work")]
    pub work: PathBuf,
    /// How many jobs to run at once.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// A directory of extra executor plugins (*.wasm), loaded after the built-ins in file-name order; a file
    /// more than one plugin claims goes to the first loaded.
    #[arg(long)]
    pub plugins: Option<PathBuf>,
    /// A program plugins may run (repeatable); each is resolved to an absolute path at start-up.
    #[arg(long = "allow-program", value_name = "NAME", default_values = ["python3"])]
    pub allow_programs: Vec<String>,
    /// The wall-clock limit for one command a plugin runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub command_timeout: Duration,
    /// The uid and gid commands run as when the runner runs as root: one no account on this machine uses.
    #[arg(long, env = "KILN_SANDBOX_ID", default_value_t = kiln_sandbox::SANDBOX_ID)]
    pub sandbox_id: u32,
}

/// `kiln results`
#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// The commit (full id); the newest submitted commit if omitted.
    pub commit: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Wait up to this long for the commit's testing to end.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
}

/// How `kiln results` prints.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// The stored JSON document.
    Json,
}

/// `kiln demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to put the demo's certificates, repository, state and logs (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// How many runners to start.
    #[arg(long, default_value_t = 2)]
    pub runners: u32,
}
