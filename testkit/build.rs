//! Builds every guest component (the example handlers and the test fixtures) for
//! wasm32-wasip2, so that `cargo test` alone has real components to load.
//!
//! The guests build with a cargo of their own into `target/guests`, a target folder
//! apart from the one the outer build holds locked, by the command `cargo xtask
//! handlers` uses ([`xtask::guests`]).

use std::path::PathBuf;

use xtask::guests;

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

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("testkit sits in the workspace")
        .to_owned();
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
    assert!(
        guests::rustc_has_target(&root, guests::WASM_TARGET),
        "{MISSING_TARGET}"
    );

    let packages: Vec<&str> = GUESTS.iter().map(|(package, _)| *package).collect();
    let status = guests::build_command(&root, &packages)
        .status()
        .expect("cannot run cargo to build the guests");
    assert!(
        status.success(),
        "building the guest components failed (see the compiler output above)"
    );
    let out = guests::out_dir(&root);
    println!("cargo:rustc-env=EDGE_GUESTS_DIR={}", out.display());
}
