//! The results directory: per commit a JSON document, `results/<commit>.json`
//! (as in the original design's file reporter), and a JUnit XML file,
//! `results/<commit>.xml`, for tools that read that format.
//!
//! Every write goes to a temporary file that is synced and then renamed over
//! the old one, so a crash leaves either the old document or the new one,
//! never half of either. The database (`db`) is the source of truth; these
//! files are the readable copy for people and other tools.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
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
    /// The directory is `0700` and every file in it `0600`; an older
    /// Kiln's looser modes are tightened here.
    pub fn open(dir: &Path) -> Result<ResultsDir, ResultsError> {
        crate::private::dir(dir).map_err(|e| ResultsError {
            action: "make private",
            path: dir.to_owned(),
            source: std::io::Error::other(kiln_proto::error_chain(&e)),
        })?;
        let mut loose = 0;
        for entry in fs::read_dir(dir).map_err(err("list", dir))? {
            let path = entry.map_err(err("list", dir))?.path();
            let mode = fs::symlink_metadata(&path).map(|m| m.is_file().then(|| m.permissions().mode() & 0o7777));
            if let Ok(Some(mode)) = mode
                && mode != crate::private::FILE_MODE
            {
                fs::set_permissions(&path, fs::Permissions::from_mode(crate::private::FILE_MODE))
                    .map_err(err("set the mode of", &path))?;
                loose += 1;
            }
        }
        if loose > 0 {
            tracing::info!(dir = %kiln_proto::Escaped(&dir.display().to_string()), files = loose, "tightened the permissions of result files to 0600");
        }
        Ok(ResultsDir { dir: dir.to_owned() })
    }

    /// The path of a commit's document.
    pub fn path_of(&self, report: &CommitReport) -> PathBuf {
        self.dir.join(format!("{}.json", report.commit))
    }

    /// Writes a commit's JSON document and JUnit XML file, each atomically.
    pub fn write(&self, report: &CommitReport) -> Result<(), ResultsError> {
        // Serializing plain data into a Vec cannot fail.
        let mut json = serde_json::to_vec_pretty(report).unwrap_or_default();
        json.push(b'\n');
        self.replace(&self.path_of(report), &json)?;
        self.replace(
            &self.dir.join(format!("{}.xml", report.commit)),
            kiln_proto::junit(&format!("kiln {}", report.commit), &report.tests).as_bytes(),
        )?;
        // Make the renames themselves durable.
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err("sync directory", &self.dir))
    }

    /// Replaces `path` with `bytes`: temporary file, sync, rename.
    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<(), ResultsError> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = self.dir.join(format!(".{name}.tmp"));
        // A leftover from a crash keeps its old mode when opened: start afresh.
        let _ = fs::remove_file(&tmp);
        let mut file = crate::private::create_file(&tmp).map_err(err("create", &tmp))?;
        file.write_all(bytes).map_err(err("write", &tmp))?;
        file.sync_all().map_err(err("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(err("rename into place", path))
    }
}

/// How often at most a running commit's files are rewritten. A commit's
/// documents are whole files (a JSON object with counts at the top, an XML
/// tree), so each write costs the commit's size; throttling bounds the
/// writes per commit to two a second plus the final one, instead of one per
/// finished file, which made a large commit cost files × tests.
pub const THROTTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Up to this many tests, a running commit's files are rewritten every
/// [`THROTTLE`]: they are small, and people watch them.
const SMALL: usize = 1_000;

/// A larger running commit's files are rewritten once its results have
/// grown by a quarter since the last write (or after [`STALE`]): a rewrite
/// costs the whole document, so rewriting on a clock would cost a long
/// commit its size for every half second it runs (a 20,000-file commit
/// running for minutes: gigabytes); growing by a quarter each time, the
/// writes add up to at most five times the final files, plus one per
/// [`STALE`].
const GROWTH: (usize, usize) = (5, 4);

/// At the latest, a running commit's files are this old.
const STALE: std::time::Duration = std::time::Duration::from_secs(30);

