//! A repository's Python environment: built once per set of inputs, cached
//! under the runner's work directory, and handed to the tests as their
//! `python3`.
//!
//! Key decision: two phases, so that nothing from the repository runs
//! outside the sandbox and the install itself is offline.
//!
//! 1. **Download** (outside the sandbox, because it needs the network):
//!    `pip download --only-binary :all:` of the requirement files, the
//!    install targets and, for `.`, the project's build requirements and
//!    its declared dependencies, from the one index the operator allows
//!    (`--index-url`), into a per-build wheelhouse. Only wheels are fetched,
//!    so no repository or package code runs (an sdist would need its build
//!    step). pip runs `--isolated` with a cleared environment, and the
//!    requirement files are checked first ([`check_requirements`]): options
//!    (`--index-url`, `-e`, `-r`, …), URLs and paths are refused, because
//!    pip would obey them. With only `--find-links DIR`, this phase is
//!    skipped and DIR is the wheelhouse.
//! 2. **Install** (inside the process sandbox: no network, writes only to
//!    the new environment): `uv venv` and `uv pip install --offline
//!    --no-index --find-links WHEELHOUSE`. Building `.` runs the project's
//!    build backend here, sandboxed and offline, from wheels in the
//!    wheelhouse.
//!
//! uv rather than pip for the install: it creates a virtualenv in
//! milliseconds (pip's `venv` + `ensurepip` takes seconds), installs from a
//! wheel directory several times faster, and is one static binary the
//! sandbox can bind read-only. pip does the download, because uv has no
//! "download only" command.
//!
//! An environment is a directory `envs/KEY` where KEY hashes exactly its
//! inputs ([`key`]); it is used only once a `.kiln-ready` marker is in it,
//! written after the install succeeded, so a failed or interrupted build is
//! never reused. The marker's modification time is its last use: beyond
//! `--env-cache-size`, the least recently used environments not in use are
//! removed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use kiln_proto::RepoConfig;
use kiln_proto::repo_config::is_project;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// The marker that makes an environment usable.
const READY: &str = ".kiln-ready";
/// Bumped when what an environment holds changes for the same inputs.
const LAYOUT: &str = "kiln-env-1";
/// How much of an installer's output a message keeps, at each end.
const MESSAGE_END: usize = 1500;
/// The build files that decide what installing `.` produces.
const BUILD_FILES: &[&str] = &["pyproject.toml", "setup.py", "setup.cfg"];

/// How this runner builds environments (`kiln runner` flags).
#[derive(Clone, Debug, Default)]
pub struct EnvSettings {
    /// The only package index downloads may use (`--index-url`); `None`: no network.
    pub index_url: Option<String>,
    /// A directory of wheels to install from (`--find-links`).
    pub find_links: Option<PathBuf>,
    /// How many environments to keep (`--env-cache-size`).
    pub cache_size: usize,
    /// The `uv` binary, resolved at start-up; `None`: this runner cannot install.
    pub uv: Option<PathBuf>,
    /// How long one phase may take.
    pub timeout: Duration,
}

/// Why an environment could not be made: the commit's error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnvError {
    #[error("{0}")]
    Refused(String),
    #[error("download the packages from {index}: {output}")]
    Download { index: String, output: String },
    #[error("install the packages (in the sandbox, offline): {0}")]
    Install(String),
    #[error("prepare the environment directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The runner's environments.
pub(crate) struct Envs {
    dir: PathBuf,
    settings: EnvSettings,
    hidden: Vec<PathBuf>,
    /// One build at a time: two batches of a commit often arrive together,
    /// and the second then finds the first's environment ready.
    building: tokio::sync::Mutex<()>,
    /// Environments jobs are using now, which eviction leaves alone.
    in_use: Mutex<HashMap<String, usize>>,
}

/// An environment a job uses; it may not be evicted until this is dropped.
pub(crate) struct EnvLease<'a> {
    envs: &'a Envs,
    key: String,
    /// The environment's interpreter, to run the tests with.
    pub python: PathBuf,
}

