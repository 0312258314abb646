//! The compiled-code cache loads native code only when it is provably what this host
//! compiled for that very handler: an entry copied over another handler's, or
//! rewritten by anyone without the folder's key, is recompiled; the folder and its key
//! are private and refused when others may write them; a symlink in the folder is
//! never followed; and without HOME there is no cache rather than a shared one. Real
//! components, real folders, the real `edge-host` binary where its log matters.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edge_host::cache::CompileCache;
use sha2::{Digest as _, Sha256};
use testkit::{ChildGuard, HandlerDir, Mosquitto, guest};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The `sha256:<hex>` digest of a file, as the host names a handler version.
fn digest_of(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("readable");
    let hex: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// A guest component compiled by `engine`.
fn component(engine: &Engine, package: &str) -> Component {
    Component::from_file(engine, guest(package)).expect("a component")
}

/// The permission bits of `path`, in octal.
fn mode(path: &Path) -> String {
    format!(
        "{:o}",
        std::fs::metadata(path).expect("exists").mode() & 0o777
    )
}

#[test]
fn the_folder_and_the_key_are_private() {
    let root = tempfile::tempdir().expect("folder");
    let dir = root.path().join("cache");
    let engine = Engine::default();
    let cache = CompileCache::new(dir.clone(), &engine);
    assert!(cache.is_active());
    let digest = digest_of(&guest("echo"));
    cache.put(&digest, &component(&engine, "echo"));
    assert_eq!(mode(&dir), "700", "the folder");
    assert_eq!(mode(&dir.join("key")), "600", "the key");
    assert_eq!(mode(&cache.entry(&digest)), "600", "an entry");
    assert!(
        cache.get(&engine, &digest).is_some(),
        "a sound entry is used"
    );
}

#[test]
fn an_entry_rewritten_without_the_key_is_refused() {
    let root = tempfile::tempdir().expect("folder");
    let engine = Engine::default();
    let cache = CompileCache::new(root.path().join("cache"), &engine);
    let digest = digest_of(&guest("echo"));
    let entry = cache.entry(&digest);

    // Someone who can write the folder files device-method's code under echo's digest,
    // with the unkeyed SHA-256 of the code in front, as entries used to carry.
    let foreign = component(&engine, "device-method")
        .serialize()
        .expect("serializes");
    let mut forged = Sha256::digest(&foreign).to_vec();
    forged.extend_from_slice(&foreign);
    std::fs::write(&entry, &forged).expect("written");
    assert!(
        cache.get(&engine, &digest).is_none(),
        "a forged entry is refused"
    );
    assert!(!entry.exists(), "and removed");

    // A sound entry with one bit flipped.
    cache.put(&digest, &component(&engine, "echo"));
    let mut bytes = std::fs::read(&entry).expect("written");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&entry, &bytes).expect("written");
    assert!(
        cache.get(&engine, &digest).is_none(),
        "a damaged entry is refused"
    );
}

