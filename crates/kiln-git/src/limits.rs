//! Caps on how far git objects from elsewhere may expand: [`Limits`], shared by
//! the observer, dispatcher and runner, and the error detail [`TooLarge`].
//!
//! A pack's size on the wire says little about what it holds: a 1 GiB blob of
//! zeros compresses to about 1 MiB, and a delta of a few kilobytes can describe
//! a gigabyte. So every side checks uncompressed sizes, from headers, before
//! anything is inflated in full:
//!
//! - **unpack** scans the pack stream first (see `scan.rs`): every object's
//!   declared size, every delta's result size and every zlib stream's real
//!   length, with a running total, with a fixed buffer;
//! - **unpack, checkout and pack** walk the commit's tree with header reads
//!   (object sizes without inflating the objects) and keep a running total.
//!
//! What stays in memory is then bounded by the blob cap: libgit2 holds a whole
//! object when it resolves a delta, when it packs an object and when checkout
//! reads a blob (libgit2 cannot stream objects out of a pack). That is why the
//! blob default is modest.

use std::fmt;

use kiln_proto::{ByteSize, Escaped};

/// The caps one process applies to the git objects it receives, checks out or packs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest uncompressed object (in practice: blob) accepted.
    pub max_blob: u64,
    /// The largest total of blob sizes one commit's tree may check out to.
    pub max_tree: u64,
    /// The largest total of the uncompressed sizes of one pack's objects (a
    /// delta counted at the size of its result).
    pub max_pack_expansion: u64,
}

impl Limits {
    /// The cap's value in bytes.
    pub fn get(&self, cap: Cap) -> u64 {
        match cap {
            Cap::Blob => self.max_blob,
            Cap::Tree => self.max_tree,
            Cap::PackExpansion => self.max_pack_expansion,
        }
    }
}

impl Default for Limits {
    /// 100 MiB per blob (GitHub's own hard limit, and a file no test suite
    /// needs to hold), 1 GiB per commit's checkout, 4 GiB per pack (a first
    /// submission carries the whole history, which is larger than any one tree).
    fn default() -> Limits {
        Limits { max_blob: 100 << 20, max_tree: 1 << 30, max_pack_expansion: 4 << 30 }
    }
}

/// One of the caps of [`Limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    /// [`Limits::max_blob`].
    Blob,
    /// [`Limits::max_tree`].
    Tree,
    /// [`Limits::max_pack_expansion`].
    PackExpansion,
}

impl Cap {
    /// The command-line flag that sets this cap (the same on every `kiln` process).
    pub fn flag(self) -> &'static str {
        match self {
            Cap::Blob => "--max-blob-size",
            Cap::Tree => "--max-tree-size",
            Cap::PackExpansion => "--max-pack-expansion",
        }
    }

    /// What the cap limits, for messages.
    fn what(self) -> &'static str {
        match self {
            Cap::Blob => "one object",
            Cap::Tree => "one commit's checked-out files",
            Cap::PackExpansion => "one pack's uncompressed objects",
        }
    }
}

/// Which object broke a cap, and by how much; part of [`GitErrorKind::TooLarge`](crate::GitErrorKind::TooLarge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooLarge {
    /// The cap broken.
    pub cap: Cap,
    /// The cap's value, in bytes.
    pub limit: u64,
    /// The size found (for [`Cap::Tree`] and [`Cap::PackExpansion`]: the running
    /// total when it first went over).
    pub size: u64,
    /// Where the object sits.
    pub at: Place,
    /// The object id, when known.
    pub object: Option<String>,
}

/// Where an object that broke a cap sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// At this path in the commit's tree (empty: the commit or its root tree).
    Path(String),
    /// In a pack not yet indexed, where no path is known yet.
    InPack {
        /// The object's position in the pack, from 0.
        index: u32,
        /// Its byte offset in the pack.
        offset: u64,
        /// Its type: commit, tree, blob, tag or delta.
        kind: &'static str,
    },
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Path(path) if path.is_empty() => f.write_str("the root tree"),
            Place::Path(path) => write!(f, "`{}`", Escaped(path)),
            Place::InPack { index, offset, kind } => {
                write!(f, "the pack's object {index} (a {kind}, at byte {offset})")
            }
        }
    }
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (at, size) = (&self.at, ByteSize(self.size));
        match (self.cap, at) {
            (Cap::Blob, Place::InPack { kind: "delta", .. }) => write!(f, "{at} expands to {size}")?,
            (Cap::Blob, _) => write!(f, "{at} is {size}")?,
            (Cap::Tree, _) => write!(f, "the files add up to {size} by {at}")?,
            (Cap::PackExpansion, _) => write!(f, "the objects add up to {size} by {at}")?,
        }
        if let Some(object) = &self.object {
            write!(f, " (object {object})")?;
        }
        write!(
            f,
            ", over the cap of {} on {} (raise it with {})",
            ByteSize(self.limit),
            self.cap.what(),
            self.cap.flag()
        )
    }
}