impl Drop for EnvLease<'_> {
    fn drop(&mut self) {
        let mut in_use = self.envs.in_use.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = in_use.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                in_use.remove(&self.key);
            }
        }
    }
}

impl Envs {
    pub(crate) fn new(dir: PathBuf, settings: EnvSettings, hidden: Vec<PathBuf>) -> Envs {
        Envs { dir, settings, hidden, building: tokio::sync::Mutex::new(()), in_use: Mutex::new(HashMap::new()) }
    }

    /// The environment for `config` and the checkout at `checkout`: reused
    /// if one with the same inputs is ready, else built.
    /// `python` is the batch's interpreter (the runner's `python3` without a matrix).
    pub(crate) async fn get(
        &self,
        config: &RepoConfig,
        checkout: &Path,
        python: Option<&crate::Interpreter>,
    ) -> Result<EnvLease<'_>, EnvError> {
        let started = Instant::now();
        let (Some(uv), Some(interpreter)) = (&self.settings.uv, python) else {
            return Err(EnvError::Refused(format!(
                "{} asks for packages to be installed, but this runner has no `uv` (install it with `pip install \
                 uv`, or pass --uv PATH) or no python3",
                config.source
            )));
        };
        let mut inputs = Vec::new();
        for file in &config.requirements {
            let text = read_checkout(checkout, file).await?;
            check_requirements(file, &text).map_err(EnvError::Refused)?;
            inputs.push((file.clone(), text));
        }
        if config.install.iter().any(|t| is_project(t)) {
            for file in BUILD_FILES {
                if let Ok(text) = tokio::fs::read_to_string(checkout.join(file)).await {
                    inputs.push(((*file).to_owned(), text));
                }
            }
        }
        let python = &interpreter.path;
        let wheels = match &self.settings.find_links {
            Some(dir) => wheel_listing(dir),
            None => Vec::new(),
        };
        let key = key(interpreter, config, &inputs, &self.settings, &wheels);
        let env = self.dir.join(&key);
        if touch_ready(&env) {
            let lease = self.lease(&key, &env);
            info!(env = %key, elapsed_ms = started.elapsed().as_millis(), "environment reused");
            return Ok(lease);
        }
        let _building = self.building.lock().await;
        if touch_ready(&env) {
            let lease = self.lease(&key, &env);
            info!(env = %key, elapsed_ms = started.elapsed().as_millis(), "environment reused (built by another batch)");
            return Ok(lease);
        }
        let lease = self.lease(&key, &env);
        let built = self.build(uv, python, config, checkout, &env, &key).await;
        if let Err(e) = built {
            // Never cached: the next commit tries again.
            let _ = tokio::fs::remove_dir_all(&env).await;
            warn!(env = %key, "environment not built: {}", kiln_proto::Escaped(&kiln_proto::error_chain(&e)));
            return Err(e);
        }
        info!(env = %key, elapsed_ms = started.elapsed().as_millis(), "environment built");
        self.evict();
        Ok(lease)
    }

    /// Marks the environment at `env` in use until the lease is dropped.
    fn lease(&self, key: &str, env: &Path) -> EnvLease<'_> {
        *self.in_use.lock().unwrap_or_else(|e| e.into_inner()).entry(key.to_owned()).or_default() += 1;
        EnvLease { envs: self, key: key.to_owned(), python: env.join("bin/python3") }
    }

    async fn build(
        &self,
        uv: &Path,
        python: &Path,
        config: &RepoConfig,
        checkout: &Path,
        env: &Path,
        key: &str,
    ) -> Result<(), EnvError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| EnvError::Io { path, source }
        };
        let _ = tokio::fs::remove_dir_all(env).await;
        tokio::fs::create_dir_all(env).await.map_err(io(env))?;
        // The sandbox user writes the environment; the runner owns the rest.
        if let Some((uid, gid)) = kiln_sandbox::command_user() {
            std::os::unix::fs::chown(env, Some(uid), Some(gid)).map_err(io(env))?;
        }
        let downloaded = self.dir.join(format!(".wheels-{key}"));
        let wheelhouse = match (&self.settings.index_url, &self.settings.find_links) {
            (Some(index), links) => {
                let _ = tokio::fs::remove_dir_all(&downloaded).await;
                tokio::fs::create_dir_all(&downloaded).await.map_err(io(&downloaded))?;
                let result = self.download(python, index, links.as_deref(), config, checkout, &downloaded).await;
                if let Err(e) = result {
                    let _ = tokio::fs::remove_dir_all(&downloaded).await;
                    return Err(e);
                }
                downloaded.clone()
            }
            (None, Some(links)) => links.clone(),
            (None, None) => {
                return Err(EnvError::Refused(format!(
                    "{} asks for packages to be installed, but this runner allows no package index (--index-url) \
                     and has no wheel directory (--find-links)",
                    config.source
                )));
            }
        };
        let result = self.install(uv, python, config, checkout, env, &wheelhouse).await;
        let _ = tokio::fs::remove_dir_all(&downloaded).await;
        result?;
        let ready = env.join(READY);
        tokio::fs::write(&ready, key).await.map_err(io(&ready))?;
        Ok(())
    }

    /// Phase 1: wheels only, from the allowed index, no repository code.
    async fn download(
        &self,
        python: &Path,
        index: &str,
        links: Option<&Path>,
        config: &RepoConfig,
        checkout: &Path,
        wheelhouse: &Path,
    ) -> Result<(), EnvError> {
        let mut args: Vec<String> = [
            "-m",
            "pip",
            "download",
            "--isolated",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "--only-binary",
            ":all:",
            "--index-url",
            index,
            "--dest",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(wheelhouse.display().to_string());
        if let Some(links) = links {
            args.extend(["--find-links".to_owned(), links.display().to_string()]);
        }
        for file in &config.requirements {
            args.extend(["-r".to_owned(), checkout.join(file).display().to_string()]);
        }
        let mut wanted: Vec<String> = config.install.iter().filter(|t| !is_project(t)).cloned().collect();
        for target in config.install.iter().filter(|t| is_project(t)) {
            let pyproject = tokio::fs::read_to_string(checkout.join("pyproject.toml")).await.unwrap_or_default();
            wanted.extend(project_requirements(&pyproject, &extras(target)).map_err(EnvError::Refused)?);
        }
        args.push("--".to_owned());
        args.extend(wanted);
        let home = wheelhouse.join(".home");
        let output = tokio::process::Command::new(python)
            .args(&args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &home)
            .env("LANG", "C.UTF-8")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = match tokio::time::timeout(self.settings.timeout, output).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => return Err(EnvError::Download { index: index.to_owned(), output: format!("pip: {e}") }),
            Err(_) => {
                return Err(EnvError::Download {
                    index: index.to_owned(),
                    output: format!("pip took longer than {}", humantime::format_duration(self.settings.timeout)),
                });
            }
        };
        let _ = tokio::fs::remove_dir_all(&home).await;
        if !output.status.success() {
            return Err(EnvError::Download { index: index.to_owned(), output: head_and_tail(&output.stderr) });
        }
        Ok(())
    }

    /// Phase 2: in the sandbox, offline, from the wheelhouse only.
    async fn install(
        &self,
        uv: &Path,
        python: &Path,
        config: &RepoConfig,
        checkout: &Path,
        env: &Path,
        wheelhouse: &Path,
    ) -> Result<(), EnvError> {
        let checkout = tokio::fs::canonicalize(checkout)
            .await
            .map_err(|source| EnvError::Io { path: checkout.to_owned(), source })?;
        let granted = BTreeMap::from([("uv".to_owned(), uv.to_owned())]);
        let mut binds = vec![
            kiln_sandbox::Bind { path: env.to_owned(), writable: true },
            kiln_sandbox::Bind { path: wheelhouse.to_owned(), writable: false },
        ];
        // The interpreter the environment is made from, wherever it lives.
        if let Some(prefix) = python.parent().and_then(Path::parent).filter(|p| *p != Path::new("/"))
            && !uv.starts_with(prefix)
        {
            binds.push(kiln_sandbox::Bind { path: prefix.to_owned(), writable: false });
        }
        let env_vars = vec![
            // A uv.toml or [tool.uv] in the repository must not redirect anything.
            ("UV_NO_CONFIG".to_owned(), "1".to_owned()),
            ("UV_PYTHON_DOWNLOADS".to_owned(), "never".to_owned()),
            ("UV_NO_CACHE".to_owned(), "1".to_owned()),
        ];
        let limits = kiln_sandbox::Limits {
            granted: &granted,
            timeout: self.settings.timeout,
            max_output: 1 << 20,
            hidden: &self.hidden,
            env: &env_vars,
            binds: &binds,
        };
        let env_text = env.display().to_string();
        let venv = vec![
            "venv".to_owned(),
            "--quiet".to_owned(),
            "--python".to_owned(),
            python.display().to_string(),
            env_text.clone(),
        ];
        self.sandboxed(&checkout, venv, &limits).await?;
        let mut install: Vec<String> =
            ["pip", "install", "--quiet", "--offline", "--no-index", "--link-mode", "copy", "--find-links"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
        install.push(wheelhouse.display().to_string());
        install.extend(["--python".to_owned(), format!("{env_text}/bin/python3")]);
        for file in &config.requirements {
            install.extend(["-r".to_owned(), file.clone()]);
        }
        // Relative to the working directory, the checkout: `.` is the project.
        install.extend(config.install.iter().cloned());
        self.sandboxed(&checkout, install, &limits).await
    }

    async fn sandboxed(
        &self,
        checkout: &Path,
        args: Vec<String>,
        limits: &kiln_sandbox::Limits<'_>,
    ) -> Result<(), EnvError> {
        let what = format!("uv {}", args.first().map_or("", String::as_str));
        let request = kiln_sandbox::Request {
            program: "uv".to_owned(),
            args,
            cwd: String::new(),
            timeout: Duration::ZERO,
            input: None,
        };
        let output = kiln_sandbox::run(checkout, request, limits)
            .await
            .map_err(|refusal| EnvError::Install(format!("{what} could not start: {refusal:?}")))?;
        if output.timed_out {
            return Err(EnvError::Install(format!(
                "{what} took longer than {}: {}",
                humantime::format_duration(limits.timeout),
                head_and_tail(&output.stderr)
            )));
        }
        if output.exit_code != Some(0) {
            let code = output.exit_code.map_or("a signal".to_owned(), |c| format!("code {c}"));
            return Err(EnvError::Install(format!("{what} exited with {code}: {}", head_and_tail(&output.stderr))));
        }
        Ok(())
    }

    /// Removes the least recently used ready environments beyond the cache
    /// size, leaving those in use alone.
    fn evict(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut ready: Vec<(SystemTime, String)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let used = std::fs::metadata(e.path().join(READY)).and_then(|m| m.modified()).ok()?;
                Some((used, name))
            })
            .collect();
        if ready.len() <= self.settings.cache_size {
            return;
        }
        ready.sort();
        let in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut excess = ready.len() - self.settings.cache_size;
        for (_, name) in ready {
            if excess == 0 {
                break;
            }
            if in_use.contains_key(&name) {
                continue;
            }
            match std::fs::remove_dir_all(self.dir.join(&name)) {
                Ok(()) => info!(env = %name, "environment removed: least recently used beyond --env-cache-size"),
                Err(e) => warn!(env = %name, "cannot remove an environment: {e}"),
            }
            excess -= 1;
        }
    }
}

