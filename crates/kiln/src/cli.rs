//! The command line: every subcommand and flag, with environment-variable
//! fallbacks for the ones a deployment sets once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln_proto::ByteSize;

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
        /// How many days the dispatcher's certificate is valid (the CA: ten years).
        #[arg(long, value_name = "DAYS", default_value_t = kiln_net::certs::DEFAULT_VALID_DAYS, value_parser = valid_days)]
        valid_days: u32,
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
        /// How many days the certificate is valid; short-lived certificates
        /// limit what a stolen key is worth.
        #[arg(long, value_name = "DAYS", default_value_t = kiln_net::certs::DEFAULT_VALID_DAYS, value_parser = valid_days)]
        valid_days: u32,
    },
    /// Issue a new dispatcher bundle (DIR/dispatcher) from the existing CA,
    /// e.g. when the old certificate expires; move the old bundle away first.
    Dispatcher {
        /// Where certificates are (DIR/ca) and are written.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// A host name or IP address the dispatcher is reached by (repeatable).
        #[arg(long = "san", value_name = "NAME_OR_IP", default_values = ["localhost", "127.0.0.1"])]
        sans: Vec<String>,
        /// How many days the certificate is valid.
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
    /// The certificate bundle directory (ca.pem, cert.pem, key.pem).
    #[arg(long, env = "KILN_IDENTITY")]
    pub identity: PathBuf,
    /// The dispatcher's HOST:PORT.
    #[arg(long, env = "KILN_DISPATCHER", default_value = "127.0.0.1:7700")]
    pub dispatcher: String,
    /// How long without hearing from the dispatcher before the connection is dead.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub idle_timeout: Duration,
}

/// The caps on uncompressed git objects, shared by the dispatcher, observer and runner.
#[derive(Debug, Args)]
pub struct GitLimitsArgs {
    /// The largest uncompressed file (git object) accepted or sent, e.g. 100MiB.
    #[arg(long, env = "KILN_MAX_BLOB_SIZE", default_value_t = ByteSize(kiln_git::Limits::default().max_blob))]
    pub max_blob_size: ByteSize,
    /// The largest total of the files one commit checks out to, e.g. 1GiB.
    #[arg(long, env = "KILN_MAX_TREE_SIZE", default_value_t = ByteSize(kiln_git::Limits::default().max_tree))]
    pub max_tree_size: ByteSize,
    /// The largest total of the uncompressed objects of one git pack, e.g. 4GiB.
    #[arg(long, env = "KILN_MAX_PACK_EXPANSION", default_value_t = ByteSize(kiln_git::Limits::default().max_pack_expansion))]
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
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub idle_timeout: Duration,
    /// The largest git pack accepted from an observer, in MiB.
    #[arg(long, default_value_t = 512)]
    pub max_pack_mib: u64,
    #[command(flatten)]
    pub git_limits: GitLimitsArgs,
    /// How long one commit's tests may run before they are stopped.
    #[arg(long, value_parser = duration, default_value = "1h")]
    pub job_timeout: Duration,
    /// After a restart, how long runners have to reconnect and claim the work
    /// they were doing before it is handed to other runners.
    #[arg(long, value_parser = duration, default_value = "20s")]
    pub resume_grace: Duration,
    /// REPO=OBSERVER: only observer OBSERVER (its certificate's name) may submit
    /// REPO (as that observer names it, e.g. its --repo path). Repeatable; wins
    /// over the default, which binds a repository to the first observer that submits it.
    #[arg(long = "repo-owner", value_name = "REPO=OBSERVER", value_parser = parse_repo_owner)]
    pub repo_owners: Vec<(String, String)>,
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
    /// The repository to watch.
    #[arg(long)]
    pub repo: PathBuf,
    /// A branch to watch (repeatable; default: the branch HEAD names, as `git init` or a clone left it).
    #[arg(long = "branch")]
    pub branches: Vec<String>,
    /// How often to look for new commits.
    #[arg(long, value_parser = duration, default_value = "5s")]
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

/// `kiln cancel`
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The commit: its id, or a unique prefix of at least 7 digits.
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
    #[arg(long, value_parser = duration, default_value = "10m")]
    pub command_timeout: Duration,
    #[command(flatten)]
    pub git_limits: GitLimitsArgs,
    /// The uid and gid commands run as when the runner runs as root: one no account on this machine uses.
    #[arg(long, env = "KILN_SANDBOX_ID", default_value_t = kiln_sandbox::SANDBOX_ID)]
    pub sandbox_id: u32,
}

/// `kiln results`
#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// The commit (its id, or a unique prefix of at least 7 digits); the newest submitted commit if omitted.
    pub commit: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Wait up to this long for the commit's testing to end.
    #[arg(long, value_parser = duration)]
    pub wait: Option<Duration>,
    /// Print each test's message whole, not only its first and last lines.
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
    /// Print each test's message whole, not only its first and last lines.
    #[arg(long, short)]
    pub verbose: bool,
}

#[cfg(test)]
mod tests {
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
            .flat_map(str::lines)
            .map(|line| line.split_once(" #").map_or(line, |(command, _comment)| command).trim())
            .filter(|line| line.starts_with("kiln "))
            .map(str::to_owned)
            .collect()
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
