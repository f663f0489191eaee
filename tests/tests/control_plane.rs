//! The control plane and omnictl, as a user runs them: real binaries, real databases.

use omni_tests::postgres::TestDatabase;
use omni_tests::process::{ControlPlane, ControlPlaneOptions, omnictl};
use sqlx::{Connection, PgConnection};
use std::os::unix::fs::PermissionsExt;
use tempfile::TempDir;

use omni_tests::{AGENT_KEY, EVOLUTION_KEY};
/// A fixed master key for Postgres runs (base64 of 32 bytes).
const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A running control plane with an admin key, and what it stores its data in.
struct Hub {
    cp: ControlPlane,
    admin: String,
    db: Option<TestDatabase>,
    dir: TempDir,
}

impl Hub {
    async fn start(backend: Backend) -> Option<Hub> {
        let dir = tempfile::tempdir().unwrap();
        let (db, options) = match backend {
            Backend::Sqlite => (None, ControlPlaneOptions::default()),
            Backend::Postgres => {
                let db = TestDatabase::create().await?;
                let options = ControlPlaneOptions {
                    database_url: Some(db.url.clone()),
                    master_key: Some(MASTER_KEY.into()),
                    bootstrap_api_key: Some("omni_bootstrap_0123456789abcdef0123456789abcdef".into()),
                    ..Default::default()
                };
                (Some(db), options)
            }
        };
        let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
        let admin = match &options.bootstrap_api_key {
            Some(key) => key.clone(),
            None => cp.generated_admin_key.clone().expect("first start prints an admin key"),
        };
        Some(Hub { cp, admin, db, dir })
    }

    async fn ctl(&self, args: &[&str]) -> omni_tests::process::Outcome {
        omnictl(&self.cp.url(), &self.admin, args).await
    }

    async fn ctl_as(&self, key: &str, args: &[&str]) -> omni_tests::process::Outcome {
        omnictl(&self.cp.url(), key, args).await
    }

    async fn create_whatsapp(&self, name: &str) -> serde_json::Value {
        omni_tests::create_whatsapp(&self.cp.url(), &self.admin, name).await
    }

    /// Everything the database holds, as text.
    async fn database_dump(&self) -> String {
        match &self.db {
            None => {
                let mut all = String::new();
                for entry in std::fs::read_dir(&self.cp.data_dir).unwrap() {
                    let path = entry.unwrap().path();
                    if path.file_name().unwrap().to_string_lossy().starts_with("omni.db") {
                        all.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
                    }
                }
                all
            }
            Some(db) => {
                let mut conn = PgConnection::connect(&db.url).await.unwrap();
                let mut all = String::new();
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
                )
                .fetch_all(&mut conn)
                .await
                .unwrap();
                assert!(tables.len() >= 10, "every table: {tables:?}");
                for table in tables {
                    let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {table} t"))
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                    all.push_str(&rows.join("\n"));
                }
                all
            }
        }
    }
}

