//! Which claimed files are test modules, by the rules of
//! `python3 -m unittest discover -s tests -t .` (Python 3.11).
//!
//! discover imports a file as a test module only if its name matches
//! `test*.py` and is a valid module name, and if it can reach the file through
//! packages: `tests/` and every directory below it on the way must hold an
//! `__init__.py` (3.11 no longer walks into namespace packages). Everything
//! else is left alone, so running it here would report tests that unittest
//! itself never runs.

/// A file that discover would import as a test module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestModule {
    /// The repository-relative path, as the host gave it.
    pub file: String,
    /// The dotted module name, e.g. `tests.sub.test_x`.
    pub name: String,
}

/// Why a claimed file is not a test module (for the runner's log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The repository-relative path.
    pub file: String,
    /// Why discover would not import it.
    pub reason: &'static str,
}

/// Splits `files` into the test modules discover would import, sorted by
/// module name (discover's own order within a directory), and the others.
///
/// `is_file` answers whether a repository-relative path is a regular file in
/// the checkout; it is a parameter so the rules can be tested without one.
pub fn test_modules(files: &[String], is_file: impl Fn(&str) -> bool) -> (Vec<TestModule>, Vec<Skipped>) {
    let mut modules = Vec::new();
    let mut skipped = Vec::new();
    for file in files {
        match module_name(file, &is_file) {
            Ok(name) => modules.push(TestModule { file: file.clone(), name }),
            Err(reason) => skipped.push(Skipped { file: file.clone(), reason }),
        }
    }
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    modules.dedup_by(|a, b| a.name == b.name);
    (modules, skipped)
}

fn module_name(file: &str, is_file: &impl Fn(&str) -> bool) -> Result<String, &'static str> {
    let segments: Vec<&str> = file.split('/').collect();
    let Some((base, dirs)) = segments.split_last() else {
        return Err("empty path");
    };
    if dirs.first() != Some(&"tests") {
        return Err("not under tests/");
    }
    // fnmatch is case-sensitive on POSIX, so `test*.py` is a plain prefix and suffix test.
    let Some(stem) = base.strip_suffix(".py").filter(|stem| stem.starts_with("test")) else {
        return Err("file name does not match test*.py");
    };
    if !is_identifier(stem) {
        return Err("file name is not a valid module name");
    }
    // discover walks into any directory holding an `__init__.py` and imports
    // it by its dotted path; a name that cannot be one path component of a
    // dotted name would import something else, so those are left out too.
    if dirs.iter().any(|d| d.is_empty() || d.contains('.') || *d == "..") {
        return Err("a directory on its path cannot be part of a module name");
    }
    let mut package = String::new();
    for dir in dirs {
        if !package.is_empty() {
            package.push('/');
        }
        package.push_str(dir);
        if !is_file(&format!("{package}/__init__.py")) {
            return Err("a directory on its path has no __init__.py");
        }
    }
    if !is_file(file) {
        return Err("not a regular file in the checkout");
    }
    let mut name = dirs.join(".");
    name.push('.');
    name.push_str(stem);
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

    fn names(files: &[&str], existing: &[&str]) -> Vec<String> {
        let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
        let (modules, _) = test_modules(&files, |p| existing.contains(&p) || files.iter().any(|f| f == p));
        modules.into_iter().map(|m| m.name).collect()
    }

    #[test]
    fn follows_discover_rules() {
        let inits = ["tests/__init__.py", "tests/pkg/__init__.py", "tests/pkg/deep/__init__.py"];
        let files = [
            "tests/test_a.py",
            "tests/pkg/test_b.py",
            "tests/pkg/deep/test_c.py",
            "tests/nopkg/test_d.py",
            "tests/helper.py",
            "tests/test-dash.py",
            "tests/test_a.pyc",
            "tests/__init__.py",
            "tests/testé.py",
            "tests/my.dir/test_e.py",
            "other/test_f.py",
        ];
        assert_eq!(names(&files, &inits), ["tests.pkg.deep.test_c", "tests.pkg.test_b", "tests.test_a", "tests.testé"]);
    }

    #[test]
    fn needs_the_top_package() {
        assert_eq!(names(&["tests/test_a.py"], &[]), Vec::<String>::new());
    }
}
