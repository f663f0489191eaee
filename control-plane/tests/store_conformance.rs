//! One suite, run against every store backend: SQLite (a fresh file per test) and Postgres (a
//! fresh database per test). Secrets here are opaque sealed strings; sealing is tested in
//! `crypto`.

use omni_control_plane::store::*;
use omni_core::access::Action;
use omni_core::kinds::{AgentProtocol, Channel};
use omni_tests::postgres::TestDatabase;
use std::sync::Arc;

type Shared = Arc<dyn Store>;

fn spec(url: &str) -> InstanceSpec {
    InstanceSpec {
        default_access: Action::Allow,
        agent: AgentSpec {
            url: url.to_owned(),
            key: Some(Sealed("v1.k.sealed-agent-key".into())),
            agent_id: String::new(),
            protocol: AgentProtocol::Omni,
            timeout_secs: 60,
            stream_mode: false,
        },
        evolution: EvolutionSpec {
            url: "http://127.0.0.1:8080".into(),
            key: Some(Sealed("v1.k.sealed-evo".into())),
            instance_name: "evo".into(),
        },
        discord: Default::default(),
        slack: Default::default(),
        behavior: BehaviorSpec {
            split_limit: 4000,
            reply_to_all_group_messages: false,
            typing_indicator: true,
            fallback_text: String::new(),
            max_message_age_secs: 300,
        },
        webhook_token: Sealed("v1.k.sealed-token".into()),
        require_webhook_token: true,
    }
}

fn record(name: &str, channel: Channel) -> InstanceRecord {
    InstanceRecord {
        id: format!("id-{name}"),
        name: name.to_owned(),
        channel,
        active: true,
        spec: spec("http://127.0.0.1:9000"),
        created_at: 0,
        updated_at: 0,
        revision: 0,
    }
}

fn scoped(patterns: &[&str]) -> Scope {
    Scope::Instances(patterns.iter().map(|p| p.to_string()).collect())
}

fn api_key(id: &str, scope: Scope) -> ApiKeyRecord {
    ApiKeyRecord {
        id: id.to_owned(),
        key_hash: format!("hash-{id}"),
        scope,
        description: format!("key {id}"),
        created_at: now_millis(),
        last_used_at: None,
        revoked_at: None,
    }
}

async fn instance_lifecycle(store: Shared) {
    let created = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    assert_eq!(created.name, "acme-wa");
    assert_eq!(created.revision, 1);
    assert!(created.created_at > 0);
    assert_eq!(created.spec, spec("http://127.0.0.1:9000"));

    let fetched = store.get_instance(&Scope::Admin, "acme-wa").await.unwrap();
    assert_eq!(fetched, created);

    let dup =
        store.create_instance(&InstanceRecord { id: "other-id".into(), ..record("acme-wa", Channel::Slack) }).await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");

    let updated =
        store.update_instance(&Scope::Admin, "acme-wa", created.revision, false, &spec("http://new:1")).await.unwrap();
    assert!(!updated.active);
    assert_eq!(updated.spec.agent.url, "http://new:1");
    assert_eq!(updated.revision, 2, "the failed duplicate create consumed no revision");
    assert!(updated.updated_at >= created.updated_at);

    // A writer holding an old revision loses.
    let stale = store.update_instance(&Scope::Admin, "acme-wa", created.revision, true, &spec("http://x:1")).await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");

    store.delete_instance(&Scope::Admin, "acme-wa").await.unwrap();
    assert!(matches!(store.get_instance(&Scope::Admin, "acme-wa").await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.delete_instance(&Scope::Admin, "acme-wa").await, Err(StoreError::NotFound(_))));
    let missing = store.update_instance(&Scope::Admin, "acme-wa", 2, true, &spec("http://x:1")).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
}

