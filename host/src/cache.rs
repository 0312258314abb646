//! The compiled-code cache: a handler's machine code, serialized by wasmtime, on disk
//! under the digest of the `.wasm` it came from, so that a restart with unchanged
//! handlers compiles nothing.
//!
//! wasmtime runs serialized code as it finds it, so an entry is loaded only when it is
//! provably what this host wrote for that very `.wasm`:
//! - every entry starts with an HMAC-SHA256 over the `.wasm` digest it is filed under,
//!   the engine key (wasmtime's version and settings) and the code, under a random key
//!   the host keeps in the folder (`key`, 0600). Without the key nobody can make an
//!   entry pass, and an entry copied over another handler's name, or written for other
//!   engine settings, fails its check and is recompiled, with a warning;
//! - the folder is created 0700, and a folder or key that another user owns or that
//!   others may write to is refused: the host then runs without a cache and says why;
//! - files are written aside and renamed into place, opened with `O_CREAT | O_EXCL |
//!   O_NOFOLLOW`, so a symlink planted in the folder is never followed, and read with
//!   `O_NOFOLLOW`.
//!
//! The cache never falls back to a shared folder: with neither `XDG_CACHE_HOME` nor
//! `HOME` set, and no folder configured, there is no cache ([`default_dir`]).
//!
//! Why not wasmtime's own cache (`Config::cache`, its `cache` feature): it files code
//! under a hash of the module and the compiler's settings and runs whatever it finds
//! under that name. Nothing ties an entry to whoever wrote it, and the folder's owner
//! and permissions are not checked, so a file planted there would run as this host's
//! own machine code; the guarantees above are what this module is for. Its one
//! `unsafe` (`Component::deserialize`) is the price of them, argued where it stands.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::hash::{Hash as _, Hasher as _};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use wasmtime::Engine;
use wasmtime::component::Component;

/// The entry layout, in every entry's name (through the engine key) and tag: entries
/// of another layout are not even looked at.
const FORMAT: &str = "edge-host compiled-code cache, HMAC-SHA256 tag, v2";

/// Length of the tag that starts every entry.
const TAG_LEN: usize = 32;

/// Length of the key, in bytes.
const KEY_LEN: usize = 32;

/// The key's file name in the folder.
const KEY_FILE: &str = "key";

/// Permission bits a trusted folder must not have: written by group or others.
const FOLDER_FORBIDDEN: u32 = 0o022;

/// Permission bits the key must not have: any access by group or others.
const KEY_FORBIDDEN: u32 = 0o077;

type HmacSha256 = Hmac<Sha256>;

/// A folder of compiled components.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    /// A hash of the engine's compatibility-relevant settings, in every entry's name.
    engine_key: String,
    /// The key entries are tagged with; none when the folder was refused (no cache).
    key: Option<Key>,
}

/// The secret entries are tagged with.
struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<hidden>)")
    }
}

impl Key {
    /// The tag of `code`, compiled from the `.wasm` with `wasm_digest` by an engine
    /// with `engine_key`.
    fn mac(&self, wasm_digest: &str, engine_key: &str, code: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        // Each part with its length first, so that no two different triples tag alike.
        for part in [
            FORMAT.as_bytes(),
            wasm_digest.as_bytes(),
            engine_key.as_bytes(),
            code,
        ] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }

    /// The entry for `code`: its tag, then the code.
    fn seal(&self, wasm_digest: &str, engine_key: &str, code: &[u8]) -> Vec<u8> {
        let tag = self
            .mac(wasm_digest, engine_key, code)
            .finalize()
            .into_bytes();
        let mut entry = Vec::with_capacity(TAG_LEN + code.len());
        entry.extend_from_slice(&tag);
        entry.extend_from_slice(code);
        entry
    }

    /// The code in `entry`, when its tag is right for `wasm_digest` and `engine_key`
    /// (compared in constant time).
    fn open<'e>(&self, wasm_digest: &str, engine_key: &str, entry: &'e [u8]) -> Option<&'e [u8]> {
        let (tag, code) = entry.split_at_checked(TAG_LEN)?;
        self.mac(wasm_digest, engine_key, code)
            .verify_slice(tag)
            .is_ok()
            .then_some(code)
    }
}

