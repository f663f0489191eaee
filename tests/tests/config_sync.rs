//! Config sync through the real binaries: control planes, data-plane nodes, omnictl.

use omni_tests::postgres::TestDatabase;
use omni_tests::process::{ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, omnictl, omnictl_stream};
use omni_tests::wait_for;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const NODE_TOKEN: &str = "node-token-for-tests-0123456789";

/// A loopback port nothing listens on right now, for a control plane that must come back on
/// the same address after a restart.
fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn admin_key(cp: &ControlPlane) -> String {
    std::fs::read_to_string(cp.data_dir.join("admin-api-key")).unwrap().trim().to_owned()
}

async fn start_node(dir: &Path, name: &str, cp: &ControlPlane) -> DataPlane {
    DataPlane::start(
        &dir.join(name),
        &DataPlaneOptions { control_plane: cp.url(), node_token: cp.node_token(), ..Default::default() },
    )
    .await
}

/// Creates a WhatsApp instance and returns the revision of the change.
async fn create(cp: &ControlPlane, key: &str, name: &str) -> i64 {
    omni_tests::create_whatsapp(&cp.url(), key, name).await["instance"]["revision"].as_i64().unwrap()
}

async fn update_timeout(cp: &ControlPlane, key: &str, name: &str, secs: u32) -> i64 {
    let updated =
        omnictl(&cp.url(), key, &["instance", "update", name, "--agent-timeout", &secs.to_string(), "-o", "json"])
            .await
            .json();
    updated["revision"].as_i64().unwrap()
}

async fn node_list(cp: &ControlPlane, key: &str) -> Value {
    omnictl(&cp.url(), key, &["node", "list", "-o", "json"]).await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &ControlPlaneOptions::default()).await;
    let key = admin_key(&cp);
    let nodes = [
        start_node(dir.path(), "n1", &cp).await,
        start_node(dir.path(), "n2", &cp).await,
        start_node(dir.path(), "n3", &cp).await,
    ];
    for node in &nodes {
        let ready = node.wait_for_revision(0).await;
        assert_eq!(ready["instances"], 0);
    }

    let created = create(&cp, &key, "acme-wa").await;
    for node in &nodes {
        assert_eq!(node.wait_for_revision(created).await["instances"], 1);
    }
    omnictl(&cp.url(), &key, &["access", "block", "acme-wa", "+5511*"]).await.ok();
    let updated = update_timeout(&cp, &key, "acme-wa", 30).await;
    assert_eq!(updated, created + 2, "the rule change was one revision too");
    for node in &nodes {
        node.wait_for_revision(updated).await;
    }
    omnictl(&cp.url(), &key, &["instance", "delete", "acme-wa"]).await.ok();
    for node in &nodes {
        assert_eq!(node.wait_for_revision(updated + 1).await["instances"], 0, "deletes propagate");
    }

    let listed = wait_for("every node to report the head revision", Duration::from_secs(10), || async {
        let list = node_list(&cp, &key).await;
        let all = list["nodes"].as_array().unwrap().iter().all(|n| n["applied_revision"] == list["head_revision"]);
        (all && list["nodes"].as_array().unwrap().len() == 3).then_some(list)
    })
    .await;
    assert_eq!(listed["head_revision"], updated + 1);
    for node in listed["nodes"].as_array().unwrap() {
        assert_eq!(node["status"], "connected");
        assert_eq!(node["last_error"], "");
        assert!(node["address"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    let table = omnictl(&cp.url(), &key, &["node", "list"]).await;
    let header: Vec<&str> = table.ok().lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "ADDRESS", "VERSION", "APPLIED", "HEAD", "LAST", "SEEN", "STATUS", "LAST", "ERROR"]);

    // A node that goes away is marked so.
    let [n1, _n2, _n3] = nodes;
    n1.terminate().await;
    wait_for("the stopped node to show as disconnected", Duration::from_secs(10), || async {
        let list = node_list(&cp, &key).await;
        list["nodes"].as_array().unwrap().iter().any(|n| n["status"] == "disconnected").then_some(())
    })
    .await;
}

/// A control plane on a fixed address (to come back on after a restart) with one node that
/// has applied an instance, `acme-wa`.
struct Restartable {
    options: ControlPlaneOptions,
    cp: ControlPlane,
    key: String,
    node: DataPlane,
    revision: i64,
}

