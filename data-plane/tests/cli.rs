//! omni-data-plane's start-up checks, before any control plane is involved.

use std::process::Command;

#[test]
fn refuses_to_start_without_a_node_token() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_omni-data-plane"))
        .args(["--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("node"))
        .arg("--control-plane-data-dir")
        .arg(dir.path().join("no-control-plane-here"))
        .env_remove("OMNI_NODE_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no node token: pass --node-token (OMNI_NODE_TOKEN)"), "{stderr}");
}

#[test]
fn a_node_token_may_start_with_a_hyphen() {
    let dir = tempfile::tempdir().unwrap();
    // Token-shaped values reach the program as values, not as unknown flags; the node then
    // stops at the next check (an invalid control-plane URL), past argument parsing.
    let output = Command::new(env!("CARGO_BIN_EXE_omni-data-plane"))
        .args(["--http-listen", "127.0.0.1:0", "--node-token", "-Jx_token-value", "--control-plane", "not a url"])
        .arg("--data-dir")
        .arg(dir.path().join("node"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
    assert!(stderr.contains("control plane"), "{stderr}");
}