async fn listing_pages_filters_and_scopes(store: Shared) {
    for (name, channel) in [
        ("acme-wa", Channel::Whatsapp),
        ("acme-slack", Channel::Slack),
        ("beta-wa", Channel::Whatsapp),
        ("acme", Channel::Discord),
        ("zeta", Channel::Whatsapp),
    ] {
        store.create_instance(&record(name, channel)).await.unwrap();
    }
    let names = |records: Vec<InstanceRecord>| records.into_iter().map(|r| r.name).collect::<Vec<_>>();
    let all = store.list_instances(&Scope::Admin, &ListInstances { limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(names(all), ["acme", "acme-slack", "acme-wa", "beta-wa", "zeta"]);

    let page1 = store.list_instances(&Scope::Admin, &ListInstances { limit: 2, ..Default::default() }).await.unwrap();
    assert_eq!(names(page1), ["acme", "acme-slack"]);
    let page2 = store
        .list_instances(&Scope::Admin, &ListInstances { limit: 2, after: Some("acme-slack".into()), channel: None })
        .await
        .unwrap();
    assert_eq!(names(page2), ["acme-wa", "beta-wa"]);

    let whatsapp = store
        .list_instances(&Scope::Admin, &ListInstances { limit: 100, channel: Some(Channel::Whatsapp), after: None })
        .await
        .unwrap();
    assert_eq!(names(whatsapp), ["acme-wa", "beta-wa", "zeta"]);

    let acme =
        store.list_instances(&scoped(&["acme-*"]), &ListInstances { limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(names(acme), ["acme-slack", "acme-wa"], "'acme-*' does not cover 'acme'");
    let mixed = store
        .list_instances(&scoped(&["acme", "zeta"]), &ListInstances { limit: 100, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(names(mixed), ["acme", "zeta"]);
    let none = store.list_instances(&scoped(&[]), &ListInstances { limit: 100, ..Default::default() }).await.unwrap();
    assert!(none.is_empty());
}

async fn scope_hides_other_tenants(store: Shared) {
    store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let other = store.create_instance(&record("other-wa", Channel::Whatsapp)).await.unwrap();
    let rule = store.put_access_rule(&Scope::Admin, "other-wa", "+55*", Action::Block).await.unwrap();
    let acme = scoped(&["acme-*"]);
    let not_found = |r: Result<(), StoreError>| matches!(r, Err(StoreError::NotFound(_)));

    assert!(store.get_instance(&acme, "acme-wa").await.is_ok());
    assert!(not_found(store.get_instance(&acme, "other-wa").await.map(drop)));
    assert!(not_found(
        store.update_instance(&acme, "other-wa", other.revision, false, &spec("http://x:1")).await.map(drop)
    ));
    assert!(not_found(store.delete_instance(&acme, "other-wa").await));
    assert!(not_found(store.list_access_rules(&acme, "other-wa").await.map(drop)));
    assert!(not_found(store.put_access_rule(&acme, "other-wa", "+1*", Action::Allow).await.map(drop)));
    assert!(not_found(store.remove_access_rule(&acme, "other-wa", rule.id).await));
    // Nor through an instance the key does own.
    assert!(not_found(store.remove_access_rule(&acme, "acme-wa", rule.id).await));

    // Nothing was changed by any of that.
    let untouched = store.get_instance(&Scope::Admin, "other-wa").await.unwrap();
    assert_eq!(untouched.revision, rule_revision(&store, "other-wa").await);
    assert!(untouched.active);
    assert_eq!(store.list_access_rules(&Scope::Admin, "other-wa").await.unwrap().len(), 1);
}

async fn rule_revision(store: &Shared, name: &str) -> i64 {
    store.get_instance(&Scope::Admin, name).await.unwrap().revision
}

async fn access_rules(store: Shared) {
    store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    store.create_instance(&record("beta-wa", Channel::Whatsapp)).await.unwrap();
    let block = store.put_access_rule(&Scope::Admin, "acme-wa", "+5511*", Action::Block).await.unwrap();
    let allow = store.put_access_rule(&Scope::Admin, "acme-wa", "+551199*", Action::Allow).await.unwrap();
    assert_eq!((block.action, allow.action), (Action::Block, Action::Allow));
    assert_ne!(block.id, allow.id);
    assert_eq!(block.instance, "acme-wa");

    // Same pattern again: the rule's action changes, no second rule appears.
    let flipped = store.put_access_rule(&Scope::Admin, "acme-wa", "+5511*", Action::Allow).await.unwrap();
    assert_eq!(flipped.id, block.id);
    let rules = store.list_access_rules(&Scope::Admin, "acme-wa").await.unwrap();
    assert_eq!(
        rules.iter().map(|r| (r.pattern.as_str(), r.action)).collect::<Vec<_>>(),
        [("+5511*", Action::Allow), ("+551199*", Action::Allow)]
    );
    // A rule change is a change of its instance.
    assert_eq!(rule_revision(&store, "acme-wa").await, store.config_revision().await.unwrap());

    let wrong_instance = store.remove_access_rule(&Scope::Admin, "beta-wa", allow.id).await;
    assert!(matches!(wrong_instance, Err(StoreError::NotFound(_))), "{wrong_instance:?}");
    store.remove_access_rule(&Scope::Admin, "acme-wa", allow.id).await.unwrap();
    assert_eq!(store.list_access_rules(&Scope::Admin, "acme-wa").await.unwrap().len(), 1);

    // Deleting the instance takes its rules along; a new instance of that name starts clean.
    store.delete_instance(&Scope::Admin, "acme-wa").await.unwrap();
    store
        .create_instance(&InstanceRecord { id: "id-new".into(), ..record("acme-wa", Channel::Whatsapp) })
        .await
        .unwrap();
    assert!(store.list_access_rules(&Scope::Admin, "acme-wa").await.unwrap().is_empty());
}

async fn every_change_is_one_revision_in_the_log(store: Shared) {
    assert_eq!(store.config_revision().await.unwrap(), 0);
    store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let rule = store.put_access_rule(&Scope::Admin, "acme-wa", "+55*", Action::Block).await.unwrap();
    store.update_instance(&Scope::Admin, "acme-wa", 2, true, &spec("http://new:1")).await.unwrap();
    store.remove_access_rule(&Scope::Admin, "acme-wa", rule.id).await.unwrap();
    store.delete_instance(&Scope::Admin, "acme-wa").await.unwrap();
    // Failed changes leave no trace.
    assert!(store.delete_instance(&Scope::Admin, "acme-wa").await.is_err());
    assert_eq!(store.config_revision().await.unwrap(), 5);

    let changes = store.config_changes(0, 100).await.unwrap();
    assert_eq!(changes.iter().map(|c| c.revision).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert!(changes.iter().all(|c| c.kind == KIND_INSTANCE && c.key == "acme-wa"));
    assert_eq!(changes.iter().map(|c| c.op).collect::<Vec<_>>(), {
        use ChangeOp::*;
        [Upsert, Upsert, Upsert, Upsert, Delete]
    });
    // An upsert carries the whole instance config at that revision, rules included.
    let at2: InstanceConfig = serde_json::from_str(changes[1].payload.as_deref().unwrap()).unwrap();
    assert_eq!(at2.instance.revision, 2);
    assert_eq!(at2.rules.len(), 1);
    assert_eq!(at2.rules[0].pattern, "+55*");
    let at3: InstanceConfig = serde_json::from_str(changes[2].payload.as_deref().unwrap()).unwrap();
    assert_eq!(at3.instance.spec.agent.url, "http://new:1");
    assert_eq!(changes[4].payload, None);

    assert_eq!(store.config_changes(3, 100).await.unwrap().len(), 2);
    assert_eq!(store.config_changes(0, 2).await.unwrap().len(), 2);
}

async fn concurrent_changes_get_distinct_consecutive_revisions(store: Shared) {
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.create_instance(&record(&format!("t{i}"), Channel::Whatsapp)).await })
        })
        .collect();
    let mut revisions = Vec::new();
    for task in tasks {
        revisions.push(task.await.unwrap().unwrap().revision);
    }
    revisions.sort();
    assert_eq!(revisions, (1..=16).collect::<Vec<i64>>());
    let logged: Vec<i64> = store.config_changes(0, 100).await.unwrap().iter().map(|c| c.revision).collect();
    assert_eq!(logged, (1..=16).collect::<Vec<i64>>());
}

async fn api_keys(store: Shared) {
    assert_eq!(store.count_api_keys().await.unwrap(), 0);
    let admin = api_key("a1", Scope::Admin);
    let tenant = api_key("t1", scoped(&["acme-*", "solo"]));
    store.create_api_key(&admin).await.unwrap();
    store.create_api_key(&tenant).await.unwrap();
    assert!(matches!(store.create_api_key(&admin).await, Err(StoreError::AlreadyExists(_))));
    assert_eq!(store.count_api_keys().await.unwrap(), 2);

    assert_eq!(store.find_api_key_by_hash("hash-t1").await.unwrap(), Some(tenant.clone()));
    assert_eq!(store.find_api_key_by_hash("nope").await.unwrap(), None);
    assert_eq!(store.list_api_keys().await.unwrap().len(), 2);

    store.touch_api_key("t1", 1234).await.unwrap();
    assert_eq!(store.find_api_key_by_hash("hash-t1").await.unwrap().unwrap().last_used_at, Some(1234));

    let revoked = store.revoke_api_key("t1", 5000).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(5000));
    // Revoking again keeps the first revocation time.
    assert_eq!(store.revoke_api_key("t1", 9000).await.unwrap().revoked_at, Some(5000));
    assert!(matches!(store.revoke_api_key("zz", 1).await, Err(StoreError::NotFound(_))));
}

async fn snapshot_is_the_state_at_its_revision(store: Shared) {
    let (revision, empty) = store.config_snapshot().await.unwrap();
    assert_eq!((revision, empty.len()), (0, 0));
    store.create_instance(&record("b-wa", Channel::Whatsapp)).await.unwrap();
    store.create_instance(&record("a-wa", Channel::Whatsapp)).await.unwrap();
    store.put_access_rule(&Scope::Admin, "a-wa", "+1*", Action::Block).await.unwrap();
    store.put_access_rule(&Scope::Admin, "b-wa", "+2*", Action::Allow).await.unwrap();
    store.put_access_rule(&Scope::Admin, "a-wa", "+3*", Action::Allow).await.unwrap();
    let (revision, configs) = store.config_snapshot().await.unwrap();
    assert_eq!(revision, 5);
    assert_eq!(configs.iter().map(|c| c.instance.name.as_str()).collect::<Vec<_>>(), ["a-wa", "b-wa"]);
    assert_eq!(configs[0].rules.iter().map(|r| r.pattern.as_str()).collect::<Vec<_>>(), ["+1*", "+3*"]);
    assert_eq!(configs[1].rules.len(), 1);
    assert_eq!(configs[0].instance.revision, 5);

    // Snapshots taken while writers commit are each consistent: as many instances as the
    // revision they carry says were created.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                store.create_instance(&record(&format!("w{i}"), Channel::Whatsapp)).await.unwrap();
            }
        })
    };
    for _ in 0..20 {
        let (revision, configs) = store.config_snapshot().await.unwrap();
        assert_eq!(configs.len() as i64, 2 + (revision - 5), "snapshot at {revision}");
    }
    writer.await.unwrap();
}