/// Marks a ready environment used now; whether it is ready.
fn touch_ready(env: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new().append(true).open(env.join(READY)) else { return false };
    let _ = file.set_modified(SystemTime::now());
    true
}

async fn read_checkout(checkout: &Path, file: &str) -> Result<String, EnvError> {
    let path = checkout.join(file);
    // The dispatcher checked it is a regular file of the commit; a link is refused all the same.
    match tokio::fs::symlink_metadata(&path).await {
        Ok(meta) if meta.is_file() => {}
        _ => return Err(EnvError::Refused(format!("requirement file `{file}` is not a regular file in the checkout"))),
    }
    tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| EnvError::Refused(format!("requirement file `{file}` cannot be read as text: {e}")))
}

/// What the `--find-links` directory holds, as the environment key reads
/// it: each entry's name, size and modification time (ns), sorted, so that
/// a wheel added, replaced or removed builds a new environment. Cheaper
/// than hashing the wheels, and a wheel rewritten in place changes its
/// modification time.
pub(crate) fn wheel_listing(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut listing: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let mtime = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
            Some(format!("{}\0{}\0{mtime}", e.file_name().to_string_lossy(), meta.len()))
        })
        .collect();
    listing.sort();
    listing
}

/// The hash of exactly what decides an environment's contents: the
/// interpreter (its path and exact version), the requirement files'
/// contents, the install targets, the project's build files when `.` is
/// installed, and where packages come from (with what the `--find-links`
/// directory holds, [`wheel_listing`]).
pub(crate) fn key(
    python: &crate::Interpreter,
    config: &RepoConfig,
    inputs: &[(String, String)],
    settings: &EnvSettings,
    wheels: &[String],
) -> String {
    let mut hash = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        hash.update(name.as_bytes());
        hash.update((value.len() as u64).to_le_bytes());
        hash.update(value);
    };
    field("layout", LAYOUT.as_bytes());
    field("python", python.path.as_os_str().as_encoded_bytes());
    field("python-version", python.version.as_bytes());
    field("index", settings.index_url.as_deref().unwrap_or("").as_bytes());
    field("find-links", settings.find_links.as_deref().map_or(&[][..], |p| p.as_os_str().as_encoded_bytes()));
    for target in &config.install {
        field("install", target.as_bytes());
    }
    for (name, text) in inputs {
        field("file", name.as_bytes());
        field("contents", text.as_bytes());
    }
    for wheel in wheels {
        field("wheel", wheel.as_bytes());
    }
    let digest = hash.finalize();
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Checks a requirement file before pip reads it outside the sandbox: only
/// requirement specifiers (with markers and `--hash` options), because pip
/// obeys the options a requirement file holds (`--index-url` would send the
/// download elsewhere, `-e` or a path would build local code) and fetches
/// any URL it names.
pub(crate) fn check_requirements(file: &str, text: &str) -> Result<(), String> {
    // pip joins lines ending in a backslash.
    let joined = text.replace("\\\r\n", " ").replace("\\\n", " ");
    for (n, line) in joined.lines().enumerate() {
        let line = match line.find(" #") {
            Some(i) => &line[..i],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let refuse =
            |why: &str| Err(format!("requirement file `{file}` line {}: `{}` {why}", n + 1, line.escape_debug()));
        if line.starts_with('-') {
            return refuse(
                "is an option; Kiln installs only requirement specifiers from requirement files (the runner \
                 chooses the index)",
            );
        }
        if line.contains("://") || line.contains(" @ ") || line.starts_with('.') || line.starts_with('/') {
            return refuse("names a URL or a path; only requirements from the runner's index can be installed");
        }
        let mut words = line.split_whitespace();
        words.next();
        for option in words.filter(|w| w.starts_with('-')) {
            if !option.starts_with("--hash=") && option != "--hash" {
                return refuse("holds an option other than --hash");
            }
        }
    }
    Ok(())
}

/// The extras of `.[a,b]`.
fn extras(target: &str) -> Vec<String> {
    target
        .strip_prefix(".[")
        .and_then(|rest| rest.strip_suffix(']'))
        .map(|list| list.split(',').map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()).collect())
        .unwrap_or_default()
}

