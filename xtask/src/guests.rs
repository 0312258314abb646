//! The guest components (the example handlers and the test fixtures): the target they
//! build for, and the one cargo command that builds them, for `cargo xtask` and
//! testkit's build script alike.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target every guest is built for.
pub const WASM_TARGET: &str = "wasm32-wasip2";

/// Where guests build: `target/guests`, a target folder of their own, apart from the
/// one an outer build (testkit's build script runs inside one) holds locked.
pub fn target_dir(root: &Path) -> PathBuf {
    root.join("target").join("guests")
}

/// Where the built components land: `NAME.wasm`, the package name with `_` for `-`.
pub fn out_dir(root: &Path) -> PathBuf {
    target_dir(root).join(WASM_TARGET).join("guest")
}

/// `cargo build` of `packages` for [`WASM_TARGET`] in the `guest` profile, into
/// [`target_dir`]. What an outer build set for itself (flags, wrappers, a target
/// folder) is removed: it is not meant for the guests.
pub fn build_command(root: &Path, packages: &[&str]) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(root)
        .args(["build", "--profile", "guest", "--target", WASM_TARGET])
        .arg("--target-dir")
        .arg(target_dir(root));
    for package in packages {
        command.args(["-p", package]);
    }
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
    command
}

/// Whether the rustc that builds in `root` has the standard library of `target`
/// ([`WASM_TARGET`] for the guests): its `target-libdir` holds a `libcore`. Without it
/// a guest build fails with "can't find crate for `core`", which does not say what to do.
pub fn rustc_has_target(root: &Path, target: &str) -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc)
        .current_dir(root)
        .args(["--print", "target-libdir", "--target", target])
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

#[cfg(test)]
mod tests {
    use super::rustc_has_target;

    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    fn rustc_finds_the_standard_library_of_a_target_it_has_and_not_of_others() {
        let root = crate::root();
        assert!(rustc_has_target(&root, "x86_64-unknown-linux-gnu"));
        assert!(!rustc_has_target(&root, "sparc64-unknown-linux-gnu"));
        assert!(!rustc_has_target(&root, "no-such-target"));
    }
}
