//! The plugin author's path end to end, as plugins/TUTORIAL.md walks it:
//! `kiln plugin new` makes a crate that builds for wasm32-wasip2, passes
//! `kiln plugin check` as generated, and runs from a runner's `--plugins`
//! directory; and `kiln plugin check` says why a file is not a plugin.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_proto::Outcome;

use crate::harness::{Cluster, Repo, kiln_output, outcomes};

/// Where scaffolded plugins are built: one target directory shared by every
/// run of these tests, so only the first builds the dependencies.
fn scaffold_target() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-scaffold")
}

/// `cargo build --release --target wasm32-wasip2` for the crate in `dir`;
/// returns the built `.wasm`.
fn build_plugin(dir: &Path, crate_file: &str) -> PathBuf {
    let mut cargo = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cargo
        .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(scaffold_target());
    // Flags meant for the tests' own build must not reach the wasm build.
    for variable in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET", "RUSTC_WRAPPER", "CARGO_TARGET_DIR"]
    {
        cargo.env_remove(variable);
    }
    let out = cargo.output().expect("run cargo");
    assert!(out.status.success(), "building the new plugin failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let wasm = scaffold_target().join(format!("wasm32-wasip2/release/{crate_file}.wasm"));
    assert!(wasm.is_file(), "{} was not built", wasm.display());
    wasm
}

/// `wasm` with every `kiln:executor` interface name moved to `version`
/// (same length as 0.2.1, so the binary stays valid).
fn with_contract_version(wasm: &[u8], version: &str) -> Vec<u8> {
    let mut bytes = wasm.to_vec();
    for interface in ["executor", "host", "types"] {
        let from = format!("kiln:executor/{interface}@0.2.1");
        let to = format!("kiln:executor/{interface}@{version}");
        while let Some(at) = bytes.windows(from.len()).position(|w| w == from.as_bytes()) {
            bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
        }
    }
    bytes
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_new_plugin_builds_passes_check_and_runs_from_the_plugins_directory() {
    let mut cluster = Cluster::start();
    let crate_dir = cluster.dir.path().join("automake");
    let out = kiln_output(&["plugin", "new", "automake", "--path", &crate_dir.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cargo build --release --target wasm32-wasip2"));
    // A second `new` into the same place refuses rather than overwrite.
    let again = kiln_output(&["plugin", "new", "automake", "--path", &crate_dir.to_string_lossy()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));

    let wasm = build_plugin(&crate_dir, "automake");
    let check = kiln_output(&["plugin", "check", &wasm.to_string_lossy()]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    let stdout = text(&check.stdout);
    for line in [
        "  name      automake\n",
        "  version   0.1.0\n",
        "  contract  kiln:executor@0.2.1 (this kiln implements 0.2.1)\n",
        "  claims    tests/automake/*.test\n",
        "  programs  sh (a runner grants those it allows with --allow-program)\n",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    assert!(stdout.contains("kiln:executor/{types,host}@0.2.1"), "{stdout}");

    // The same plugin built against another contract version is refused,
    // naming both versions.
    let newer = cluster.dir.path().join("newer.wasm");
    std::fs::write(&newer, with_contract_version(&std::fs::read(&wasm).unwrap(), "1.0.0")).unwrap();
    let refused = kiln_output(&["plugin", "check", &newer.to_string_lossy()]);
    assert_eq!(refused.status.code(), Some(2));
    let err = text(&refused.stderr);
    assert!(err.contains("kiln:executor@1.0.0") && err.contains("kiln:executor@0.2.1"), "{err}");

    // A runner loads it from --plugins DIR (after the built-ins).
    let plugins = cluster.dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(&wasm, plugins.join("automake.wasm")).unwrap();
    std::fs::write(plugins.join("README.txt"), "not a plugin: ignored").unwrap();
    let repo = Repo::new(
        cluster.dir.path(),
        &[
            ("tests/automake/pass.test", "exit 0\n"),
            ("tests/automake/skip.test", "echo 'no network' >&2\nexit 77\n"),
            ("tests/automake/fail.test", "echo 'expected 4, got 5' >&2\nexit 1\n"),
            ("tests/automake/hard.test", "exit 99\n"),
            ("tests/automake/notes.txt", "not claimed\n"),
        ],
    );
    let commit = repo.commit("automake tests");
    cluster.issue("runner", "runner");
    let work = cluster.dir.path().join("runner-work");
    let flags: Vec<&std::ffi::OsStr> = vec![
        "--work".as_ref(),
        work.as_os_str(),
        "--plugins".as_ref(),
        plugins.as_os_str(),
        "--allow-program".as_ref(),
        "sh".as_ref(),
    ];
    cluster.spawn("runner", "runner", &flags);
    cluster.observer("observer", &repo.path, "300ms");
    let report = cluster.wait_for(&commit);
    assert_eq!(
        outcomes(&report).into_iter().collect::<Vec<_>>(),
        [
            ("tests/automake/fail.test".to_owned(), Outcome::Fail),
            ("tests/automake/hard.test".to_owned(), Outcome::Error),
            ("tests/automake/pass.test".to_owned(), Outcome::Pass),
            ("tests/automake/skip.test".to_owned(), Outcome::Skip),
        ],
        "{}",
        cluster.logs()
    );
    let skip = report.tests.iter().find(|t| t.id == "tests/automake/skip.test").unwrap();
    assert_eq!(skip.message, "no network");
}

#[test]
fn plugin_check_says_why_a_file_is_not_a_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 3] = [
        (
            "core.wasm",
            b"\0asm\x01\0\0\0",
            "it is a core WebAssembly module, not a component: build it for the wasm32-wasip2 target",
        ),
        ("script.wasm", b"#!/bin/sh\n", "it is not a WebAssembly component"),
        (
            "empty.wasm",
            b"\0asm\x0d\0\x01\0",
            "it is not a Kiln executor plugin (it does not export kiln:executor/executor)",
        ),
    ];
    for (name, bytes, reason) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = kiln_output(&["plugin", "check", &path.to_string_lossy()]);
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = text(&out.stderr);
        assert!(err.contains(&*path.to_string_lossy()) && err.contains(reason), "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = kiln_output(&["plugin", "check", "/definitely/not/here.wasm"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/definitely/not/here.wasm"));
}