/// Keeps the results directory up to date from the stream of changes:
/// a commit's files are written when it first appears, at most once per
/// [`THROTTLE`] while it runs, and once more when it ends; then it is
/// dropped from memory. `running` are the stored commits not yet final.
pub async fn follow(dir: ResultsDir, mut feed: crate::stream::Feed, running: Vec<crate::state::CommitEntry>) {
    use std::collections::HashMap;
    use tokio::time::Instant;

    use crate::stream::{Doc, Next};

    /// When each commit's files were last written, with how many tests,
    /// and whether they are behind.
    #[derive(Default)]
    struct Written {
        at: Option<Instant>,
        tests: usize,
        dirty: bool,
    }
    /// When a running commit's files (behind, with `now` tests) are due.
    fn due_at(w: &Written, now: usize) -> Option<Instant> {
        let at = w.at?;
        let grown = now <= SMALL || now * GROWTH.1 >= w.tests * GROWTH.0;
        Some(at + if grown { THROTTLE } else { STALE })
    }
    let mut docs: HashMap<kiln_proto::CommitId, Doc> = running.iter().map(|e| (e.commit, Doc::of(e))).collect();
    let mut written: HashMap<kiln_proto::CommitId, Written> = HashMap::new();
    let mut closed = false;
    while !closed {
        let count = |c: &kiln_proto::CommitId| docs.get(c).map_or(0, |d| d.tests.len());
        let due = written
            .iter()
            .filter(|(_, w)| w.dirty)
            .map(|(c, w)| due_at(w, count(c)).unwrap_or_else(Instant::now))
            .min();
        tokio::select! {
            next = feed.next() => match next {
                Next::Update(update) => {
                    for change in &update.changes {
                        if let Some(commit) = crate::stream::apply(&mut docs, change) {
                            written.entry(commit).or_default().dirty = true;
                        }
                    }
                }
                Next::Resync(snapshot) => {
                    // Whatever was missed, every stored commit's files are rewritten.
                    docs = snapshot.entries.iter().map(|e| (e.commit, Doc::of(e))).collect();
                    written = docs.keys().map(|c| (*c, Written { at: None, tests: 0, dirty: true })).collect();
                }
                Next::Closed => closed = true,
            },
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
        }
        let now = Instant::now();
        let ready: Vec<kiln_proto::CommitId> = written
            .iter()
            .filter(|(_, w)| w.dirty)
            .filter(|(c, w)| {
                let ended = docs.get(c).is_some_and(|d| d.row.status.is_final());
                closed || ended || due_at(w, docs.get(c).map_or(0, |d| d.tests.len())).is_none_or(|at| now >= at)
            })
            .map(|(c, _)| *c)
            .collect();
        for commit in ready {
            let Some(doc) = docs.get(&commit) else {
                written.remove(&commit);
                continue;
            };
            let report = doc.report();
            if report.status.is_final() {
                // A final commit never changes again.
                docs.remove(&commit);
                written.remove(&commit);
            } else {
                written.insert(commit, Written { at: Some(now), tests: report.tests.len(), dirty: false });
            }
            let dir = dir.clone();
            let path = dir.path_of(&report);
            match tokio::task::spawn_blocking(move || dir.write(&report)).await {
                Ok(Ok(())) => tracing::debug!(path = %path.display(), "results written"),
                Ok(Err(e)) => {
                    tracing::warn!("failed to write results: {}", kiln_proto::Escaped(&kiln_proto::error_chain(&e)))
                }
                Err(e) => tracing::warn!("results writer failed: {e}"),
            }
        }
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
            files: Default::default(),
            tests: vec![],
        };
        results.write(&report).unwrap();
        report.status = CommitStatus::Passed;
        results.write(&report).unwrap();
        let back: CommitReport = serde_json::from_slice(&fs::read(results.path_of(&report)).unwrap()).unwrap();
        assert_eq!(back, report);
        let mut names: Vec<_> =
            fs::read_dir(dir.path().join("results")).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        let expected: Vec<std::ffi::OsString> =
            [".json", ".xml"].iter().map(|ext| format!("{}{ext}", report.commit).into()).collect();
        assert_eq!(names, expected, "no temporary files left");
    }
}
