//! The send API (`MessageService`, `omnictl send`): messages the hub initiates, sent by a node
//! through the instance's Evolution server with its key, split like replies, traced, scoped.

use omni_tests::fakes::{FakeAgent, FakeEvolution};
use omni_tests::process::{ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, Outcome, omnictl};
use omni_tests::wait_for;
use serde_json::Value;
use std::time::Duration;

const ADMIN_KEY: &str = "omni_sender_0123456789abcdef0123456789abcd";

struct Hub {
    cp: ControlPlane,
    node: DataPlane,
    evolution: FakeEvolution,
    dir: tempfile::TempDir,
}

/// The instance every test sends through: returns the revision that created it.
async fn create_instance(cp: &ControlPlane, agent: &FakeAgent, evolution: &FakeEvolution) -> i64 {
    evolution.instance("acme", "acme-evolution-key-0123");
    #[rustfmt::skip]
    let created = omnictl(&cp.url(), ADMIN_KEY, &[
        "instance", "create", "acme-wa", "--channel", "whatsapp", "--agent-url", &agent.url,
        "--evolution-url", &evolution.url, "--evolution-key", "acme-evolution-key-0123",
        "--evolution-instance", "acme", "--split-limit", "40", "-o", "json",
    ]).await.json();
    created["instance"]["revision"].as_i64().unwrap()
}

impl Hub {
    async fn start() -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let options = ControlPlaneOptions { bootstrap_api_key: Some(ADMIN_KEY.into()), ..Default::default() };
        let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
        let node = DataPlane::start_for(&cp, &dir.path().join("node"), DataPlaneOptions::default()).await;
        let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
        node.wait_for_revision(create_instance(&cp, &agent, &evolution).await).await;
        Hub { cp, node, evolution, dir }
    }

    async fn ctl(&self, args: &[&str]) -> Outcome {
        omnictl(&self.cp.url(), ADMIN_KEY, args).await
    }

    /// The trace once it is finished.
    async fn trace(&self, id: &str) -> Value {
        wait_for("the send's trace", Duration::from_secs(10), || async {
            let trace = self.ctl(&["trace", "get", id, "--payloads", "-o", "json"]).await;
            let trace: Value = serde_json::from_str(&trace.stdout).ok()?;
            matches!(trace["status"].as_str(), Some("completed" | "failed")).then_some(trace)
        })
        .await
    }
}

