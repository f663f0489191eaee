//! WhatsApp instance lifecycle through Evolution, with the real binaries against a fake Evolution
//! server that enforces the `apikey` header and the nested webhook body: provisioning,
//! connection status, QR codes and deprovisioning.

use omni_tests::evolution::fixture;
use omni_tests::fakes::{FakeAgent, FakeEvolution};
use omni_tests::process::{
    ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, Outcome, http_post, omnictl,
};
use omni_tests::wait_for;
use serde_json::{Value, json};
use std::time::Duration;

const GLOBAL_KEY: &str = "evolution-global-key-0123456789";
const ADMIN_KEY: &str = "omni_lifecycle_0123456789abcdef0123456789ab";

struct Hub {
    cp: ControlPlane,
    node: DataPlane,
    agent: FakeAgent,
    evolution: FakeEvolution,
    dir: tempfile::TempDir,
}

impl Hub {
    async fn start() -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let options = ControlPlaneOptions { bootstrap_api_key: Some(ADMIN_KEY.into()), ..Default::default() };
        let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
        let node = DataPlane::start_for(&cp, &dir.path().join("node"), DataPlaneOptions::default()).await;
        let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
        evolution.global_key(GLOBAL_KEY);
        Hub { cp, node, agent, evolution, dir }
    }

    async fn ctl(&self, args: &[&str]) -> Outcome {
        omnictl(&self.cp.url(), ADMIN_KEY, args).await
    }

    async fn provision(&self, name: &str, evolution_url: &str, key: &str) -> Outcome {
        #[rustfmt::skip]
        let args = [
            "instance", "create", name, "--channel", "whatsapp", "--agent-url", &self.agent.url,
            "--evolution-url", evolution_url, "--evolution-key", key,
            "--provision", "--public-url", "https://hub.example.com/", "-o", "json",
        ];
        self.ctl(&args).await
    }

    async fn status(&self, name: &str) -> Value {
        self.ctl(&["instance", "status", name, "-o", "json"]).await.json()
    }

    async fn webhook(&self, instance: &str, token: &str, body: &Value) -> u16 {
        let path = format!("/webhook/evolution/{instance}");
        let bytes = serde_json::to_vec(body).unwrap();
        http_post(&self.node.addr, &path, &[("x-omni-webhook-token", token)], &bytes).await.unwrap().0
    }

    /// Everything the SQLite database holds, as text.
    fn database_dump(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.cp.data_dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with("omni.db") {
                all.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
            }
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioned_instance_is_wired_linked_and_removed_through_evolution() {
    let hub = Hub::start().await;
    let created = hub.provision("acme-wa", &hub.evolution.url, GLOBAL_KEY).await.json();
    let token = created["webhook_token"].as_str().unwrap().to_owned();

    // Created on Evolution with the nested webhook pointing at the hub, carrying the token.
    let there = hub.evolution.provisioned("acme-wa").expect("created on Evolution");
    assert_eq!(there.webhook["url"], "https://hub.example.com/webhook/evolution/acme-wa");
    assert_eq!(there.webhook["headers"]["x-omni-webhook-token"], token.as_str());
    assert_eq!(there.webhook["events"], json!(["MESSAGES_UPSERT", "CONNECTION_UPDATE", "QRCODE_UPDATED"]));
    assert_eq!((there.webhook["byEvents"].clone(), there.webhook["base64"].clone()), (json!(false), json!(true)));
    let create = hub.evolution.lifecycle().into_iter().find(|r| r.path == "/instance/create").unwrap();
    assert_eq!(create.headers["apikey"], GLOBAL_KEY);
    // The instance token Evolution issued is kept, encrypted.
    let dump = hub.database_dump();
    assert!(dump.contains("acme-wa"), "the dump holds the instance");
    assert!(!dump.contains(&there.token), "the instance token is stored in plaintext");

    // Messages to it are answered as usual.
    hub.node.wait_for_revision(created["instance"]["revision"].as_i64().unwrap()).await;
    assert_eq!(hub.webhook("acme-wa", &token, &fixture("text_dm.json")).await, 200);
    wait_for("the reply", Duration::from_secs(10), || async { (!hub.evolution.replies().is_empty()).then_some(()) })
        .await;
    // Calls about the instance itself use its own token, not the server's global key.
    assert_eq!(hub.evolution.texts()[0].headers["apikey"], there.token);

    // Status: Evolution's live state, then the connection.update and qrcode.updated it sent.
    let status = hub.status("acme-wa").await;
    assert_eq!((status["state"].as_str(), &status["last_connection"]), (Some("connecting"), &Value::Null));
    assert_eq!(hub.webhook("acme-wa", &token, &fixture("qrcode_updated.json")).await, 200);
    assert_eq!(hub.webhook("acme-wa", &token, &fixture("connection_update_open.json")).await, 200);
    hub.evolution.set_state("acme-wa", "open");
    let status = wait_for("the connection.update in the status", Duration::from_secs(10), || async {
        let status = hub.status("acme-wa").await;
        (!status["last_connection"].is_null() && !status["last_qr_time"].is_null()).then_some(status)
    })
    .await;
    assert_eq!(status["state"], "open");
    let state_call = hub.evolution.lifecycle().into_iter().find(|r| r.path.contains("connectionState")).unwrap();
    assert_eq!(state_call.headers["apikey"], there.token);
    let last = &status["last_connection"];
    assert_eq!((last["state"].as_str(), last["status_reason"].as_i64()), (Some("open"), Some(200)));
    assert_eq!(last["wuid"], "5511888888888@s.whatsapp.net");
    let table = hub.ctl(&["instance", "status", "acme-wa"]).await;
    assert!(table.ok().contains("open (reason 200)") && table.stdout.contains("Acme"), "{table:?}");

    // QR: already connected now; drawn (and saved) while connecting; Evolution's error body.
    let qr = hub.ctl(&["instance", "qr", "acme-wa"]).await;
    assert!(qr.ok().contains("already connected"), "{qr:?}");
    hub.evolution.set_state("acme-wa", "connecting");
    let png = hub.dir.path().join("qr.png");
    let qr = hub.ctl(&["instance", "qr", "acme-wa", "--png", png.to_str().unwrap()]).await;
    assert!(qr.ok().contains('▀') || qr.stdout.contains('█'), "a QR code drawn: {qr:?}");
    assert!(qr.stdout.contains("WZYEH1YY"), "the pairing code: {qr:?}");
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    let json = hub.ctl(&["instance", "qr", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(json["code"], "2@acme-wa-qr-payload,abc,def==");
    hub.evolution.fail_connect("acme-wa", "Connection Closed");
    let failed = hub.ctl(&["instance", "qr", "acme-wa"]).await;
    assert!(failed.failed().contains("Connection Closed"), "{failed:?}");

    // Another tenant's key sees none of it.
    let scoped = hub.ctl(&["apikey", "create", "--instances", "beta-*", "-o", "json"]).await.json();
    let scoped = scoped["key"].as_str().unwrap();
    for args in [["instance", "status", "acme-wa"], ["instance", "qr", "acme-wa"]] {
        let refused = omnictl(&hub.cp.url(), scoped, &args).await;
        assert!(refused.failed().contains("not found"), "{refused:?}");
    }

    let deleted = hub.ctl(&["instance", "delete", "acme-wa", "--deprovision"]).await;
    assert!(deleted.ok().contains("deleted"));
    assert!(hub.evolution.provisioned("acme-wa").is_none(), "deleted on Evolution too");
    let gone = hub.ctl(&["instance", "get", "acme-wa"]).await;
    assert!(gone.failed().contains("not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_failures_leave_nothing_half_created() {
    let hub = Hub::start().await;
    let listed = || async { hub.ctl(&["instance", "list", "-o", "json"]).await.json().as_array().unwrap().len() };

    // Evolution refuses the key: nothing anywhere, and the reason is said.
    let refused = hub.provision("acme-wa", &hub.evolution.url, "not-the-global-key").await;
    assert!(refused.failed().contains("Evolution refused") && refused.stderr.contains("401"), "{refused:?}");
    assert!(hub.evolution.provisioned("acme-wa").is_none());
    assert_eq!(listed().await, 0);

    // Evolution is unreachable.
    let port = omni_tests::free_port();
    let down = hub.provision("acme-wa", &format!("http://127.0.0.1:{port}"), GLOBAL_KEY).await;
    assert!(down.failed().contains("unreachable"), "{down:?}");
    assert_eq!(listed().await, 0);

    // An instance Evolution has already: its webhook is set, nothing is created there.
    hub.evolution.existing("beta-wa", "beta-own-token");
    let created = hub.provision("beta-wa", &hub.evolution.url, GLOBAL_KEY).await.json();
    let there = hub.evolution.provisioned("beta-wa").unwrap();
    assert_eq!(there.webhook["headers"]["x-omni-webhook-token"], created["webhook_token"]);
    let paths: Vec<String> = hub.evolution.lifecycle().iter().map(|r| r.path.clone()).collect();
    assert!(paths.contains(&"/webhook/set/beta-wa".to_owned()), "{paths:?}");
    assert!(!paths.iter().any(|p| p == "/instance/create"), "{paths:?}");

    // A name the hub has taken fails before Evolution is asked anything.
    let before = hub.evolution.lifecycle().len();
    let taken = hub.provision("beta-wa", &hub.evolution.url, GLOBAL_KEY).await;
    assert!(taken.failed().contains("already exists"), "{taken:?}");
    assert_eq!(hub.evolution.lifecycle().len(), before);

    // Provisioning needs the public URL, and is for WhatsApp only.
    let usage = hub.ctl(&["instance", "create", "x-wa", "--channel", "whatsapp", "--provision"]).await;
    assert_eq!(usage.code, 2, "{usage:?}");
    assert!(usage.stderr.contains("--public-url"), "{usage:?}");
    #[rustfmt::skip]
    let slack = hub.ctl(&[
        "instance", "create", "x-slack", "--channel", "slack", "--agent-url", &hub.agent.url,
        "--slack-bot-token", "xoxb-1", "--slack-signing-secret", "s", "--provision", "--public-url", "https://h.example",
    ]).await;
    assert!(slack.failed().contains("WhatsApp"), "{slack:?}");

    // Evolution refusing the deletion keeps the instance here.
    let updated = hub.ctl(&["instance", "update", "beta-wa", "--evolution-key", "a-wrong-key-0000"]).await;
    updated.ok();
    let kept = hub.ctl(&["instance", "delete", "beta-wa", "--deprovision"]).await;
    assert!(kept.failed().contains("401"), "{kept:?}");
    assert_eq!(listed().await, 1);
    assert!(hub.evolution.provisioned("beta-wa").is_some());
}
