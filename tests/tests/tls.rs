//! The gRPC port over TLS: omnictl and nodes verify the control plane's certificate.

use omni_tests::process::{ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, omnictl};
use std::path::{Path, PathBuf};

/// A self-signed certificate for "localhost": (certificate, key) PEM files.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.join("cp.pem"), dir.join("cp.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_nodes_verify_the_control_plane_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let options = ControlPlaneOptions { tls: Some((cert.clone(), key)), ..Default::default() };
    let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
    let admin = std::fs::read_to_string(cp.data_dir.join("admin-api-key")).unwrap().trim().to_owned();
    let port = cp.addr.rsplit(':').next().unwrap().to_owned();
    let https = format!("https://localhost:{port}");
    let ca = cert.to_str().unwrap();

    let created = omnictl(
        &https,
        &admin,
        &[
            "--ca-cert",
            ca,
            "instance",
            "create",
            "acme",
            "--channel",
            "discord",
            "--agent-url",
            "http://127.0.0.1:9000",
            "--discord-token",
            "discord-token-0123456789",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    let revision = created["instance"]["revision"].as_i64().unwrap();

    // Without trusting the certificate, or in plaintext, nothing gets through.
    let untrusted = omnictl(&https, &admin, &["instance", "list"]).await;
    assert!(
        untrusted.failed().starts_with(&format!("error: cannot reach the control plane at {https}")),
        "{untrusted:?}"
    );
    let plaintext = omnictl(&format!("http://localhost:{port}"), &admin, &["instance", "list"]).await;
    assert_ne!(plaintext.code, 0);

    let node = DataPlane::start(
        &dir.path().join("n1"),
        &DataPlaneOptions {
            control_plane: https,
            node_token: cp.node_token(),
            ca_cert: Some(cert),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(node.wait_for_revision(revision).await["instances"], 1);
}

/// Standalone mode with TLS: the embedded node trusts the control plane's own certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_mode_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let options =
        ControlPlaneOptions { tls: Some((cert, key)), embedded_http_listen: Some(http.clone()), ..Default::default() };
    let _cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
    omni_tests::wait_for("the embedded node to be ready", std::time::Duration::from_secs(15), || async {
        let (status, _) = omni_tests::process::http_get(&http, "/ready").await.ok()?;
        (status == 200).then_some(())
    })
    .await;
}
