//! The dispatcher's durable state: an SQLite database (WAL) in the state
//! directory holding every commit, its job's attempt counter, its per-test
//! results and its finished files, and which observer owns each repository.
//!
//! The in-memory [`State`](crate::state::State) decides; this module is the
//! [`Store`] that records each event's changes in one transaction before the
//! dispatcher acts on them, so a restarted dispatcher (even after `kill -9`)
//! resumes where it stopped, and never from half of an event.
//! WAL with `synchronous=FULL`: each transaction is synced to disk before
//! it counts as stored, so what the dispatcher has told anyone (an
//! assignment sent, a result acknowledged) survives a power loss too, not
//! only a crash of the process. (`NORMAL` would lose the last transactions
//! on a power loss, and with them the record of assignments already sent:
//! their job ids and attempts would be handed out again.) The owner task
//! stores the events that queue up during one sync in one transaction
//! (group commit), which is what keeps a sync per transaction affordable.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_proto::{CommitId, TestResult, escaped};
use rusqlite::{Connection, OptionalExtension, params};

use crate::state::{Batch, CommitEntry, Lease};
use crate::store::{Change, CommitRow, Store, StoreError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS commits (
    commit_id      TEXT PRIMARY KEY,
    repo           TEXT NOT NULL,
    branch         TEXT NOT NULL,
    seq            INTEGER NOT NULL UNIQUE,
    status         TEXT NOT NULL,
    error          TEXT,
    runner         TEXT,
    queued_at_ms   INTEGER NOT NULL,
    finished_at_ms INTEGER,
    job            INTEGER NOT NULL UNIQUE,
    attempt        INTEGER NOT NULL,
    warnings       TEXT NOT NULL DEFAULT '[]',
    -- The commit's tree, read from the mirror at submission: the same code has the same tree.
    tree           TEXT
);
-- The test files a commit was split into, listed from the mirror at submission.
-- `retries`: how many times the file was queued again because a test failed (`--retry-failed`).
CREATE TABLE IF NOT EXISTS commit_files (
    commit_id TEXT NOT NULL REFERENCES commits (commit_id),
    file      TEXT NOT NULL,
    retries   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (commit_id, file)
);
-- Running batches: leases a restarted dispatcher keeps for their runners.
CREATE TABLE IF NOT EXISTS batches (
    job       INTEGER PRIMARY KEY,
    commit_id TEXT NOT NULL REFERENCES commits (commit_id),
    attempt   INTEGER NOT NULL,
    runner    TEXT NOT NULL,
    slots     INTEGER NOT NULL,
    files     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS done_files (
    commit_id TEXT NOT NULL REFERENCES commits (commit_id),
    file      TEXT NOT NULL,
    PRIMARY KEY (commit_id, file)
);
-- Which observer identity each repository belongs to: the first to submit it.
CREATE TABLE IF NOT EXISTS repo_owners (
    repo        TEXT PRIMARY KEY,
    observer    TEXT NOT NULL,
    bound_at_ms INTEGER NOT NULL
);
";

/// Per-test results. `python`: the version the test ran with when its
/// commit has an interpreter matrix, else empty (not NULL: a primary key
/// column holding NULL would let the same test be stored twice), so the
/// same test id is stored once per version.
const RESULTS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS results (
    commit_id   TEXT NOT NULL REFERENCES commits (commit_id),
    test_id     TEXT NOT NULL,
    file        TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    message     TEXT NOT NULL,
    runner      TEXT,
    flaky       INTEGER NOT NULL DEFAULT 0,
    earlier     TEXT NOT NULL DEFAULT '[]',
    python      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (commit_id, python, test_id)
);
";

/// Version 4's change to `results`: a `python` column in its primary key.
/// SQLite cannot change a table's primary key, so an older table is
/// renamed, the new one made, the rows copied (with no version) and the
/// old table dropped, in one transaction.
const RESULTS_REBUILD: &str = "
BEGIN;
ALTER TABLE results RENAME TO results_before_v4;
{RESULTS_TABLE}
INSERT INTO results (commit_id, test_id, file, outcome, duration_ms, message, runner, flaky, earlier, python)
    SELECT commit_id, test_id, file, outcome, duration_ms, message, runner, flaky, earlier, '' FROM results_before_v4;
DROP TABLE results_before_v4;
COMMIT;
";

/// The schema version this code writes (SQLite's `user_version`). Version
/// 2 added `results.runner`, `commit_files` and `batches`; version 3
/// `results.flaky`, `results.earlier` and `commit_files.retries`; version 4
/// `commits.tree`, `results.python` (in its primary key) and
/// `batches.python`. An older
/// database gains them when opened.
const VERSION: i64 = 4;

/// Columns added since version 1, each with what adds it to an older table
/// (`CREATE TABLE IF NOT EXISTS` leaves an existing table as it was).
const ADDED_COLUMNS: [(&str, &str, &str); 6] = [
    ("batches", "python", "ALTER TABLE batches ADD COLUMN python TEXT"),
    ("results", "runner", "ALTER TABLE results ADD COLUMN runner TEXT"),
    ("results", "flaky", "ALTER TABLE results ADD COLUMN flaky INTEGER NOT NULL DEFAULT 0"),
    ("results", "earlier", "ALTER TABLE results ADD COLUMN earlier TEXT NOT NULL DEFAULT '[]'"),
    ("commit_files", "retries", "ALTER TABLE commit_files ADD COLUMN retries INTEGER NOT NULL DEFAULT 0"),
    ("commits", "tree", "ALTER TABLE commits ADD COLUMN tree TEXT"),
];

/// Why the state database failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("the state database {path}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The database file's mode could not be made `0600`.
    #[error("make the state database private")]
    Private(#[from] crate::private::PrivateError),
    /// The database holds something this version cannot read.
    #[error("the state database {path} is unreadable: {reason}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The open database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl Db {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// The database is `0600`: SQLite gives its `-wal` and `-shm` files the
    /// mode of the database file, so they are private too.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let err = |source| DbError::Sqlite { path: path.to_owned(), source };
        if !path.exists() {
            crate::private::create_file(path).map_err(|e| crate::private::PrivateError::io("create", path, e))?;
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            crate::private::tighten(Path::new(&file), crate::private::FILE_MODE)?;
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(err)?;
        // Another process holding the database would be a misconfiguration; wait briefly, then fail.
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(err)?;
        if version > VERSION {
            return Err(DbError::Corrupt {
                path: path.to_owned(),
                reason: format!("it was written by a newer Kiln (schema {version}, this one knows {VERSION})"),
            });
        }
        conn.execute_batch(SCHEMA).map_err(err)?;
        conn.execute_batch(RESULTS_TABLE).map_err(err)?;
        let has = |table: &str, column: &str| -> Result<bool, DbError> {
            let n: i64 = conn
                .query_row("SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2", [table, column], |r| r.get(0))
                .map_err(err)?;
            Ok(n > 0)
        };
        for (table, column, add) in ADDED_COLUMNS {
            if !has(table, column)? {
                conn.execute_batch(add).map_err(err)?;
            }
        }
        if !has("results", "python")? {
            conn.execute_batch(&RESULTS_REBUILD.replace("{RESULTS_TABLE}", RESULTS_TABLE)).map_err(err)?;
        }
        conn.pragma_update(None, "user_version", VERSION).map_err(err)?;
        Ok(Db { conn, path: path.to_owned() })
    }

    fn err(&self) -> impl FnOnce(rusqlite::Error) -> DbError + '_ {
        |source| DbError::Sqlite { path: self.path.clone(), source }
    }

    fn corrupt(&self, reason: String) -> DbError {
        DbError::Corrupt { path: self.path.clone(), reason }
    }

    /// Every commit, with its results and finished files, in submission order.
    pub fn load(&self) -> Result<Vec<CommitEntry>, DbError> {
        let mut entries: BTreeMap<CommitId, CommitEntry> = BTreeMap::new();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT commit_id, repo, branch, seq, status, error, runner, queued_at_ms, finished_at_ms, job, attempt,
                        warnings, tree
                 FROM commits",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, String>(11)?,
                    r.get::<_, Option<String>>(12)?,
                ))
            })
            .map_err(self.err())?;
        for row in rows {
            let (commit, repo, branch, seq, status, error, runner, queued, finished, job, attempt, warnings, tree) =
                row.map_err(self.err())?;
            let tree = tree
                .map(|t| t.parse::<kiln_proto::TreeId>())
                .transpose()
                .map_err(|e| self.corrupt(format!("tree of {commit}: {e}")))?;
            let warnings: Vec<String> =
                serde_json::from_str(&warnings).map_err(|e| self.corrupt(format!("warnings of {commit}: {e}")))?;
            let commit: CommitId = commit.parse().map_err(|e| self.corrupt(format!("{e}")))?;
            let status = status.parse().map_err(|e: String| self.corrupt(e))?;
            entries.insert(
                commit,
                CommitEntry {
                    commit,
                    repo,
                    branch,
                    seq: seq as u64,
                    status,
                    error,
                    runners: runner.iter().flat_map(|r| r.split(", ")).map(str::to_owned).collect(),
                    warnings,
                    queued_at_ms: queued as u64,
                    finished_at_ms: finished.map(|f| f as u64),
                    tree,
                    job: job as u64,
                    attempt: attempt as u32,
                    files: BTreeMap::new(),
                    pending: Default::default(),
                    pending_ms: 0,
                    done_ms: 0,
                    total_ms: 0,
                    divisor: crate::state::GUESSED_DIVISOR,
                    batches: BTreeMap::new(),
                    tests: BTreeMap::new(),
                    done_files: BTreeSet::new(),
                    retries: BTreeMap::new(),
                    avoid: BTreeMap::new(),
                },
            );
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT commit_id, test_id, file, outcome, duration_ms, message, runner, flaky, earlier, python
                 FROM results",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, bool>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, String>(9)?,
                ))
            })
            .map_err(self.err())?;
        for row in rows {
            let (commit, id, file, outcome, duration, message, runner, flaky, earlier, python) =
                row.map_err(self.err())?;
            let commit: CommitId = commit.parse().map_err(|e| self.corrupt(format!("{e}")))?;
            let outcome = outcome.parse().map_err(|e: String| self.corrupt(e))?;
            let earlier = serde_json::from_str(&earlier)
                .map_err(|e| self.corrupt(format!("earlier runs of {} on {commit}: {e}", escaped(&id))))?;
            if let Some(entry) = entries.get_mut(&commit) {
                let duration_ms = duration as u64;
                let python = (!python.is_empty()).then_some(python);
                let result = TestResult { id, file, outcome, duration_ms, message, runner, flaky, earlier, python };
                entry.tests.insert(result.key(), result);
            }
        }
        let mut stmt = self.conn.prepare("SELECT commit_id, file FROM done_files").map_err(self.err())?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(self.err())?;
        for row in rows {
            let (commit, file) = row.map_err(self.err())?;
            let commit: CommitId = commit.parse().map_err(|e| self.corrupt(format!("{e}")))?;
            if let Some(entry) = entries.get_mut(&commit) {
                entry.done_files.insert(file);
            }
        }
        let mut stmt = self.conn.prepare("SELECT commit_id, file, retries FROM commit_files").map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
            .map_err(self.err())?;
        for row in rows {
            let (commit, file, retries) = row.map_err(self.err())?;
            let commit: CommitId = commit.parse().map_err(|e| self.corrupt(format!("{e}")))?;
            if let Some(entry) = entries.get_mut(&commit) {
                if retries > 0 {
                    entry.retries.insert(file.clone(), retries as u32);
                }
                // Estimates are the state's business: it computes them on restore.
                entry.files.insert(file, 0);
            }
        }
        let mut stmt = self
            .conn
            .prepare("SELECT job, commit_id, attempt, runner, slots, files, python FROM batches")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(self.err())?;
        for row in rows {
            let (job, commit, attempt, runner, slots, files, python) = row.map_err(self.err())?;
            let commit: CommitId = commit.parse().map_err(|e| self.corrupt(format!("{e}")))?;
            let files: Vec<String> =
                serde_json::from_str(&files).map_err(|e| self.corrupt(format!("files of batch {job}: {e}")))?;
            if let Some(entry) = entries.get_mut(&commit) {
                let lease = Lease { runner, conn: None };
                let (job, attempt, slots) = (job as u64, attempt as u32, slots as u32);
                let batch = Batch { job, attempt, files, slots, lease, python };
                entry.batches.insert(job, batch);
            }
        }
        let mut entries: Vec<CommitEntry> = entries.into_values().collect();
        entries.sort_by_key(|e| e.seq);
        Ok(entries)
    }

    /// Applies one event's changes in one transaction.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), DbError> {
        let path = self.path.clone();
        let err = |source| DbError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        for change in changes {
            match change {
                Change::Commit(row) => save_row(&tx, row),
                // A test's result is replaced when a later run of its file changes it (`--retry-failed`).
                Change::Test { commit, result: t } => tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO results
                           (commit_id, test_id, file, outcome, duration_ms, message, runner, flaky, earlier, python)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            commit.as_str(),
                            t.id,
                            t.file,
                            t.outcome.as_str(),
                            t.duration_ms as i64,
                            t.message,
                            t.runner,
                            t.flaky,
                            serde_json::to_string(&t.earlier).unwrap_or_else(|_| "[]".to_owned()),
                            t.python.as_deref().unwrap_or(""),
                        ])
                    }),
                Change::Retry { commit, file, retries } => tx
                    .prepare_cached("UPDATE commit_files SET retries = ?3 WHERE commit_id = ?1 AND file = ?2")
                    .and_then(|mut s| s.execute(params![commit.as_str(), file, i64::from(*retries)])),
                Change::Files { commit, files } => files
                    .iter()
                    .try_for_each(|file| {
                        tx.prepare_cached("INSERT OR IGNORE INTO commit_files (commit_id, file) VALUES (?1, ?2)")
                            .and_then(|mut s| s.execute(params![commit.as_str(), file]))
                            .map(drop)
                    })
                    .map(|()| 0),
                Change::Batch(b) => tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO batches (job, commit_id, attempt, runner, slots, files, python)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            b.job as i64,
                            b.commit.as_str(),
                            i64::from(b.attempt),
                            b.runner,
                            i64::from(b.slots),
                            serde_json::to_string(&b.files).unwrap_or_else(|_| "[]".to_owned()),
                            b.python,
                        ])
                    }),
                Change::BatchEnded { job } => tx
                    .prepare_cached("DELETE FROM batches WHERE job = ?1")
                    .and_then(|mut s| s.execute(params![*job as i64])),
                Change::FileDone { commit, file } => tx
                    .prepare_cached("INSERT OR IGNORE INTO done_files (commit_id, file) VALUES (?1, ?2)")
                    .and_then(|mut s| s.execute(params![commit.as_str(), file])),
                Change::Owner { repo, observer, at_ms } => tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO repo_owners (repo, observer, bound_at_ms) VALUES (?1, ?2, ?3)",
                    )
                    .and_then(|mut s| s.execute(params![repo, observer, *at_ms as i64])),
            }
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Every repository's owner, as bound by its first submission.
    pub fn load_owners(&self) -> Result<Vec<(String, String)>, DbError> {
        let mut stmt = self.conn.prepare("SELECT repo, observer FROM repo_owners").map_err(self.err())?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Refuses (or allows again) every write, as a full or read-only disk would.
    #[cfg(test)]
    pub(crate) fn set_read_only(&self, read_only: bool) {
        self.conn.pragma_update(None, "query_only", read_only).unwrap();
    }

    /// Whether the database knows the commit (for tests and diagnostics).
    pub fn has_commit(&self, commit: &CommitId) -> Result<bool, DbError> {
        self.conn
            .query_row("SELECT 1 FROM commits WHERE commit_id = ?1", [commit.as_str()], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(self.err())
    }
}

/// Writes a commit's row (everything but its results and files).
fn save_row(tx: &rusqlite::Transaction<'_>, e: &CommitRow) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "INSERT INTO commits (commit_id, repo, branch, seq, status, error, runner, queued_at_ms,
                              finished_at_ms, job, attempt, warnings, tree)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT (commit_id) DO UPDATE SET status = ?5, error = ?6, runner = ?7,
             finished_at_ms = ?9, attempt = ?11, warnings = ?12, tree = ?13",
    )?
    .execute(params![
        e.commit.as_str(),
        e.repo,
        e.branch,
        e.seq as i64,
        e.status.as_str(),
        e.error,
        e.runner,
        e.queued_at_ms as i64,
        e.finished_at_ms.map(|f| f as i64),
        e.job as i64,
        i64::from(e.attempt),
        serde_json::to_string(&e.warnings).unwrap_or_else(|_| "[]".to_owned()),
        e.tree.as_ref().map(|t| t.as_str()),
    ])
}