async fn revisions_are_announced(store: Shared) {
    let mut watch = store.watch_revision();
    assert_eq!(*watch.borrow_and_update(), 0);
    store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), watch.changed()).await.unwrap().unwrap();
    assert_eq!(*watch.borrow_and_update(), 1);
}

async fn node_registry(store: Shared) {
    let node = NodeRecord {
        id: "n1".into(),
        address: "10.0.0.1:8882".into(),
        version: "0.1.0".into(),
        applied_revision: 3,
        first_seen_at: 1000,
        last_seen_at: 1000,
        connected: true,
        last_error: String::new(),
    };
    store.node_connected(&node).await.unwrap();
    store.node_nacked("n1", "too many instances", 2000).await.unwrap();
    let listed = store.list_nodes().await.unwrap();
    assert_eq!(listed[0].last_error, "too many instances");
    assert_eq!(listed[0].applied_revision, 3);
    store.node_acked("n1", 7, 3000).await.unwrap();
    store.node_seen("n1", 4000).await.unwrap();
    let listed = store.list_nodes().await.unwrap();
    assert_eq!((listed[0].applied_revision, listed[0].last_error.as_str(), listed[0].last_seen_at), (7, "", 4000));
    store.node_disconnected("n1", 5000).await.unwrap();
    assert!(!store.list_nodes().await.unwrap()[0].connected);

    // Reconnecting keeps the first-seen time.
    store
        .node_connected(&NodeRecord { first_seen_at: 9000, last_seen_at: 9000, applied_revision: 8, ..node.clone() })
        .await
        .unwrap();
    let again = &store.list_nodes().await.unwrap()[0];
    assert_eq!(
        (again.first_seen_at, again.last_seen_at, again.applied_revision, again.connected),
        (1000, 9000, 8, true)
    );
}

