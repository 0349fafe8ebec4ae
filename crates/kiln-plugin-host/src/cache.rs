//! The on-disk cache of compiled plugins, so that a runner compiles a plugin
//! once and starts in milliseconds afterwards.
//!
//! Key decision: an entry is trusted only if it provably came from this
//! cache. Loading compiled code is `unsafe` in wasmtime (the file is native
//! machine code, mapped and run as is), so each entry is keyed and checked
//! twice over:
//!
//! - its file name is the key, `sha256(format, engine, wasm)`, where
//!   `engine` is wasmtime's own hash of everything that makes compiled code
//!   compatible (wasmtime version, target, compiler flags, tunables, wasm
//!   features), and `wasm` is the sha256 of the component's bytes;
//! - the file holds a header (a magic string, the key again, and the sha256
//!   of the compiled bytes), checked before wasmtime sees a byte of it.
//!
//! A file that fails either check (truncated by a crash, corrupted on disk,
//! left by another version) is logged, recompiled and replaced. Entries are
//! written to a temporary file, synced, and renamed into place, so a reader
//! never sees half an entry. The directory is created private to the
//! runner's user: anyone who can write to it can make the runner execute
//! code. Entries of older plugins or wasmtime versions are never read again;
//! deleting the directory at any time is safe.

use std::hash::Hasher;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::HostError;

/// The start of every entry; the last byte is the entry format's version.
const MAGIC: &[u8; 8] = b"KILNCC\n\x01";
/// Magic, key, payload digest.
const HEADER_LEN: usize = MAGIC.len() + 32 + 32;

/// How a plugin's compiled code was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compilation {
    /// Compiled now (no cache, or no usable entry in it).
    Compiled,
    /// Loaded from the compile cache: nothing was compiled.
    Cached,
}

/// A directory of compiled components for one engine configuration.
pub(crate) struct CompileCache {
    dir: PathBuf,
    /// Hash of the format version and the engine's compatibility hash.
    engine_key: [u8; 32],
}

impl CompileCache {
    /// Opens (creating, private to this user) the cache directory `dir` for
    /// components compiled by `engine`.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<CompileCache, HostError> {
        let cache_error = |source| HostError::Cache { path: dir.to_owned(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(cache_error)?;
        // An existing directory may have been made with looser permissions;
        // this fails (and so refuses the cache) if another user owns it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(cache_error)?;
        let mut hasher = ShaHasher(Sha256::new());
        hasher.0.update(MAGIC);
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        Ok(CompileCache { dir: dir.to_owned(), engine_key: hasher.0.finalize().into() })
    }

    /// The component for `wasm`, from the cache if it holds a valid entry,
    /// otherwise compiled (with `compile`) and stored. Problems with the
    /// cache itself are logged and never fail the load.
    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        origin: &str,
        wasm: &[u8],
        compile: impl FnOnce() -> Result<Component, HostError>,
    ) -> Result<(Component, Compilation), HostError> {
        let key = self.key(wasm);
        let path = self.dir.join(format!("{}.cwasm", hex(&key)));
        match std::fs::read(&path) {
            Ok(entry) => match self.deserialize(engine, &key, &entry) {
                Ok(component) => return Ok((component, Compilation::Cached)),
                Err(why) => {
                    tracing::warn!(origin, entry = %path.display(), "ignoring an invalid compile cache entry ({why}); recompiling");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(origin, entry = %path.display(), "cannot read a compile cache entry ({e}); recompiling")
            }
        }
        let component = compile()?;
        match component.serialize() {
            Ok(payload) => {
                if let Err(e) = self.store(&path, &key, &payload) {
                    tracing::warn!(origin, entry = %path.display(), "cannot store a compile cache entry: {e}");
                }
            }
            Err(e) => tracing::warn!(origin, "cannot serialize a compiled plugin for the cache: {e}"),
        }
        Ok((component, Compilation::Compiled))
    }

    /// The entry key of a component: engine and content.
    fn key(&self, wasm: &[u8]) -> [u8; 32] {
        let wasm_digest: [u8; 32] = Sha256::digest(wasm).into();
        let mut hasher = Sha256::new();
        hasher.update(self.engine_key);
        hasher.update(wasm_digest);
        hasher.finalize().into()
    }

    /// Checks an entry's header and digest, and only then loads its code.
    fn deserialize(&self, engine: &Engine, key: &[u8; 32], entry: &[u8]) -> Result<Component, String> {
        if entry.len() < HEADER_LEN || &entry[..MAGIC.len()] != MAGIC {
            return Err("not a Kiln compile cache entry of this format".to_owned());
        }
        let (stored_key, rest) = entry[MAGIC.len()..].split_at(32);
        let (digest, payload) = rest.split_at(32);
        if stored_key != key {
            return Err("its key does not match its name".to_owned());
        }
        if Sha256::digest(payload).as_slice() != digest {
            return Err("its content does not match its digest (corrupted)".to_owned());
        }
        // SAFETY: the bytes are exactly what `Component::serialize` produced
        // in a process with the same engine configuration (the key covers
        // wasmtime's compatibility hash) and were written by `store` below
        // into a directory private to this user; the digest proves they are
        // unchanged since. wasmtime also checks its own header and version.
        #[expect(unsafe_code, reason = "loading precompiled code; see the SAFETY comment")]
        let component = unsafe { Component::deserialize(engine, payload) };
        component.map_err(|e| format!("wasmtime refused it: {e}"))
    }

    /// Writes an entry atomically: temporary file, fsync, rename.
    fn store(&self, path: &Path, key: &[u8; 32], payload: &[u8]) -> std::io::Result<()> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let temporary = self.dir.join(format!(
            ".tmp-{}-{}-{}",
            hex(&key[..8]),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || {
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temporary)?;
            file.write_all(MAGIC)?;
            file.write_all(key)?;
            file.write_all(&Sha256::digest(payload))?;
            file.write_all(payload)?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)?;
            // Make the rename itself durable; failing that is harmless.
            if let Ok(dir) = std::fs::File::open(&self.dir) {
                let _ = dir.sync_all();
            }
            Ok(())
        };
        let result = write();
        if result.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        result
    }
}

/// Feeds a `Hash` implementation into sha256. wasmtime exposes its
/// compatibility hash as `impl Hash`; a cryptographic digest of it keeps
/// the key stable across runs (unlike `DefaultHasher`, which is free to
/// change between Rust versions, though that would only cost a recompile).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_content_and_names_are_hex() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = CompileCache::open(&dir.path().join("cache"), &engine).unwrap();
        assert_ne!(cache.key(b"a"), cache.key(b"b"));
        assert_eq!(cache.key(b"a"), cache.key(b"a"));
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        let mode = std::fs::metadata(dir.path().join("cache")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        // A directory someone made world-writable is made private again.
        std::fs::set_permissions(dir.path().join("cache"), std::fs::Permissions::from_mode(0o777)).unwrap();
        CompileCache::open(&dir.path().join("cache"), &engine).unwrap();
        let mode = std::fs::metadata(dir.path().join("cache")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn the_engine_configuration_is_part_of_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let plain = CompileCache::open(dir.path(), &Engine::default()).unwrap();
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let other = CompileCache::open(dir.path(), &Engine::new(&config).unwrap()).unwrap();
        assert_ne!(plain.key(b"a"), other.key(b"a"));
    }
}
