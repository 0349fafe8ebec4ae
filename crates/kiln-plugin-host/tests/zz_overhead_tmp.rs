//! Temporary: per-command overhead.
use std::path::Path;
use std::time::{Duration, Instant};
use kiln_plugin_host::sandbox::testing::{Options, Sandbox};

#[tokio::test]
async fn overhead() {
    let dir = tempfile::tempdir().unwrap();
    for (name, options) in [
        ("full", Options::default()),
        ("none", Options { pid_namespace: false, network_namespace: false, cgroups: false, landlock: false, ..Options::default() }),
    ] {
        let sandbox = Sandbox::new(options);
        let started = Instant::now();
        for _ in 0..50 {
            let out = sandbox.run(dir.path(), Path::new("/bin/true"), &[], Duration::from_secs(10), 1024).await.unwrap();
            assert_eq!(out.exit_code, Some(0));
        }
        eprintln!("{name}: {:?} per command", started.elapsed() / 50);
    }
}