impl Restartable {
    async fn start(dir: &Path) -> Restartable {
        let options = ControlPlaneOptions { listen: Some(free_port()), ..Default::default() };
        let cp = ControlPlane::start(&dir.join("cp"), &options).await;
        let key = admin_key(&cp);
        let node = start_node(dir, "n1", &cp).await;
        let revision = create(&cp, &key, "acme-wa").await;
        node.wait_for_revision(revision).await;
        Restartable { options, cp, key, node, revision }
    }
}

/// Starts the control plane again, waits for `node` to reconnect, and has it apply a change.
async fn restart_and_resync(dir: &Path, options: &ControlPlaneOptions, key: &str, node: &DataPlane) -> ControlPlane {
    let cp = ControlPlane::start(&dir.join("cp"), options).await;
    wait_for("the node to reconnect", Duration::from_secs(30), || async {
        (node.ready().await.1["connected"] == true).then_some(())
    })
    .await;
    let updated = update_timeout(&cp, key, "acme-wa", 20).await;
    node.wait_for_revision(updated).await;
    cp
}

/// Nodes serve their last config while the control plane is down, a node restarted meanwhile
/// starts from its cache, and everyone catches up by changes (not a snapshot) afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_ride_out_a_control_plane_outage() {
    let dir = tempfile::tempdir().unwrap();
    let Restartable { options, cp, key, node, revision } = Restartable::start(dir.path()).await;
    let token = cp.node_token();
    let cp_url = cp.url();

    cp.kill().await;
    wait_for("the node to notice the outage", Duration::from_secs(10), || async {
        let (status, body) = node.ready().await;
        (status == 200 && body["connected"] == false).then_some(())
    })
    .await;
    assert_eq!(node.ready().await.1["revision"], revision, "still serving its last config");

    // Restarted while the control plane is down: ready at once, from the encrypted cache.
    node.terminate().await;
    let cache = std::fs::read(dir.path().join("n1/config.cache")).unwrap();
    assert!(!String::from_utf8_lossy(&cache).contains(omni_tests::AGENT_KEY), "the cache is encrypted");
    let node = DataPlane::start(
        &dir.path().join("n1"),
        &DataPlaneOptions { control_plane: cp_url, node_token: token, ..Default::default() },
    )
    .await;
    let (status, body) = node.ready().await;
    assert_eq!((status, body["revision"].as_i64(), body["connected"].as_bool()), (200, Some(revision), Some(false)));

    let _cp = restart_and_resync(dir.path(), &options, &key, &node).await;
    assert_eq!(node.metric("omni_node_config_snapshots_total").await, 0.0, "resumed from its revision");
}

/// SIGTERM stops a control plane cleanly with a node's config stream, a trace tail and a health
/// watch open: each is ended rather than waited for (a graceful stop used to wait for them
/// forever), the tail says why, the watch hears NOT_SERVING first, and the node reconnects once
/// the control plane is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_stops_cleanly_with_streams_open() {
    let dir = tempfile::tempdir().unwrap();
    let Restartable { options, cp, key, node, .. } = Restartable::start(dir.path()).await;
    let mut tail = omnictl_stream(&cp.url(), &key, &["trace", "tail"]);
    tail.next_line(Duration::from_secs(10)).await.expect("the tail's header");
    let channel = tonic::transport::Endpoint::from_shared(cp.url()).unwrap().connect().await.unwrap();
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel).watch(request).await.unwrap().into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(health.message().await.unwrap().map(|m| m.status), Some(serving));

    let log_path = cp.log_path.clone();
    assert!(cp.terminate().await.success(), "SIGTERM is a clean stop");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("cut off"), "the streams ended themselves, none waited out the grace period:\n{log}");
    let (code, stderr) = tail.exit().await;
    assert!(code != 0 && stderr.contains("the control plane is stopping"), "{code} {stderr}");
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(health.message().await.unwrap().map(|m| m.status), Some(not_serving), "the watch is told");
    assert!(matches!(health.message().await, Ok(None)), "and then ends");
    wait_for("the node to notice the stop", Duration::from_secs(10), || async {
        (node.ready().await.1["connected"] == false).then_some(())
    })
    .await;

    restart_and_resync(dir.path(), &options, &key, &node).await;
}

