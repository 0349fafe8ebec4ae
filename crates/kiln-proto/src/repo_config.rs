//! A repository's own configuration: `kiln.toml` at its root, or a
//! `[tool.kiln]` table in its `pyproject.toml` (`kiln.toml` wins when both
//! are there, and the table is then not read at all).
//!
//! The dispatcher reads it from its mirror for each commit and turns it into
//! a validated [`RepoConfig`] once; a problem becomes the commit's `error`
//! with one sentence naming it (an unknown key, a wrong type, a requirement
//! file the commit lacks, a bad duration, an environment variable the tests
//! may not set). The validated value travels to runners in the assignment,
//! and runners check it again with [`RepoConfig::check`], because what a
//! peer sends is still input.
//!
//! Pure: the caller reads the files and says which paths exist in the
//! commit's tree ([`Tree`]), so this is tested as plain data in, data out.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The configuration file at the repository root.
pub const KILN_TOML: &str = "kiln.toml";
/// The Python project file that may carry a `[tool.kiln]` table instead.
pub const PYPROJECT_TOML: &str = "pyproject.toml";

/// The longest `file-timeout` a repository may ask for; a runner's own
/// maximum (`kiln runner --max-file-timeout`) usually bounds it lower.
pub const MAX_FILE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The most entries one list (`versions`, `requirements`, …) or the `[env]` table may hold.
const MAX_ENTRIES: usize = 64;
/// The longest string a key may hold: paths, specifiers, variable values.
const MAX_STRING: usize = 4096;

/// A repository's validated configuration, as it travels to runners.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Where it was read from: `kiln.toml` or `pyproject.toml [tool.kiln]`,
    /// for messages.
    pub source: String,
    /// Python versions to test with (`["3.11", "3.12"]`); empty: the runner's `python3`.
    pub versions: Vec<String>,
    /// Requirement files, repository-relative, installed in order.
    pub requirements: Vec<String>,
    /// Install targets: `.` (the project), `.[extra]`, or requirement specifiers.
    pub install: Vec<String>,
    /// Directories put on `sys.path`, repository-relative, in order.
    pub paths: Vec<String>,
    /// Environment variables for the tests.
    pub env: BTreeMap<String, String>,
    /// The per-file time limit, replacing the runner's default (and bounded by its maximum).
    pub file_timeout_ms: Option<u64>,
}

/// What kind of entry a path is in the commit's tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular or executable file.
    File,
    /// A directory.
    Dir,
    /// Something else: a symbolic link or a submodule.
    Other,
}

/// The commit's tree, as the validation needs it: what lies at a
/// repository-relative `/` path, if anything.
pub trait Tree {
    /// The kind of entry at `path`, or `None` if there is none.
    fn kind(&self, path: &str) -> Option<Kind>;
}

impl<F: Fn(&str) -> Option<Kind>> Tree for F {
    fn kind(&self, path: &str) -> Option<Kind> {
        self(path)
    }
}

/// Why a repository's configuration is unusable: one problem, in one
/// sentence that names the file, the key and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{source_file}: {problem}")]
pub struct ConfigError {
    /// `kiln.toml` or `pyproject.toml [tool.kiln]`.
    pub source_file: String,
    /// What is wrong, with the line where the TOML parser knows it.
    pub problem: String,
}

/// The raw `kiln.toml`, exactly as spelled there.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    python: RawPython,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPython {
    #[serde(default)]
    versions: Vec<String>,
    #[serde(default)]
    requirements: Vec<String>,
    #[serde(default)]
    install: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(rename = "file-timeout")]
    file_timeout: Option<String>,
}

/// `pyproject.toml`, of which only `[tool.kiln]` matters here.
#[derive(Debug, Deserialize)]
struct Pyproject {
    tool: Option<PyprojectTool>,
}

#[derive(Debug, Deserialize)]
struct PyprojectTool {
    kiln: Option<toml::Table>,
}

