//! The results directory: one JSON document per commit,
//! `results/<commit>.json`, as in the original design's file reporter.
//!
//! Every write goes to a temporary file that is synced and then renamed over
//! the old one, so a crash leaves either the old document or the new one,
//! never half of either. The database (`db`) is the source of truth; these
//! files are the readable copy for people and other tools.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_proto::CommitReport;

/// Why the results directory could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct ResultsError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ResultsError {
    let path = path.to_owned();
    move |source| ResultsError { action, path, source }
}

/// The directory of per-commit result documents.
#[derive(Clone, Debug)]
pub struct ResultsDir {
    dir: PathBuf,
}

impl ResultsDir {
    /// Opens (creating if needed) the results directory.
    pub fn open(dir: &Path) -> Result<ResultsDir, ResultsError> {
        fs::create_dir_all(dir).map_err(err("create directory", dir))?;
        Ok(ResultsDir { dir: dir.to_owned() })
    }

    /// The path of a commit's document.
    pub fn path_of(&self, report: &CommitReport) -> PathBuf {
        self.dir.join(format!("{}.json", report.commit))
    }

    /// Writes a commit's document atomically.
    pub fn write(&self, report: &CommitReport) -> Result<(), ResultsError> {
        let path = self.path_of(report);
        let tmp = self.dir.join(format!(".{}.json.tmp", report.commit));
        // Serializing plain data into a Vec cannot fail.
        let mut bytes = serde_json::to_vec_pretty(report).unwrap_or_default();
        bytes.push(b'\n');
        let mut file = fs::File::create(&tmp).map_err(err("create", &tmp))?;
        file.write_all(&bytes).map_err(err("write", &tmp))?;
        file.sync_all().map_err(err("sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(err("rename into place", &path))?;
        // Make the rename itself durable.
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err("sync directory", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::{CommitStatus, Counts};

    #[test]
    fn writes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let results = ResultsDir::open(&dir.path().join("results")).unwrap();
        let mut report = CommitReport {
            commit: "0123456789abcdef0123456789abcdef01234567".parse().unwrap(),
            repo: "r".into(),
            branch: "main".into(),
            status: CommitStatus::Running,
            counts: Counts::default(),
            error: None,
            runner: None,
            warnings: vec![],
            queued_at_ms: 1,
            finished_at_ms: None,
            tests: vec![],
        };
        results.write(&report).unwrap();
        report.status = CommitStatus::Passed;
        results.write(&report).unwrap();
        let back: CommitReport = serde_json::from_slice(&fs::read(results.path_of(&report)).unwrap()).unwrap();
        assert_eq!(back, report);
        let names: Vec<_> = fs::read_dir(dir.path().join("results")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary files left: {names:?}");
    }
}
