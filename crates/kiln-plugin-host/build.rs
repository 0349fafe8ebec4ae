//! Builds the executor plugins in `plugins/` (their own cargo workspace) for
//! wasm32-wasip2, so that the crate can embed them with `include_bytes!`.
//!
//! The nested cargo gets its own target directory under OUT_DIR: sharing the
//! outer build's directory would wait forever on the lock the outer cargo
//! holds. The variables cargo sets for build scripts are removed from its
//! environment, because the nested cargo would otherwise read them as its own
//! configuration (the outer flags, wrappers such as clippy-driver, jobserver).

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Plugins built into the runner: (file name of its .wasm, the variable
/// through which the crate learns the file's path).
const BUILT_IN: &[(&str, &str)] =
    &[("python_unittest.wasm", "KILN_PLUGIN_PYTHON_UNITTEST"), ("tap.wasm", "KILN_PLUGIN_TAP")];

const TARGET: &str = "wasm32-wasip2";

fn main() {
    if let Err(message) = build() {
        // `cargo::error` fails the build with this one line as the message.
        println!("cargo::error={message}");
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let plugins = manifest_dir.join("../../plugins");
    watch(&plugins)?;

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    check_target_installed(&rustc)?;

    let target_dir = out_dir.join("plugins-target");
    let mut command = Command::new(&cargo);
    command
        .arg("build")
        .arg("--release")
        .arg("--locked")
        .args(["--target", TARGET])
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (name, _) in env::vars_os() {
        if leaks_into_nested_cargo(&name.to_string_lossy()) {
            command.env_remove(&name);
        }
    }
    let output = command.output().map_err(|e| format!("could not run {}: {e}", Path::new(&cargo).display()))?;
    if !output.status.success() {
        // Cargo shows a failing build script's stderr: pass the nested
        // build's diagnostics through.
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        return Err(format!(
            "building the executor plugins in {} for {TARGET} failed ({}); see the output above",
            plugins.display(),
            output.status
        ));
    }

    let wasm_dir = target_dir.join(TARGET).join("release");
    for (file, variable) in BUILT_IN {
        let path = wasm_dir.join(file);
        if !path.is_file() {
            return Err(format!("the plugins build did not produce {}", path.display()));
        }
        println!("cargo::rustc-env={variable}={}", path.display());
    }
    // Tests load the plugins that are not built in (e.g. the misbehaving one
    // used to test the host's limits) from here.
    println!("cargo::rustc-env=KILN_PLUGINS_WASM_DIR={}", wasm_dir.display());
    Ok(())
}

/// Reruns this script when a plugin's sources, a manifest, the lock file or
/// the WIT contract change. Each member directory is named rather than
/// `plugins/` itself, so that `plugins/target` (from native unit tests) does
/// not trigger rebuilds.
fn watch(plugins: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(plugins).map_err(|e| format!("could not read {}: {e}", plugins.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("could not read {}: {e}", plugins.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "target" || name.starts_with('.') {
            continue;
        }
        println!("cargo::rerun-if-changed={}", entry.path().display());
    }
    Ok(())
}

/// Fails with the one fix that is needed when the WebAssembly target's
/// standard library is missing, instead of a page of compiler errors.
fn check_target_installed(rustc: &OsString) -> Result<(), String> {
    let output = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("could not run {}: {e}", Path::new(rustc).display()))?;
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || sysroot.is_empty() {
        return Err(format!("`{} --print sysroot` failed", Path::new(rustc).display()));
    }
    if !Path::new(&sysroot).join("lib/rustlib").join(TARGET).is_dir() {
        return Err(format!("the {TARGET} target is not installed: run `rustup target add {TARGET}`"));
    }
    Ok(())
}

/// Variables that cargo sets for build scripts (or that configure cargo) and
/// that must not reach the nested cargo.
fn leaks_into_nested_cargo(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_TARGET_DIR",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_CRATE_NAME",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "NUM_JOBS",
        "OPT_LEVEL",
        "DEBUG",
        "PROFILE",
    ];
    const PREFIXES: &[&str] = &["CARGO_FEATURE_", "CARGO_CFG_", "CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_PROFILE_"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}
