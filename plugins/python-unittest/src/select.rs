//! Which claimed files the driver runs, by the rules of
//! `python3 -m unittest discover -s tests -t .` (Python 3.11).
//!
//! discover imports a file as a test module only if its name matches
//! `test*.py` and is a valid module name, and if it can reach the file through
//! packages: `tests/` and every directory below it on the way must hold an
//! `__init__.py` (3.11 no longer walks into namespace packages). It also
//! imports every package it walks into and loads tests from the package
//! itself: the tests defined in its `__init__.py`, or everything its
//! `load_tests` returns. So a package's `__init__.py` is a unit of its own,
//! unless it is empty (nothing to load, nothing that can fail to import).
//! Everything else is left alone, so running it here would report tests that
//! unittest itself never runs.
//!
//! What needs importing is left to the driver: whether a package on the way
//! fails to import or takes over its contents with `load_tests`, and what a
//! directory name that is not an identifier imports as.

/// A file the driver runs: a test module, or a package's `__init__.py`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestModule {
    /// The repository-relative path, as the host gave it.
    pub file: String,
    /// The dotted module name, e.g. `tests.sub.test_x`, or the package's,
    /// e.g. `tests.sub` for `tests/sub/__init__.py`: the id of an error about
    /// the whole file.
    pub name: String,
}

/// Why a claimed file is not run (for the runner's log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The repository-relative path.
    pub file: String,
    /// Why discover would not import it.
    pub reason: &'static str,
}

/// What the checkout holds at a repository-relative path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A regular file of this many bytes.
    File(u64),
    /// Anything else, or nothing.
    Other,
}

/// Splits `files` into the ones the driver runs, in the order given, each
/// once, and the others. The order is the runner's: the dispatcher puts a
/// batch's longest files first, so that the batch ends on short ones.
///
/// `entry` says what a repository-relative path is in the checkout; it is a
/// parameter so the rules can be tested without one.
pub fn test_modules(files: &[String], entry: impl Fn(&str) -> Entry) -> (Vec<TestModule>, Vec<Skipped>) {
    let mut modules = Vec::new();
    let mut skipped = Vec::new();
    for file in files {
        match module_name(file, &entry) {
            Ok(name) => modules.push(TestModule { file: file.clone(), name }),
            Err(reason) => skipped.push(Skipped { file: file.clone(), reason }),
        }
    }
    let mut seen = std::collections::HashSet::new();
    modules.retain(|m| seen.insert(m.file.clone()));
    (modules, skipped)
}

fn module_name(file: &str, entry: &impl Fn(&str) -> Entry) -> Result<String, &'static str> {
    let segments: Vec<&str> = file.split('/').collect();
    let Some((base, dirs)) = segments.split_last() else {
        return Err("empty path");
    };
    if dirs.first() != Some(&"tests") {
        return Err("not under tests/");
    }
    let package = *base == "__init__.py";
    // The module's own name; none for a package's __init__.py.
    let stem = if package {
        None
    } else {
        // fnmatch is case-sensitive on POSIX, so `test*.py` is a plain prefix and suffix test.
        let Some(stem) = base.strip_suffix(".py").filter(|stem| stem.starts_with("test")) else {
            return Err("file name does not match test*.py");
        };
        if !is_identifier(stem) {
            return Err("file name is not a valid module name");
        }
        Some(stem)
    };
    let mut path = String::new();
    for dir in dirs {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(dir);
        if !matches!(entry(&format!("{path}/__init__.py")), Entry::File(_)) {
            return Err("a directory on its path has no __init__.py");
        }
    }
    // An empty __init__.py loads nothing and cannot fail to import, unless
    // its directory's name is no identifier: discover imports `tests/my.dir`
    // as `tests.my`, which fails, and that error is part of what it reports.
    let plain_name = dirs.last().is_some_and(|dir| is_identifier(dir));
    match entry(file) {
        Entry::File(0) if package && plain_name => {
            return Err("an empty package __init__.py: no tests, no load_tests");
        }
        Entry::File(_) => {}
        Entry::Other => return Err("not a regular file in the checkout"),
    }
    let mut name = dirs.join(".");
    if let Some(stem) = stem {
        name.push('.');
        name.push_str(stem);
    }
    Ok(name)
}

