//! [`PluginHost`]: loads plugins (compiling each once, or loading it from the
//! compile cache), matches a job's files to them, and runs each plugin in a
//! fresh, limited store.
//!
//! Which plugin gets a file: the first loaded whose claims match it. The
//! built-ins load first (python-unittest, then tap), then the files the
//! runner loads, in the order it loads them (`kiln runner --plugins DIR`
//! loads them sorted by file name). When a later plugin also claims a file,
//! a warning names the file and both plugins.
//!
//! Each call is bounded twice over: an epoch deadline traps WebAssembly that
//! computes for too long, and a watchdog future cancels a call that waits too
//! long inside WASI (a guest sleeping, say), which no epoch check can
//! interrupt. Both measure the same clock, which stops while `run-command`
//! runs (the command timeout bounds that).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use kiln_proto::{Escaped, Outcome, TestResult};
use tokio::sync::mpsc;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx};

use crate::bindings::{self, PluginPre};
use crate::cache::{Compilation, CompileCache};
use crate::claims::Claim;
use crate::state::{CallClock, GuestOutput, HostState, Job};
use crate::{HostError, HostEvent, Policy};

/// The plugins compiled into the runner, in the order they get files:
/// (name, component). The build script builds them from `plugins/` and says
/// where the files are.
const BUILT_IN: &[(&str, &[u8])] = &[
    ("python-unittest", include_bytes!(env!("KILN_PLUGIN_PYTHON_UNITTEST"))),
    ("tap", include_bytes!(env!("KILN_PLUGIN_TAP"))),
];

/// The `kiln:executor` contract version this host implements
/// (plugins/wit/executor.wit).
pub const CONTRACT_VERSION: &str = "0.2.1";
const EXECUTOR_EXPORT: &str = "kiln:executor/executor";
const HOST_IMPORT: &str = "kiln:executor/host";

/// How often the engine's epoch advances: the resolution of the call time
/// limit, and how long a computing plugin may hold an executor thread before
/// it yields.
const EPOCH_TICK: Duration = Duration::from_millis(20);

/// Where the checkout appears inside a plugin.
const GUEST_CHECKOUT: &str = "/checkout";

/// What a loaded plugin is and what it was granted, for the runner's log,
/// its registration with the dispatcher and `kiln plugin check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginSummary {
    /// The plugin's name, unique among the loaded plugins.
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// The `kiln:executor` contract version it was built against.
    pub contract: String,
    /// What the component imports (e.g. `kiln:executor/host@0.1.0`,
    /// `wasi:filesystem/types@0.2.6`). The host links all of WASI, but with
    /// nothing behind it except the read-only checkout.
    pub imports: Vec<String>,
    /// Glob patterns of the files it claims.
    pub claims: Vec<String>,
    /// Programs it asked to run.
    pub programs: Vec<String>,
    /// The programs it may run: those it asked for that the policy allows.
    pub granted: Vec<String>,
    /// Whether it was compiled at load or came from the compile cache.
    pub compilation: Compilation,
}

/// What a repository's configuration changes about one [`PluginHost::run_with`]:
/// everything else comes from the runner's [`Policy`].
#[derive(Clone, Debug, Default)]
pub struct RunSettings {
    /// The per-file time limit instead of the policy's command timeout (the
    /// caller bounds it by the runner's maximum).
    pub file_timeout: Option<Duration>,
    /// Variables added to every command's environment; the caller has
    /// checked them (see `kiln_proto::repo_config::refused_env`).
    pub env: Vec<(String, String)>,
    /// Granted programs to start from another path for this run (`python3`
    /// from the repository's environment): a plugin still gets only the
    /// programs the policy granted it, by name.
    pub programs: BTreeMap<String, PathBuf>,
}