fn trace_event(trace: &str, instance_id: &str, seq: i64, stage: &str, status: &str) -> TraceEventRecord {
    TraceEventRecord {
        trace_id: trace.into(),
        seq,
        instance_id: instance_id.into(),
        stage: stage.into(),
        at: 1_000 + seq * 10,
        status: status.into(),
        ..Default::default()
    }
}

fn header(sender: &str, name: &str) -> TraceHeaderRecord {
    TraceHeaderRecord {
        channel: "whatsapp".into(),
        external_id: "3EB0".into(),
        conversation_id: format!("{sender}@s.whatsapp.net"),
        sender: sender.into(),
        sender_name: name.into(),
        user_id: format!("user-{sender}"),
        message_type: "conversation".into(),
        text: "hello".into(),
        received_at: 1_000,
    }
}

async fn traces_are_stored_once_and_scoped(store: Shared) {
    let acme = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let other = store.create_instance(&record("other-wa", Channel::Whatsapp)).await.unwrap();
    let first = vec![
        TraceEventRecord {
            header: Some(header("5511", "Maria")),
            ..trace_event("t1", &acme.id, 0, "received", "received")
        },
        trace_event("t1", &acme.id, 1, "access", "processing"),
        TraceEventRecord { agent_ms: 120, ..trace_event("t1", &acme.id, 2, "agent_response", "processing") },
        trace_event("t1", &acme.id, 3, "completed", "completed"),
    ];
    assert_eq!(store.ingest_trace_events("n1", &first).await.unwrap(), 4);
    // A resent batch, and a late copy of an early stage, change nothing.
    assert_eq!(store.ingest_trace_events("n1", &first).await.unwrap(), 0);
    assert_eq!(store.ingest_trace_events("n1", &first[1..2]).await.unwrap(), 0);

    let failed = vec![
        TraceEventRecord { header: Some(header("5511", "")), ..trace_event("t2", &acme.id, 0, "received", "received") },
        TraceEventRecord {
            error: "agent timed out after 60s".into(),
            ..trace_event("t2", &acme.id, 1, "agent_request", "failed")
        },
    ];
    store.ingest_trace_events("n1", &failed).await.unwrap();
    let elsewhere = vec![TraceEventRecord {
        header: Some(header("5522", "Jo")),
        ..trace_event("t3", &other.id, 0, "received", "ignored")
    }];
    store.ingest_trace_events("n2", &elsewhere).await.unwrap();

    let all = store.list_traces(&Scope::Admin, &TraceQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 3);
    let acme_only =
        store.list_traces(&scoped(&["acme-*"]), &TraceQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(acme_only.iter().map(|t| t.id.as_str()).collect::<Vec<_>>().len(), 2);
    assert!(acme_only.iter().all(|t| t.instance == "acme-wa"));
    let failures = store
        .list_traces(&Scope::Admin, &TraceQuery { status: Some("failed".into()), limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (failures[0].error_stage.as_str(), failures[0].error.as_str()),
        ("agent_request", "agent timed out after 60s")
    );

    let (t1, stages) = store.get_trace(&Scope::Admin, "t1").await.unwrap();
    assert_eq!((t1.status.as_str(), t1.agent_ms, t1.node_id.as_str()), ("completed", 120, "n1"));
    assert_eq!(
        stages.iter().map(|s| s.stage.as_str()).collect::<Vec<_>>(),
        ["received", "access", "agent_response", "completed"]
    );
    let hidden = store.get_trace(&scoped(&["acme-*"]), "t3").await;
    assert!(matches!(hidden, Err(StoreError::NotFound(_))), "{hidden:?}");

    // Two messages from one sender: one user, counted twice, keeping the name it had.
    let users = store.list_users(&Scope::Admin, "acme-wa").await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(
        (users[0].identity.as_str(), users[0].display_name.as_str(), users[0].message_count),
        ("5511", "Maria", 2)
    );
    assert!(matches!(store.list_users(&scoped(&["acme-*"]), "other-wa").await, Err(StoreError::NotFound(_))));
}

/// Opens stores on one fresh database of the backend under test.
struct Fixture {
    url: String,
    _dir: Option<tempfile::TempDir>,
    _db: Option<TestDatabase>,
}

impl Fixture {
    fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("omni.db").display());
        Fixture { url, _dir: Some(dir), _db: None }
    }

    async fn postgres() -> Option<Fixture> {
        let db = TestDatabase::create().await?;
        Some(Fixture { url: db.url.clone(), _dir: None, _db: Some(db) })
    }

    async fn store(&self) -> Shared {
        self.store_with(StoreOptions::default()).await
    }

    async fn store_with(&self, options: StoreOptions) -> Shared {
        connect_with(&self.url, options).await.unwrap()
    }
}