/// A node whose revision was compacted out of the change log gets a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_far_behind_gets_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let options = ControlPlaneOptions { change_log_retention: Some(3), ..Default::default() };
    let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
    let key = admin_key(&cp);
    let node = start_node(dir.path(), "n1", &cp).await;
    let first = create(&cp, &key, "acme-wa").await;
    node.wait_for_revision(first).await;
    node.terminate().await;

    let mut head = first;
    for (i, name) in ["b1", "b2", "b3", "b4", "b5"].into_iter().enumerate() {
        head = create(&cp, &key, name).await;
        assert_eq!(head, first + 1 + i as i64);
    }
    omnictl(&cp.url(), &key, &["instance", "delete", "acme-wa"]).await.ok();
    head += 1;

    let node = start_node(dir.path(), "n1", &cp).await;
    let ready = node.wait_for_revision(head).await;
    assert_eq!(ready["instances"], 5, "the snapshot replaced everything, the deleted instance included");
    assert_eq!(node.metric("omni_node_config_snapshots_total").await, 1.0);
}

/// A revision the node cannot run is NACKed: the node keeps its previous config, the registry
/// shows why, and the next change brings it back with a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_change_leaves_the_node_on_its_previous_revision() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &ControlPlaneOptions::default()).await;
    let key = admin_key(&cp);
    let node = DataPlane::start(
        &dir.path().join("n1"),
        &DataPlaneOptions {
            control_plane: cp.url(),
            node_token: cp.node_token(),
            max_instances: Some(1),
            ..Default::default()
        },
    )
    .await;
    let accepted = create(&cp, &key, "acme-wa").await;
    node.wait_for_revision(accepted).await;

    let refused = create(&cp, &key, "beta-wa").await;
    let listed = wait_for("the NACK to reach the registry", Duration::from_secs(10), || async {
        let list = node_list(&cp, &key).await;
        let node = list["nodes"][0].clone();
        (node["last_error"] != "").then_some(node)
    })
    .await;
    assert_eq!(listed["last_error"], "2 instances exceed this node's limit of 1");
    assert_eq!(listed["applied_revision"], accepted);
    let (status, ready) = node.ready().await;
    assert_eq!((status, ready["revision"].as_i64(), ready["instances"].as_i64()), (200, Some(accepted), Some(1)));
    assert_eq!(node.metric("omni_node_config_nacks_total").await, 1.0);
    assert!(refused > accepted);

    omnictl(&cp.url(), &key, &["instance", "delete", "acme-wa"]).await.ok();
    let ready = node.wait_for_revision(refused + 1).await;
    assert_eq!(ready["instances"], 1);
    wait_for("the error to clear", Duration::from_secs(10), || async {
        (node_list(&cp, &key).await["nodes"][0]["last_error"] == "").then_some(())
    })
    .await;
}

/// Nodes present the node token and nothing else; API keys and the node token do not mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_admin_credentials_do_not_mix() {
    let dir = tempfile::tempdir().unwrap();
    let options = ControlPlaneOptions { node_token: Some(NODE_TOKEN.into()), ..Default::default() };
    let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
    let key = admin_key(&cp);
    assert!(!cp.data_dir.join("node-token").exists(), "a configured token is not written to disk");

    let with_admin_key = DataPlane::start(
        &dir.path().join("n1"),
        &DataPlaneOptions { control_plane: cp.url(), node_token: key.clone(), ..Default::default() },
    )
    .await;
    wait_for("the refusal to be logged", Duration::from_secs(10), || async {
        with_admin_key.log().contains("the config stream needs the node token").then_some(())
    })
    .await;
    let (status, body) = with_admin_key.ready().await;
    assert_eq!((status, &body["ready"]), (503, &Value::Bool(false)));

    let refused = omnictl(&cp.url(), NODE_TOKEN, &["instance", "list"]).await;
    assert!(refused.failed().contains("invalid or revoked API key"));
    assert_eq!(node_list(&cp, &key).await["nodes"], serde_json::json!([]));

    let with_token = DataPlane::start(
        &dir.path().join("n2"),
        &DataPlaneOptions { control_plane: cp.url(), node_token: NODE_TOKEN.into(), ..Default::default() },
    )
    .await;
    with_token.wait_for_revision(0).await;
}