/// Reads a commit's configuration from the contents of its `kiln.toml` and
/// `pyproject.toml` (each `None` when the commit has no such file), checking
/// paths against `tree`. `Ok(None)`: the commit has no configuration, and
/// Kiln behaves as without one.
pub fn parse(
    kiln_toml: Option<&[u8]>,
    pyproject: Option<&[u8]>,
    tree: &dyn Tree,
) -> Result<Option<RepoConfig>, ConfigError> {
    if let Some(bytes) = kiln_toml {
        let fail = |problem: String| ConfigError { source_file: KILN_TOML.to_owned(), problem };
        let text = std::str::from_utf8(bytes).map_err(|e| fail(format!("not UTF-8 text ({e})")))?;
        let raw: Raw = toml::from_str(text).map_err(|e| fail(toml_problem(&e, text)))?;
        return validate(raw, KILN_TOML, tree).map(Some);
    }
    let Some(bytes) = pyproject else { return Ok(None) };
    let source = "pyproject.toml [tool.kiln]";
    let fail = |problem: String| ConfigError { source_file: source.to_owned(), problem };
    // A pyproject.toml that is not valid TOML is the build backend's
    // business, unless it was meant to configure Kiln.
    let Ok(text) = std::str::from_utf8(bytes) else { return Ok(None) };
    let project: Pyproject = match toml::from_str(text) {
        Ok(project) => project,
        Err(e) if text.contains("[tool.kiln") => return Err(fail(toml_problem(&e, text))),
        Err(_) => return Ok(None),
    };
    let Some(table) = project.tool.and_then(|t| t.kiln) else { return Ok(None) };
    let raw = Raw::deserialize(toml::Value::Table(table)).map_err(|e| fail(toml_problem(&e, text)))?;
    validate(raw, source, tree).map(Some)
}

/// The TOML parser's message on one line, with the line it points at when it knows.
fn toml_problem(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let line = text.as_bytes().iter().take(span.start).filter(|&&b| b == b'\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

fn validate(raw: Raw, source: &str, tree: &dyn Tree) -> Result<RepoConfig, ConfigError> {
    let fail = |problem: String| ConfigError { source_file: source.to_owned(), problem };
    let Raw { python, env, limits } = raw;
    let config = RepoConfig {
        source: source.to_owned(),
        versions: python.versions,
        requirements: python.requirements,
        install: python.install,
        paths: python.paths,
        env,
        file_timeout_ms: match limits.file_timeout {
            None => None,
            Some(text) => Some(file_timeout(&text).map_err(fail)?),
        },
    };
    config.check().map_err(fail)?;
    for file in &config.requirements {
        match tree.kind(file) {
            Some(Kind::File) => {}
            Some(_) => return Err(fail(format!("[python] requirements: `{file}` is not a regular file"))),
            None => return Err(fail(format!("[python] requirements: `{file}` is not in the commit"))),
        }
    }
    for dir in &config.paths {
        if tree.kind(dir) != Some(Kind::Dir) {
            return Err(fail(format!("[python] paths: `{dir}` is not a directory in the commit")));
        }
    }
    if config.install.iter().any(|t| is_project(t))
        && tree.kind("pyproject.toml").is_none()
        && tree.kind("setup.py").is_none()
    {
        return Err(fail(
            "[python] install: `.` installs the project, but the commit has neither pyproject.toml nor setup.py"
                .to_owned(),
        ));
    }
    Ok(config)
}

/// `[limits] file-timeout`: a duration such as `90s`, `10m` or `1h 30m`.
fn file_timeout(text: &str) -> Result<u64, String> {
    let parsed = humantime::parse_duration(text.trim()).map_err(|e| {
        format!(
            "[limits] file-timeout: `{}` is not a duration ({e}); write for example \"90s\", \"10m\" or \"1h\"",
            text.escape_debug()
        )
    })?;
    if parsed.is_zero() {
        return Err("[limits] file-timeout: must be longer than zero".to_owned());
    }
    if parsed > MAX_FILE_TIMEOUT {
        return Err(format!("[limits] file-timeout: `{text}` is longer than the most Kiln allows, 24h"));
    }
    Ok(u64::try_from(parsed.as_millis()).unwrap_or(u64::MAX))
}

/// Whether an install target names the project itself: `.` or `.[extras]`.
pub fn is_project(target: &str) -> bool {
    target == "." || (target.starts_with(".[") && target.ends_with(']'))
}

/// Environment variables a repository may not set for its tests, because
/// they would change what runs or how it is confined rather than what the
/// tests see: the dynamic loader's (`LD_*`, which could preload code into
/// the interpreter), the interpreter's own start-up (`PYTHONHOME`,
/// `PYTHONPATH`, which `[python] paths` sets, `PYTHONSTARTUP`,
/// `PYTHONINSPECT`, `PYTHONEXECUTABLE`, `PYTHONUSERBASE`, `PYTHONNOUSERSITE`,
/// `PYTHONSAFEPATH`, `PYTHONPLATLIBDIR`), and what the sandbox sets itself
/// (`PATH`, `HOME`, `TMPDIR`, `PYTHONDONTWRITEBYTECODE`, `PYTHONIOENCODING`,
/// `VIRTUAL_ENV`). Names starting `KILN_` are Kiln's.
const REFUSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "VIRTUAL_ENV",
    "PYTHONHOME",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
    "PYTHONEXECUTABLE",
    "PYTHONUSERBASE",
    "PYTHONNOUSERSITE",
    "PYTHONSAFEPATH",
    "PYTHONPLATLIBDIR",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONIOENCODING",
];

/// Why the tests may not get environment variable `name`, if they may not.
pub fn refused_env(name: &str) -> Option<&'static str> {
    let mut chars = name.chars();
    let identifier = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !identifier {
        return Some("is not a variable name (letters, digits and `_`, not starting with a digit)");
    }
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("LD_") {
        return Some("is the dynamic loader's: it could load code into the interpreter");
    }
    if upper.starts_with("KILN_") {
        return Some("starts with KILN_, which Kiln keeps for itself");
    }
    if upper == "PYTHONPATH" {
        return Some("is set from [python] paths; list the directories there");
    }
    if REFUSED_ENV.contains(&upper.as_str()) {
        return Some("is set by Kiln's sandbox or changes how the interpreter starts");
    }
    None
}