fn stages(trace: &Value) -> Vec<&str> {
    trace["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_and_files_are_sent_split_and_traced() {
    let hub = Hub::start().await;
    let text = "Your order shipped.\n\nIt arrives on Monday between 9 and 12.";
    let sent =
        hub.ctl(&["send", "text", "acme-wa", "--to", "5511999999999", "--text", text, "-o", "json"]).await.json();
    assert_eq!(sent["message_ids"].as_array().unwrap().len(), 2, "{sent}");
    let texts = hub.evolution.texts();
    let chunks: Vec<(&str, &str)> =
        texts.iter().map(|r| (r.body["number"].as_str().unwrap(), r.body["text"].as_str().unwrap())).collect();
    assert_eq!(
        chunks,
        [("5511999999999", "Your order shipped."), ("5511999999999", "It arrives on Monday between 9 and 12.")]
    );
    assert!(
        texts.iter().all(|r| r.path == "/message/sendText/acme" && r.headers["apikey"] == "acme-evolution-key-0123")
    );

    let trace = hub.trace(sent["trace_id"].as_str().unwrap()).await;
    assert_eq!((trace["status"].as_str(), trace["message_type"].as_str()), (Some("completed"), Some("outbound_text")));
    assert_eq!(stages(&trace), ["send_request", "send_chunk", "send_chunk", "completed"]);
    let users = hub.ctl(&["user", "list", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(users, Value::Array(vec![]), "a message the hub sent makes no user");

    // A file from disk goes as base64 with its name and type; the trace does not carry it.
    let file = hub.dir.path().join("invoice.pdf");
    std::fs::write(&file, b"%PDF-1.4 an invoice").unwrap();
    #[rustfmt::skip]
    let sent = hub.ctl(&[
        "send", "media", "acme-wa", "--to", "5511999999999", "--file", file.to_str().unwrap(), "--caption", "Invoice", "-o", "json",
    ]).await.json();
    let media = &hub.evolution.media()[0];
    assert_eq!(media.path, "/message/sendMedia/acme");
    assert_eq!(
        (media.body["mediatype"].as_str(), media.body["mimetype"].as_str(), media.body["fileName"].as_str()),
        (Some("document"), Some("application/pdf"), Some("invoice.pdf"))
    );
    assert_eq!(media.body["media"], "JVBERi0xLjQgYW4gaW52b2ljZQ==");
    assert_eq!(media.body["caption"], "Invoice");
    let trace = hub.trace(sent["trace_id"].as_str().unwrap()).await;
    assert_eq!(trace["status"], "completed");
    assert!(!trace.to_string().contains("JVBERi0x"), "the file is not in the trace");
    let table = hub
        .ctl(&["send", "media", "acme-wa", "--to", "5511999999999", "--url", "https://files.example/photo.jpg"])
        .await;
    assert!(table.ok().starts_with("sent 1 message(s)"), "{table:?}");
    assert_eq!(hub.evolution.media()[1].body["mediatype"], "image");
    assert_eq!(hub.evolution.media()[1].body["media"], "https://files.example/photo.jpg");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_scoped_and_undeliverable_sends_say_why() {
    let hub = Hub::start().await;
    // Evolution refuses a number that is not on WhatsApp: the caller hears it, the trace says so.
    let refused = hub.ctl(&["send", "text", "acme-wa", "--to", "0000111", "--text", "hello"]).await;
    assert!(refused.failed().contains("400") && refused.stderr.contains("exists"), "{refused:?}");
    let failed = wait_for("the failed send's trace", Duration::from_secs(10), || async {
        let traces = hub.ctl(&["trace", "list", "--status", "failed", "-o", "json"]).await.json();
        traces.as_array().unwrap().first().cloned()
    })
    .await;
    assert_eq!((failed["error_stage"].as_str(), failed["sender"].as_str()), (Some("send_chunk"), Some("0000111")));

    // Other tenants, bad requests, channels without a sender yet.
    let key = hub.ctl(&["apikey", "create", "--instances", "beta-*", "-o", "json"]).await.json();
    let scoped = omnictl(
        &hub.cp.url(),
        key["key"].as_str().unwrap(),
        &["send", "text", "acme-wa", "--to", "5511", "--text", "x"],
    )
    .await;
    assert!(scoped.failed().contains("not found"), "{scoped:?}");
    let empty = hub.ctl(&["send", "text", "acme-wa", "--to", "5511", "--text", " "]).await;
    assert!(empty.failed().contains("text is required"), "{empty:?}");
    let neither = hub.ctl(&["send", "media", "acme-wa", "--to", "5511"]).await;
    assert_eq!(neither.code, 2, "{neither:?}");
    assert!(neither.stderr.contains("--file"), "{neither:?}");
    assert!(hub.evolution.texts().is_empty(), "nothing was sent");

    // With no node connected, nothing can be sent, and the caller is told so.
    let Hub { node, .. } = &hub;
    let pid = node.pid().unwrap();
    let _ = std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status();
    let down = wait_for("sends to be refused without a node", Duration::from_secs(20), || async {
        let out = hub.ctl(&["send", "text", "acme-wa", "--to", "5511999999999", "--text", "hi"]).await;
        out.stderr.contains("no data-plane node").then_some(out)
    })
    .await;
    assert_ne!(down.code, 0);
}

/// Holds Evolution's answers to sends for `hold`, sends a text, and stops the control plane
/// (SIGTERM, which must be a clean stop) once the send has reached Evolution: what omnictl said,
/// and the control plane's log.
async fn stop_with_a_send_under_way(cp: ControlPlane, evolution: &FakeEvolution, hold: Duration) -> (Outcome, String) {
    evolution.delay_sends(hold);
    let url = cp.url();
    let send = tokio::spawn(async move {
        omnictl(&url, ADMIN_KEY, &["send", "text", "acme-wa", "--to", "5511999999999", "--text", "Hi", "-o", "json"])
            .await
    });
    wait_for("the send to reach Evolution", Duration::from_secs(10), || async {
        (evolution.sends_arrived() == 1).then_some(())
    })
    .await;
    let log_path = cp.log_path.clone();
    assert!(cp.terminate().await.success(), "SIGTERM is a clean stop");
    (send.await.unwrap(), std::fs::read_to_string(log_path).unwrap())
}

/// A send under way when the control plane is stopped is answered, not cut off: the node's
/// config stream stays open until the node reports the outcome, and only then does the control
/// plane exit (cleanly, with nothing cut off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_under_way_at_a_stop_is_answered() {
    let Hub { cp, node: _node, evolution, dir: _dir } = Hub::start().await;
    let (sent, log) = stop_with_a_send_under_way(cp, &evolution, Duration::from_secs(1)).await;
    assert_eq!(sent.json()["message_ids"].as_array().map(Vec::len), Some(1), "{sent:?}");
    assert_eq!(evolution.texts().len(), 1);
    assert!(!log.contains("cut off") && !log.contains("before the node reported"), "{log}");
}

/// A send the node has not reported when the control plane's drain runs out (8 s) is answered
/// as of unknown outcome (it may have gone out), not cut off with the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_unreported_by_the_end_of_a_stop_is_of_unknown_outcome() {
    let Hub { cp, node: _node, evolution, dir: _dir } = Hub::start().await;
    let (refused, log) = stop_with_a_send_under_way(cp, &evolution, Duration::from_secs(60)).await;
    let why = "the control plane stopped before the node reported the outcome; the message may have been sent";
    assert_eq!(refused.failed(), format!("error: {why}"), "{refused:?}");
    assert!(!log.contains("cut off"), "answered within the grace period:\n{log}");
}

/// Standalone (the node embedded in the control plane's process): the node stops after the
/// control plane's server, so a send under way at SIGTERM is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_hub_answers_a_send_under_way_at_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", omni_tests::free_port());
    let options = ControlPlaneOptions {
        bootstrap_api_key: Some(ADMIN_KEY.into()),
        embedded_http_listen: Some(http.clone()),
        ..Default::default()
    };
    let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    let revision = create_instance(&cp, &agent, &evolution).await;
    wait_for("the embedded node to apply the instance", Duration::from_secs(15), || async {
        let (status, body) = omni_tests::process::http_get(&http, "/ready").await.ok()?;
        let body: Value = serde_json::from_str(&body).ok()?;
        (status == 200 && body["revision"] == revision).then_some(())
    })
    .await;
    // Longer than the node's own stop takes (it waits up to 2 s to hand back gateway leases).
    let (sent, log) = stop_with_a_send_under_way(cp, &evolution, Duration::from_secs(3)).await;
    assert_eq!(sent.json()["message_ids"].as_array().map(Vec::len), Some(1), "{sent:?}");
    assert!(!log.contains("cut off") && !log.contains("before the node reported"), "{log}");
}