/// Runs Kiln executor plugins. Share it between jobs with an `Arc`: `run`
/// takes `&self` and every call gets its own store.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    policy: Policy,
    /// Where compiled plugins are kept between runs, if anywhere.
    cache: Option<CompileCache>,
    /// Whether this host serves a runner or only checks a plugin file.
    purpose: Purpose,
    /// Built-ins first, then files in load order: the first plugin whose
    /// claims match a file gets it.
    plugins: Vec<Plugin>,
    /// Advances the engine's epoch for as long as the host lives.
    _ticker: EpochTicker,
}

/// What a host is for: a runner's (built-ins loaded, grant problems logged)
/// or `kiln plugin check`'s (the file alone, nothing to warn a runner about).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Runner,
    Check,
}

/// A compiled, described plugin, ready to instantiate.
struct Plugin {
    name: Arc<str>,
    summary: PluginSummary,
    claims: Vec<Claim>,
    granted: Arc<BTreeMap<String, PathBuf>>,
    pre: PluginPre<HostState>,
}

/// Why a plugin call produced no (or not all) results.
enum Failure {
    /// The plugin returned `err`.
    Refused(String),
    /// The watchdog stopped a call that waited too long.
    TimeLimit,
    /// wasmtime reported a trap or another error.
    Wasm(wasmtime::Error),
}

/// The error the epoch callback raises when a call has used its time.
#[derive(Debug, thiserror::Error)]
#[error("the plugin call exceeded its time limit")]
struct TimeLimitExceeded;

/// Where one plugin call runs, and what it may use and tell.
struct Run<'a> {
    checkout: &'a Path,
    slots: u32,
    settings: &'a RunSettings,
    report: &'a mpsc::UnboundedSender<HostEvent>,
    more: Option<mpsc::UnboundedReceiver<Vec<String>>>,
}

impl PluginHost {
    /// Sets up the engine and loads the built-in plugins, compiling each.
    pub fn new(policy: Policy) -> Result<PluginHost, HostError> {
        PluginHost::build(policy, None, Purpose::Runner)
    }

    /// Like [`PluginHost::new`], keeping compiled plugins in `cache_dir`
    /// (created if missing, private to this user): a plugin compiled once,
    /// by this or an earlier process with the same wasmtime build and
    /// configuration, is loaded from there instead of compiled again.
    pub fn with_cache(policy: Policy, cache_dir: &Path) -> Result<PluginHost, HostError> {
        PluginHost::build(policy, Some(cache_dir), Purpose::Runner)
    }

    /// Loads the plugin in `path` the way a runner would, on its own (no
    /// built-ins, no cache, no programs allowed), and describes it: what
    /// `kiln plugin check` prints. The error says why it cannot be loaded.
    pub fn check_file(path: &Path) -> Result<PluginSummary, HostError> {
        let policy = Policy {
            programs: BTreeMap::new(),
            command_timeout: Duration::from_secs(10),
            max_output: 1 << 20,
            call_timeout: Duration::from_secs(10),
            max_memory: 256 << 20,
            hidden: Vec::new(),
        };
        let mut host = PluginHost::build(policy, None, Purpose::Check)?;
        host.load_file(path)?;
        host.plugins.pop().map(|p| p.summary).ok_or_else(|| HostError::Info {
            origin: format!("plugin file {}", path.display()),
            detail: "it was not loaded".to_owned(),
        })
    }

