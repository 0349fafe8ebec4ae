//! Measuring trees and packs against the [`Limits`] with header reads: the
//! object database gives an object's size without inflating it (for a packed
//! delta, from the delta's header), so a gigabyte blob costs nothing to measure.

use std::collections::{HashMap, HashSet};

use git2::{Odb, Oid, Repository};

use crate::checkout::{MODE_GITLINK, MODE_TREE, child_path};
use crate::limits::{Cap, Limits, Place, TooLarge};

/// Why a measurement stopped.
#[derive(Debug)]
pub(crate) enum MeasureError {
    /// A cap was broken.
    TooLarge(TooLarge),
    /// An object could not be read (in practice: it is missing).
    Unreadable {
        /// The object.
        object: Oid,
        /// Where it sits in the tree.
        path: String,
        /// What libgit2 said.
        source: git2::Error,
    },
}

/// A tree being summed: its entries, how far through them, and their total so far.
struct Frame {
    id: Oid,
    path: String,
    entries: Vec<(Oid, i32, Vec<u8>)>,
    next: usize,
    sum: u64,
}

/// The total size of the blobs (files and symlink targets) that checking out
/// `root` writes, counting a subtree each time it appears, as checkout writes it
/// each time. Fails at the first blob over the blob cap, or where the running
/// total first goes over the tree cap, naming that path.
///
/// Each distinct subtree is read once (its total is remembered), so a tree that
/// repeats one subtree a million times costs one read of it.
pub(crate) fn tree_size(repo: &Repository, odb: &Odb, root: Oid, limits: &Limits) -> Result<u64, MeasureError> {
    let open = |id: Oid, path: String| -> Result<Frame, MeasureError> {
        let tree =
            repo.find_tree(id).map_err(|source| MeasureError::Unreadable { object: id, path: path.clone(), source })?;
        let entries = tree.iter().map(|e| (e.id(), e.filemode(), e.name_bytes().to_vec())).collect();
        Ok(Frame { id, path, entries, next: 0, sum: 0 })
    };
    let over_tree = |total: u64, path: &str| {
        (total > limits.max_tree).then(|| {
            MeasureError::TooLarge(TooLarge {
                cap: Cap::Tree,
                limit: limits.max_tree,
                size: total,
                at: Place::Path(path.to_owned()),
                object: None,
            })
        })
    };
    let mut known: HashMap<Oid, u64> = HashMap::new();
    let mut total: u64 = 0;
    let mut stack = vec![open(root, String::new())?];
    while let Some(top) = stack.last_mut() {
        let Some((id, mode, name)) = top.entries.get(top.next).cloned() else {
            let done = stack.pop().unwrap_or_else(|| unreachable!("the loop holds the top frame"));
            known.insert(done.id, done.sum);
            if let Some(parent) = stack.last_mut() {
                parent.sum = parent.sum.saturating_add(done.sum);
            }
            continue;
        };
        top.next += 1;
        let path = child_path(&top.path, &name);
        match mode {
            MODE_TREE => match known.get(&id) {
                Some(&size) => {
                    top.sum = top.sum.saturating_add(size);
                    total = total.saturating_add(size);
                    if let Some(e) = over_tree(total, &path) {
                        return Err(e);
                    }
                }
                None => stack.push(open(id, path)?),
            },
            // Submodule commits live in another repository and are not checked out.
            MODE_GITLINK => {}
            _ => {
                let size = blob_size(odb, id, &path, limits)?;
                top.sum = top.sum.saturating_add(size);
                total = total.saturating_add(size);
                if let Some(e) = over_tree(total, &path) {
                    return Err(e);
                }
            }
        }
    }
    Ok(total)
}

/// The size of object `id` at `path`, from its header; fails if over the blob cap.
fn blob_size(odb: &Odb, id: Oid, path: &str, limits: &Limits) -> Result<u64, MeasureError> {
    let (size, _) =
        odb.read_header(id).map_err(|source| MeasureError::Unreadable { object: id, path: path.to_owned(), source })?;
    let size = size as u64;
    if size > limits.max_blob {
        return Err(MeasureError::TooLarge(TooLarge {
            cap: Cap::Blob,
            limit: limits.max_blob,
            size,
            at: Place::Path(path.to_owned()),
            object: Some(id.to_string()),
        }));
    }
    Ok(size)
}

/// Checks what a pack of `commits` (not reachable from `hidden`) would hold:
/// no object over the blob cap, and their sizes together within the pack
/// expansion cap. Objects reachable from the trees of `hidden` commits are the
/// receiver's already and are not counted, as the pack builder leaves them out.
pub(crate) fn pack_size(
    repo: &Repository,
    odb: &Odb,
    commits: &[Oid],
    hidden: &[Oid],
    limits: &Limits,
) -> Result<u64, MeasureError> {
    fn unreadable(object: Oid, path: &str) -> impl FnOnce(git2::Error) -> MeasureError + '_ {
        move |source| MeasureError::Unreadable { object, path: path.to_owned(), source }
    }
    let mut seen: HashSet<Oid> = HashSet::new();
    for &commit in hidden {
        let tree = repo.find_commit(commit).map_err(unreadable(commit, ""))?.tree_id();
        let mut stack = vec![tree];
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            // A have whose tree is not all here only means more is sent.
            let Ok(tree) = repo.find_tree(id) else { continue };
            for entry in tree.iter() {
                match entry.filemode() {
                    MODE_TREE => stack.push(entry.id()),
                    MODE_GITLINK => {}
                    _ => {
                        seen.insert(entry.id());
                    }
                }
            }
        }
    }
    let mut total: u64 = 0;
    let mut add = |size: u64, path: &str, id: Oid| {
        total = total.saturating_add(size);
        if total > limits.max_pack_expansion {
            return Err(MeasureError::TooLarge(TooLarge {
                cap: Cap::PackExpansion,
                limit: limits.max_pack_expansion,
                size: total,
                at: Place::Path(path.to_owned()),
                object: Some(id.to_string()),
            }));
        }
        Ok(())
    };
    for &commit in commits {
        add(blob_size(odb, commit, "", limits)?, "", commit)?;
        let tree = repo.find_commit(commit).map_err(unreadable(commit, ""))?.tree_id();
        let mut stack = vec![(tree, String::new())];
        while let Some((id, path)) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            add(blob_size(odb, id, &path, limits)?, &path, id)?;
            let tree = repo.find_tree(id).map_err(unreadable(id, &path))?;
            for entry in tree.iter() {
                let child = child_path(&path, entry.name_bytes());
                match entry.filemode() {
                    MODE_TREE => stack.push((entry.id(), child)),
                    MODE_GITLINK => {}
                    _ => {
                        if seen.insert(entry.id()) {
                            add(blob_size(odb, entry.id(), &child, limits)?, &child, entry.id())?;
                        }
                    }
                }
            }
        }
    }
    Ok(total)
}
