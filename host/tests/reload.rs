//! Hot swap: handlers deployed by dropping files into the folder while the host runs,
//! through a real Mosquitto, with real components built from testkit's fixtures.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edge_invoker::{CallRequest, Caller, ConnectOptions};
use edge_proto::Catalog;
use serde_json::{Value, json};
use testkit::{HandlerDir, Mosquitto, TestHost, guest, host_config};

const DEVICE: &str = "reload-device";
/// Generous: a reload takes a debounce and a compile, far less than this.
const SETTLE: Duration = Duration::from_secs(20);

struct Setup {
    broker: Mosquitto,
    handlers: HandlerDir,
    host: TestHost,
    caller: Caller,
}

/// A host serving `version-a` as `version.wasm` (plus `files`), and a caller.
async fn setup(files: &[&str]) -> Setup {
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(files).expect("handlers");
    std::fs::copy(guest("version-a"), handlers.path().join("version.wasm")).expect("copy");
    let (host, caller) = start_at(&broker, handlers.path()).await;
    Setup {
        broker,
        handlers,
        host,
        caller,
    }
}

/// Starts a host serving the folder at `handlers` (a [`HandlerDir`]'s, or a path the
/// test replaces: a symlink, a folder removed and made again), and a caller.
async fn start_at(broker: &Mosquitto, handlers: &Path) -> (TestHost, Caller) {
    testkit::init_logging();
    let host = TestHost::start(host_config(DEVICE, handlers, broker.url()))
        .await
        .expect("host starts");
    (host, connect(broker).await)
}

/// A caller on `broker`.
async fn connect(broker: &Mosquitto) -> Caller {
    Caller::connect(ConnectOptions::new(broker.url()))
        .await
        .expect("caller connects")
}

/// Calls `method` and returns the status and the payload.
async fn call(caller: &Caller, method: &str, payload: &str) -> (u16, Value) {
    let response = caller
        .call(&CallRequest::new(DEVICE, method, payload))
        .await
        .unwrap_or_else(|e| panic!("call of {method} failed: {e}"));
    (response.status, response.payload.to_value())
}

/// Which version answers `version` now: "a", "b", or the whole answer when neither.
async fn version(caller: &Caller) -> String {
    match call(caller, "version", "null").await {
        (200, body) => body["version"].as_str().unwrap_or("?").to_owned(),
        (status, body) => format!("{status} {body}"),
    }
}

/// Calls until `check` holds for an answer, or panics after [`SETTLE`].
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    testkit::eventually(what, SETTLE, async || check().await.then_some(())).await;
}

