//! `cargo xtask new NAME --lang rust|python|js` makes a folder that builds with its one
//! command into a component a real host serves: each language is scaffolded into a
//! temporary folder outside the workspace, built with the command its README gives,
//! loaded on a host (Mosquitto, in-process edge-host) and called.
//!
//! The Python and JavaScript builds use the toolchains `cargo xtask test` installs
//! under target/ (found through the scaffolds' own hooks: `COMPONENTIZE_PY`, and a
//! `node_modules` link); without them these tests fail, saying how to install them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use testkit::{HandlerDir, Mosquitto, TestHost, WireCaller, host_config};
use xtask::lang::{Lang, Toolchain};
use xtask::scaffold::{self, Language};

const DEVICE: &str = "scaffold-device";

/// How long a host may take to start when it compiles a 12-18 MB component (seconds
/// alone, minutes on a machine busy with other builds).
const COMPILE_TIME: Duration = Duration::from_secs(300);

/// Hosts start one at a time, so that a 12-18 MB component compiles alone.
static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Scaffolds `name` in `lang` into a temporary folder, runs its build command there,
/// serves the component it wrote (with its sidecar) on a host, and calls its method.
async fn scaffold_builds_and_serves(name: &str, lang: Language) {
    testkit::init_logging();
    let root = xtask::root();
    let outside = tempfile::tempdir().expect("a folder outside the workspace");
    let made = scaffold::new(name, lang, &outside.path().join(name)).expect("scaffold");
    assert!(
        made.dir.join("wit/handler.wit").is_file(),
        "the WIT is copied in"
    );
    assert!(made.dir.join("README.md").is_file());
    let error = scaffold::new(name, lang, &made.dir).expect_err("never overwrites");
    assert!(error.to_string().contains("already exists"), "{error}");

    let (program, args) = made.build.split_first().expect("a command");
    let mut build = Command::new(program);
    build.args(args).current_dir(&made.dir);
    // What `cargo test` set for itself must not leak into the scaffold's own build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_MANIFEST_DIR",
    ] {
        build.env_remove(var);
    }
    match lang {
        // Its own target folder, kept across runs so that wit-bindgen builds once.
        Language::Rust => {
            build.env("CARGO_TARGET_DIR", root.join("target/scaffold-rust"));
        }
        Language::Python => {
            let toolchain =
                Toolchain::find(&root, Lang::Python).unwrap_or_else(|e| panic!("{e:#}"));
            build.env("COMPONENTIZE_PY", toolchain.componentize_py());
        }
        Language::Js => {
            let toolchain = Toolchain::find(&root, Lang::Js).unwrap_or_else(|e| panic!("{e:#}"));
            std::os::unix::fs::symlink(
                toolchain.dir().join("node_modules"),
                made.dir.join("node_modules"),
            )
            .expect("linking node_modules");
        }
    }
    let output = build.output().expect("the build command runs");
    assert!(
        output.status.success(),
        "`{}` failed in {}:\n{}{}",
        made.build.join(" "),
        made.dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let wasm = match lang {
        Language::Rust => root
            .join("target/scaffold-rust/wasm32-wasip2/release")
            .join(made.wasm.file_name().expect("a file name")),
        _ => made.dir.join(&made.wasm),
    };

    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&[]).expect("handlers");
    copy(&wasm, &handlers.path().join(format!("{name}.wasm")));
    std::fs::write(
        handlers.path().join(format!("{name}.toml")),
        std::fs::read_to_string(made.dir.join(format!("{name}.toml")))
            .expect("the scaffold's sidecar")
            .replace("greeting = \"Hello\"", "greeting = \"Hi\""),
    )
    .expect("sidecar");
    let mut config = host_config(DEVICE, handlers.path(), broker.url());
    config.cache = true;
    config.cache_dir = Some(testkit::lang::compile_cache());
    let host = {
        let _one_at_a_time = STARTING.lock().await;
        TestHost::start_within(config, COMPILE_TIME)
            .await
            .expect("host starts")
    };
    let mut client = WireCaller::connect(&broker.url(), DEVICE)
        .await
        .expect("client");
    let (status, body) = client
        .call(name, br#"{"hello":1}"#)
        .await
        .expect("answered");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], format!("Hi from {DEVICE}"), "{body}");
    assert_eq!(body["received"], json!({"hello": 1}), "{body}");
    host.stop().await.expect("clean stop");
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_scaffold_builds_with_cargo_and_serves_its_method() {
    scaffold_builds_and_serves("hello-rust", Language::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_scaffold_builds_with_build_sh_and_serves_its_method() {
    scaffold_builds_and_serves("hello-python", Language::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_scaffold_builds_with_npm_run_build_and_serves_its_method() {
    scaffold_builds_and_serves("hello-js", Language::Js).await;
}