/// Python's `[_a-z]\w*` under `re.IGNORECASE` with Unicode `\w`, the check
/// discover applies to a module's file name (`VALID_MODULE_NAME`).
fn is_identifier(stem: &str) -> bool {
    let mut chars = stem.chars();
    let Some(first) = chars.next() else { return false };
    (first == '_' || first.is_ascii_alphabetic()) && chars.all(|c| c == '_' || c.is_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files the driver runs, given the claimed `files` (each one byte
    /// long unless listed in `empty`) and other files that exist.
    fn runs(files: &[&str], existing: &[&str], empty: &[&str]) -> Vec<String> {
        let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
        let entry = |p: &str| {
            if empty.contains(&p) {
                Entry::File(0)
            } else if existing.contains(&p) || files.iter().any(|f| f == p) {
                Entry::File(1)
            } else {
                Entry::Other
            }
        };
        let (modules, _) = test_modules(&files, entry);
        modules.into_iter().map(|m| format!("{} {}", m.file, m.name)).collect()
    }

    #[test]
    fn follows_discover_rules() {
        let inits =
            ["tests/__init__.py", "tests/pkg/__init__.py", "tests/pkg/deep/__init__.py", "tests/my.dir/__init__.py"];
        let files = [
            "tests/test_a.py",
            "tests/pkg/test_b.py",
            "tests/pkg/deep/test_c.py",
            "tests/nopkg/test_d.py",
            "tests/helper.py",
            "tests/test-dash.py",
            "tests/test_a.pyc",
            "tests/testé.py",
            "tests/my.dir/test_e.py",
            "other/test_f.py",
        ];
        assert_eq!(
            runs(&files, &inits, &[]),
            [
                "tests/test_a.py tests.test_a",
                "tests/pkg/test_b.py tests.pkg.test_b",
                "tests/pkg/deep/test_c.py tests.pkg.deep.test_c",
                "tests/testé.py tests.testé",
                "tests/my.dir/test_e.py tests.my.dir.test_e",
            ]
        );
    }

    /// The batch's order is kept (the dispatcher's: longest first), and a
    /// file given twice runs once, where it came first.
    #[test]
    fn keeps_the_order_given_and_each_file_once() {
        let files = ["tests/test_z.py", "tests/test_a.py", "tests/test_z.py", "tests/test_m.py"];
        assert_eq!(
            runs(&files, &["tests/__init__.py"], &[]),
            ["tests/test_z.py tests.test_z", "tests/test_a.py tests.test_a", "tests/test_m.py tests.test_m"]
        );
    }

    #[test]
    fn package_init_files_are_units_unless_empty() {
        let files = ["tests/__init__.py", "tests/pkg/__init__.py", "tests/nopkg/sub/__init__.py"];
        assert_eq!(runs(&files, &[], &["tests/pkg/__init__.py"]), ["tests/__init__.py tests"]);
        // discover imports `tests/my.dir` as `tests.my`: that can fail.
        assert_eq!(
            runs(
                &["tests/__init__.py", "tests/my.dir/__init__.py"],
                &[],
                &["tests/__init__.py", "tests/my.dir/__init__.py"]
            ),
            ["tests/my.dir/__init__.py tests.my.dir"]
        );
        assert_eq!(runs(&files, &[], &[]), ["tests/__init__.py tests", "tests/pkg/__init__.py tests.pkg"]);
    }

    #[test]
    fn needs_the_top_package() {
        assert_eq!(runs(&["tests/test_a.py"], &[], &[]), Vec::<String>::new());
    }
}