/// Puts `package`'s component at `to` the way deployment tools do: written under a
/// hidden temporary name, then renamed into place in one step.
fn deploy_atomically(package_or_bytes: Result<&str, &[u8]>, to: &Path) {
    let tmp = to.with_file_name(format!(
        ".{}.tmp",
        to.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    match package_or_bytes {
        Ok(package) => std::fs::copy(guest(package), &tmp).map(|_| ()),
        Err(bytes) => std::fs::write(&tmp, bytes),
    }
    .expect("write temporary file");
    std::fs::rename(&tmp, to).expect("rename into place");
}

/// The latest retained catalog.
async fn catalog(broker: &Mosquitto) -> Catalog {
    testkit::catalog(&broker.url(), DEVICE)
        .await
        .expect("retained catalog")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_rename_under_load_swaps_versions_without_a_failed_call() {
    let s = setup(&[]).await;
    assert_eq!(version(&s.caller).await, "a");

    // Four callers keep calls in flight for the whole swap; each records when it sent
    // a call and what answered, and counts the answers.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut loads = Vec::new();
    for _ in 0..4 {
        let (caller, stop, answered) = (s.caller.clone(), Arc::clone(&stop), Arc::clone(&answered));
        loads.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = started.elapsed();
                let answer = version(&caller).await;
                seen.push((sent, started.elapsed(), answer));
                answered.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    // Until `more` answers came after now.
    let answers_after = |more: usize| {
        let from = answered.load(Ordering::Relaxed);
        let answered = Arc::clone(&answered);
        testkit::eventually("the load goes on", SETTLE, async move || {
            (answered.load(Ordering::Relaxed) >= from + more).then_some(())
        })
    };
    // The load is under way before the swap...
    answers_after(12).await;
    deploy_atomically(Ok("version-b"), &s.handlers.path().join("version.wasm"));
    until("version b serves", || async {
        version(&s.caller).await == "b"
    })
    .await;
    // ...and goes on after it.
    answers_after(12).await;
    stop.store(true, Ordering::Relaxed);

    let mut calls = Vec::new();
    for load in loads {
        calls.extend(load.await.expect("load task"));
    }
    assert!(
        calls.len() > 20,
        "too few calls to say anything: {}",
        calls.len()
    );
    for (_, _, answer) in &calls {
        assert!(
            answer == "a" || answer == "b",
            "a call failed during the swap: {answer}"
        );
    }
    let first_b = calls
        .iter()
        .filter(|(_, _, answer)| answer == "b")
        .map(|(_, received, _)| *received)
        .min()
        .expect("version b answered");
    for (sent, _, answer) in &calls {
        if *sent > first_b {
            assert_eq!(
                answer, "b",
                "a call sent after the swap was served by the old version"
            );
        }
    }
    assert!(
        calls.iter().any(|(_, _, answer)| answer == "a"),
        "the old version served before the swap"
    );
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_in_pieces_is_never_served_half() {
    let s = setup(&[]).await;
    let bytes = std::fs::read(guest("version-b")).expect("built guest");
    let path = s.handlers.path().join("version.wasm");
    let file = std::fs::File::create(&path).expect("truncate in place");
    drop(file);
    // Four pieces, each after the debounce has long passed, so the host sees (and
    // must refuse) every partial file; calls go on throughout.
    let quarter = bytes.len() / 4 + 1;
    for piece in bytes.chunks(quarter) {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        std::io::Write::write_all(&mut file, piece).expect("write piece");
        drop(file);
        let deadline = Instant::now() + Duration::from_millis(400);
        while Instant::now() < deadline {
            let answer = version(&s.caller).await;
            assert!(
                answer == "a" || answer == "b",
                "a half-written file was served: {answer}"
            );
        }
    }
    until("the complete file serves", || async {
        version(&s.caller).await == "b"
    })
    .await;
    let catalog = catalog(&s.broker).await;
    assert!(
        catalog.failures.is_empty(),
        "the complete file clears the failure: {:?}",
        catalog.failures
    );
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_last_good_version_until_a_good_one_comes() {
    let s = setup(&[]).await;
    let path = s.handlers.path().join("version.wasm");
    let good = std::fs::read(guest("version-b")).expect("built guest");
    deploy_atomically(Err(&good[..good.len() / 2]), &path);
    let catalog = testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        c.failures.iter().any(|f| f.handler == "version.wasm")
    })
    .await
    .expect("the broken file is reported");
    assert!(
        catalog.methods.iter().any(|m| m.name == "version"),
        "the old version is still listed"
    );
    let failure = &catalog.failures[0].error;
    assert!(failure.contains("not a valid component"), "{failure}");
    assert_eq!(
        version(&s.caller).await,
        "a",
        "the last good version serves"
    );

    deploy_atomically(Ok("version-b"), &path);
    until("the good file serves", || async {
        version(&s.caller).await == "b"
    })
    .await;
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_file_unregisters_its_methods_and_adding_it_back_serves_again() {
    let s = setup(&["echo"]).await;
    let path = s.handlers.path().join("version.wasm");
    std::fs::remove_file(&path).expect("delete");
    until("version answers 404", || async {
        call(&s.caller, "version", "null").await.0 == 404
    })
    .await;
    assert_eq!(
        call(&s.caller, "echo", "7").await,
        (200, json!(7)),
        "other handlers are untouched"
    );
    let catalog = catalog(&s.broker).await;
    assert!(
        !catalog.methods.iter().any(|m| m.name == "version"),
        "{catalog:?}"
    );

    deploy_atomically(Ok("version-a"), &path);
    until("version serves again", || async {
        version(&s.caller).await == "a"
    })
    .await;
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_file_claiming_a_served_method_is_refused() {
    let s = setup(&[]).await;
    deploy_atomically(Ok("version-b"), &s.handlers.path().join("impostor.wasm"));
    let catalog = testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        c.failures.iter().any(|f| f.handler == "impostor.wasm")
    })
    .await
    .expect("the clash is reported");
    assert!(
        catalog.failures[0]
            .error
            .contains("already served by version.wasm"),
        "{catalog:?}"
    );
    assert_eq!(version(&s.caller).await, "a");
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_sidecar_reloads_the_handler_with_its_new_config() {
    let s = setup(&["device-info"]).await;
    let model =
        |caller: Caller| async move { call(&caller, "getInfo", "null").await.1["model"].clone() };
    assert_eq!(model(s.caller.clone()).await, json!("unknown"));
    std::fs::write(
        s.handlers.path().join("device-info.toml"),
        "[config]\nmodel = \"x-100\"\n",
    )
    .expect("sidecar");
    until("the new config serves", || async {
        model(s.caller.clone()).await == json!("x-100")
    })
    .await;
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_warm_cache_compiles_nothing_and_a_corrupt_entry_is_rebuilt() {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["echo", "device-method", "device-info"]).expect("handlers");
    let cache = tempfile::tempdir().expect("cache folder");
    let config = || {
        let mut config = host_config(DEVICE, handlers.path(), broker.url());
        config.cache = true;
        config.cache_dir = Some(cache.path().to_owned());
        config
    };
    let cold = TestHost::start(config())
        .await
        .expect("cold start")
        .stop()
        .await
        .expect("stop");
    assert_eq!(cold.compilations, 3, "a cold cache compiles every handler");

    let warm = TestHost::start(config()).await.expect("warm start");
    let caller = connect(&broker).await;
    assert_eq!(
        call(&caller, "echo", "[1]").await,
        (200, json!([1])),
        "cached code serves"
    );
    let warm = warm.stop().await.expect("stop");
    assert_eq!(warm.compilations, 0, "a warm cache compiles nothing");

    // Flip one byte of one entry: it must be refused and rebuilt, never run.
    let entry = std::fs::read_dir(cache.path())
        .expect("cache folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .expect("a cache entry");
    let mut bytes = std::fs::read(&entry).expect("read entry");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entry, &bytes).expect("corrupt entry");
    let host = TestHost::start(config())
        .await
        .expect("start with a corrupt entry");
    for method in ["echo", "DeviceMethod", "getInfo"] {
        assert_eq!(
            call(&caller, method, "null").await.0,
            200,
            "{method} serves"
        );
    }
    let report = host.stop().await.expect("stop");
    assert_eq!(
        report.compilations, 1,
        "only the corrupt entry is compiled again"
    );
}

/// Whether the catalog lists `method` as served by `handler`.
fn serves(catalog: &Catalog, method: &str, handler: &str) -> bool {
    catalog
        .methods
        .iter()
        .any(|m| m.name == method && m.handler == handler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_a_handler_file_serves_its_methods_under_the_new_name() {
    let s = setup(&["echo"]).await;
    let dir = s.handlers.path();
    std::fs::rename(dir.join("echo.wasm"), dir.join("echo2.wasm")).expect("mv");
    let catalog = testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        serves(c, "echo", "echo2.wasm") && c.failures.is_empty()
    })
    .await
    .expect("echo is served by echo2.wasm, and nothing is blamed");
    assert!(!catalog.methods.iter().any(|m| m.handler == "echo.wasm"));
    assert_eq!(call(&s.caller, "echo", "[2]").await, (200, json!([2])));

    // And back again: the name that was removed is a new file like any other.
    std::fs::rename(dir.join("echo2.wasm"), dir.join("echo.wasm")).expect("mv back");
    testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        serves(c, "echo", "echo.wasm") && c.failures.is_empty()
    })
    .await
    .expect("echo is served by echo.wasm again");
    assert_eq!(call(&s.caller, "echo", "[3]").await, (200, json!([3])));
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_refused_for_a_clash_serves_once_the_clash_is_gone() {
    let s = setup(&[]).await;
    deploy_atomically(Ok("version-b"), &s.handlers.path().join("impostor.wasm"));
    testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        c.failures.iter().any(|f| f.handler == "impostor.wasm")
    })
    .await
    .expect("the clash is reported");
    assert_eq!(version(&s.caller).await, "a");

    // The file that held the method goes; the refused one, unchanged, takes over.
    std::fs::remove_file(s.handlers.path().join("version.wasm")).expect("delete");
    until("the refused file serves", || async {
        version(&s.caller).await == "b"
    })
    .await;
    testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        serves(c, "version", "impostor.wasm") && c.failures.is_empty()
    })
    .await
    .expect("the clash is no longer reported");
    s.host.stop().await.expect("clean stop");
}