    fn build(policy: Policy, cache_dir: Option<&Path>, purpose: Purpose) -> Result<PluginHost, HostError> {
        let engine_error = |e: wasmtime::Error| HostError::Engine(e.into_boxed_dyn_error());
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(engine_error)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_error)?;
        bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(engine_error)?;
        let cache = cache_dir.map(|dir| CompileCache::open(dir, &engine)).transpose()?;
        let ticker = EpochTicker::start(engine.clone())?;
        let mut host = PluginHost { engine, linker, policy, cache, purpose, plugins: Vec::new(), _ticker: ticker };
        if purpose == Purpose::Runner {
            for (name, bytes) in BUILT_IN {
                host.load(format!("built-in plugin {name}"), bytes)?;
            }
        }
        Ok(host)
    }

    /// Loads a plugin component from a `.wasm` file. Its claims come after
    /// those of the plugins already loaded.
    pub fn load_file(&mut self, path: &Path) -> Result<(), HostError> {
        let bytes = std::fs::read(path).map_err(|source| HostError::ReadPlugin { path: path.to_owned(), source })?;
        self.load(format!("plugin file {}", path.display()), &bytes)
    }

    /// The loaded plugins, in the order they get files.
    pub fn plugins(&self) -> Vec<PluginSummary> {
        self.plugins.iter().map(|p| p.summary.clone()).collect()
    }

    /// The names of the plugins whose claims match `file`, in load order:
    /// the first one gets the file.
    pub fn claimants(&self, file: &str) -> Vec<String> {
        self.plugins
            .iter()
            .filter(|p| p.claims.iter().any(|c| c.matches(file)))
            .map(|p| p.summary.name.clone())
            .collect()
    }

    /// Runs the tests in `files` (repository-relative, `/`-separated) of the
    /// checkout at `checkout`, sending each result to `report` as it comes
    /// and [`HostEvent::FileDone`] after each file's last result.
    ///
    /// Each file goes to the first plugin that claims it; files no plugin
    /// claims are ignored. Each plugin gets its files in one `run` call (a
    /// batch), in a fresh instance, and may run up to `slots` of them at
    /// once. A plugin that fails (traps, runs out of time or memory, or
    /// refuses) costs only the files it had not completed, each of which
    /// gets an `error` result if it has none. A test id already reported in
    /// this run is dropped. Errors are only what the caller must handle: a
    /// checkout that cannot be opened, or `report`'s receiver gone.
    pub async fn run(
        &self,
        checkout: &Path,
        files: &[String],
        slots: u32,
        report: &mpsc::UnboundedSender<HostEvent>,
    ) -> Result<(), HostError> {
        self.run_with(checkout, files, slots, &RunSettings::default(), report, None).await
    }

    /// [`PluginHost::run`] with a repository's [`RunSettings`], and with
    /// `more`, then more files of the same checkout while the plugin wants
    /// them. When the files all go to one plugin and it asks for more
    /// (`next-files`) once they are done, `report` gets [`HostEvent::Idle`];
    /// the files next sent on `more` are its answer, run and reported in the
    /// same call, and closing `more` tells it that none will come. Only
    /// files that plugin claims may be sent ([`PluginHost::claimants`]).
    /// Files split over several plugins run as without `more`, which is
    /// closed unread.
    pub async fn run_with(
        &self,
        checkout: &Path,
        files: &[String],
        slots: u32,
        settings: &RunSettings,
        report: &mpsc::UnboundedSender<HostEvent>,
        more: Option<mpsc::UnboundedReceiver<Vec<String>>>,
    ) -> Result<(), HostError> {
        let checkout = tokio::fs::canonicalize(checkout)
            .await
            .map_err(|e| HostError::Checkout { path: checkout.to_owned(), source: Box::new(e) })?;
        let mut seen = HashSet::new();
        let assigned = self.assign(files);
        let mut more = more.filter(|_| assigned.iter().filter(|f| !f.is_empty()).count() == 1);
        for (plugin, files) in self.plugins.iter().zip(assigned) {
            if files.is_empty() {
                continue;
            }
            let retry;
            let run = Run { checkout: &checkout, slots: slots.max(1), settings, report, more: more.take() };
            (seen, retry) = self.run_batch(plugin, files, run, seen).await?;
            // The batch failed, and nothing says which file caused it: each
            // file it left unfinished runs again alone, so that only a file
            // that fails on its own gets the error. (Repeated results are
            // dropped as repeated ids.)
            for file in retry {
                let run = Run { checkout: &checkout, slots: 1, settings, report, more: None };
                (seen, _) = self.run_batch(plugin, vec![file], run, seen).await?;
            }
        }
        Ok(())
    }

    /// Splits `files` among the plugins (same order as `self.plugins`): each
    /// goes to the first plugin that claims it. Files that more than one
    /// plugin claims are reported, one warning per pair of plugins.
    fn assign(&self, files: &[String]) -> Vec<Vec<String>> {
        let mut assigned = vec![Vec::new(); self.plugins.len()];
        let mut unique = HashSet::new();
        // (winner, loser) -> (how many files, the first of them)
        let mut overlaps: BTreeMap<(usize, usize), (usize, &str)> = BTreeMap::new();
        for file in files {
            if !is_repository_path(file) {
                tracing::warn!(file, "ignoring a file that is not a relative path inside the repository");
                continue;
            }
            if !unique.insert(file) {
                continue;
            }
            let mut claiming = self
                .plugins
                .iter()
                .enumerate()
                .filter(|(_, p)| p.claims.iter().any(|c| c.matches(file)))
                .map(|(i, _)| i);
            let Some(winner) = claiming.next() else {
                tracing::trace!(file, "no plugin claims this file");
                continue;
            };
            assigned[winner].push(file.clone());
            for loser in claiming {
                overlaps.entry((winner, loser)).or_insert((0, file)).0 += 1;
            }
        }
        for ((winner, loser), (count, file)) in overlaps {
            let (winner, loser) = (&self.plugins[winner].name, &self.plugins[loser].name);
            tracing::warn!(
                file,
                plugin = %Escaped(winner),
                also_claimed_by = %Escaped(loser),
                files = count,
                "{} (and {} more) is claimed by plugins {} and {}; {} runs it, because the first plugin loaded wins \
                 (built-ins, then --plugins files by name)",
                Escaped(file),
                count - 1,
                Escaped(winner),
                Escaped(loser),
                Escaped(winner)
            );
        }
        assigned
    }

    /// Runs one plugin on a batch of files in a fresh instance. Returns the
    /// test ids reported so far, and, when the call failed on a batch of
    /// several files, the files it did not complete, to be run again one by
    /// one. Otherwise it completes every file itself: those the plugin did
    /// not mark done get their `FileDone` (and, after a failure, an `error`
    /// result if they have none).
    async fn run_batch(
        &self,
        plugin: &Plugin,
        files: Vec<String>,
        run: Run<'_>,
        seen: HashSet<String>,
    ) -> Result<(HashSet<String>, Vec<String>), HostError> {
        let Run { checkout, slots, settings, report, more } = run;
        let started = Instant::now();
        // The limits are per file; a batch of n files gets n times them.
        let count = u32::try_from(files.len()).unwrap_or(u32::MAX);
        let file_timeout = settings.file_timeout.unwrap_or(self.policy.command_timeout);
        let job = Job {
            files: files.clone(),
            done: HashSet::new(),
            spawn_timeout: file_timeout.saturating_mul(count),
            file_timeout,
            call_timeout: self.policy.call_timeout,
            more,
            checkout: checkout.to_owned(),
            report: report.clone(),
            seen,
            files_with_results: HashSet::new(),
            closed: false,
            env: settings.env.clone().into(),
        };
        let granted = if settings.programs.is_empty() {
            plugin.granted.clone()
        } else {
            let mut granted = (*plugin.granted).clone();
            for (name, path) in granted.iter_mut() {
                if let Some(replacement) = settings.programs.get(name) {
                    path.clone_from(replacement);
                }
            }
            Arc::new(granted)
        };
        let limit = self.policy.call_timeout.saturating_mul(count);
        let mut store = self.store(&plugin.name, &granted, Some(job), Some(checkout), limit)?;
        store.data_mut().call.command_timeout = file_timeout;
        let clock = store.data().call.clock.clone();
        let batch = bindings::exports::kiln::executor::executor::Batch {
            files,
            slots,
            file_timeout_ms: u64::try_from(file_timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let call = async {
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            instance.kiln_executor_executor().call_run(&mut store, &batch).await
        };
        let failure = match self.bounded(call, &clock).await {
            Ok(()) => {
                let printed = store.data().call.output.text();
                if !printed.is_empty() {
                    tracing::debug!(plugin = %plugin.name, "the plugin printed: {printed}");
                }
                None
            }
            Err(failure) => Some(self.explain(&format!("plugin {}", plugin.name), &failure, store.data())),
        };
        store.data_mut().reap().await;
        tracing::debug!(plugin = %plugin.name, files = count, elapsed_ms = started.elapsed().as_millis(), "plugin run ended");
        let Some(mut job) = store.into_data().call.job else { unreachable!("a run call's store always holds its job") };
        if job.closed {
            return Err(HostError::ReportClosed);
        }
        // Its files, with those `next-files` handed it.
        let files = std::mem::take(&mut job.files);
        let undone: Vec<String> = files.into_iter().filter(|f| !job.done.contains(f)).collect();
        if let Some(message) = &failure {
            tracing::warn!(plugin = %Escaped(&plugin.name), files = %Escaped(&undone.join(", ")), "{}", Escaped(message));
            if undone.len() > 1 {
                return Ok((job.seen, undone));
            }
        }
        for file in undone {
            if let Some(message) = &failure
                && !job.files_with_results.contains(&file)
                && job.seen.insert(file.clone())
            {
                let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let result = TestResult::new(file.clone(), file.clone(), Outcome::Error, duration_ms, message.clone());
                report.send(HostEvent::Test(result)).map_err(|_| HostError::ReportClosed)?;
            }
            report.send(HostEvent::FileDone(file)).map_err(|_| HostError::ReportClosed)?;
        }
        Ok((job.seen, Vec::new()))
    }

    /// Runs a plugin call under the call time limit. The epoch callback traps
    /// computing WebAssembly; this watchdog catches a call blocked in WASI.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = wasmtime::Result<Result<T, String>>>,
        clock: &CallClock,
    ) -> Result<T, Failure> {
        let watchdog = async {
            // The clock cannot run faster than wall time, so sleeping for the
            // time left never oversleeps; it stops during commands (and the
            // limit grows with `next-files`), so check again on waking.
            loop {
                let (used, limit) = (clock.used(), clock.limit());
                if used >= limit {
                    return;
                }
                tokio::time::sleep(limit - used).await;
            }
        };
        tokio::select! {
            result = call => match result {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(message)) => Err(Failure::Refused(message)),
                Err(error) => Err(Failure::Wasm(error)),
            },
            () = watchdog => Err(Failure::TimeLimit),
        }
    }

    /// A fresh store for one call of `plugin`: WASI with at most the checkout
    /// (read-only), no network, no environment, no arguments; the memory
    /// limit; the epoch deadline.
    fn store(
        &self,
        name: &Arc<str>,
        granted: &Arc<BTreeMap<String, PathBuf>>,
        job: Option<Job>,
        checkout: Option<&Path>,
        limit: Duration,
    ) -> Result<Store<HostState>, HostError> {
        let output = GuestOutput::new();
        let mut wasi = WasiCtx::builder();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .stdout(output.clone())
            .stderr(output.clone());
        if let Some(dir) = checkout {
            wasi.preopened_dir(dir, GUEST_CHECKOUT, FsPerms::ReadOnly)
                .map_err(|e| HostError::Checkout { path: dir.to_owned(), source: e.into_boxed_dyn_error() })?;
        }
        let call = crate::state::Call {
            plugin: name.clone(),
            granted: granted.clone(),
            command_timeout: self.policy.command_timeout,
            max_output: self.policy.max_output,
            hidden: self.policy.hidden.clone().into(),
            job,
            clock: CallClock::start(limit),
            output,
        };
        let mut store = Store::new(&self.engine, HostState::new(wasi.build(), self.policy.max_memory, call));
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |context| {
            if context.data().call.clock.exceeded() {
                return Err(wasmtime::Error::new(TimeLimitExceeded));
            }
            // Yielding lets other jobs' tasks run on this executor thread.
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(store)
    }

    /// The message given to a failed call's files: which plugin (`who`, e.g.
    /// "plugin python-unittest"), what went wrong, and what the plugin
    /// printed (a panic message, usually).
    fn explain(&self, who: &str, failure: &Failure, state: &HostState) -> String {
        let time_limit = || format!("{who} exceeded its time limit of {}", human_duration(state.call.clock.limit()));
        let mut message = match failure {
            Failure::Refused(why) => format!("{who} could not run these tests: {why}"),
            Failure::TimeLimit => time_limit(),
            Failure::Wasm(error) if error.downcast_ref::<TimeLimitExceeded>().is_some() => time_limit(),
            Failure::Wasm(_) if state.limiter.exceeded => {
                format!("{who} exceeded its memory limit of {}", human_bytes(self.policy.max_memory))
            }
            Failure::Wasm(error) => {
                tracing::debug!(who, "plugin failure: {error:?}");
                match error.downcast_ref::<Trap>() {
                    Some(trap) => format!("{who} crashed: {trap}"),
                    None => format!("{who} failed: {}", error_chain(error)),
                }
            }
        };
        let printed = state.call.output.text();
        if !printed.is_empty() {
            message.push_str("\n\nThe plugin printed:\n");
            message.push_str(&printed);
        }
        message
    }

    /// Compiles (or finds in the cache), checks and describes a plugin, and
    /// adds it to the list.
    fn load(&mut self, origin: String, bytes: &[u8]) -> Result<(), HostError> {
        let started = Instant::now();
        let compile = || {
            Component::new(&self.engine, bytes).map_err(|e| {
                let (reason, detail_helps) = not_a_component(bytes);
                HostError::Compile {
                    origin: origin.clone(),
                    reason,
                    source: detail_helps.then(|| e.into_boxed_dyn_error()),
                }
            })
        };
        let (component, compilation) = match &self.cache {
            Some(cache) => cache.load_or_compile(&self.engine, &origin, bytes, compile)?,
            None => (compile()?, Compilation::Compiled),
        };
        let contract = check_contract(&origin, &self.engine, &component)?;
        let imports = component.component_type().imports(&self.engine).map(|(name, _)| name.to_owned()).collect();
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(PluginPre::new)
            .map_err(|e| HostError::NotAPlugin { origin: origin.clone(), reason: error_chain(&e) })?;
        let info = self.describe(&origin, &pre)?;
        let plugin = self.admit(origin, info, pre, Loaded { contract, imports, compilation })?;
        for claim in &plugin.summary.claims {
            if let Some(earlier) = self.plugins.iter().find(|p| p.summary.claims.contains(claim)) {
                tracing::warn!(
                    plugin = %plugin.name,
                    claim,
                    "plugin {} claims `{claim}`, as plugin {} (loaded earlier) does: {} gets those files",
                    plugin.name,
                    earlier.name,
                    earlier.name
                );
            }
        }
        if self.purpose == Purpose::Runner {
            tracing::info!(
                plugin = %Escaped(&plugin.name),
                version = %plugin.summary.version,
                contract = %plugin.summary.contract,
                claims = %Escaped(&plugin.summary.claims.join(",")),
                granted = %Escaped(&plugin.summary.granted.join(",")),
                compilation = %match plugin.summary.compilation {
                    Compilation::Compiled => "compiled",
                    Compilation::Cached => "cached",
                },
                elapsed_ms = started.elapsed().as_millis(),
                "plugin loaded"
            );
        }
        self.plugins.push(plugin);
        Ok(())
    }

    /// Calls the plugin's `info` export, under the same limits as any call
    /// but with nothing granted and no checkout.
    fn describe(
        &self,
        origin: &str,
        pre: &PluginPre<HostState>,
    ) -> Result<bindings::kiln::executor::types::PluginInfo, HostError> {
        let limit = self.policy.call_timeout;
        let mut store = self.store(&Arc::from(origin), &Arc::new(BTreeMap::new()), None, None, limit)?;
        let clock = store.data().call.clock.clone();
        let call = async {
            let instance = pre.instantiate_async(&mut store).await?;
            instance.kiln_executor_executor().call_info(&mut store).await.map(Ok)
        };
        let result = block_on(self.bounded(call, &clock))?;
        result.map_err(|failure| HostError::Info {
            origin: origin.to_owned(),
            detail: self.explain("its `info` call", &failure, store.data()),
        })
    }

    /// Checks a plugin's self-description and works out its grants.
    fn admit(
        &self,
        origin: String,
        info: bindings::kiln::executor::types::PluginInfo,
        pre: PluginPre<HostState>,
        loaded: Loaded,
    ) -> Result<Plugin, HostError> {
        let bad = |detail: String| HostError::BadInfo { origin: origin.clone(), detail };
        let name_ok = !info.name.is_empty()
            && info.name.len() <= 64
            && info.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(bad(format!(
                "its name `{}` must be 1 to 64 ASCII letters, digits, `-`, `_` or `.`",
                info.name.chars().take(80).collect::<String>()
            )));
        }
        if self.plugins.iter().any(|p| p.summary.name == info.name) {
            return Err(HostError::DuplicateName { origin, name: info.name });
        }
        let claims = info.claims.iter().map(|c| Claim::parse(c)).collect::<Result<Vec<_>, _>>().map_err(bad)?;
        let mut granted = BTreeMap::new();
        let mut not_granted = Vec::new();
        for program in &info.programs {
            match self.policy.programs.get(program) {
                Some(path) => {
                    granted.insert(program.clone(), path.clone());
                }
                None => not_granted.push(Escaped(program).to_string()),
            }
        }
        // A plugin lists every program it might use (the TAP plugin: any
        // interpreter a shebang may name); most repositories need few of them.
        // So one line now, and a warning only when a file needs one (see `state.rs`).
        if self.purpose == Purpose::Runner && !not_granted.is_empty() {
            tracing::info!(
                plugin = %info.name,
                "plugin {} may also run {}, which this runner does not allow; a test file that needs one will \
                 say so",
                info.name,
                not_granted.join(", ")
            );
        }
        Ok(Plugin {
            name: Arc::from(info.name.as_str()),
            summary: PluginSummary {
                name: info.name,
                version: info.version,
                contract: loaded.contract,
                imports: loaded.imports,
                claims: info.claims,
                programs: info.programs,
                granted: granted.keys().cloned().collect(),
                compilation: loaded.compilation,
            },
            claims,
            granted: Arc::new(granted),
            pre,
        })
    }
}