async fn the_change_log_is_compacted_past_its_retention(fixture: Fixture) {
    let store = fixture.store_with(StoreOptions { change_log_retention: 3 }).await;
    assert_eq!(store.config_log_bounds().await.unwrap(), LogBounds { head: 0, compacted: 0 });
    for i in 0..5 {
        store.create_instance(&record(&format!("i{i}"), Channel::Whatsapp)).await.unwrap();
    }
    assert_eq!(store.config_log_bounds().await.unwrap(), LogBounds { head: 5, compacted: 2 });
    let kept: Vec<i64> = store.config_changes(0, 5).await.unwrap().iter().map(|c| c.revision).collect();
    assert_eq!(kept, [3, 4, 5]);
}

/// Two stores on one database (two control planes): each hears of the other's commits.
async fn other_writers_are_announced(fixture: Fixture) {
    let a = fixture.store().await;
    let b = fixture.store().await;
    let mut watch = b.watch_revision();
    watch.borrow_and_update();
    a.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    if b.backend() == Backend::Postgres {
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.changed()).await.unwrap().unwrap();
        assert_eq!(*watch.borrow(), 1);
    } else {
        // One SQLite file is one process's: nothing to announce across processes, and the
        // sync sessions re-read the log on their progress tick regardless.
        assert_eq!(b.config_revision().await.unwrap(), 1);
    }
}