/// What installing the project needs from the index, read from
/// `pyproject.toml` without running anything: its build requirements
/// (`setuptools>=40.8.0` and `wheel` when it declares none, as pip assumes)
/// and its declared dependencies, with those of `extras`. Dependencies a
/// `setup.py` computes cannot be known this way; their install then fails
/// offline, naming the missing package.
pub(crate) fn project_requirements(pyproject: &str, extras: &[String]) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize, Default)]
    struct Pyproject {
        #[serde(rename = "build-system")]
        build_system: Option<BuildSystem>,
        project: Option<Project>,
    }
    #[derive(serde::Deserialize)]
    struct BuildSystem {
        requires: Option<Vec<String>>,
    }
    #[derive(serde::Deserialize)]
    struct Project {
        dependencies: Option<Vec<String>>,
        #[serde(rename = "optional-dependencies")]
        optional: Option<BTreeMap<String, Vec<String>>>,
    }
    let parsed: Pyproject = if pyproject.trim().is_empty() {
        Pyproject::default()
    } else {
        toml::from_str(pyproject).map_err(|e| format!("pyproject.toml cannot be read: {}", e.message()))?
    };
    let mut wanted = match parsed.build_system.and_then(|b| b.requires) {
        Some(requires) => requires,
        None => vec!["setuptools>=40.8.0".to_owned(), "wheel".to_owned()],
    };
    if let Some(project) = parsed.project {
        wanted.extend(project.dependencies.unwrap_or_default());
        let optional = project.optional.unwrap_or_default();
        for extra in extras {
            wanted.extend(optional.get(extra).cloned().unwrap_or_default());
        }
    }
    for requirement in &wanted {
        check_requirements("pyproject.toml", requirement)?;
    }
    Ok(wanted)
}