/// What loading found out about a component before asking the plugin.
struct Loaded {
    contract: String,
    imports: Vec<String>,
    compilation: Compilation,
}

/// Why bytes that wasmtime could not compile are not a plugin, in terms of
/// what to do about it, and whether wasmtime's own message adds to that
/// (it does for a damaged component; for other bytes it is noise).
fn not_a_component(bytes: &[u8]) -> (String, bool) {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => (
            "it is a core WebAssembly module, not a component: build it for the wasm32-wasip2 target (or wrap it \
             with `wasm-tools component new`)"
                .to_owned(),
            false,
        ),
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => ("it is not a valid WebAssembly component".to_owned(), true),
        _ => ("it is not a WebAssembly component (a plugin is a .wasm file built for wasm32-wasip2)".to_owned(), false),
    }
}

/// Refuses a component that does not export the executor interface, or
/// that targets a contract version this host cannot run: same major version,
/// and for 0.x the same minor, with nothing newer than the host's own.
/// Returns the version the plugin was built against.
fn check_contract(origin: &str, engine: &Engine, component: &Component) -> Result<String, HostError> {
    let ty = component.component_type();
    let mut exported = None;
    for (name, _) in ty.exports(engine) {
        if let Some(rest) = name.strip_prefix(EXECUTOR_EXPORT) {
            exported = Some(rest.strip_prefix('@').unwrap_or("(unversioned)").to_owned());
        }
    }
    let Some(found) = exported else {
        return Err(HostError::NotAPlugin {
            origin: origin.to_owned(),
            reason: format!("it does not export {EXECUTOR_EXPORT}"),
        });
    };
    let mut versions = vec![found.clone()];
    for (name, _) in ty.imports(engine) {
        if let Some(rest) = name.strip_prefix(HOST_IMPORT) {
            versions.push(rest.strip_prefix('@').unwrap_or("(unversioned)").to_owned());
        }
    }
    for version in versions {
        if !compatible(&version, CONTRACT_VERSION) {
            return Err(HostError::IncompatibleContract {
                origin: origin.to_owned(),
                found: version,
                supported: CONTRACT_VERSION.to_owned(),
            });
        }
    }
    Ok(found)
}

