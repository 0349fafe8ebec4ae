//! `kiln plugin check`, `kiln plugin new` and `kiln plugin run`: the plugin
//! author's tools.
//!
//! `check` loads a `.wasm` file exactly as a runner would (same engine,
//! same contract check, its `info` called in the same sandbox) and prints
//! what the plugin is, or the one reason it cannot be loaded. `new` writes a
//! plugin crate from the templates in `plugin/template/`, built on the
//! plugin SDK (`plugins/kiln-plugin-sdk`), that passes `check` as generated.
//! `run` runs the plugins on a local directory with no dispatcher, the way a
//! runner runs them on a checkout: the same plugin host and limits, the files
//! under `tests/` listed the same way, the directory's `kiln.toml` (or
//! `[tool.kiln]`) read and checked as the dispatcher reads a commit's and
//! applied as a runner applies it (`paths`, `env`, `file-timeout`), each
//! result printed as it comes.
//!
//! Where the SDK comes from: a plugin crate depends on it by path (it is not
//! published). `new` takes `--sdk DIR`, or finds `plugins/kiln-plugin-sdk` in
//! a Kiln checkout above the new crate, or in the checkout this binary was
//! built from. The crate is its own workspace, so it can live anywhere, and
//! gets a copy of the lock file Kiln's own plugins are built with, so it
//! builds with the same, known-good dependency versions.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use kiln_plugin_host::{HostEvent, PluginHost, Policy};
use kiln_proto::{CommitStatus, Counts, TestResult};

use crate::cli::{Format, PluginCommand, RunArgs};

/// The SDK in the checkout this binary was built from, if it is still there.
const BUILT_FROM_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../plugins/kiln-plugin-sdk");
/// Where the SDK sits in a Kiln checkout.
const SDK_IN_CHECKOUT: &str = "plugins/kiln-plugin-sdk";