impl CompileCache {
    /// A cache in `dir` for code compiled by `engine`. The folder is created (0700)
    /// and its key read, or made on first use. A folder or key that cannot be trusted
    /// (another user's, writable by others, a symlinked key) turns the cache off with
    /// a warning: every load then compiles.
    pub fn new(dir: PathBuf, engine: &Engine) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        FORMAT.hash(&mut hasher);
        let key = match open_folder(&dir) {
            Ok(key) => Some(key),
            Err(error) => {
                tracing::warn!(
                    folder = %dir.display(),
                    "the compiled-code cache is off, every handler is compiled: {error:#}"
                );
                None
            }
        };
        Self {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
            key,
        }
    }

    /// Whether the cache is in use: false when its folder or key was refused.
    pub fn is_active(&self) -> bool {
        self.key.is_some()
    }

    /// Where the entry of the `.wasm` with `wasm_digest` is.
    pub fn entry(&self, wasm_digest: &str) -> PathBuf {
        let hex = wasm_digest.strip_prefix("sha256:").unwrap_or(wasm_digest);
        self.dir.join(format!("{hex}-{}.cwasm", self.engine_key))
    }

    /// The component compiled from the `.wasm` with `wasm_digest`, if a sound entry
    /// exists. A missing entry is `None`; an unsound one is logged, removed and `None`.
    pub fn get(&self, engine: &Engine, wasm_digest: &str) -> Option<Component> {
        let key = self.key.as_ref()?;
        let path = self.entry(wasm_digest);
        let bytes = match read_private(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(entry = %path.display(), %error, "cache entry cannot be read; recompiling");
                std::fs::remove_file(&path).ok();
                return None;
            }
        };
        match key.open(wasm_digest, &self.engine_key, &bytes) {
            Some(code) => {
                // SAFETY: wasmtime trusts serialized code as it trusts its own output.
                // These bytes carry an HMAC-SHA256, under a key that only this user can
                // read or replace (the folder and key were checked to be this user's
                // and not writable by others), over the digest of the `.wasm` they are
                // filed under, the engine's settings and the code itself; the tag
                // matches, so they are what `put` wrote from `Component::serialize` for
                // this very `.wasm` and engine, unaltered, and not another handler's
                // code. A mismatch never reaches here.
                #[allow(unsafe_code)]
                let component = unsafe { Component::deserialize(engine, code) };
                match component {
                    Ok(component) => return Some(component),
                    Err(error) => {
                        tracing::warn!(entry = %path.display(), %error, "cache entry refused by wasmtime; recompiling")
                    }
                }
            }
            None => tracing::warn!(
                entry = %path.display(),
                "cache entry fails its check (corrupt, altered, or another handler's); recompiling"
            ),
        }
        std::fs::remove_file(&path).ok();
        None
    }

    /// Stores `component`, compiled from the `.wasm` with `wasm_digest`. Failing to
    /// write is logged and otherwise harmless: the next start compiles again.
    pub fn put(&self, wasm_digest: &str, component: &Component) {
        let Some(key) = &self.key else { return };
        let path = self.entry(wasm_digest);
        let written = component
            .serialize()
            .map_err(anyhow::Error::from)
            .and_then(|code| write_aside(&path, &key.seal(wasm_digest, &self.engine_key, &code)));
        if let Err(error) = written {
            tracing::warn!(entry = %path.display(), "could not write the compiled-code cache: {error:#}");
        }
    }
}

/// Creates (0700) or checks the folder, and reads or makes its key.
fn open_folder(dir: &Path) -> anyhow::Result<Key> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let folder =
        std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if !folder.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    trusted(&folder, FOLDER_FORBIDDEN)
        .with_context(|| format!("the folder {} cannot be trusted", dir.display()))?;
    let path = dir.join(KEY_FILE);
    match read_key(&path) {
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
        {
            make_key(&path)
        }
        read => read.with_context(|| format!("the key {} cannot be used", path.display())),
    }
}

/// Whether a file's owner and mode allow trusting it: owned by this process's user,
/// without any of the permission bits in `forbidden`.
fn trusted(metadata: &std::fs::Metadata, forbidden: u32) -> anyhow::Result<()> {
    let me = rustix::process::geteuid().as_raw();
    if metadata.uid() != me {
        bail!(
            "it belongs to user {}, not to this one ({me})",
            metadata.uid()
        );
    }
    let mode = metadata.mode() & 0o7777;
    if mode & forbidden != 0 {
        bail!(
            "its mode {mode:04o} lets others {} it (chmod {:o} fixes it)",
            if forbidden == KEY_FORBIDDEN {
                "read or write"
            } else {
                "write to"
            },
            if forbidden == KEY_FORBIDDEN {
                0o600
            } else {
                0o700
            }
        );
    }
    Ok(())
}

/// Reads the key: a regular file, not a symlink, of this user and private to it.
fn read_key(path: &Path) -> anyhow::Result<Key> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nofollow())
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        bail!("it is not a regular file");
    }
    trusted(&metadata, KEY_FORBIDDEN)?;
    let mut key = [0; KEY_LEN];
    file.read_exact(&mut key)
        .context("it is shorter than a key")?;
    if file.read(&mut [0])? != 0 {
        bail!("it is longer than a key");
    }
    Ok(Key(key))
}

