//! The results directory: one JSON document per commit,
//! `results/<commit>.json`, as in the original design's file reporter.
//!
//! Every write goes to a temporary file that is synced and then renamed over
//! the old one, so a crash leaves either the old document or the new one,
//! never half of either. The files are also how a restarted dispatcher finds
//! the commits it knew.

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
    /// Opens (creating if needed) `dir` and reads the reports in it. Files
    /// that do not parse are left in place and named in the returned list of
    /// problems, so no data is thrown away.
    pub fn open(dir: &Path) -> Result<(ResultsDir, Vec<CommitReport>, Vec<String>), ResultsError> {
        fs::create_dir_all(dir).map_err(err("create directory", dir))?;
        let mut reports = Vec::new();
        let mut problems = Vec::new();
        for entry in fs::read_dir(dir).map_err(err("read directory", dir))? {
            let path = entry.map_err(err("read directory", dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match fs::read(&path).map(|bytes| serde_json::from_slice::<CommitReport>(&bytes)) {
                Ok(Ok(report)) => reports.push(report),
                Ok(Err(e)) => problems.push(format!("{} is not a valid report ({e}); ignoring it", path.display())),
                Err(e) => problems.push(format!("cannot read {} ({e}); ignoring it", path.display())),
            }
        }
        Ok((ResultsDir { dir: dir.to_owned() }, reports, problems))
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
    fn writes_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (results, found, problems) = ResultsDir::open(dir.path()).unwrap();
        assert!(found.is_empty() && problems.is_empty());
        let report = CommitReport {
            commit: "0123456789abcdef0123456789abcdef01234567".parse().unwrap(),
            repo: "r".into(),
            branch: "main".into(),
            status: CommitStatus::Passed,
            counts: Counts::default(),
            error: None,
            runner: None,
            queued_at_ms: 1,
            finished_at_ms: Some(2),
            tests: vec![],
        };
        results.write(&report).unwrap();
        results.write(&report).unwrap();
        fs::write(dir.path().join("junk.json"), b"{").unwrap();
        let (_, found, problems) = ResultsDir::open(dir.path()).unwrap();
        assert_eq!(found, vec![report]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("junk.json"));
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
    }
}