#[test]
fn a_folder_or_key_others_may_write_turns_the_cache_off() {
    let engine = Engine::default();
    let digest = digest_of(&guest("echo"));
    let echo = component(&engine, "echo");

    let root = tempfile::tempdir().expect("folder");
    let open = root.path().join("open");
    std::fs::create_dir(&open).expect("created");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let cache = CompileCache::new(open.clone(), &engine);
    assert!(!cache.is_active(), "a folder anyone may write");
    cache.put(&digest, &echo);
    assert_eq!(
        std::fs::read_dir(&open).expect("listed").count(),
        0,
        "nothing is written there"
    );

    let shared_key = root.path().join("shared-key");
    CompileCache::new(shared_key.clone(), &engine);
    std::fs::set_permissions(
        shared_key.join("key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    assert!(
        !CompileCache::new(shared_key, &engine).is_active(),
        "a key others may read"
    );

    let linked_key = root.path().join("linked-key");
    std::fs::create_dir(&linked_key).expect("created");
    std::fs::set_permissions(&linked_key, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let elsewhere = root.path().join("a-key-elsewhere");
    std::fs::write(&elsewhere, [7u8; 32]).expect("written");
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::symlink(&elsewhere, linked_key.join("key")).expect("symlink");
    assert!(
        !CompileCache::new(linked_key, &engine).is_active(),
        "a key that is a symlink"
    );

    // Another user's folder, where this test may hand one over (as root).
    let theirs = root.path().join("theirs");
    std::fs::create_dir(&theirs).expect("created");
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    if std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).is_ok() {
        assert!(
            !CompileCache::new(theirs, &engine).is_active(),
            "another user's folder"
        );
    }
}

#[test]
fn a_symlink_at_the_temporarys_name_is_not_followed() {
    let root = tempfile::tempdir().expect("folder");
    let engine = Engine::default();
    let cache = CompileCache::new(root.path().join("cache"), &engine);
    let digest = digest_of(&guest("echo"));
    let victim = root.path().join("victim");
    std::fs::write(&victim, "precious").expect("written");
    // The temporary an entry is written to before it is renamed into place.
    let mut aside = cache.entry(&digest).into_os_string();
    aside.push(format!(".partial-{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &aside).expect("symlink");

    cache.put(&digest, &component(&engine, "echo"));
    assert_eq!(
        std::fs::read_to_string(&victim).expect("still there"),
        "precious",
        "the symlink's target was written through"
    );
    assert!(
        std::fs::symlink_metadata(&aside)
            .expect("left in place")
            .is_symlink(),
        "the symlink is left alone"
    );
    assert!(
        cache.get(&engine, &digest).is_none(),
        "no entry was written (had one been, the test planted at the wrong name)"
    );
}

/// The real `edge-host` binary serving `handlers` as `device` on `broker`, with the
/// compiled-code cache in `cache` (none: its default), its log in `log`.
fn spawn_host(
    device: &str,
    handlers: &HandlerDir,
    broker: &Mosquitto,
    cache: Option<&Path>,
    log: &Path,
    env: &[(&str, &Path)],
) -> ChildGuard {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-host"));
    command
        .args(["--device-id", device, "--broker", &broker.url().to_string()])
        .arg("--handlers")
        .arg(handlers.path());
    if let Some(cache) = cache {
        command.arg("--cache-dir").arg(cache);
    } else {
        // Only what a service manager gives a process without a home.
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    }
    command
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .env("RUST_LOG", "warn,edge_host::sandbox=debug")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    ChildGuard::spawn(&mut command).expect("edge-host starts")
}

/// Stops a host with SIGTERM and returns its log.
fn stop(mut host: ChildGuard, log: &Path) -> String {
    host.signal(testkit::Signal::TERM).expect("SIGTERM is sent");
    let status = host.wait().expect("ends");
    let log = std::fs::read_to_string(log).expect("log");
    assert!(status.success(), "{status}: {log}");
    log
}

/// The one cache entry whose name starts with the hex of `digest`.
fn entry_of(dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the cache folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(hex))
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_copied_over_another_handlers_is_recompiled_with_a_warning() {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto");
    let handlers = HandlerDir::with(&["echo", "device-method"]).expect("handlers");
    let root = tempfile::tempdir().expect("folder");
    let cache = root.path().join("cache");
    let log = root.path().join("host.log");
    let device = "cache-swap";

    let host = spawn_host(device, &handlers, &broker, Some(&cache), &log, &[]);
    testkit::presence(&broker.url(), device, true, Duration::from_secs(30))
        .await
        .expect("online");
    stop(host, &log);

    // echo's compiled code, filed under device-method's digest.
    let echo = digest_of(&handlers.path().join("echo.wasm"));
    let device_method = digest_of(&handlers.path().join("device-method.wasm"));
    let swapped = entry_of(&cache, &device_method);
    std::fs::copy(entry_of(&cache, &echo), &swapped).expect("copied");

    let host = spawn_host(device, &handlers, &broker, Some(&cache), &log, &[]);
    testkit::presence(&broker.url(), device, true, Duration::from_secs(30))
        .await
        .expect("online");
    let catalog = testkit::catalog(&broker.url(), device)
        .await
        .expect("catalog");
    let log = stop(host, &log);
    let served: Vec<(&str, &str)> = catalog
        .methods
        .iter()
        .map(|m| (m.name.as_str(), m.handler.as_str()))
        .collect();
    assert_eq!(
        (served, catalog.failures.len()),
        (
            vec![
                ("DeviceMethod", "device-method.wasm"),
                ("echo", "echo.wasm")
            ],
            0
        ),
        "{log}"
    );
    let warning = log
        .lines()
        .find(|line| line.contains("WARN") && line.contains(&*swapped.to_string_lossy()));
    assert!(
        warning.is_some_and(|line| line.contains("fails its check")),
        "a warning names the entry: {log}"
    );
    let echo_short = &echo[..19];
    assert!(
        log.lines()
            .any(|l| l.contains("taken from the cache") && l.contains(echo_short)),
        "echo's own entry still serves: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_home_the_cache_is_off_rather_than_in_a_shared_folder() {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto");
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let root = tempfile::tempdir().expect("folder");
    let shared = root.path().join("tmp");
    std::fs::create_dir(&shared).expect("created");
    let log = root.path().join("host.log");
    let device = "homeless";
    // No HOME, no XDG_CACHE_HOME; TMPDIR names the folder every user shares.
    let host = spawn_host(
        device,
        &handlers,
        &broker,
        None,
        &log,
        &[("TMPDIR", &shared)],
    );
    testkit::presence(&broker.url(), device, true, Duration::from_secs(30))
        .await
        .expect("online");
    let log = stop(host, &log);
    assert_eq!(
        std::fs::read_dir(&shared).expect("listed").count(),
        0,
        "nothing is cached in the shared folder: {log}"
    );
    assert!(
        log.contains("neither XDG_CACHE_HOME nor HOME is set"),
        "a warning says why there is no cache: {log}"
    );
}