const CARGO_TOML: &str = include_str!("plugin/template/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("plugin/template/lib.rs.tmpl");
const README: &str = include_str!("plugin/template/README.md.tmpl");
const GITIGNORE: &str = include_str!("plugin/template/gitignore.tmpl");
/// The lock file of Kiln's own plugins: a new crate starts from the versions
/// they are built and tested with.
const CARGO_LOCK: &str = include_str!("../../../plugins/Cargo.lock");

/// Runs one `kiln plugin` subcommand.
pub async fn run(command: PluginCommand) -> anyhow::Result<ExitCode> {
    match command {
        PluginCommand::Run(args) => return run_tests(args).await,
        PluginCommand::Check { file } => {
            // The error names the file and says what is wrong with it.
            let summary = kiln_plugin_host::PluginHost::check_file(&file)?;
            print!("{}", describe(&file, &summary));
        }
        PluginCommand::New { name, path, sdk } => {
            let dir = path.unwrap_or_else(|| PathBuf::from(&name));
            let sdk = new_plugin(&name, &dir, sdk.as_deref())?;
            println!("created the plugin crate `{name}` in {} (SDK: {})", dir.display(), sdk.display());
            println!("next, in {}:", dir.display());
            println!("  cargo test                                      # its pure parts, natively");
            println!("  cargo build --release --target wasm32-wasip2");
            println!("  kiln plugin check target/wasm32-wasip2/release/{}.wasm", crate_file_name(&name));
            println!("then copy the .wasm into a directory and start runners with `--plugins DIR --allow-program sh`");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln plugin run`: the runner's plugin host on a local directory.
async fn run_tests(a: RunArgs) -> anyhow::Result<ExitCode> {
    let text = matches!(a.format, Format::Text);
    let tests = run_plugins(&a, |result| {
        if text {
            print!("{}", render_result(result));
        }
    })
    .await?;
    let counts = Counts::of(&tests);
    // As for a runner's commit: no test at all is an error, not a pass.
    let status = if tests.iter().any(|t| t.outcome.is_failure()) {
        CommitStatus::Failed
    } else if tests.is_empty() {
        CommitStatus::Error
    } else {
        CommitStatus::Passed
    };
    match a.format {
        Format::Text => println!("{}", summary(&counts)),
        Format::Json => {
            let document =
                serde_json::json!({ "dir": a.dir, "status": status.as_str(), "counts": counts, "tests": tests });
            println!("{}", serde_json::to_string_pretty(&document)?);
        }
        Format::Junit => print!("{}", kiln_proto::junit(&format!("kiln {}", a.dir.display()), &tests)),
    }
    Ok(match status {
        CommitStatus::Passed => ExitCode::SUCCESS,
        CommitStatus::Failed => ExitCode::from(1),
        _ => {
            eprintln!("no test found under {}", a.dir.join("tests").display());
            ExitCode::from(2)
        }
    })
}

/// Runs the plugins on `a.dir` as a runner runs them on a checkout, calling
/// `each` with every result as it comes; returns them all, in that order.
async fn run_plugins(a: &RunArgs, mut each: impl FnMut(&TestResult)) -> anyhow::Result<Vec<TestResult>> {
    if !a.dir.is_dir() {
        bail!("{} is not a directory; point --dir at a repository's working tree", a.dir.display());
    }
    let names: Vec<&str> = a.allow_programs.iter().map(String::as_str).collect();
    let programs = Policy::resolve_programs(&names).context("cannot resolve the allowed programs")?;
    // The runner's limits (`kiln runner`), so a plugin behaves here as it will there.
    // No runner here: nothing of the runner's to hide.
    let policy = Policy::runner(programs, a.command_timeout, Vec::new());
    let mut host = PluginHost::new(policy).context("cannot start the plugin host")?;
    if let Some(dir) = &a.plugins {
        for path in wasm_files(dir)? {
            host.load_file(&path).with_context(|| format!("cannot load the plugin {}", path.display()))?;
        }
    }
    let found = kiln_plugin_host::test_files(&a.dir)
        .with_context(|| format!("cannot list the files under {}", a.dir.join("tests").display()))?;
    if let Some(warning) = found.warning() {
        if found.files.is_empty() {
            bail!("no tests found: {warning}");
        }
        eprintln!("warning: {warning}");
    }
    let files = found.files;
    let settings = match local_config(&a.dir)? {
        None => kiln_plugin_host::RunSettings::default(),
        Some(config) => {
            if config.installs() {
                eprintln!(
                    "warning: {} lists packages to install; kiln plugin run builds no environment, so the tests \
                     run with python3 as it is (a runner installs them)",
                    config.source
                );
            }
            if !config.versions.is_empty() {
                eprintln!(
                    "warning: {} asks for Python {}; kiln plugin run tests with python3 only (runners test each \
                     version)",
                    config.source,
                    config.versions.join(", ")
                );
            }
            let (settings, warning) = kiln_runner::run_settings(&config, MAX_FILE_TIMEOUT)
                .map_err(|problem| anyhow::anyhow!("{}: {problem}", config.source))?;
            if let Some(warning) = warning {
                eprintln!("warning: {warning}");
            }
            settings
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = async move {
        let slots = a.slots.unwrap_or_else(kiln_runner::usable_cpus);
        let ran = host.run_with(&a.dir, &files, slots, &settings, &tx, None).await;
        drop(tx);
        ran
    };
    let collect = async {
        let mut tests = Vec::new();
        while let Some(event) = rx.recv().await {
            if let HostEvent::Test(result) = event {
                each(&result);
                tests.push(result);
            }
        }
        tests
    };
    let (ran, tests) = tokio::join!(run, collect);
    ran.with_context(|| format!("cannot run the tests in {}", a.dir.display()))?;
    Ok(tests)
}

/// The most a `file-timeout` may ask for here: a runner's default
/// `--max-file-timeout`, so a suite behaves here as on a runner left at its defaults.
const MAX_FILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The directory's `kiln.toml` or `pyproject.toml [tool.kiln]`, read and
/// checked as the dispatcher checks a commit's (the directory stands for
/// the commit's tree; a symbolic link is neither a file nor a directory).
fn local_config(dir: &Path) -> anyhow::Result<Option<kiln_proto::RepoConfig>> {
    use kiln_proto::repo_config::{KILN_TOML, Kind, PYPROJECT_TOML, parse};
    let read = |name: &str| match std::fs::read(dir.join(name)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.join(name).display())),
    };
    let (kiln_toml, pyproject) = (read(KILN_TOML)?, read(PYPROJECT_TOML)?);
    let tree = |path: &str| {
        let meta = std::fs::symlink_metadata(dir.join(path)).ok()?;
        Some(if meta.is_file() {
            Kind::File
        } else if meta.is_dir() {
            Kind::Dir
        } else {
            Kind::Other
        })
    };
    parse(kiln_toml.as_deref(), pyproject.as_deref(), &tree).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The `.wasm` files in `dir`, sorted by name: the order a runner loads them.
fn wasm_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read the plugins directory {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// One result for a terminal: outcome, id and duration, then the head and
/// tail of a message, or a skip's reason (as `kiln results` shows them).
fn render_result(t: &TestResult) -> String {
    crate::report::render_test(t, false, "")
}

/// The closing line: how many tests ended each way.
fn summary(c: &Counts) -> String {
    crate::report::summary(c)
}

/// What `check` prints about a loadable plugin.
fn describe(file: &Path, p: &kiln_plugin_host::PluginSummary) -> String {
    let mut out = String::new();
    let list = |items: &[String]| if items.is_empty() { "none".to_owned() } else { items.join(", ") };
    let _ = writeln!(out, "{}: a Kiln executor plugin", file.display());
    let _ = writeln!(out, "  name      {}", p.name);
    let _ = writeln!(out, "  version   {}", p.version);
    let _ = writeln!(
        out,
        "  contract  kiln:executor@{} (this kiln implements {})",
        p.contract,
        kiln_plugin_host::CONTRACT_VERSION
    );
    let _ = writeln!(out, "  claims    {}", list(&p.claims));
    let _ = writeln!(out, "  programs  {} (a runner grants those it allows with --allow-program)", list(&p.programs));
    let _ = writeln!(out, "  imports   {}", condense(&p.imports));
    out
}

/// Imports grouped by package and version, in first-seen order:
/// `wasi:io/poll@0.2.6, wasi:io/streams@0.2.6` becomes
/// `wasi:io/{poll,streams}@0.2.6`.
fn condense(imports: &[String]) -> String {
    let mut groups: Vec<(String, String, Vec<String>)> = Vec::new();
    for import in imports {
        let (name, version) = import.split_once('@').unwrap_or((import, ""));
        let (package, interface) = name.rsplit_once('/').unwrap_or(("", name));
        match groups.iter_mut().find(|(p, v, _)| p == package && v == version) {
            Some((_, _, interfaces)) => interfaces.push(interface.to_owned()),
            None => groups.push((package.to_owned(), version.to_owned(), vec![interface.to_owned()])),
        }
    }
    if groups.is_empty() {
        return "none".to_owned();
    }
    let shown: Vec<String> = groups
        .into_iter()
        .map(|(package, version, interfaces)| {
            let interfaces =
                if interfaces.len() == 1 { interfaces.concat() } else { format!("{{{}}}", interfaces.join(",")) };
            let package = if package.is_empty() { String::new() } else { format!("{package}/") };
            let version = if version.is_empty() { String::new() } else { format!("@{version}") };
            format!("{package}{interfaces}{version}")
        })
        .collect();
    shown.join(", ")
}

/// Writes a new plugin crate named `name` into `dir`; returns the SDK path
/// its manifest uses.
fn new_plugin(name: &str, dir: &Path, sdk: Option<&Path>) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not an empty directory; choose another --path", dir.display());
    }
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let sdk = match sdk {
        Some(sdk) => {
            let sdk =
                std::fs::canonicalize(sdk).with_context(|| format!("cannot find the SDK at {}", sdk.display()))?;
            if !sdk.join("Cargo.toml").is_file() {
                bail!(
                    "{} is not a crate directory (it has no Cargo.toml); point --sdk at kiln-plugin-sdk",
                    sdk.display()
                );
            }
            sdk
        }
        None => find_sdk(&dir)?,
    };
    let sdk_path = relative_path(&dir, &sdk);
    let files = [
        ("Cargo.toml", render(CARGO_TOML, name, &sdk_path)),
        ("src/lib.rs", render(LIB_RS, name, &sdk_path)),
        ("README.md", render(README, name, &sdk_path)),
        (".gitignore", GITIGNORE.to_owned()),
        ("Cargo.lock", CARGO_LOCK.to_owned()),
    ];
    for (file, content) in files {
        let path = dir.join(file);
        std::fs::write(&path, content).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(sdk_path)
}

/// A name that works as a crate name, a plugin name and a directory name.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        bail!(
            "`{name}` cannot name a plugin: use 1 to 64 lowercase ASCII letters, digits, `-` or `_`, starting with a \
             letter (e.g. `my-framework`)"
        );
    }
    if name == "kiln-plugin-sdk" || name == "kiln_plugin_sdk" {
        bail!("`{name}` is the SDK's own name; choose another");
    }
    Ok(())
}

/// The SDK in a Kiln checkout above `dir`, else in the one this binary was
/// built from.
fn find_sdk(dir: &Path) -> anyhow::Result<PathBuf> {
    let above = dir.ancestors().skip(1).map(|a| a.join(SDK_IN_CHECKOUT)).find(|c| c.join("Cargo.toml").is_file());
    if let Some(sdk) = above {
        return std::fs::canonicalize(&sdk).with_context(|| format!("cannot resolve {}", sdk.display()));
    }
    match std::fs::canonicalize(BUILT_FROM_SDK) {
        Ok(sdk) if sdk.join("Cargo.toml").is_file() => Ok(sdk),
        _ => bail!(
            "cannot find the Kiln plugin SDK: pass --sdk PATH, pointing at {SDK_IN_CHECKOUT} in a checkout of the \
             Kiln repository"
        ),
    }
}

/// `to` relative to `from` when both are under a common directory other
/// than `/` (so the pair can move together), else `to` itself.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to_parts: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to_parts).take_while(|(a, b)| a == b).count();
    if common <= 1 {
        return to.to_owned();
    }
    let mut relative = PathBuf::new();
    for _ in common..from.len() {
        relative.push("..");
    }
    for part in &to_parts[common..] {
        relative.push(part);
    }
    relative
}

/// Fills a template's `{{name}}`, `{{crate_name}}` and `{{sdk}}`.
fn render(template: &str, name: &str, sdk: &Path) -> String {
    // A TOML basic string: escape what it cannot hold as is.
    let sdk = sdk.to_string_lossy().replace('\\', "\\\\").replace('"', "\\\"");
    template.replace("{{name}}", name).replace("{{crate_name}}", &crate_file_name(name)).replace("{{sdk}}", &sdk)
}

/// The stem of the `.wasm` cargo builds for crate `name`.
fn crate_file_name(name: &str) -> String {
    name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, files: &[(&str, &str)]) {
        for (path, content) in files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
    }

    /// `kiln plugin run DIR --format json --slots 2` with python3 allowed.
    fn run_args(dir: &Path) -> RunArgs {
        RunArgs {
            dir: dir.to_owned(),
            format: Format::Json,
            allow_programs: vec!["python3".to_owned()],
            plugins: None,
            command_timeout: std::time::Duration::from_secs(60),
            slots: Some(2),
        }
    }

    #[tokio::test]
    async fn run_reports_every_test_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &[
                ("tests/__init__.py", ""),
                (
                    "tests/test_x.py",
                    "import unittest\n\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n\n    \
                     def test_no(self):\n        self.fail('no')\n",
                ),
            ],
        );
        let args = run_args(dir.path());
        let mut seen = 0;
        let tests = run_plugins(&args, |_| seen += 1).await.unwrap();
        let outcomes: Vec<(&str, &str)> = tests.iter().map(|t| (t.id.as_str(), t.outcome.as_str())).collect();
        assert_eq!(outcomes, [("tests.test_x.T.test_no", "fail"), ("tests.test_x.T.test_ok", "pass")]);
        assert_eq!(seen, 2);
        assert!(render_result(&tests[0]).starts_with("FAIL  tests.test_x.T.test_no ("), "{}", render_result(&tests[0]));
        assert_eq!(
            summary(&Counts::of(&tests)),
            "2 tests: 1 passed, 1 failed, 0 errors, 0 skipped, 0 expected failures, 0 unexpected successes"
        );

        let missing = RunArgs { dir: dir.path().join("nope"), ..args };
        assert!(run_plugins(&missing, |_| ()).await.unwrap_err().to_string().contains("is not a directory"));
    }

    /// Needs `lib/` on `sys.path` and `APP_MODE` from `[env]`.
    const CONFIGURED: &str = "\
import os
import unittest

import helper_mod


class T(unittest.TestCase):
    def test_paths(self):
        self.assertEqual(helper_mod.VALUE, 42)

    def test_env(self):
        self.assertEqual(os.environ.get('APP_MODE'), 'local')
";

    #[tokio::test]
    async fn run_honours_the_directorys_kiln_toml_as_a_runner_does() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &[
                ("lib/helper_mod.py", "VALUE = 42\n"),
                ("tests/__init__.py", ""),
                ("tests/test_x.py", CONFIGURED),
                ("kiln.toml", "[python]\npaths = [\"lib\"]\n\n[env]\nAPP_MODE = \"local\"\n"),
            ],
        );
        let args = run_args(dir.path());
        let tests = run_plugins(&args, |_| ()).await.unwrap();
        let outcomes: Vec<(&str, &str)> = tests.iter().map(|t| (t.id.as_str(), t.outcome.as_str())).collect();
        assert_eq!(outcomes, [("tests.test_x.T.test_env", "pass"), ("tests.test_x.T.test_paths", "pass")], "{tests:?}");
        // A configuration the dispatcher would refuse is refused here, with the same words.
        write(dir.path(), &[("kiln.toml", "[python]\npath = [\"lib\"]\n")]);
        let err = run_plugins(&args, |_| ()).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "kiln.toml: line 2: unknown field `path`, expected one of `versions`, `requirements`, `install`, `paths`"
        );
        write(dir.path(), &[("kiln.toml", "[env]\nLD_PRELOAD = \"/tmp/x.so\"\n")]);
        let err = run_plugins(&args, |_| ()).await.unwrap_err().to_string();
        assert!(err.starts_with("kiln.toml: [env] LD_PRELOAD: the tests may not set it"), "{err}");
    }

    #[test]
    fn names() {
        for good in ["automake", "my-framework", "t2_x"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Upper", "1st", "has space", "../escape", "kiln-plugin-sdk", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn imports_are_grouped_by_package() {
        let imports: Vec<String> = [
            "kiln:executor/types@0.1.0",
            "kiln:executor/host@0.1.0",
            "wasi:io/poll@0.2.6",
            "wasi:cli/exit@0.2.6",
            "plain",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            condense(&imports),
            "kiln:executor/{types,host}@0.1.0, wasi:io/poll@0.2.6, wasi:cli/exit@0.2.6, plain"
        );
        assert_eq!(condense(&[]), "none");
    }

    #[test]
    fn relative_paths() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            relative_path(&p("/work/main/plugins/x"), &p("/work/main/plugins/kiln-plugin-sdk")),
            p("../kiln-plugin-sdk")
        );
        assert_eq!(relative_path(&p("/work/x/y"), &p("/work/main/sdk")), p("../../main/sdk"));
        assert_eq!(relative_path(&p("/tmp/x"), &p("/work/sdk")), p("/work/sdk"));
    }

    #[test]
    fn new_refuses_a_used_directory_and_writes_a_crate() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("taken"), "").unwrap();
        assert!(new_plugin("x", dir.path(), None).is_err());
        let sdk = Path::new(BUILT_FROM_SDK);
        let used = new_plugin("my-tests", &dir.path().join("my-tests"), Some(sdk)).unwrap();
        // Relative or absolute depending on where the checkout is; either way it must lead to the SDK.
        let resolved = dir.path().join("my-tests").join(&used);
        assert_eq!(resolved.canonicalize().unwrap(), sdk.canonicalize().unwrap(), "{}", used.display());
        let manifest = std::fs::read_to_string(dir.path().join("my-tests/Cargo.toml")).unwrap();
        assert!(
            manifest.contains("name = \"my-tests\"") && manifest.contains(&format!("path = \"{}\"", used.display()))
        );
        let lib = std::fs::read_to_string(dir.path().join("my-tests/src/lib.rs")).unwrap();
        assert!(lib.contains("\"tests/my-tests/*.test\"") && !lib.contains("{{"), "{lib}");
        let readme = std::fs::read_to_string(dir.path().join("my-tests/README.md")).unwrap();
        assert!(readme.contains("release/my_tests.wasm"));
    }

    /// The tutorial walks through the crate `kiln plugin new automake` makes
    /// next to a Kiln checkout in `kiln/`: its code must be exactly what the
    /// command generates.
    #[test]
    fn the_tutorial_shows_the_generated_plugin() {
        let tutorial = include_str!("../../../plugins/TUTORIAL.md");
        let sdk = Path::new("../kiln/plugins/kiln-plugin-sdk");
        let lib = render(LIB_RS, "automake", sdk);
        assert!(tutorial.contains(&lib), "plugins/TUTORIAL.md does not show the generated src/lib.rs");
        let manifest = render(CARGO_TOML, "automake", sdk);
        assert!(tutorial.contains(&manifest), "plugins/TUTORIAL.md does not show the generated Cargo.toml");
    }
}
