//! Finding the `weft` binary that the process tests drive.
//!
//! Integration tests live in `target/<profile>/deps/`, and cargo puts the `weft` binary
//! one level up, in `target/<profile>/`. `cargo test --workspace` builds it together
//! with the tests, but `cargo test -p weft-tests` does not, and would run whatever binary
//! an earlier build left there; so each test process runs
//! `cargo build -p weft-node --bin weft` once (a no-op when it is current).
//! `WEFT_BIN` overrides the lookup entirely.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The path of the `weft` binary, brought up to date first. Panics with the reason
/// when it cannot be found or built.
pub fn weft_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(locate_or_build)
}

fn locate_or_build() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "WEFT_BIN={} does not name a file",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable location {}", exe.display()))
        .to_path_buf();
    let binary = profile_dir.join("weft");
    // Always through cargo, even when the file exists: `cargo test` does not rebuild
    // another package's binary, so an existing one may predate the code under test.
    // Up to date, this is a no-op of about a second.
    build(&profile_dir);
    assert!(
        binary.is_file(),
        "`cargo build -p weft-node --bin weft` succeeded but {} does not exist",
        binary.display()
    );
    binary
}

/// Runs `cargo build -p weft-node --bin weft` for the profile the tests were built with,
/// into the target directory the tests live in.
fn build(profile_dir: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("weft-tests lives inside the workspace");
    let mut command = Command::new(&cargo);
    command
        .current_dir(workspace)
        .args(["build", "-p", "weft-node", "--bin", "weft"]);
    if let Some(target_dir) = profile_dir.parent() {
        command.arg("--target-dir").arg(target_dir);
    }
    match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
    }
    eprintln!("weft-tests: building the weft binary: {command:?}");
    let status = command
        .status()
        .unwrap_or_else(|err| panic!("cannot run {cargo:?} to build the weft binary: {err}"));
    assert!(
        status.success(),
        "building the weft binary failed ({status}); see the cargo output above"
    );
}
