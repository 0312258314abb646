//! The compiled-code cache: a handler's machine code, serialized by wasmtime, on disk
//! under the digest of the `.wasm` it came from, so that a restart with unchanged
//! handlers compiles nothing.
//!
//! An entry is never trusted: it carries a SHA-256 of its own bytes, checked before
//! wasmtime sees them, and its name includes a hash of everything in the engine that
//! compiled code depends on (wasmtime's version and settings), so that a corrupt,
//! truncated or foreign entry is ignored and rebuilt, never loaded.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Length of the checksum that starts every entry.
const CHECKSUM_LEN: usize = 32;

/// A folder of compiled components.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    /// A hash of the engine's compatibility-relevant settings, in every entry's name.
    engine_key: String,
}

impl CompileCache {
    /// A cache in `dir` (created when first written) for code compiled by `engine`.
    pub fn new(dir: PathBuf, engine: &Engine) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        Self {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, wasm_digest: &str) -> PathBuf {
        let hex = wasm_digest.strip_prefix("sha256:").unwrap_or(wasm_digest);
        self.dir.join(format!("{hex}-{}.cwasm", self.engine_key))
    }

    /// The component compiled from the `.wasm` with `wasm_digest`, if a sound entry
    /// exists. A missing entry is `None`; an unsound one is logged, removed and `None`.
    pub fn get(&self, engine: &Engine, wasm_digest: &str) -> Option<Component> {
        let path = self.entry(wasm_digest);
        let bytes = std::fs::read(&path).ok()?;
        match checked(&bytes) {
            Some(code) => {
                // SAFETY: wasmtime trusts serialized code as it trusts its own output.
                // These bytes are what `put` wrote from `Component::serialize` for the same
                // engine settings (the entry's name says so) and their checksum matches,
                // so they are that output, unaltered. A mismatch never reaches here.
                #[allow(unsafe_code)]
                let component = unsafe { Component::deserialize(engine, code) };
                match component {
                    Ok(component) => return Some(component),
                    Err(error) => {
                        tracing::warn!(entry = %path.display(), %error, "cache entry refused by wasmtime; recompiling")
                    }
                }
            }
            None => tracing::warn!(entry = %path.display(), "cache entry is corrupt; recompiling"),
        }
        std::fs::remove_file(&path).ok();
        None
    }

    /// Stores `component`, compiled from the `.wasm` with `wasm_digest`. Failing to
    /// write is logged and otherwise harmless: the next start compiles again.
    pub fn put(&self, wasm_digest: &str, component: &Component) {
        let path = self.entry(wasm_digest);
        if let Err(error) = self.write(&path, component) {
            tracing::warn!(entry = %path.display(), %error, "could not write the compiled-code cache");
        }
    }

    fn write(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        let code = component.serialize()?;
        std::fs::create_dir_all(&self.dir)?;
        let mut bytes = Vec::with_capacity(CHECKSUM_LEN + code.len());
        bytes.extend_from_slice(&Sha256::digest(&code));
        bytes.extend_from_slice(&code);
        // Written aside, then renamed: another host sharing the folder never reads half.
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        std::fs::write(&partial, &bytes)?;
        std::fs::rename(&partial, path)?;
        Ok(())
    }
}

/// The code in an entry, when its checksum matches.
fn checked(bytes: &[u8]) -> Option<&[u8]> {
    let (checksum, code) = bytes.split_at_checked(CHECKSUM_LEN)?;
    (Sha256::digest(code).as_slice() == checksum).then_some(code)
}

/// The cache folder when none is configured: `$XDG_CACHE_HOME/edge-host`, else
/// `$HOME/.cache/edge-host`, else one in the system's temporary folder.
pub fn default_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("edge-host")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_used_only_when_its_checksum_matches() {
        let code = b"compiled code".as_slice();
        let mut entry = Sha256::digest(code).to_vec();
        entry.extend_from_slice(code);
        assert_eq!(checked(&entry), Some(code));
        let last = entry.len() - 1;
        entry[last] ^= 1;
        assert_eq!(checked(&entry), None, "a flipped bit is refused");
        assert_eq!(checked(&entry[..10]), None, "a truncated entry is refused");
    }
}