/// A repository-relative path a key may name: relative, `/`-separated, no
/// `..`, no empty or `.` parts (so it cannot leave the checkout).
fn check_path(key: &str, path: &str) -> Result<(), String> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path.contains('\0')
        || path.split('/').any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(format!(
            "{key}: `{}` must be a relative path inside the repository (no `..`, no leading `/`)",
            path.escape_debug()
        ));
    }
    Ok(())
}

impl RepoConfig {
    /// Checks what does not need the tree: lengths, names and spellings.
    /// The dispatcher checks every config it sends; a runner checks every
    /// config it receives again, and runs nothing from one that fails.
    pub fn check(&self) -> Result<(), String> {
        for (key, list) in [
            ("[python] versions", &self.versions),
            ("[python] requirements", &self.requirements),
            ("[python] install", &self.install),
            ("[python] paths", &self.paths),
        ] {
            if list.len() > MAX_ENTRIES {
                return Err(format!("{key}: {} entries; at most {MAX_ENTRIES}", list.len()));
            }
            if let Some(long) = list.iter().find(|s| s.len() > MAX_STRING) {
                return Err(format!("{key}: an entry of {} bytes; at most {MAX_STRING}", long.len()));
            }
        }
        for version in &self.versions {
            let parts: Vec<&str> = version.split('.').collect();
            let numeric = parts.iter().all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()));
            if !numeric || parts.len() < 2 || parts.len() > 3 {
                return Err(format!(
                    "[python] versions: `{}` is not a Python version; write for example \"3.12\"",
                    version.escape_debug()
                ));
            }
        }
        for file in &self.requirements {
            check_path("[python] requirements", file)?;
        }
        for dir in &self.paths {
            check_path("[python] paths", dir)?;
        }
        for target in &self.install {
            // An install target is handed to the installer as an argument:
            // one that looks like an option would be read as one.
            if target.trim().is_empty() || target.starts_with('-') || target.contains(['\0', '\n', '\r']) {
                return Err(format!(
                    "[python] install: `{}` is not an install target; write \".\", \".[test]\" or a requirement \
                     such as \"attrs>=23\"",
                    target.escape_debug()
                ));
            }
            if !is_project(target) && (target.starts_with('.') || target.starts_with('/')) {
                return Err(format!(
                    "[python] install: `{}`: only the project itself (\".\" or \".[extras]\") may be installed \
                     from a path",
                    target.escape_debug()
                ));
            }
        }
        if self.env.len() > MAX_ENTRIES {
            return Err(format!("[env]: {} variables; at most {MAX_ENTRIES}", self.env.len()));
        }
        for (name, value) in &self.env {
            if let Some(why) = refused_env(name) {
                return Err(format!("[env] {}: the tests may not set it: it {why}", name.escape_debug()));
            }
            if value.contains('\0') {
                return Err(format!("[env] {name}: the value holds a NUL character, which no variable can"));
            }
            if value.len() > MAX_STRING {
                return Err(format!("[env] {name}: a value of {} bytes; at most {MAX_STRING}", value.len()));
            }
        }
        if let Some(ms) = self.file_timeout_ms
            && (ms == 0 || u128::from(ms) > MAX_FILE_TIMEOUT.as_millis())
        {
            return Err(format!("[limits] file-timeout: {ms} ms is outside 1 ms to 24h"));
        }
        Ok(())
    }

    /// Whether anything must be installed: an environment must be built.
    pub fn installs(&self) -> bool {
        !self.requirements.is_empty() || !self.install.is_empty()
    }

    /// The per-file time limit this configuration asks for.
    pub fn file_timeout(&self) -> Option<Duration> {
        self.file_timeout_ms.map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree holding `files` and the directories above them.
    fn tree(files: &'static [&'static str]) -> impl Fn(&str) -> Option<Kind> {
        move |path: &str| {
            if files.contains(&path) {
                Some(Kind::File)
            } else if files.iter().any(|f| f.starts_with(&format!("{path}/"))) {
                Some(Kind::Dir)
            } else {
                None
            }
        }
    }

    const FILES: &[&str] = &["requirements-test.txt", "src/pkg/__init__.py", "pyproject.toml", "tests/test_a.py"];

    fn kiln(text: &str) -> Result<Option<RepoConfig>, ConfigError> {
        parse(Some(text.as_bytes()), None, &tree(FILES))
    }

    fn problem(text: &str) -> String {
        kiln(text).expect_err("should be refused").to_string()
    }

    #[test]
    fn every_key_is_read() {
        let config = kiln(
            r#"
            [python]
            versions = ["3.11", "3.12"]
            requirements = ["requirements-test.txt"]
            install = [".[test]", "attrs>=23"]
            paths = ["src"]
            [env]
            TZ = "UTC"
            [limits]
            file-timeout = "10m"
            "#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            config,
            RepoConfig {
                source: "kiln.toml".into(),
                versions: vec!["3.11".into(), "3.12".into()],
                requirements: vec!["requirements-test.txt".into()],
                install: vec![".[test]".into(), "attrs>=23".into()],
                paths: vec!["src".into()],
                env: BTreeMap::from([("TZ".into(), "UTC".into())]),
                file_timeout_ms: Some(600_000),
            }
        );
        assert!(config.installs());
        assert_eq!(config.file_timeout(), Some(Duration::from_secs(600)));
    }

    #[test]
    fn no_file_is_no_configuration_and_an_empty_one_is_the_defaults() {
        assert_eq!(parse(None, None, &tree(FILES)), Ok(None));
        let empty = kiln("").unwrap().unwrap();
        assert_eq!(empty, RepoConfig { source: "kiln.toml".into(), ..RepoConfig::default() });
        assert!(!empty.installs());
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        assert_eq!(
            problem("[python]\nversions = [\"3.12\"]\nrequirments = [\"requirements-test.txt\"]\n"),
            "kiln.toml: line 3: unknown field `requirments`, expected one of `versions`, `requirements`, `install`, \
             `paths`"
        );
        assert_eq!(
            problem("[pyhton]\nversions = []\n"),
            "kiln.toml: line 1: unknown field `pyhton`, expected one of `python`, `env`, `limits`"
        );
        assert!(problem("[limits]\nfile_timeout = \"1m\"\n").contains("unknown field `file_timeout`"));
    }

    #[test]
    fn a_wrong_type_is_named() {
        let p = problem("[python]\nversions = \"3.12\"\n");
        assert!(p.starts_with("kiln.toml: line 2: invalid type: string \"3.12\", expected a sequence"), "{p}");
        let p = problem("[env]\nWORKERS = 4\n");
        assert!(p.starts_with("kiln.toml: line 2: invalid type: integer `4`, expected a string"), "{p}");
        assert!(problem("python = 3\n").contains("invalid type: integer `3`"));
        assert!(problem("[python\n").starts_with("kiln.toml: line 1: "));
        assert_eq!(parse(Some(b"\xff"), None, &tree(FILES)).unwrap_err().source_file, "kiln.toml");
    }

    #[test]
    fn files_and_directories_must_be_in_the_commit() {
        assert_eq!(
            problem("[python]\nrequirements = [\"requirements-dev.txt\"]\n"),
            "kiln.toml: [python] requirements: `requirements-dev.txt` is not in the commit"
        );
        assert_eq!(
            problem("[python]\nrequirements = [\"src\"]\n"),
            "kiln.toml: [python] requirements: `src` is not a regular file"
        );
        assert_eq!(
            problem("[python]\npaths = [\"lib\"]\n"),
            "kiln.toml: [python] paths: `lib` is not a directory in the commit"
        );
        let no_project = parse(Some(b"[python]\ninstall = [\".\"]\n"), None, &tree(&["tests/test_a.py"]));
        assert!(no_project.unwrap_err().problem.contains("neither pyproject.toml nor setup.py"));
    }

    #[test]
    fn paths_cannot_leave_the_checkout() {
        for bad in ["../x", "/etc", "a/../b", "./src", "", "src/", "a\\b"] {
            let text = format!("[python]\npaths = [{bad:?}]\n");
            assert!(problem(&text).contains("must be a relative path inside the repository"), "{bad}");
            let text = format!("[python]\nrequirements = [{bad:?}]\n");
            assert!(problem(&text).contains("must be a relative path inside the repository"), "{bad}");
        }
    }

    #[test]
    fn bad_durations_are_named() {
        assert_eq!(kiln("[limits]\nfile-timeout = \"90s\"\n").unwrap().unwrap().file_timeout_ms, Some(90_000));
        assert_eq!(kiln("[limits]\nfile-timeout = \"1h 30m\"\n").unwrap().unwrap().file_timeout_ms, Some(5_400_000));
        let p = problem("[limits]\nfile-timeout = \"10 minutes please\"\n");
        assert!(p.starts_with("kiln.toml: [limits] file-timeout: `10 minutes please` is not a duration"), "{p}");
        assert!(problem("[limits]\nfile-timeout = \"0s\"\n").contains("longer than zero"));
        assert!(problem("[limits]\nfile-timeout = \"2days\"\n").contains("longer than the most Kiln allows"));
        assert!(problem("[limits]\nfile-timeout = 600\n").contains("invalid type: integer `600`, expected a string"));
    }

    #[test]
    fn variables_that_would_weaken_the_sandbox_or_the_driver_are_refused() {
        for name in [
            "LD_PRELOAD",
            "ld_library_path",
            "LD_AUDIT",
            "PYTHONPATH",
            "PYTHONHOME",
            "PATH",
            "HOME",
            "KILN_X",
            "PYTHONSTARTUP",
        ] {
            let p = problem(&format!("[env]\n{name} = \"x\"\n"));
            assert!(p.contains(&format!("[env] {name}: the tests may not set it")), "{name}: {p}");
        }
        assert!(problem("[env]\nPYTHONPATH = \"src\"\n").contains("list the directories there"));
        assert!(problem("[env]\n\"1X\" = \"x\"\n").contains("is not a variable name"));
        assert!(problem("[env]\n\"A=B\" = \"x\"\n").contains("is not a variable name"));
        assert!(problem("[env]\nA = \"x\\u0000y\"\n").contains("NUL"));
        let ok = kiln("[env]\nTZ = \"UTC\"\nLANG = \"en_US.UTF-8\"\nPYTHONHASHSEED = \"0\"\n").unwrap().unwrap();
        assert_eq!(ok.env.len(), 3);
    }

    #[test]
    fn install_targets_cannot_be_options_or_paths() {
        for bad in ["-e.", "--index-url=https://evil.example", " ", "../other", "/abs/path", "./sub"] {
            let text = format!("[python]\ninstall = [{bad:?}]\n");
            assert!(problem(&text).contains("[python] install: "), "{bad}");
        }
        let ok = kiln("[python]\ninstall = [\".\", \".[test,docs]\", \"six==1.16.0\"]\n").unwrap().unwrap();
        assert_eq!(ok.install.len(), 3);
    }

    #[test]
    fn versions_must_look_like_versions() {
        for bad in ["3", "three", "3.x", "3.12.1.1", "", "3..1"] {
            let text = format!("[python]\nversions = [{bad:?}]\n");
            assert!(problem(&text).contains("is not a Python version"), "{bad}");
        }
        assert_eq!(kiln("[python]\nversions = [\"3.12\", \"3.11.7\"]\n").unwrap().unwrap().versions.len(), 2);
    }

    #[test]
    fn kiln_toml_wins_over_pyproject() {
        let pyproject = b"[project]\nname = \"x\"\n[tool.kiln.python]\npaths = [\"src\"]\n";
        let from_pyproject = parse(None, Some(pyproject), &tree(FILES)).unwrap().unwrap();
        assert_eq!(from_pyproject.source, "pyproject.toml [tool.kiln]");
        assert_eq!(from_pyproject.paths, ["src"]);
        let both = parse(Some(b"[env]\nTZ = \"UTC\"\n"), Some(pyproject), &tree(FILES)).unwrap().unwrap();
        assert_eq!(both.source, "kiln.toml");
        assert!(both.paths.is_empty());
    }

    #[test]
    fn pyproject_without_kiln_is_no_configuration() {
        assert_eq!(
            parse(None, Some(b"[project]\nname = \"x\"\n[tool.black]\nline-length = 1\n"), &tree(FILES)),
            Ok(None)
        );
        // Broken TOML is the build backend's problem unless it meant to configure Kiln.
        assert_eq!(parse(None, Some(b"[project\n"), &tree(FILES)), Ok(None));
        let broken = parse(None, Some(b"[tool.kiln]\npython = [\n"), &tree(FILES)).unwrap_err();
        assert_eq!(broken.source_file, "pyproject.toml [tool.kiln]");
        let typo = parse(None, Some(b"[tool.kiln.python]\npath = [\"src\"]\n"), &tree(FILES)).unwrap_err();
        assert!(typo.to_string().starts_with("pyproject.toml [tool.kiln]: unknown field `path`"), "{typo}");
    }

    #[test]
    fn lists_are_bounded() {
        let many: Vec<String> = (0..65).map(|i| format!("\"p{i}\"")).collect();
        let text = format!("[python]\ninstall = [{}]\n", many.join(", "));
        assert!(problem(&text).contains("65 entries; at most 64"));
    }

    #[test]
    fn check_refuses_what_a_peer_could_send_unvalidated() {
        let mut config = RepoConfig::default();
        assert_eq!(config.check(), Ok(()));
        config.env.insert("LD_PRELOAD".into(), "/tmp/evil.so".into());
        assert!(config.check().unwrap_err().contains("[env] LD_PRELOAD"));
        let config = RepoConfig { paths: vec!["../../etc".into()], ..RepoConfig::default() };
        assert!(config.check().is_err());
        let config = RepoConfig { file_timeout_ms: Some(0), ..RepoConfig::default() };
        assert!(config.check().is_err());
    }
}