/// Opens a FIFO's writing end when dropped, so that a reader stuck opening it (a
/// loader that does not refuse FIFOs) is let go when the test ends, pass or fail.
struct FifoRelease(std::path::PathBuf);

impl Drop for FifoRelease {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Without a reader, a non-blocking open for writing fails at once: fine.
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.0)
            .ok();
    }
}

fn mkfifo(path: &Path) -> FifoRelease {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo {}", path.display());
    FifoRelease(path.to_owned())
}

/// The failure the catalog reports for `handler`, if any.
fn failure<'c>(catalog: &'c Catalog, handler: &str) -> Option<&'c str> {
    catalog
        .failures
        .iter()
        .find(|f| f.handler == handler)
        .map(|f| f.error.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_devices_and_folders_named_like_handler_files_are_reported_not_read() {
    let s = setup(&["echo"]).await;
    let dir = s.handlers.path();
    // A FIFO as a sidecar: reading it would wait for a writer forever.
    let _fifo_sidecar = mkfifo(&dir.join("echo.toml"));
    // A FIFO and a device as handlers.
    let _fifo_handler = mkfifo(&dir.join("pipe.wasm"));
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.wasm")).expect("ln -s");
    // A folder named like a sidecar, beside a good handler.
    std::fs::create_dir(dir.join("info.toml")).expect("mkdir");
    std::fs::copy(guest("device-info"), dir.join("info.wasm")).expect("copy");
    // And after all that, a new version: the loader must still be working.
    deploy_atomically(Ok("version-b"), &dir.join("version.wasm"));

    until("the new version serves", || async {
        version(&s.caller).await == "b"
    })
    .await;
    let catalog = testkit::catalog_until(&s.broker.url(), DEVICE, |c| c.failures.len() == 4)
        .await
        .expect("every odd file is reported");
    for (handler, why) in [
        ("echo.wasm", "echo.toml is not a regular file (a FIFO)"),
        ("pipe.wasm", "pipe.wasm is not a regular file (a FIFO)"),
        (
            "zero.wasm",
            "zero.wasm is not a regular file (a character device)",
        ),
        ("info.wasm", "info.toml is not a regular file (a folder)"),
    ] {
        let error = failure(&catalog, handler).unwrap_or_default();
        assert!(error.contains(why), "{handler}: {error:?}; {catalog:?}");
    }
    assert_eq!(
        call(&s.caller, "echo", "5").await,
        (200, json!(5)),
        "echo's last good version serves"
    );
    assert_eq!(call(&s.caller, "getInfo", "null").await.0, 404);
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_linked_to_dev_zero_is_refused_unread() {
    let s = setup(&[]).await;
    let dir = s.handlers.path();
    std::os::unix::fs::symlink("/dev/zero", dir.join("echo.toml")).expect("ln -s");
    deploy_atomically(Ok("echo"), &dir.join("echo.wasm"));
    let catalog = testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        failure(c, "echo.wasm").is_some()
    })
    .await
    .expect("the sidecar is reported");
    let error = failure(&catalog, "echo.wasm").unwrap_or_default();
    assert!(
        error.contains("echo.toml is not a regular file (a character device)"),
        "{error}"
    );
    assert_eq!(version(&s.caller).await, "a", "the host goes on");
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_file_over_the_size_cap_is_refused_unread() {
    let s = setup(&[]).await;
    // Sparse: 300 MiB long, nothing on disk.
    let big = std::fs::File::create(s.handlers.path().join("big.wasm")).expect("create");
    big.set_len(300 << 20).expect("set_len");
    drop(big);
    let catalog = testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        failure(c, "big.wasm").is_some()
    })
    .await
    .expect("the file is reported");
    let error = failure(&catalog, "big.wasm").unwrap_or_default();
    assert!(
        error.contains("big.wasm is 314572800 bytes; the limit is 268435456"),
        "{error}"
    );
    assert_eq!(version(&s.caller).await, "a", "the host goes on");
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handlers_folder_removed_and_created_again_is_still_watched() {
    let broker = Mosquitto::start().expect("mosquitto starts");
    let root = tempfile::tempdir().expect("temp folder");
    let dir = root.path().join("handlers");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::copy(guest("version-a"), dir.join("version.wasm")).expect("copy");
    let (host, caller) = start_at(&broker, &dir).await;
    assert_eq!(version(&caller).await, "a");

    // rm -rf handlers && mkdir handlers && cp ...
    std::fs::remove_dir_all(&dir).expect("rm -rf");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::copy(guest("version-b"), dir.join("version.wasm")).expect("copy");
    until("the new folder's version serves", || async {
        version(&caller).await == "b"
    })
    .await;
    // Later changes to the new folder are seen too.
    deploy_atomically(Ok("echo"), &dir.join("echo.wasm"));
    until("a file added to the new folder serves", || async {
        call(&caller, "echo", "1").await.0 == 200
    })
    .await;
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_handlers_folder_swapped_to_a_new_release_is_still_watched() {
    let broker = Mosquitto::start().expect("mosquitto starts");
    let root = tempfile::tempdir().expect("temp folder");
    let release = |n: u32, package: &str| {
        let dir = root.path().join(format!("release-{n}"));
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::copy(guest(package), dir.join("version.wasm")).expect("copy");
        dir
    };
    let current = root.path().join("current");
    // ln -sfn: a new link under a temporary name, renamed over the old one.
    let point_at = |target: &Path| {
        let tmp = root.path().join(".current.tmp");
        std::os::unix::fs::symlink(target, &tmp).expect("ln -s");
        std::fs::rename(&tmp, &current).expect("mv -T");
    };
    point_at(&release(1, "version-a"));
    let (host, caller) = start_at(&broker, &current).await;
    assert_eq!(version(&caller).await, "a");

    let second = release(2, "version-b");
    point_at(&second);
    until("the new release serves", || async {
        version(&caller).await == "b"
    })
    .await;
    deploy_atomically(Ok("echo"), &second.join("echo.wasm"));
    until("a file added to the new release serves", || async {
        call(&caller, "echo", "1").await.0 == 200
    })
    .await;
    host.stop().await.expect("clean stop");
}

/// The retained catalog's size in bytes, as the broker holds it.
async fn catalog_bytes(broker: &Mosquitto) -> usize {
    let topic = edge_proto::Namespace::for_device(DEVICE)
        .expect("namespace")
        .catalog_topic();
    let mut reader = testkit::RawClient::connect(&broker.url(), std::slice::from_ref(&topic))
        .await
        .expect("reader connects");
    let (_, body) = reader
        .next_where(Duration::from_secs(5), |_| true)
        .await
        .expect("retained catalog");
    body.len()
}

/// Whether the device's retained presence says online now.
async fn online(broker: &Mosquitto) -> bool {
    testkit::presence(&broker.url(), DEVICE, true, Duration::from_secs(5))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_over_its_size_cap_is_reported_and_the_device_stays_online() {
    let s = setup(&["echo"]).await;
    // 1.2 MB on one line that is not TOML: a parser's error would quote all of it.
    let text = format!("model = {}\n", "x".repeat(1_200_000));
    std::fs::write(s.handlers.path().join("echo.toml"), text).expect("sidecar");
    let catalog = testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        failure(c, "echo.wasm").is_some()
    })
    .await
    .expect("the sidecar is reported");
    let error = failure(&catalog, "echo.wasm").unwrap_or_default();
    assert!(
        error.contains("echo.toml is 1200009 bytes; the limit is 1048576"),
        "{error}"
    );
    assert!(online(&s.broker).await, "the device is online");
    assert_eq!(call(&s.caller, "echo", "8").await, (200, json!(8)));
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_with_huge_texts_is_cut_to_fit_and_the_device_stays_online() {
    let s = setup(&[]).await;
    let dir = s.handlers.path();
    // Just under the sidecar cap, one line the TOML parser quotes (and underlines)
    // whole in its error: about 2 MB of failure text.
    let text = format!("model = {}\n", "x".repeat(1_000_000));
    std::fs::copy(guest("echo"), dir.join("echo.wasm")).expect("copy");
    std::fs::write(dir.join("echo.toml"), text).expect("sidecar");
    // A description of 900 kB, given through the sidecar's config.
    let description = "d".repeat(900_000);
    std::fs::write(
        dir.join("named.toml"),
        format!("[config]\ndescription = \"{description}\"\n"),
    )
    .expect("sidecar");
    deploy_atomically(Ok("named"), &dir.join("named.wasm"));

    let catalog = testkit::catalog_until(&s.broker.url(), DEVICE, |c| {
        failure(c, "echo.wasm").is_some() && c.methods.iter().any(|m| m.name == "named")
    })
    .await
    .expect("the failure and the method are listed");
    let error = failure(&catalog, "echo.wasm").unwrap_or_default();
    assert!(error.starts_with("invalid sidecar"), "{}", &error[..200]);
    assert!(
        error.len() < 8 * 1024,
        "failure text cut: {} bytes",
        error.len()
    );
    assert!(error.contains("bytes cut]"), "the cut is marked");
    let named = catalog
        .methods
        .iter()
        .find(|m| m.name == "named")
        .expect("named");
    assert!(named.description.starts_with("ddd"));
    assert!(named.description.len() < 8 * 1024);
    assert!(
        named.description.contains("bytes cut]"),
        "the cut is marked"
    );
    assert!(catalog_bytes(&s.broker).await <= edge_proto::message::CATALOG_MAX_BYTES);
    assert!(online(&s.broker).await, "the device is online");
    assert_eq!(call(&s.caller, "named", "9").await, (200, json!(9)));
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_host_does_not_read_its_handler_files_again_and_again() {
    use notify::{EventKind, RecursiveMode, Watcher as _};
    let setup = setup(&["echo"]).await;
    // A reload (the start's load happens before the watch begins): swapped and
    // serving, so whatever reading the swap did is over.
    deploy_atomically(Ok("version-b"), &setup.handlers.path().join("version.wasm"));
    until("version b serves", async || {
        version(&setup.caller).await == "b"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let opened = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&opened);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && matches!(event.kind, EventKind::Access(_))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    })
    .expect("a watcher");
    watcher
        .watch(setup.handlers.path(), RecursiveMode::NonRecursive)
        .expect("watching the handlers folder");
    // Nothing changes in the folder meanwhile: a host that reads its files now reads
    // them because its own last read looked like a change (each sync opens every
    // handler file and digests it: 18 MB for a Python handler).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        opened.load(Ordering::Relaxed),
        0,
        "the host opened or read its handler files while nothing changed"
    );
    setup.host.stop().await.expect("stops");
}