/// Whether a plugin built for contract version `found` runs on a host that
/// implements `supported` (the rule stated in the WIT package's docs).
fn compatible(found: &str, supported: &str) -> bool {
    let (Some(found), Some(supported)) = (parse_version(found), parse_version(supported)) else {
        return false;
    };
    match (found, supported) {
        ((0, minor, patch), (0, s_minor, s_patch)) => minor == s_minor && patch <= s_patch,
        ((major, minor, _), (s_major, s_minor, _)) => major == s_major && minor <= s_minor,
    }
}

fn parse_version(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let parsed = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(parsed)
}

/// Whether `path` is a plain relative path inside a repository.
fn is_repository_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path.split('/').all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

fn human_bytes(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    if bytes.is_multiple_of(MIB) { format!("{} MiB", bytes / MIB) } else { format!("{bytes} bytes") }
}

/// An error and its causes on one line.
fn error_chain(error: &wasmtime::Error) -> String {
    error.chain().map(|cause| cause.to_string()).collect::<Vec<_>>().join(": ")
}

/// Drives `future` to completion from synchronous code (loading a plugin),
/// whether or not the caller is inside a tokio runtime: on a scoped thread
/// with its own small runtime, which WASI's host functions need.
fn block_on<F>(future: F) -> Result<F::Output, HostError>
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("kiln-plugin-load".to_owned())
            .spawn_scoped(scope, move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                Ok(runtime.block_on(future))
            })
            .map_err(HostError::Thread)?;
        match thread.join() {
            Ok(result) => result.map_err(HostError::Thread),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A thread that advances the engine's epoch every [`EPOCH_TICK`] until
/// dropped.
struct EpochTicker {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<EpochTicker, HostError> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kiln-epoch".to_owned())
            .spawn(move || {
                // Dropping the sender wakes this up with `Disconnected`.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(EPOCH_TICK) {
                    engine.increment_epoch();
                }
            })
            .map_err(HostError::Thread)?;
        Ok(EpochTicker { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_versions() {
        assert!(compatible("0.1.0", "0.1.0"));
        assert!(compatible("0.1.0", "0.1.3"));
        assert!(!compatible("0.1.4", "0.1.3"));
        assert!(!compatible("0.2.0", "0.1.0"));
        assert!(compatible("1.2.0", "1.3.0"));
        assert!(!compatible("1.4.0", "1.3.0"));
        assert!(!compatible("2.0.0", "1.3.0"));
        assert!(!compatible("(unversioned)", "0.1.0"));
    }

    #[test]
    fn contract_version_matches_the_wit() {
        let wit = include_str!("../../../plugins/wit/executor.wit");
        assert!(wit.contains(&format!("package kiln:executor@{CONTRACT_VERSION};")));
    }

    #[test]
    fn repository_paths() {
        assert!(is_repository_path("tests/test_a.py"));
        for bad in ["", "/etc/passwd", "tests/../x", "tests//x", "./x"] {
            assert!(!is_repository_path(bad), "{bad}");
        }
    }

    #[test]
    fn host_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PluginHost>();
    }
}