/// An installer's message: its head and its tail, where the cause usually is.
fn head_and_tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() <= 2 * MESSAGE_END {
        return text.to_owned();
    }
    let head_end = (0..=MESSAGE_END).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let tail_start = (text.len() - MESSAGE_END..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    format!("{} […] {}", &text[..head_end], &text[tail_start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirement_files_may_hold_only_specifiers() {
        let ok = "# test deps\nsix==1.16.0\nattrs>=23 ; python_version >= '3.8'  # comment\n\nfoo==1 \\\n    --hash=sha256:abc\n";
        assert_eq!(check_requirements("r.txt", ok), Ok(()));
        for bad in [
            "--index-url https://evil.example/simple",
            "-i https://evil.example/simple",
            "--extra-index-url=https://evil.example",
            "-e .",
            "-r other.txt",
            "--find-links /tmp",
            "six @ https://evil.example/six.whl",
            "git+https://example.com/x.git",
            "./local",
            "/abs/path.whl",
            "six --install-option=--evil",
        ] {
            let text = format!("six\n{bad}\n");
            let err = check_requirements("r.txt", &text).unwrap_err();
            assert!(err.starts_with("requirement file `r.txt` line 2: "), "{bad}: {err}");
        }
    }

    #[test]
    fn the_project_needs_its_build_requirements_and_declared_dependencies() {
        let pyproject = "[build-system]\nrequires = [\"hatchling\"]\n[project]\nname = \"x\"\ndependencies = \
                         [\"six\"]\n[project.optional-dependencies]\ntest = [\"attrs\"]\ndocs = [\"sphinx\"]\n";
        assert_eq!(project_requirements(pyproject, &["test".into()]).unwrap(), ["hatchling", "six", "attrs"]);
        assert_eq!(project_requirements("", &[]).unwrap(), ["setuptools>=40.8.0", "wheel"]);
        let evil = "[project]\nname = \"x\"\ndependencies = [\"x @ https://evil.example/x.whl\"]\n";
        assert!(project_requirements(evil, &[]).unwrap_err().contains("names a URL or a path"));
        assert_eq!(extras(".[test, docs]"), ["test", "docs"]);
        assert!(extras(".").is_empty());
    }

    #[test]
    fn the_key_changes_with_each_input_and_only_then() {
        let settings = EnvSettings { index_url: Some("https://pypi.org/simple".into()), ..EnvSettings::default() };
        let config = RepoConfig { install: vec![".".into()], ..RepoConfig::default() };
        let python = &crate::Interpreter { version: "3.11.2".into(), path: "/usr/bin/python3".into() };
        let inputs = vec![("requirements.txt".to_owned(), "six\n".to_owned())];
        let base = key(python, &config, &inputs, &settings, &[]);
        assert_eq!(base, key(python, &config, &inputs, &settings, &[]));
        assert_eq!(base.len(), 32);
        let other_contents = vec![("requirements.txt".to_owned(), "six==1.16.0\n".to_owned())];
        assert_ne!(base, key(python, &config, &other_contents, &settings, &[]));
        let elsewhere = crate::Interpreter { path: "/usr/bin/python3.12".into(), ..python.clone() };
        assert_ne!(base, key(&elsewhere, &config, &inputs, &settings, &[]));
        // The same path after an upgrade of the interpreter in place.
        let upgraded = crate::Interpreter { version: "3.11.9".into(), ..python.clone() };
        assert_ne!(base, key(&upgraded, &config, &inputs, &settings, &[]));
        let other_target = RepoConfig { install: vec![".[test]".into()], ..RepoConfig::default() };
        assert_ne!(base, key(python, &other_target, &inputs, &settings, &[]));
        let offline = EnvSettings { find_links: Some("/wheels".into()), ..EnvSettings::default() };
        assert_ne!(base, key(python, &config, &inputs, &offline, &[]));
        // What does not change the environment does not change the key.
        let env_only = RepoConfig { env: [("TZ".to_owned(), "UTC".to_owned())].into(), ..config.clone() };
        assert_eq!(base, key(python, &env_only, &inputs, &settings, &[]));
    }

    #[test]
    fn a_new_or_changed_wheel_in_the_find_links_directory_changes_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let settings = EnvSettings { find_links: Some(dir.path().to_owned()), ..EnvSettings::default() };
        let config = RepoConfig { requirements: vec!["r.txt".into()], ..RepoConfig::default() };
        let python = &crate::Interpreter { version: "3.12.1".into(), path: "/opt/py/bin/python3".into() };
        let inputs = vec![("r.txt".to_owned(), "six\n".to_owned())];
        let key_now = || key(python, &config, &inputs, &settings, &wheel_listing(dir.path()));
        let wheel = dir.path().join("six-1.16.0-py2.py3-none-any.whl");
        std::fs::write(&wheel, b"one").unwrap();
        let one = key_now();
        assert_eq!(one, key_now(), "nothing changed, same key");
        std::fs::write(dir.path().join("attrs-23.1.0-py3-none-any.whl"), b"two").unwrap();
        let two = key_now();
        assert_ne!(one, two, "a new wheel");
        // The same name rewritten with other contents (another size, another time).
        std::fs::write(&wheel, b"one, rebuilt").unwrap();
        let file = std::fs::File::options().write(true).open(&wheel).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(5)).unwrap();
        assert_ne!(two, key_now(), "a replaced wheel");
        assert!(wheel_listing(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn the_least_recently_used_environments_beyond_the_cache_size_go_unless_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let settings = EnvSettings { cache_size: 2, ..EnvSettings::default() };
        let envs = Envs::new(dir.path().to_owned(), settings, Vec::new());
        let now = SystemTime::now();
        for (name, age) in [("oldest", 40), ("old", 30), ("newer", 20), ("newest", 10)] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            let ready = std::fs::File::create(dir.path().join(name).join(READY)).unwrap();
            ready.set_modified(now - Duration::from_secs(age)).unwrap();
        }
        // Half built (no marker): not counted, not removed here.
        std::fs::create_dir(dir.path().join("building")).unwrap();
        let lease = envs.lease("oldest", &dir.path().join("oldest"));
        envs.evict();
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        // The one in use stays; the next least recently used go instead.
        assert_eq!(left, ["building", "newest", "oldest"]);
        drop(lease);
        // Reuse makes an environment the most recently used.
        assert!(touch_ready(&dir.path().join("oldest")));
        assert!(!touch_ready(&dir.path().join("building")));
        std::fs::create_dir(dir.path().join("fresh")).unwrap();
        std::fs::File::create(dir.path().join("fresh").join(READY)).unwrap();
        envs.evict();
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["building", "fresh", "oldest"]);
    }

    #[test]
    fn messages_keep_the_head_and_the_tail() {
        let long = format!("{}{}{}", "a".repeat(2000), "b".repeat(2000), "c".repeat(2000));
        let kept = head_and_tail(long.as_bytes());
        assert!(kept.starts_with(&"a".repeat(1500)) && kept.ends_with(&"c".repeat(1500)) && kept.contains(" […] "));
        assert_eq!(head_and_tail(b"  short\n"), "short");
    }
}