/// Makes a new random key at `path`, or reads the one another host made first.
fn make_key(path: &Path) -> anyhow::Result<Key> {
    let key = Key(rand::random());
    let aside = aside(path);
    let mut file = create_private(&aside)?;
    file.write_all(&key.0)?;
    file.sync_all()?;
    drop(file);
    // A link never replaces: of two hosts starting on one folder, one key wins.
    let linked = std::fs::hard_link(&aside, path);
    std::fs::remove_file(&aside).ok();
    match linked {
        Ok(()) => Ok(key),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key(path).with_context(|| format!("the key {} cannot be used", path.display()))
        }
        Err(error) => Err(error).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Writes `bytes` to `path` through a temporary beside it, renamed into place: a
/// reader never sees half an entry.
fn write_aside(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let aside = aside(path);
    let mut file = create_private(&aside)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| std::fs::rename(&aside, path));
    if written.is_err() {
        std::fs::remove_file(&aside).ok();
    }
    Ok(written?)
}

/// The temporary name `path` is written under.
fn aside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(OsString::from(format!(".partial-{}", std::process::id())));
    PathBuf::from(name)
}

/// Creates a new file readable by this user only. `O_EXCL` and `O_NOFOLLOW`: whatever
/// is in the way, a symlink above all, is never followed nor reused. A regular file of
/// this user's in the way is a temporary left by a crash (with this process id), and
/// is replaced.
fn create_private(path: &Path) -> anyhow::Result<File> {
    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nofollow())
            .mode(0o600)
            .open(path)
    };
    match create() {
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let in_the_way = std::fs::symlink_metadata(path)?;
            if !in_the_way.is_file() || trusted(&in_the_way, FOLDER_FORBIDDEN).is_err() {
                bail!(
                    "{} is in the way and is not a file of this user's (a symlink?): not following it",
                    path.display()
                );
            }
            std::fs::remove_file(path)?;
            Ok(create()?)
        }
        created => Ok(created.with_context(|| format!("cannot create {}", path.display()))?),
    }
}

/// Reads an entry: a regular file, never through a symlink.
fn read_private(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nofollow())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// `O_NOFOLLOW`, for `OpenOptionsExt::custom_flags`.
fn nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// The cache folder when none is configured: `$XDG_CACHE_HOME/edge-host`, else
/// `$HOME/.cache/edge-host`; none (no cache) when neither is set, rather than a folder
/// other users share.
pub fn default_dir() -> Option<PathBuf> {
    default_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// [`default_dir`] from the values of `XDG_CACHE_HOME` and `HOME`. Empty or relative
/// values count as unset (the XDG base directory specification says to ignore them).
fn default_dir_from(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let absolute = |value: Option<OsString>| value.map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(xdg_cache_home)
        .or_else(|| absolute(home).map(|home| home.join(".cache")))
        .map(|cache| cache.join("edge-host"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_opens_only_with_its_key_digest_and_engine() {
        let key = Key([7; KEY_LEN]);
        let code = b"compiled code".as_slice();
        let entry = key.seal("sha256:aa", "engine-1", code);
        assert_eq!(key.open("sha256:aa", "engine-1", &entry), Some(code));
        assert_eq!(
            key.open("sha256:bb", "engine-1", &entry),
            None,
            "another handler's name"
        );
        assert_eq!(
            key.open("sha256:aa", "engine-2", &entry),
            None,
            "another engine"
        );
        assert_eq!(
            Key([8; KEY_LEN]).open("sha256:aa", "engine-1", &entry),
            None,
            "another key"
        );
        let mut flipped = entry.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            key.open("sha256:aa", "engine-1", &flipped),
            None,
            "a flipped bit"
        );
        assert_eq!(
            key.open("sha256:aa", "engine-1", &entry[..10]),
            None,
            "truncated"
        );
    }

    #[test]
    fn without_xdg_cache_home_or_home_there_is_no_cache_folder() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(default_dir_from(None, None), None);
        assert_eq!(default_dir_from(os(""), os("")), None);
        assert_eq!(default_dir_from(os("relative"), None), None);
        assert_eq!(
            default_dir_from(None, os("/home/op")),
            Some(PathBuf::from("/home/op/.cache/edge-host"))
        );
        assert_eq!(
            default_dir_from(os("/var/cache/op"), os("/home/op")),
            Some(PathBuf::from("/var/cache/op/edge-host"))
        );
    }
}