macro_rules! conformance {
    (stores: [$($test:ident),+ $(,)?], fixtures: [$($fixture_test:ident),+ $(,)?] $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let fixture = super::Fixture::sqlite();
                    super::$test(fixture.store().await).await;
                }
            )+
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $fixture_test() {
                    super::$fixture_test(super::Fixture::sqlite()).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(fixture) = super::Fixture::postgres().await else { return };
                    super::$test(fixture.store().await).await;
                }
            )+
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $fixture_test() {
                    let Some(fixture) = super::Fixture::postgres().await else { return };
                    super::$fixture_test(fixture).await;
                }
            )+
        }
    };
}

conformance!(
    stores: [
        instance_lifecycle,
        listing_pages_filters_and_scopes,
        scope_hides_other_tenants,
        access_rules,
        every_change_is_one_revision_in_the_log,
        concurrent_changes_get_distinct_consecutive_revisions,
        api_keys,
        snapshot_is_the_state_at_its_revision,
        revisions_are_announced,
        node_registry,
        traces_are_stored_once_and_scoped,
    ],
    fixtures: [the_change_log_is_compacted_past_its_retention, other_writers_are_announced],
);

/// Two control planes starting together on one fresh Postgres database both come up: the
/// migration lock serializes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_on_postgres() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (a, b) = tokio::join!(connect(&db.url), connect(&db.url));
    let (a, b) = (a.unwrap(), b.unwrap());
    a.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    assert_eq!(b.get_instance(&Scope::Admin, "acme-wa").await.unwrap().revision, 1);
}