impl Store for Db {
    fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        Db::apply(self, changes).map_err(|e| StoreError {
            action: format!("store {} change{}", changes.len(), if changes.len() == 1 { "" } else { "s" }),
            source: Box::new(e),
        })
    }

    fn load(&mut self) -> Result<Vec<CommitEntry>, StoreError> {
        Db::load(self).map_err(|e| StoreError { action: "load the commits".into(), source: Box::new(e) })
    }

    fn load_owners(&mut self) -> Result<Vec<(String, String)>, StoreError> {
        Db::load_owners(self)
            .map_err(|e| StoreError { action: "load the repository owners".into(), source: Box::new(e) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;
    use kiln_proto::wire::Supersede;
    use kiln_proto::{CommitStatus, Outcome};

    /// The commits table of schema versions 1 to 3 (before `tree`).
    const OLD_COMMITS: &str = "CREATE TABLE commits (commit_id TEXT PRIMARY KEY, repo TEXT NOT NULL, \
        branch TEXT NOT NULL, seq INTEGER NOT NULL UNIQUE, status TEXT NOT NULL, error TEXT, runner TEXT, \
        queued_at_ms INTEGER NOT NULL, finished_at_ms INTEGER, job INTEGER NOT NULL UNIQUE, \
        attempt INTEGER NOT NULL, warnings TEXT NOT NULL DEFAULT '[]');";

    #[test]
    fn a_version_1_database_opens_and_gains_the_runner_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "{OLD_COMMITS}
                 CREATE TABLE results (commit_id TEXT NOT NULL REFERENCES commits (commit_id), test_id TEXT NOT NULL,
                     file TEXT NOT NULL, outcome TEXT NOT NULL, duration_ms INTEGER NOT NULL, message TEXT NOT NULL,
                     PRIMARY KEY (commit_id, test_id));
                 INSERT INTO commits VALUES ('0123456789abcdef0123456789abcdef01234567', 'repo', 'main', 1, 'passed',
                     NULL, 'old-runner', 1, 2, 1, 1, '[]');
                 INSERT INTO results VALUES ('0123456789abcdef0123456789abcdef01234567', 't', 'tests/test_a.py',
                     'pass', 3, '');
                 PRAGMA user_version = 1;"
            ))
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let loaded = db.load().unwrap();
        assert_eq!(loaded[0].tests["t"].runner, None, "an old result names no runner");
        assert_eq!(loaded[0].tree, None, "an old commit has no tree");
        assert_eq!(loaded[0].runners.iter().collect::<Vec<_>>(), ["old-runner"]);
        let version: i64 = db.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, VERSION);
    }

    #[test]
    fn an_older_results_table_gains_the_python_key_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let c = "0123456789abcdef0123456789abcdef01234567";
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "{OLD_COMMITS}
                 CREATE TABLE results (commit_id TEXT NOT NULL REFERENCES commits (commit_id), test_id TEXT NOT NULL,
                     file TEXT NOT NULL, outcome TEXT NOT NULL, duration_ms INTEGER NOT NULL, message TEXT NOT NULL,
                     runner TEXT, flaky INTEGER NOT NULL DEFAULT 0, earlier TEXT NOT NULL DEFAULT '[]',
                     PRIMARY KEY (commit_id, test_id));
                 INSERT INTO commits VALUES ('{c}', 'repo', 'main', 1, 'running', NULL, 'r', 1, NULL, 1, 1, '[]');
                 INSERT INTO results VALUES ('{c}', 't', 'tests/test_a.py', 'pass', 3, '', 'r', 0, '[]');
                 PRAGMA user_version = 3;"
            ))
            .unwrap();
        }
        let mut db = Db::open(&path).unwrap();
        let loaded = db.load().unwrap();
        assert_eq!(loaded[0].tests["t"].python, None, "an old result ran without a matrix");
        // The same test id, once per version, beside the old row.
        let commit: CommitId = c.parse().unwrap();
        let mut changes = Vec::new();
        for v in ["3.11", "3.12"] {
            let result = TestResult {
                python: Some(v.into()),
                ..TestResult::new("t".into(), "tests/test_a.py".into(), Outcome::Fail, 4, v.into())
            };
            changes.push(Change::Test { commit, result });
        }
        db.apply(&changes).unwrap();
        let tests = &db.load().unwrap()[0].tests;
        let got: Vec<(&str, Option<&str>, &str)> =
            tests.iter().map(|(k, t)| (k.as_str(), t.python.as_deref(), t.message.as_str())).collect();
        assert_eq!(got, [("3.11:t", Some("3.11"), "3.11"), ("3.12:t", Some("3.12"), "3.12"), ("t", None, "")]);
        let version: i64 = db.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, 4);
    }

    #[test]
    fn state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let commit: CommitId = "0123456789abcdef0123456789abcdef01234567".parse().unwrap();
        let mut state = State::default();
        state
            .submit("repo", "main", commit, Supersede::Nothing, |_| true, &["tests/test_a.py".into()], None, 5)
            .unwrap();
        let tree: kiln_proto::TreeId = "4b825dc642cb6eb9a060e54bf8d69288fbee4904".parse().unwrap();
        state.set_tree(&commit, Some(tree));
        state.register("r", 1, 1, &[], &["network isolation: NO".to_owned()], &[]);
        let d = state.assign().remove(0).assignment;
        let t = TestResult {
            id: "tests.test_a.T.test_x".into(),
            file: "tests/test_a.py".into(),
            outcome: Outcome::Xfail,
            duration_ms: 12,
            message: "it's 'quoted'\nand multi-line".into(),
            runner: Some("r".into()),
            flaky: false,
            earlier: Vec::new(),
            python: None,
        };
        state.record_test(d.job, d.attempt, 1, t.clone()).unwrap();
        state.file_done(d.job, d.attempt, 1, "tests/test_a.py".into()).unwrap();
        // The same test's result after its file ran again.
        let earlier = vec![kiln_proto::EarlierRun {
            outcome: Outcome::Fail,
            duration_ms: 3,
            message: "AssertionError".into(),
            runner: Some("q".into()),
        }];
        let latest = TestResult { flaky: true, earlier, ..t.clone() };
        {
            let mut db = Db::open(&path).unwrap();
            let entry = state.entry(&commit).unwrap();
            let again = Change::Test { commit, result: latest.clone() };
            let batch = entry.batches.values().next().unwrap();
            db.apply(&[
                Change::Commit(entry.row()),
                Change::Files { commit, files: vec!["tests/test_a.py".into()] },
                Change::Batch(entry.batch_row(batch)),
                Change::Test { commit, result: t.clone() },
                again,
                Change::Retry { commit, file: "tests/test_a.py".into(), retries: 1 },
                Change::FileDone { commit, file: "tests/test_a.py".into() },
            ])
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert!(db.has_commit(&commit).unwrap());
        let loaded = db.load().unwrap();
        assert_eq!(loaded.len(), 1);
        let e = &loaded[0];
        assert_eq!(e.status, CommitStatus::Running);
        assert_eq!((e.job, e.attempt, e.seq), (state.entry(&commit).unwrap().job, 1, 1));
        assert_eq!(e.tree, Some(tree));
        assert_eq!(e.files.keys().collect::<Vec<_>>(), ["tests/test_a.py"]);
        let b = &e.batches[&d.job];
        assert_eq!(
            (b.attempt, &b.files[..], b.slots, b.lease.runner.as_str()),
            (1, &["tests/test_a.py".to_owned()][..], 1, "r")
        );
        assert_eq!(b.lease.conn, None, "a restored lease waits for its runner");
        assert_eq!(e.warnings, vec!["sandbox on r: network isolation: NO".to_owned()]);
        assert_eq!(e.tests.values().cloned().collect::<Vec<_>>(), vec![latest], "a later run's result replaces it");
        assert_eq!(e.retries, BTreeMap::from([("tests/test_a.py".to_owned(), 1)]));
        assert_eq!(e.done_files.iter().cloned().collect::<Vec<_>>(), vec!["tests/test_a.py".to_owned()]);
    }

    #[test]
    fn repository_owners_survive_a_reopen_and_the_first_binding_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let mut db = Db::open(&path).unwrap();
            let owner = |repo: &str, observer: &str, at_ms| Change::Owner {
                repo: repo.into(),
                observer: observer.into(),
                at_ms,
            };
            db.apply(&[owner("/srv/git/a", "watcher", 1), owner("/srv/git/a", "intruder", 2)]).unwrap();
            db.apply(&[owner("/srv/git/b\nINFO forged", "other", 3)]).unwrap();
        }
        let mut owners = Db::open(&path).unwrap().load_owners().unwrap();
        owners.sort();
        assert_eq!(
            owners,
            vec![
                ("/srv/git/a".to_owned(), "watcher".to_owned()),
                ("/srv/git/b\nINFO forged".to_owned(), "other".to_owned())
            ]
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = Db::open(&path).unwrap_err();
        assert!(err.to_string().contains("newer Kiln"), "{err}");
    }
}