/// A cache that does not open (corrupt, or another node's key) is set aside, not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cache_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &ControlPlaneOptions::default()).await;
    let key = admin_key(&cp);
    let node = start_node(dir.path(), "n1", &cp).await;
    node.wait_for_revision(create(&cp, &key, "acme-wa").await).await;
    node.terminate().await;
    let cache = dir.path().join("n1/config.cache");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cache).unwrap().permissions()) & 0o777,
        0o600
    );
    let token = cp.node_token();
    let url = cp.url();
    cp.kill().await;

    let mut bytes = std::fs::read(&cache).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&cache, bytes).unwrap();
    let node = DataPlane::start(
        &dir.path().join("n1"),
        &DataPlaneOptions { control_plane: url, node_token: token, ..Default::default() },
    )
    .await;
    let (status, body) = node.ready().await;
    assert_eq!((status, &body["ready"]), (503, &Value::Bool(false)), "no config rather than a tampered one");
    assert!(dir.path().join("n1/config.corrupt").exists());
    assert!(node.log().contains("config cache discarded"));
}

/// Standalone mode: one process runs the control plane and a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_mode_runs_an_embedded_node() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let options = ControlPlaneOptions { embedded_http_listen: Some(http.clone()), ..Default::default() };
    let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
    let key = admin_key(&cp);
    let revision = create(&cp, &key, "acme-wa").await;
    let ready = wait_for("the embedded node to apply the change", Duration::from_secs(15), || async {
        let (status, body) = omni_tests::process::http_get(&http, "/ready").await.ok()?;
        let body: Value = serde_json::from_str(&body).ok()?;
        (status == 200 && body["revision"] == revision).then_some(body)
    })
    .await;
    assert_eq!(ready["instances"], 1);
    assert_eq!(node_list(&cp, &key).await["nodes"].as_array().unwrap().len(), 1);
}

/// A standalone hub whose node cannot start (its HTTP port taken) does not run on without it: it
/// exits, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_hub_whose_node_cannot_start_exits() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = taken.local_addr().unwrap().to_string();
    let options = ControlPlaneOptions { embedded_http_listen: Some(http.clone()), ..Default::default() };
    // The gRPC port is announced before the node starts; the exit may come before or after.
    let log = match ControlPlane::try_start(&dir.path().join("cp"), &options).await {
        Err(log) => log,
        Ok(cp) => {
            let (status, log) = cp.exit_unasked().await;
            assert!(!status.success(), "{status}: {log}");
            log
        }
    };
    assert!(log.contains(&format!("embedded data plane: cannot listen on {http}")), "{log}");
}

/// Two control planes on one Postgres: a change made through either reaches nodes connected
/// to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_on_postgres_feed_each_others_nodes() {
    let Some(db) = TestDatabase::create().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let options = ControlPlaneOptions {
        database_url: Some(db.url.clone()),
        master_key: Some(MASTER_KEY.into()),
        bootstrap_api_key: Some("omni_sync_0123456789abcdef0123456789abcdef".into()),
        node_token: Some(NODE_TOKEN.into()),
        ..Default::default()
    };
    let key = options.bootstrap_api_key.clone().unwrap();
    let a = ControlPlane::start(&dir.path().join("a"), &options).await;
    let b = ControlPlane::start(&dir.path().join("b"), &options).await;
    let node_options = |cp: &ControlPlane| DataPlaneOptions {
        control_plane: cp.url(),
        node_token: NODE_TOKEN.into(),
        ..Default::default()
    };
    let on_a = DataPlane::start(&dir.path().join("na"), &node_options(&a)).await;
    let on_b = DataPlane::start(&dir.path().join("nb"), &node_options(&b)).await;
    on_a.wait_for_revision(0).await;
    on_b.wait_for_revision(0).await;

    let through_a = create(&a, &key, "acme-wa").await;
    on_b.wait_for_revision(through_a).await;
    on_a.wait_for_revision(through_a).await;
    let through_b = update_timeout(&b, &key, "acme-wa", 15).await;
    on_a.wait_for_revision(through_b).await;
    on_b.wait_for_revision(through_b).await;
    let nodes = node_list(&a, &key).await;
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 2, "one registry for both control planes");
}
