//! [`with_store`]: the one way Kiln's async code does git work. git2 blocks,
//! so the work runs on tokio's blocking threads, and it gets a store opened
//! once for the whole of it, instead of one open per call.

use std::path::{Path, PathBuf};

use crate::{GitError, ObjectStore};

/// How [`with_store`] opens the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    /// It must exist ([`ObjectStore::open`]).
    Existing,
    /// A bare repository is made if there is none ([`ObjectStore::open_or_init_bare`]).
    OrInitBare,
}

/// Opens the store at `path` once and runs `work` on it, off the async
/// threads.
pub async fn with_store<T: Send + 'static>(
    path: &Path,
    open: Open,
    work: impl FnOnce(ObjectStore) -> Result<T, GitError> + Send + 'static,
) -> Result<T, GitError> {
    let path: PathBuf = path.to_owned();
    let task = tokio::task::spawn_blocking(move || {
        let store = match open {
            Open::Existing => ObjectStore::open(&path)?,
            Open::OrInitBare => ObjectStore::open_or_init_bare(&path)?,
        };
        work(store)
    });
    match task.await {
        Ok(result) => result,
        // The work does not panic; if it ever did, surface it loudly.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_work_gets_the_store_and_a_missing_one_is_made_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.git");
        assert!(with_store(&path, Open::Existing, |_| Ok(())).await.is_err());
        let commits = with_store(&path, Open::OrInitBare, |store| store.recorded_commits(8)).await.unwrap();
        assert!(commits.is_empty());
        with_store(&path, Open::Existing, |_| Ok(())).await.unwrap();
    }
}
