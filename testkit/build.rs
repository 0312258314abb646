//! Builds every guest component (the example handlers and the test fixtures) for
//! wasm32-wasip2, so that `cargo test` alone has real components to load.
//!
//! The guests build with a cargo of their own into `target/guests`, a target folder
//! apart from the one the outer build holds locked.

use std::path::PathBuf;
use std::process::Command;

/// Every guest package, with the folder it lives in.
const GUESTS: &[(&str, &str)] = &[
    ("device-method", "handlers/device-method"),
    ("echo", "handlers/echo"),
    ("device-info", "handlers/device-info"),
    ("misbehave", "testkit/fixtures/misbehave"),
    ("version-a", "testkit/fixtures/version-a"),
    ("version-b", "testkit/fixtures/version-b"),
    ("wrong-world", "testkit/fixtures/wrong-world"),
    ("probe", "testkit/fixtures/probe"),
    ("named", "testkit/fixtures/named"),
];

/// What to do when the guests' target is missing; `cargo xtask test` does it itself.
const MISSING_TARGET: &str = "the wasm32-wasip2 target is not installed for this toolchain, and the \
    tests' guest components are built for it: run `rustup target add wasm32-wasip2` (or run the \
    tests with `cargo xtask test`, which adds it), then build again";

/// Whether the compiler cargo uses has the standard library of wasm32-wasip2.
fn has_wasm_target() -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
        .output()
    else {
        return false;
    };
    let libdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    out.status.success()
        && std::fs::read_dir(libdir).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|entry| entry.file_name().to_string_lossy().starts_with("libcore-"))
        })
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("testkit sits in the workspace")
        .to_owned();
    let target_dir = root.join("target").join("guests");
    for (_, dir) in GUESTS {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );

    // Without the target the build below fails with "can't find crate for `core`",
    // which does not say what to do.
    assert!(has_wasm_target(), "{MISSING_TARGET}");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args([
            "build",
            "--profile",
            "guest",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir);
    for (package, _) in GUESTS {
        command.args(["-p", package]);
    }
    // What the outer build set for itself must not leak into the guests' build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .expect("cannot run cargo to build the guests");
    assert!(
        status.success(),
        "building the guest components failed (see the compiler output above)"
    );
    let out = target_dir.join("wasm32-wasip2").join("guest");
    println!("cargo:rustc-env=EDGE_GUESTS_DIR={}", out.display());
}