/// The sequence a new user runs, from the quickstart.
async fn quickstart(backend: Backend) {
    let Some(hub) = Hub::start(backend).await else { return };
    let created = hub
        .ctl(&[
            "instance",
            "create",
            "acme-wa",
            "--channel",
            "whatsapp",
            "--agent-url",
            "http://127.0.0.1:9000",
            "--agent-key",
            AGENT_KEY,
            "--evolution-url",
            "http://127.0.0.1:8080",
            "--evolution-key",
            EVOLUTION_KEY,
            "--evolution-instance",
            "acme",
        ])
        .await;
    let out = created.ok();
    assert!(out.contains("created instance acme-wa"), "{out}");
    assert!(out.contains("webhook path:  /webhook/evolution/acme-wa"), "{out}");
    let token = out.lines().find_map(|l| l.strip_prefix("webhook token: ")).expect("token printed");
    assert!(token.len() >= 43, "a 256-bit token: {token}");

    let list = hub.ctl(&["instance", "list"]).await;
    let mut lines = list.ok().lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["NAME", "CHANNEL", "ACTIVE", "AGENT", "URL", "UPDATED"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["acme-wa", "whatsapp", "true", "http://127.0.0.1:9000"]);

    let got = hub.ctl(&["instance", "get", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(got["agent"]["key"], serde_json::json!({"set": true, "last4": "6789"}));
    assert_eq!(got["evolution"]["key"], serde_json::json!({"set": true, "last4": "ghij"}));
    assert_eq!(got["evolution"]["instance_name"], "acme");
    assert_eq!(got["agent"]["timeout_seconds"], 60);
    assert_eq!(got["behavior"]["split_limit"], 4000);
    let revision = got["revision"].as_i64().unwrap();

    let updated = hub
        .ctl(&[
            "instance",
            "update",
            "acme-wa",
            "--agent-timeout",
            "30",
            "--agent-url",
            "http://127.0.0.1:9001",
            "--agent-key",
            omni_tests::AGENT_KEY,
            "-o",
            "json",
        ])
        .await
        .json();
    assert_eq!(updated["agent"]["timeout_seconds"], 30);
    assert_eq!(updated["agent"]["url"], "http://127.0.0.1:9001");
    assert_eq!(updated["agent"]["key"]["set"], true);
    assert_eq!(updated["evolution"]["url"], "http://127.0.0.1:8080");
    assert_eq!(updated["revision"].as_i64().unwrap(), revision + 1);

    assert_eq!(hub.ctl(&["access", "block", "acme-wa", "+5511*"]).await.ok().trim(), "rule 1: block +5511* on acme-wa");
    assert_eq!(
        hub.ctl(&["access", "allow", "acme-wa", "+551199*"]).await.ok().trim(),
        "rule 2: allow +551199* on acme-wa"
    );
    let check = hub.ctl(&["access", "check", "acme-wa", "+5511991234567"]).await;
    assert_eq!(check.ok().trim(), "allow (rule 2: allow +551199*)");
    let check = hub.ctl(&["access", "check", "acme-wa", "5511881234567", "-o", "json"]).await.json();
    assert_eq!(check["action"], "block");
    assert_eq!(check["matched_rule"]["id"], 1);
    let check = hub.ctl(&["access", "check", "acme-wa", "+4930123456"]).await;
    assert_eq!(check.ok().trim(), "allow (instance default)");
    let rules = hub.ctl(&["access", "list", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(rules["rules"].as_array().unwrap().len(), 2);
    assert_eq!(rules["default_access"], "allow");
    hub.ctl(&["access", "remove", "acme-wa", "1"]).await.ok();
    assert_eq!(
        hub.ctl(&["access", "check", "acme-wa", "+5511881234567"]).await.ok().trim(),
        "allow (instance default)"
    );

    let key = hub.ctl(&["apikey", "create", "--instances", "acme-*", "-o", "json"]).await.json();
    let scoped = key["key"].as_str().unwrap();
    assert!(scoped.starts_with("omni_"));
    assert_eq!(key["api_key"]["instance_patterns"], serde_json::json!(["acme-*"]));
    let seen = hub.ctl_as(scoped, &["instance", "get", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(seen["name"], "acme-wa");

    assert_eq!(hub.ctl(&["instance", "delete", "acme-wa"]).await.ok().trim(), "deleted instance acme-wa");
    let gone = hub.ctl(&["instance", "get", "acme-wa"]).await;
    assert_eq!(gone.failed(), "error: instance \"acme-wa\" not found");
    assert_eq!(hub.ctl(&["instance", "list", "-o", "json"]).await.json(), serde_json::json!([]));
}

/// A key scoped to `acme-*` sees only acme's instances; everything else is NOT_FOUND.
async fn scoped_keys_are_isolated(backend: Backend) {
    let Some(hub) = Hub::start(backend).await else { return };
    hub.create_whatsapp("acme-wa").await;
    hub.create_whatsapp("other-wa").await;
    hub.ctl(&["access", "block", "other-wa", "+1*"]).await.ok();
    let key = hub.ctl(&["apikey", "create", "--instances", "acme-*", "-o", "json"]).await.json();
    let (scoped, scoped_id) = (key["key"].as_str().unwrap(), key["api_key"]["id"].as_str().unwrap());

    let list = hub.ctl_as(scoped, &["instance", "list", "-o", "json"]).await.json();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme-wa"]);

    let not_found = "error: instance \"other-wa\" not found";
    for args in [
        &["instance", "get", "other-wa"][..],
        &["instance", "update", "other-wa", "--agent-timeout", "5"],
        &["instance", "delete", "other-wa"],
        &["access", "list", "other-wa"],
        &["access", "allow", "other-wa", "+1555*"],
        &["access", "remove", "other-wa", "1"],
        &["access", "check", "other-wa", "+15551234"],
    ] {
        assert_eq!(hub.ctl_as(scoped, args).await.failed(), not_found, "{args:?}");
    }
    // A name that does not exist at all reads the same.
    assert_eq!(hub.ctl_as(scoped, &["instance", "get", "ghost"]).await.failed(), "error: instance \"ghost\" not found");
    let outside = hub
        .ctl_as(
            scoped,
            &[
                "instance",
                "create",
                "other-2",
                "--channel",
                "discord",
                "--agent-url",
                "http://a:1",
                "--discord-token",
                "t",
            ],
        )
        .await;
    assert!(outside.failed().starts_with("error: permission denied:"), "{outside:?}");
    let keys = hub.ctl_as(scoped, &["apikey", "list"]).await;
    assert_eq!(keys.failed(), "error: permission denied: listing API keys needs an admin API key");

    // Nothing of other-wa changed.
    let other = hub.ctl(&["instance", "get", "other-wa", "-o", "json"]).await.json();
    assert_eq!(other["agent"]["timeout_seconds"], 60);
    assert_eq!(
        hub.ctl(&["access", "list", "other-wa", "-o", "json"]).await.json()["rules"].as_array().unwrap().len(),
        1
    );

    // Revocation takes effect at once; wrong keys are refused the same way.
    assert_eq!(hub.ctl(&["apikey", "revoke", scoped_id]).await.ok().trim(), format!("revoked API key {scoped_id}"));
    let refused = hub.ctl_as(scoped, &["instance", "list"]).await;
    assert_eq!(
        refused.failed(),
        "error: not authenticated: invalid or revoked API key (check OMNI_API_KEY or --api-key)"
    );
    let wrong = hub.ctl_as("omni_000000000000_nope", &["instance", "list"]).await;
    assert!(wrong.failed().contains("invalid or revoked API key"));
    let listed = hub.ctl(&["apikey", "list", "-o", "json"]).await.json();
    let revoked = listed.as_array().unwrap().iter().find(|k| k["id"] == scoped_id).unwrap();
    assert!(revoked["revoke_time"].is_string());
}

/// Bad input gets one clear line and a non-zero exit, and changes nothing.
async fn invalid_requests_are_refused(backend: Backend) {
    let Some(hub) = Hub::start(backend).await else { return };
    let cases: &[(&[&str], &str)] = &[
        (
            &["instance", "create", "Acme_WA", "--channel", "slack", "--agent-url", "http://a:1"],
            "error: instance name \"Acme_WA\" must be a lowercase DNS label: a-z, 0-9 and '-', not starting or ending with '-'",
        ),
        (
            &[
                "instance",
                "create",
                "acme",
                "--channel",
                "whatsapp",
                "--agent-url",
                "http://a:1",
                "--evolution-url",
                "http://e:1",
            ],
            "error: evolution key is required for a whatsapp instance",
        ),
        (
            &[
                "instance",
                "create",
                "acme",
                "--channel",
                "slack",
                "--agent-url",
                "http://a:1",
                "--slack-bot-token",
                "xoxb-1",
            ],
            "error: slack bot token and signing secret are required for a slack instance",
        ),
        (
            &["instance", "create", "acme", "--channel", "discord", "--agent-url", "ftp://a", "--discord-token", "t"],
            "error: agent url \"ftp://a\" must be an http:// or https:// URL with a host and no query",
        ),
        (
            &["instance", "create", "acme", "--channel", "discord", "--discord-token", "t"],
            "error: agent url is required",
        ),
        (
            &[
                "instance",
                "create",
                "acme",
                "--channel",
                "discord",
                "--agent-url",
                "http://a:1",
                "--discord-token",
                "t",
                "--split-limit",
                "2001",
            ],
            "error: split limit must be at most 2000 characters for discord",
        ),
        (
            &[
                "instance",
                "create",
                "acme",
                "--channel",
                "discord",
                "--agent-url",
                "http://a:1",
                "--discord-token",
                "t",
                "--evolution-key",
                "k",
            ],
            "error: evolution/slack settings do not apply to a discord instance",
        ),
    ];
    for (args, expected) in cases {
        assert_eq!(hub.ctl(args).await.failed(), *expected, "{args:?}");
    }
    assert_eq!(hub.ctl(&["instance", "list", "-o", "json"]).await.json(), serde_json::json!([]));

    hub.create_whatsapp("acme-wa").await;
    let dup = hub
        .ctl(&[
            "instance",
            "create",
            "acme-wa",
            "--channel",
            "discord",
            "--agent-url",
            "http://a:1",
            "--discord-token",
            "t",
        ])
        .await;
    assert_eq!(dup.failed(), "error: instance \"acme-wa\" already exists");
    assert_eq!(
        hub.ctl(&["access", "allow", "acme-wa", "55*11"]).await.failed(),
        "error: access pattern \"55*11\" may contain '*' only as its last character"
    );
    assert_eq!(
        hub.ctl(&["access", "remove", "acme-wa", "99"]).await.failed(),
        "error: access rule 99 of instance \"acme-wa\" not found"
    );
    assert_eq!(
        hub.ctl(&["instance", "update", "acme-wa"]).await.failed(),
        "error: nothing to update: give at least one setting flag (see --help)"
    );
    assert_eq!(
        hub.ctl(&["instance", "update", "acme-wa", "--evolution-key", ""]).await.failed(),
        "error: evolution key is required for a whatsapp instance"
    );
    assert_eq!(
        hub.ctl(&["apikey", "create", "--instances", "ACME*"]).await.failed(),
        "error: instance pattern \"ACME*\" must be an instance name, optionally ending in '*'"
    );
    // A stored key never follows its settings to a new place, and URLs carry no credentials.
    assert_eq!(
        hub.ctl(&["instance", "update", "acme-wa", "--agent-url", "http://elsewhere.example:9000"]).await.failed(),
        "error: changing the agent URL needs the agent key again (--agent-key)"
    );
    assert_eq!(
        hub.ctl(&["instance", "update", "acme-wa", "--evolution-instance", "someone-else"]).await.failed(),
        "error: changing the Evolution URL or instance needs the Evolution key again (--evolution-key)"
    );
    let with_password = hub.ctl(&["instance", "update", "acme-wa", "--agent-url", "http://u:hunter2@a:1"]).await;
    assert!(with_password.failed().contains("must not carry credentials"), "{with_password:?}");
    assert!(!with_password.stderr.contains("hunter2"));
    assert_eq!(
        hub.ctl(&["instance", "update", "acme-wa", "--evolution-instance", "../instance/delete/x"]).await.failed(),
        "error: evolution instance name may only hold letters, digits, '-', '_' and '.' (not first)"
    );
    let got = hub.ctl(&["instance", "get", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(got["revision"], 1, "failed updates change nothing");
    #[rustfmt::skip]
    let moved = hub.ctl(&[
        "instance", "update", "acme-wa", "--agent-url", "http://elsewhere.example:9000", "--agent-key", "new-agent-key-0000",
    ]).await;
    assert!(moved.ok().contains("elsewhere.example"), "{moved:?}");

    let no_key = omnictl(&hub.cp.url(), "", &["instance", "list"]).await;
    assert_eq!(no_key.failed(), "error: no API key: set OMNI_API_KEY or pass --api-key");
    let unreachable = omnictl("http://127.0.0.1:1", &hub.admin, &["instance", "list"]).await;
    assert!(
        unreachable.failed().starts_with("error: cannot reach the control plane at http://127.0.0.1:1"),
        "{unreachable:?}"
    );
}

/// Secrets are sealed before they reach the database and appear in no answer and no log line.
async fn secrets_stay_secret(backend: Backend) {
    let Some(hub) = Hub::start(backend).await else { return };
    let created = hub.create_whatsapp("acme-wa").await;
    let webhook_token = created["webhook_token"].as_str().unwrap().to_owned();
    hub.ctl(&["instance", "update", "acme-wa", "--agent-key", "rotated-agent-key-9999"]).await.ok();
    let slack = hub
        .ctl(&[
            "instance",
            "create",
            "acme-slack",
            "--channel",
            "slack",
            "--agent-url",
            "http://a:1",
            "--slack-bot-token",
            "xoxb-slack-bot-token-1",
            "--slack-signing-secret",
            "slack-signing-secret-2",
        ])
        .await;
    slack.ok();
    let key = hub.ctl(&["apikey", "create", "--scope", "admin", "-o", "json"]).await.json()["key"]
        .as_str()
        .unwrap()
        .to_owned();

    let secrets = [
        AGENT_KEY,
        EVOLUTION_KEY,
        "rotated-agent-key-9999",
        "xoxb-slack-bot-token-1",
        "slack-signing-secret-2",
        &webhook_token,
        &key,
        &hub.admin,
    ];
    let dump = hub.database_dump().await;
    assert!(dump.contains("acme-wa"), "the dump is readable");
    let mut answers = String::new();
    for args in [
        &["instance", "get", "acme-wa", "-o", "json"][..],
        &["instance", "list", "-o", "json"],
        &["instance", "get", "acme-slack"],
        &["apikey", "list", "-o", "json"],
    ] {
        answers.push_str(hub.ctl(args).await.ok());
    }
    let log = hub.cp.log();
    assert!(log.contains("instance created"), "the log is captured");
    for secret in secrets {
        assert!(!dump.contains(secret), "{secret} is in the database");
        assert!(!answers.contains(secret), "{secret} is in an API answer");
        assert!(!log.contains(secret), "{secret} is in the log");
    }
    let _ = &hub.dir;
}

macro_rules! on_both_backends {
    ($($test:ident),+ $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::Backend::Sqlite).await })+
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::Backend::Postgres).await })+
        }
    };
}

on_both_backends!(quickstart, scoped_keys_are_isolated, invalid_requests_are_refused, secrets_stay_secret);

/// Generic gRPC clients can check health and discover the API.
#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let hub = Hub::start(Backend::Sqlite).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(hub.cp.url()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "omni.v1.InstanceService", "omni.v1.AccessService", "omni.v1.ApiKeyService"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in
        ["omni.v1.InstanceService", "omni.v1.AccessService", "omni.v1.ApiKeyService", "grpc.health.v1.Health"]
    {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

/// Standalone with no setup: generated master key and admin key files are owner-only, kept
/// across restarts, and the key is printed only on the first start.
#[tokio::test]
async fn generated_keys_are_private_and_survive_restarts() {
    let hub = Hub::start(Backend::Sqlite).await.unwrap();
    hub.create_whatsapp("acme-wa").await;
    let data_dir = hub.cp.data_dir.clone();
    for file in ["master.key", "admin-api-key", "omni.db"] {
        let mode = std::fs::metadata(data_dir.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    assert_eq!(std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::read_to_string(data_dir.join("admin-api-key")).unwrap().trim(), hub.admin);
    let master_key = std::fs::read_to_string(data_dir.join("master.key")).unwrap();
    assert!(!hub.cp.log().contains(master_key.trim()), "the master key is never logged");

    let Hub { cp, admin, dir, .. } = hub;
    assert!(cp.terminate().await.success(), "SIGTERM is a clean stop");
    let restarted = ControlPlane::start(&data_dir, &ControlPlaneOptions::default()).await;
    assert_eq!(restarted.generated_admin_key, None, "no second key on restart");
    let got = omnictl(&restarted.url(), &admin, &["instance", "get", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(got["agent"]["key"]["last4"], "6789", "secrets still open with the kept master key");
    drop(dir);
}

#[tokio::test]
async fn postgres_needs_a_master_key() {
    let Some(db) = TestDatabase::create().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let options = ControlPlaneOptions { database_url: Some(db.url.clone()), ..Default::default() };
    let error = ControlPlane::try_start(&dir.path().join("cp"), &options).await.err().expect("refuses to start");
    assert!(error.contains("a Postgres-backed control plane needs a master key: set OMNI_MASTER_KEY"), "{error}");
}

/// Two control planes on one Postgres, started at the same moment on an empty database: both
/// migrate safely and serve the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_share_one_postgres() {
    let Some(db) = TestDatabase::create().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let options = ControlPlaneOptions {
        database_url: Some(db.url.clone()),
        master_key: Some(MASTER_KEY.into()),
        bootstrap_api_key: Some("omni_shared_0123456789abcdef0123456789abcdef".into()),
        ..Default::default()
    };
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let (a, b) = tokio::join!(ControlPlane::start(&dir_a, &options), ControlPlane::start(&dir_b, &options));
    let key = options.bootstrap_api_key.as_deref().unwrap();
    omni_tests::create_whatsapp(&a.url(), key, "acme-wa").await;
    let through_b = omnictl(&b.url(), key, &["instance", "get", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(through_b["agent"]["key"]["last4"], "6789");
    let keys = omnictl(&b.url(), key, &["apikey", "list", "-o", "json"]).await.json();
    assert_eq!(keys.as_array().unwrap().len(), 1, "the bootstrap key is registered once");
}
