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
            instance_token: None,
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
        trace_retention_secs: 0,
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
        discord_token_sha256: None,
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

    let updated = store
        .update_instance(&Scope::Admin, "acme-wa", created.revision, false, &spec("http://new:1"), None)
        .await
        .unwrap();
    assert!(!updated.active);
    assert_eq!(updated.spec.agent.url, "http://new:1");
    assert_eq!(updated.revision, 2, "the failed duplicate create consumed no revision");
    assert!(updated.updated_at >= created.updated_at);

    // A writer holding an old revision loses.
    let stale =
        store.update_instance(&Scope::Admin, "acme-wa", created.revision, true, &spec("http://x:1"), None).await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");

    store.delete_instance(&Scope::Admin, "acme-wa").await.unwrap();
    assert!(matches!(store.get_instance(&Scope::Admin, "acme-wa").await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.delete_instance(&Scope::Admin, "acme-wa").await, Err(StoreError::NotFound(_))));
    let missing = store.update_instance(&Scope::Admin, "acme-wa", 2, true, &spec("http://x:1"), None).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
}

fn bot(name: &str, fingerprint: Option<&str>) -> InstanceRecord {
    InstanceRecord { discord_token_sha256: fingerprint.map(str::to_owned), ..record(name, Channel::Discord) }
}

async fn fingerprint_of(store: &Shared, name: &str) -> Option<String> {
    store.get_instance(&Scope::Admin, name).await.unwrap().discord_token_sha256
}

/// One Discord bot serves one instance: the database refuses a second instance with the same
/// token fingerprint, however the writes interleave.
async fn a_discord_token_fingerprint_is_unique(store: Shared) {
    let in_use = |r: &Result<InstanceRecord, StoreError>| matches!(r, Err(StoreError::DiscordTokenInUse));

    // Creates at once with one fingerprint: exactly one succeeds, the others change nothing.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.create_instance(&bot(&format!("bot{i}"), Some("sha-shared"))).await })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results.iter().filter(|r| r.is_err()).all(in_use), "{results:?}");
    let winner = results.into_iter().find_map(Result::ok).unwrap();
    assert_eq!(winner.discord_token_sha256.as_deref(), Some("sha-shared"));
    assert_eq!(fingerprint_of(&store, &winner.name).await.as_deref(), Some("sha-shared"));
    let all = store.list_instances(&Scope::Admin, &ListInstances { limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(store.config_revision().await.unwrap(), 1, "refused creates consume no revision");

    // A taken name is reported as such, even when the fingerprint is taken too.
    let again = store.create_instance(&InstanceRecord { id: "id-again".into(), ..winner.clone() }).await;
    assert!(matches!(again, Err(StoreError::AlreadyExists(_))), "{again:?}");

    // Instances without a fingerprint (other channels) never collide.
    store.create_instance(&bot("tokenless-1", None)).await.unwrap();
    store.create_instance(&bot("tokenless-2", None)).await.unwrap();
    store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    assert_eq!(fingerprint_of(&store, "acme-wa").await, None);

    // An update may not take a fingerprint another instance has, and then changes nothing.
    let other = store.create_instance(&bot("other", Some("sha-other"))).await.unwrap();
    let taken =
        store.update_instance(&Scope::Admin, "other", other.revision, false, &other.spec, Some("sha-shared")).await;
    assert!(in_use(&taken), "{taken:?}");
    let unchanged = store.get_instance(&Scope::Admin, "other").await.unwrap();
    assert_eq!(unchanged, other);
    // It may keep its own, and a fingerprint it gives up is free at once.
    let kept =
        store.update_instance(&Scope::Admin, "other", other.revision, false, &other.spec, Some("sha-other")).await;
    let kept = kept.unwrap();
    assert_eq!(kept.discord_token_sha256.as_deref(), Some("sha-other"));
    assert!(in_use(&store.create_instance(&bot("late", Some("sha-other"))).await));
    store.update_instance(&Scope::Admin, "other", kept.revision, true, &kept.spec, Some("sha-moved")).await.unwrap();
    store.create_instance(&bot("late", Some("sha-other"))).await.unwrap();

    // The fingerprint travels with the instance's config, in the snapshot as in the log.
    let (_, snapshot) = store.config_snapshot().await.unwrap();
    let late = snapshot.iter().find(|c| c.instance.name == "late").unwrap();
    assert_eq!(late.instance.discord_token_sha256.as_deref(), Some("sha-other"));
    let head = store.config_revision().await.unwrap();
    let logged: InstanceConfig =
        serde_json::from_str(store.config_changes(head - 1, head).await.unwrap()[0].payload.as_deref().unwrap())
            .unwrap();
    assert_eq!(logged.instance, late.instance);

    // Deleting an instance frees its fingerprint.
    store.delete_instance(&Scope::Admin, &winner.name).await.unwrap();
    store.create_instance(&bot("heir", Some("sha-shared"))).await.unwrap();
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
        store.update_instance(&acme, "other-wa", other.revision, false, &spec("http://x:1"), None).await.map(drop)
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
    store.update_instance(&Scope::Admin, "acme-wa", 2, true, &spec("http://new:1"), None).await.unwrap();
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
        .list_traces(
            &Scope::Admin,
            &TraceQuery {
                filter: TraceFilter { status: Some("failed".into()), ..Default::default() },
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (failures[0].error_stage.as_str(), failures[0].error.as_str()),
        ("agent_request", "agent timed out after 60s")
    );

    let (t1, stages) = store.get_trace(&Scope::Admin, "t1", false).await.unwrap();
    assert_eq!((t1.status.as_str(), t1.agent_ms, t1.node_id.as_str()), ("completed", 120, "n1"));
    assert_eq!(
        stages.iter().map(|s| s.stage.as_str()).collect::<Vec<_>>(),
        ["received", "access", "agent_response", "completed"]
    );
    let hidden = store.get_trace(&scoped(&["acme-*"]), "t3", true).await;
    assert!(matches!(hidden, Err(StoreError::NotFound(_))), "{hidden:?}");

    // Two messages from one sender: one user, counted twice, keeping the name it had.
    let users = store.list_users(&Scope::Admin, &users_of("acme-wa")).await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(
        (users[0].identity.as_str(), users[0].display_name.as_str(), users[0].message_count),
        ("5511", "Maria", 2)
    );
    assert!(matches!(
        store.list_users(&scoped(&["acme-*"]), &users_of("other-wa")).await,
        Err(StoreError::NotFound(_))
    ));
}

fn users_of(instance: &str) -> UserQuery {
    UserQuery { instance: instance.into(), limit: 100, ..Default::default() }
}

/// One finished trace: received at `at`, with an agent latency and a final status.
fn finished(
    trace: &str,
    instance_id: &str,
    at: i64,
    sender: &str,
    agent_ms: i64,
    status: &str,
) -> Vec<TraceEventRecord> {
    let received = TraceEventRecord {
        header: Some(TraceHeaderRecord {
            received_at: at,
            text: format!("text of {trace}"),
            user_id: format!("{instance_id}/{sender}"),
            ..header(sender, "")
        }),
        at,
        ..trace_event(trace, instance_id, 0, "received", "received")
    };
    let agent = TraceEventRecord {
        agent_ms,
        at: at + agent_ms,
        ..trace_event(trace, instance_id, 1, "agent_response", "processing")
    };
    let end = TraceEventRecord {
        at: at + agent_ms + 5,
        error: if status == "failed" { "the agent answered 500".into() } else { String::new() },
        stage: if status == "failed" { "agent_request".into() } else { status.into() },
        ..trace_event(trace, instance_id, 2, status, status)
    };
    vec![received, agent, end]
}

fn ids(traces: &[TraceRecord]) -> Vec<&str> {
    traces.iter().map(|t| t.id.as_str()).collect()
}

async fn trace_pages_and_filters(store: Shared) {
    let acme = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let mut events = Vec::new();
    // Five traces, two sharing a timestamp (the cursor must split ties by id).
    for (id, at, sender) in
        [("a", 100, "5511"), ("b", 200, "5522"), ("c", 200, "5511"), ("d", 300, "5533"), ("e", 400, "5511")]
    {
        events.extend(finished(id, &acme.id, at, sender, 10, "completed"));
    }
    store.ingest_trace_events("n1", &events).await.unwrap();
    let page = |after: Option<TraceCursor>, filter: TraceFilter| TraceQuery { filter, after, limit: 2 };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let traces = store.list_traces(&Scope::Admin, &page(after.clone(), TraceFilter::default())).await.unwrap();
        if traces.is_empty() {
            break;
        }
        // A trace arriving between pages (newer than all) does not shift the pages.
        if seen.is_empty() {
            store.ingest_trace_events("n1", &finished("z", &acme.id, 999, "5599", 10, "completed")).await.unwrap();
        }
        let last = traces.last().unwrap();
        after = Some(TraceCursor { received_at: last.received_at, id: last.id.clone() });
        seen.extend(traces.into_iter().map(|t| t.id));
    }
    assert_eq!(seen, ["e", "d", "c", "b", "a"]);

    let query = |filter: TraceFilter| TraceQuery { filter, limit: 50, ..Default::default() };
    let by_sender = store
        .list_traces(&Scope::Admin, &query(TraceFilter { sender: Some("5511".into()), ..Default::default() }))
        .await
        .unwrap();
    assert_eq!(ids(&by_sender), ["e", "c", "a"]);
    let window = store
        .list_traces(&Scope::Admin, &query(TraceFilter { since: Some(200), until: Some(400), ..Default::default() }))
        .await
        .unwrap();
    assert_eq!(ids(&window), ["d", "c", "b"]);
    let text = store
        .list_traces(
            &Scope::Admin,
            &query(TraceFilter { text_contains: Some("TEXT OF D".into()), ..Default::default() }),
        )
        .await
        .unwrap();
    assert_eq!(ids(&text), ["d"]);
    // LIKE metacharacters in the search are literal.
    let literal = store
        .list_traces(
            &Scope::Admin,
            &query(TraceFilter { text_contains: Some("text_of%".into()), ..Default::default() }),
        )
        .await
        .unwrap();
    assert!(literal.is_empty());
    let channel = store
        .list_traces(&Scope::Admin, &query(TraceFilter { channel: Some("slack".into()), ..Default::default() }))
        .await
        .unwrap();
    assert!(channel.is_empty());

    // The tail's lookup: only the ids asked for, within scope and filter.
    let wanted = ["a".to_owned(), "e".to_owned(), "nope".to_owned()];
    let found = store.traces_by_ids(&Scope::Admin, &wanted, &TraceFilter::default()).await.unwrap();
    assert_eq!(ids(&found), ["a", "e"]);
    assert!(store.traces_by_ids(&scoped(&["other"]), &wanted, &TraceFilter::default()).await.unwrap().is_empty());
}

async fn finished_traces_are_announced(store: Shared) {
    let acme = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let mut finished_ids = store.finished_traces();
    let mut events = finished("t1", &acme.id, 100, "5511", 10, "completed");
    let last = events.pop().unwrap();
    store.ingest_trace_events("n1", &events).await.unwrap();
    store.ingest_trace_events("n1", std::slice::from_ref(&last)).await.unwrap();
    // Resent: stored already, so not announced again.
    store.ingest_trace_events("n1", &[last]).await.unwrap();
    let announced =
        tokio::time::timeout(std::time::Duration::from_secs(5), finished_ids.recv()).await.unwrap().unwrap();
    assert_eq!(&announced[..], ["t1".to_owned()]);
    assert!(finished_ids.try_recv().is_err(), "announced once");
}

async fn payloads_are_compressed_and_only_read_when_asked(fixture: Fixture) {
    let store = fixture.store().await;
    let acme = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let payload = format!("{{\"text\":\"{}\"}}", "compressible ".repeat(200));
    let mut events = finished("t1", &acme.id, 100, "5511", 10, "completed");
    events[1].payload = payload.clone();
    store.ingest_trace_events("n1", &events).await.unwrap();
    let (_, without) = store.get_trace(&Scope::Admin, "t1", false).await.unwrap();
    assert!(without.iter().all(|s| s.payload.is_empty()));
    let (_, with) = store.get_trace(&Scope::Admin, "t1", true).await.unwrap();
    assert_eq!(with[1].payload, payload);
    // Stored as LZ4 with the trace: the text is not in the database, and what is stored (every
    // stage) is much smaller than the one payload.
    let stored: i64 = match store.backend() {
        Backend::Sqlite => {
            use sqlx::Connection;
            let mut conn = sqlx::SqliteConnection::connect(&fixture.url).await.unwrap();
            sqlx::query_scalar("SELECT length(stages) FROM traces WHERE id = 't1'").fetch_one(&mut conn).await.unwrap()
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&fixture.url).await.unwrap();
            let n: i32 = sqlx::query_scalar("SELECT length(stages) FROM traces WHERE id = 't1'")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            i64::from(n)
        }
    };
    assert!(stored > 0 && stored * 5 < payload.len() as i64, "{stored} bytes stored for {}", payload.len());
}

/// Runs `sql` on the fixture's database, outside the store.
async fn raw(fixture: &Fixture, store: &Shared, sql: &str) {
    use sqlx::Connection;
    match store.backend() {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&fixture.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&fixture.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        }
    }
}

/// A trace stored before stages moved into its row (its stages in `trace_stages`) reads the
/// same, takes new stages once, and is purged whole.
async fn stages_stored_before_the_upgrade_are_still_read(fixture: Fixture) {
    let store = fixture.store().await;
    let acme = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let events = finished("old", &acme.id, 100, "5511", 10, "completed");
    store.ingest_trace_events("n1", &events[..2]).await.unwrap();
    raw(
        &fixture,
        &store,
        "UPDATE traces SET stages = NULL WHERE id = 'old'; \
         INSERT INTO trace_stages (trace_id, seq, stage, at, duration_ms, detail, payload) VALUES \
         ('old', 0, 'received', 100, 0, '', '{\"a\":1}'), ('old', 1, 'agent_response', 110, 0, '', '')",
    )
    .await;
    assert_eq!(store.ingest_trace_events("n1", &events[1..2]).await.unwrap(), 0, "stored before: not again");
    assert_eq!(store.ingest_trace_events("n1", &events).await.unwrap(), 1, "the third stage is new");
    let (trace, stages) = store.get_trace(&Scope::Admin, "old", true).await.unwrap();
    assert_eq!(trace.status, "completed");
    let numbered: Vec<(i64, &str)> = stages.iter().map(|s| (s.seq, s.stage.as_str())).collect();
    assert_eq!(numbered, [(0, "received"), (1, "agent_response"), (2, "completed")]);
    assert_eq!(stages[0].payload, r#"{"a":1}"#);
    let filter = TraceFilter { until: Some(1_000_000), ..Default::default() };
    assert_eq!(store.purge_traces(&Scope::Admin, &filter, false).await.unwrap(), 1);
    assert!(store.get_trace(&Scope::Admin, "old", false).await.is_err());
}

async fn stats_are_computed_by_the_database(store: Shared) {
    let acme = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let other = store.create_instance(&record("other-wa", Channel::Whatsapp)).await.unwrap();
    let hour = 3_600_000;
    let mut events = Vec::new();
    // 100 traces with agent latencies 1..=100 ms over two hours: 90 completed, 10 failed.
    for i in 1..=100i64 {
        let status = if i % 10 == 0 { "failed" } else { "completed" };
        events.extend(finished(&format!("t{i}"), &acme.id, 10 * hour + (i % 2) * hour + i, "5511", i, status));
    }
    events.extend(finished("x", &other.id, 10 * hour, "5522", 1000, "completed"));
    store.ingest_trace_events("n1", &events).await.unwrap();

    let filter = TraceFilter { instance: Some("acme-wa".into()), ..Default::default() };
    let stats = store.trace_stats(&Scope::Admin, &filter).await.unwrap();
    assert_eq!(stats.total, 100);
    assert_eq!(stats.by_status, [("completed".to_owned(), 90), ("failed".to_owned(), 10)]);
    assert_eq!(stats.by_error_stage, [("agent_request".to_owned(), 10)]);
    assert_eq!(stats.by_instance, [("acme-wa".to_owned(), 100)]);
    let agent = &stats.agent_latency;
    assert_eq!((agent.samples, agent.p50_ms, agent.p95_ms, agent.p99_ms, agent.max_ms), (100, 50, 95, 99, 100));
    assert_eq!(agent.avg_ms, 50); // 50.5, truncated
    // Total: from received to the last stage, agent + 5 ms.
    assert_eq!((stats.total_latency.p50_ms, stats.total_latency.max_ms), (55, 105));
    assert_eq!(stats.per_hour, [(10 * hour, 50), (11 * hour, 50)]);

    let everyone = store.trace_stats(&Scope::Admin, &TraceFilter::default()).await.unwrap();
    assert_eq!(everyone.total, 101);
    let scoped_stats = store.trace_stats(&scoped(&["other-*"]), &TraceFilter::default()).await.unwrap();
    assert_eq!((scoped_stats.total, scoped_stats.agent_latency.max_ms), (1, 1000));
    let empty =
        store.trace_stats(&Scope::Admin, &TraceFilter { since: Some(99 * hour), ..Default::default() }).await.unwrap();
    assert_eq!((empty.total, empty.agent_latency.samples, empty.agent_latency.p99_ms), (0, 0, 0));
}

async fn purges_and_retention_delete_old_traces(store: Shared) {
    let day = 86_400_000;
    let now = 100 * day;
    let mut short = record("short-wa", Channel::Whatsapp);
    short.spec.trace_retention_secs = 86_400;
    let short = store.create_instance(&short).await.unwrap();
    let keep = store.create_instance(&record("keep-wa", Channel::Whatsapp)).await.unwrap();
    let gone = store.create_instance(&record("gone-wa", Channel::Whatsapp)).await.unwrap();
    let mut events = Vec::new();
    for (id, instance, age_days) in [
        ("s-old", &short.id, 2),
        ("s-new", &short.id, 0),
        ("k-old", &keep.id, 40),
        ("k-mid", &keep.id, 10),
        ("g-old", &gone.id, 40),
    ] {
        events.extend(finished(id, instance, now - age_days * day - 1000, "5511", 10, "completed"));
    }
    store.ingest_trace_events("n1", &events).await.unwrap();
    store.delete_instance(&Scope::Admin, "gone-wa").await.unwrap();

    // A scoped purge reaches only its instances; a dry run deletes nothing.
    let older_than_5d = TraceFilter { until: Some(now - 5 * day), ..Default::default() };
    assert_eq!(store.purge_traces(&scoped(&["keep-*"]), &older_than_5d, true).await.unwrap(), 2);
    assert_eq!(store.purge_traces(&Scope::Admin, &older_than_5d, true).await.unwrap(), 3);
    assert_eq!(
        store
            .purge_traces(
                &scoped(&["keep-*"]),
                &TraceFilter { until: Some(now - 20 * day), ..Default::default() },
                false
            )
            .await
            .unwrap(),
        1
    );
    let (_, stages) = store.get_trace(&Scope::Admin, "k-mid", false).await.unwrap();
    assert_eq!(stages.len(), 3);
    assert!(matches!(store.get_trace(&Scope::Admin, "k-old", false).await, Err(StoreError::NotFound(_))));

    // Retention: the instance's own (1 day), else the default (30 days), also for traces of
    // deleted instances.
    assert_eq!(store.apply_trace_retention(30 * day, now).await.unwrap(), 2);
    let left = store.list_traces(&Scope::Admin, &TraceQuery { limit: 50, ..Default::default() }).await.unwrap();
    assert_eq!(ids(&left), ["s-new", "k-mid"]);
    // An admin purge also reaches traces of deleted instances, and leaves no stages behind.
    assert_eq!(
        store
            .purge_traces(&Scope::Admin, &TraceFilter { until: Some(now + day), ..Default::default() }, false)
            .await
            .unwrap(),
        2
    );
    assert_eq!(store.trace_stats(&Scope::Admin, &TraceFilter::default()).await.unwrap().total, 0);
}

async fn users_are_searched_and_paged(store: Shared) {
    let acme = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let mut events = Vec::new();
    for (i, (sender, name)) in
        [("5511", "Maria Silva"), ("5522", "João"), ("5533", "mariana"), ("5544", "")].iter().enumerate()
    {
        events.push(TraceEventRecord {
            header: Some(TraceHeaderRecord { received_at: 1000 + i as i64, ..header(sender, name) }),
            ..trace_event(&format!("t{i}"), &acme.id, 0, "received", "received")
        });
    }
    store.ingest_trace_events("n1", &events).await.unwrap();
    let query = |search: Option<&str>, after: Option<(i64, String)>, limit| UserQuery {
        instance: "acme-wa".into(),
        search: search.map(str::to_owned),
        after,
        limit,
    };
    let found = store.list_users(&Scope::Admin, &query(Some("MARIA"), None, 10)).await.unwrap();
    assert_eq!(found.iter().map(|u| u.identity.as_str()).collect::<Vec<_>>(), ["5533", "5511"]);
    let by_number = store.list_users(&Scope::Admin, &query(Some("552"), None, 10)).await.unwrap();
    assert_eq!(by_number.iter().map(|u| u.display_name.as_str()).collect::<Vec<_>>(), ["João"]);
    let first = store.list_users(&Scope::Admin, &query(None, None, 3)).await.unwrap();
    let last = first.last().unwrap();
    let rest = store
        .list_users(&Scope::Admin, &query(None, Some((last.last_seen_at, last.identity.clone())), 3))
        .await
        .unwrap();
    let all: Vec<&str> = first.iter().chain(&rest).map(|u| u.identity.as_str()).collect();
    assert_eq!(all, ["5544", "5533", "5522", "5511"]);
}

/// A trace reported stage by stage, out of order and with a resend, ends as one reported whole.
async fn stages_in_pieces_add_up(store: Shared) {
    let acme = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let whole = finished("whole", &acme.id, 100, "5511", 40, "failed");
    store.ingest_trace_events("n1", &whole).await.unwrap();
    let pieces = finished("pieces", &acme.id, 100, "5511", 40, "failed");
    for batch in [&pieces[0..1], &pieces[2..3], &pieces[1..2], &pieces[0..2]] {
        store.ingest_trace_events("n1", batch).await.unwrap();
    }
    let (a, _) = store.get_trace(&Scope::Admin, "whole", false).await.unwrap();
    let (b, stages) = store.get_trace(&Scope::Admin, "pieces", false).await.unwrap();
    assert_eq!(stages.len(), 3);
    for t in [&a, &b] {
        assert_eq!(
            (t.status.as_str(), t.error_stage.as_str(), t.error.as_str(), t.agent_ms, t.updated_at),
            ("failed", "agent_request", "the agent answered 500", 40, 145),
            "{t:?}"
        );
    }
}

/// One report of hundreds of traces, some stored before and some new, spans several
/// statements of each kind: every trace and stage lands, and each sender is counted once per
/// message.
async fn a_large_batch_is_stored_whole(store: Shared) {
    let acme = store.create_instance(&record("acme-wa", Channel::Whatsapp)).await.unwrap();
    let received = |i: usize| TraceEventRecord {
        header: Some(header(&format!("55{}", i % 7), "")),
        ..trace_event(&format!("t{i:03}"), &acme.id, 0, "received", "received")
    };
    let completed = |i: usize| trace_event(&format!("t{i:03}"), &acme.id, 1, "completed", "completed");
    let earlier: Vec<_> = (0..150).map(received).collect();
    assert_eq!(store.ingest_trace_events("n1", &earlier).await.unwrap(), 150);
    // The earlier traces' first stages come again (a resend): they count neither as stages nor
    // as messages of their senders.
    let batch: Vec<_> = (0..301).flat_map(|i| [received(i), completed(i)]).collect();
    assert_eq!(store.ingest_trace_events("n1", &batch).await.unwrap(), 150 + 2 * 151);

    let traces = store.list_traces(&Scope::Admin, &TraceQuery { limit: 500, ..Default::default() }).await.unwrap();
    assert_eq!(traces.len(), 301);
    assert!(traces.iter().all(|t| t.status == "completed"), "every trace got its last stage");
    for id in ["t000", "t149", "t150", "t300"] {
        let (_, stages) = store.get_trace(&Scope::Admin, id, false).await.unwrap();
        assert_eq!(stages.iter().map(|s| s.stage.as_str()).collect::<Vec<_>>(), ["received", "completed"], "{id}");
    }
    let users = store.list_users(&Scope::Admin, &users_of("acme-wa")).await.unwrap();
    assert_eq!(users.len(), 7);
    assert_eq!(users.iter().map(|u| u.message_count).sum::<i64>(), 301);
}

async fn connection_events_keep_the_latest(store: Shared) {
    let event = |kind: &str, state: &str, at: i64| InstanceEventRecord {
        instance_id: "i1".into(),
        kind: kind.into(),
        state: state.into(),
        status_reason: if state == "open" { 200 } else { 401 },
        wuid: "5511@s.whatsapp.net".into(),
        profile_name: "Acme".into(),
        at,
        ..Default::default()
    };
    assert_eq!(store.instance_connection("i1").await.unwrap(), None);
    store.record_instance_events(&[event("qrcode", "", 50)]).await.unwrap();
    store.record_instance_events(&[event("connection", "open", 200), event("connection", "close", 100)]).await.unwrap();
    store.record_instance_events(&[event("qrcode", "", 40)]).await.unwrap();
    let now = store.instance_connection("i1").await.unwrap().unwrap();
    assert_eq!(
        (now.state.as_str(), now.status_reason, now.connection_at, now.qr_at, now.profile_name.as_str()),
        ("open", 200, 200, 50, "Acme")
    );
}

const TTL: i64 = 30_000;

fn gateway_event(instance_id: &str, node_id: &str, state: &str, revision: i64, at: i64) -> InstanceEventRecord {
    InstanceEventRecord {
        instance_id: instance_id.into(),
        kind: "gateway".into(),
        state: state.into(),
        detail: if state == "error" { "4004 authentication failed".into() } else { String::new() },
        node_id: node_id.into(),
        revision,
        at,
        ..Default::default()
    }
}

async fn lease_holder(store: &Shared, instance_id: &str) -> Option<(String, i64)> {
    store
        .gateway_status(instance_id)
        .await
        .unwrap()
        .filter(|s| !s.lease_node_id.is_empty())
        .map(|s| (s.lease_node_id, s.lease_expires_at))
}

async fn gateway_report(store: &Shared, instance_id: &str) -> (String, i64) {
    let status = store.gateway_status(instance_id).await.unwrap().unwrap();
    (status.state, status.revision)
}

async fn gateway_leases_spread_renew_and_move(store: Shared) {
    for name in ["a", "b", "c"] {
        store.create_instance(&record(name, Channel::Discord)).await.unwrap();
    }
    store.create_instance(&record("wa", Channel::Whatsapp)).await.unwrap();
    let t0 = now_millis();
    // Three bots, two live nodes: the first to ask gets its share (rounded up), in id order.
    assert_eq!(store.renew_gateway_leases("n1", t0, TTL, 2).await.unwrap(), ["id-a", "id-b"]);
    assert_eq!(store.renew_gateway_leases("n2", t0 + 1, TTL, 2).await.unwrap(), ["id-c"]);
    assert_eq!(lease_holder(&store, "id-a").await, Some(("n1".into(), t0 + TTL)));

    // Renewal keeps what each holds and extends it.
    assert_eq!(store.renew_gateway_leases("n1", t0 + 10_000, TTL, 2).await.unwrap(), ["id-a", "id-b"]);
    assert_eq!(store.renew_gateway_leases("n2", t0 + 20_000, TTL, 2).await.unwrap(), ["id-c"]);
    assert_eq!(lease_holder(&store, "id-b").await, Some(("n1".into(), t0 + 10_000 + TTL)));

    // n1 falls silent: once its leases expire, n2 (now the only live node) takes them.
    let later = t0 + 10_000 + TTL + 5_000;
    assert_eq!(store.renew_gateway_leases("n2", later, TTL, 1).await.unwrap(), ["id-a", "id-b", "id-c"]);
    assert_eq!(lease_holder(&store, "id-a").await, Some(("n2".into(), later + TTL)));
    // n1 comes back: its expired leases are not renewed, and nothing is free to claim.
    assert!(store.renew_gateway_leases("n1", later + 1_000, TTL, 2).await.unwrap().is_empty());
    assert_eq!(lease_holder(&store, "id-a").await, Some(("n2".into(), later + TTL)));
    assert_eq!(lease_holder(&store, "id-wa").await, None, "only Discord bots are leased");
}

async fn gateway_leases_follow_eligibility(store: Shared) {
    let d1 = store.create_instance(&record("d1", Channel::Discord)).await.unwrap();
    let d2 = store.create_instance(&record("d2", Channel::Discord)).await.unwrap();
    store.create_instance(&record("wa", Channel::Whatsapp)).await.unwrap();
    store.create_instance(&record("sl", Channel::Slack)).await.unwrap();
    let t0 = now_millis();
    assert_eq!(store.renew_gateway_leases("n1", t0, TTL, 1).await.unwrap(), ["id-d1", "id-d2"]);

    // Deactivated: n1's renewal no longer returns it (so n1 closes it), but the lease is not
    // freed: n1 may run the bot until it hears so. It is not extended either, and nobody else
    // gets the bot before it runs out, even once the instance is active again.
    let d1 = store
        .update_instance(&Scope::Admin, "d1", d1.revision, false, &d1.spec, d1.discord_token_sha256.as_deref())
        .await
        .unwrap();
    assert_eq!(store.renew_gateway_leases("n1", t0 + 1_000, TTL, 1).await.unwrap(), ["id-d2"]);
    assert_eq!(lease_holder(&store, "id-d1").await, Some(("n1".into(), t0 + TTL)), "kept, not extended");
    assert!(store.renew_gateway_leases("n2", t0 + 1_000, TTL, 2).await.unwrap().is_empty());
    store
        .update_instance(&Scope::Admin, "d1", d1.revision, true, &d1.spec, d1.discord_token_sha256.as_deref())
        .await
        .unwrap();
    assert!(store.renew_gateway_leases("n2", t0 + TTL - 1, TTL, 2).await.unwrap().is_empty(), "n1's until it ends");
    assert_eq!(lease_holder(&store, "id-d1").await, Some(("n1".into(), t0 + TTL)));
    // Once it has run out, the bot is free like any other.
    assert_eq!(store.renew_gateway_leases("n2", t0 + TTL, TTL, 2).await.unwrap(), ["id-d1"]);
    assert_eq!(store.renew_gateway_leases("n1", t0 + TTL + 1, TTL, 2).await.unwrap(), ["id-d2"]);

    // A lease left to run out on a bot no longer eligible does not count toward its holder's
    // share: n1 still claims its share of the eligible bots.
    store
        .update_instance(&Scope::Admin, "d2", d2.revision, false, &d2.spec, d2.discord_token_sha256.as_deref())
        .await
        .unwrap();
    store.create_instance(&record("d3", Channel::Discord)).await.unwrap();
    assert_eq!(store.renew_gateway_leases("n1", t0 + TTL + 2, TTL, 2).await.unwrap(), ["id-d3"]);
    assert_eq!(lease_holder(&store, "id-d2").await, Some(("n1".into(), t0 + 2 * TTL + 1)));
    assert_eq!(store.renew_gateway_leases("n2", t0 + TTL + 3, TTL, 2).await.unwrap(), ["id-d1"]);

    // Deleted: the lease goes with the instance (its id is never eligible again).
    store.delete_instance(&Scope::Admin, "d2").await.unwrap();
    assert_eq!(lease_holder(&store, "id-d2").await, None);
    assert_eq!(store.renew_gateway_leases("n1", t0 + TTL + 4, TTL, 2).await.unwrap(), ["id-d3"]);
}

async fn gateway_errors_stop_a_bot_until_it_is_updated(store: Shared) {
    let created = store.create_instance(&record("d1", Channel::Discord)).await.unwrap();
    let rev = created.revision;
    let t0 = now_millis();
    assert_eq!(store.renew_gateway_leases("n1", t0, TTL, 2).await.unwrap(), ["id-d1"]);
    // An error about an older config says nothing about the current one, whenever it arrives.
    store.record_instance_events(&[gateway_event("id-d1", "n1", "error", rev - 1, t0 + 1)]).await.unwrap();
    assert_eq!(store.renew_gateway_leases("n1", t0 + 1_000, TTL, 2).await.unwrap(), ["id-d1"]);

    store.record_instance_events(&[gateway_event("id-d1", "n1", "ready", rev, t0 + 2)]).await.unwrap();
    let status = store.gateway_status("id-d1").await.unwrap().unwrap();
    assert_eq!(
        (status.state.as_str(), status.node_id.as_str(), status.at, status.revision),
        ("ready", "n1", t0 + 2, rev)
    );

    // A fatal close at the current revision, then the node's report of closing it: the error
    // stands, and the bot is no longer leased (not renewed, nor claimed once it runs out).
    let closes =
        [gateway_event("id-d1", "n1", "error", rev, t0 + 3), gateway_event("id-d1", "n1", "closed", rev, t0 + 4)];
    store.record_instance_events(&closes).await.unwrap();
    let status = store.gateway_status("id-d1").await.unwrap().unwrap();
    assert_eq!((status.state.as_str(), status.error.as_str()), ("error", "4004 authentication failed"));
    assert!(store.renew_gateway_leases("n1", t0 + 2_000, TTL, 2).await.unwrap().is_empty(), "not renewed");
    let expired = t0 + 1_000 + TTL;
    assert!(store.renew_gateway_leases("n2", expired, TTL, 2).await.unwrap().is_empty(), "not restarted");
    // Late reports about an older config do not lift it.
    let late = [
        gateway_event("id-d1", "n2", "ready", rev - 1, t0 + 5),
        gateway_event("id-d1", "n2", "closed", rev - 1, t0 + 6),
    ];
    store.record_instance_events(&late).await.unwrap();
    assert_eq!(gateway_report(&store, "id-d1").await, ("error".into(), rev));
    assert!(store.renew_gateway_leases("n2", expired + 1, TTL, 2).await.unwrap().is_empty());

    // A new token (any update) raises the instance's revision: the bot may try again.
    let mut spec = created.spec.clone();
    spec.discord.token = Some(Sealed("v1.k.new-token".into()));
    let updated = store.update_instance(&Scope::Admin, "d1", rev, true, &spec, Some("sha-new-token")).await.unwrap();
    assert!(updated.revision > rev);
    assert_eq!(store.renew_gateway_leases("n2", expired + 2, TTL, 2).await.unwrap(), ["id-d1"]);
    store
        .record_instance_events(&[gateway_event("id-d1", "n2", "connecting", updated.revision, t0 + 7)])
        .await
        .unwrap();
    let status = store.gateway_status("id-d1").await.unwrap().unwrap();
    assert_eq!((status.state.as_str(), status.node_id.as_str()), ("connecting", "n2"));

    // A late error about the config before the update is shown, but does not stop the bot.
    store.record_instance_events(&[gateway_event("id-d1", "n1", "error", rev, t0 + 8)]).await.unwrap();
    assert_eq!(gateway_report(&store, "id-d1").await, ("error".into(), rev));
    assert_eq!(store.renew_gateway_leases("n2", expired + 3, TTL, 2).await.unwrap(), ["id-d1"]);
    // A closed report about the newer config replaces that error.
    store.record_instance_events(&[gateway_event("id-d1", "n2", "closed", updated.revision, t0 + 9)]).await.unwrap();
    assert_eq!(gateway_report(&store, "id-d1").await, ("closed".into(), updated.revision));

    // An error at the current revision stops it again, until the next update.
    store.record_instance_events(&[gateway_event("id-d1", "n2", "error", updated.revision, t0 + 10)]).await.unwrap();
    assert!(store.renew_gateway_leases("n2", expired + 4, TTL, 2).await.unwrap().is_empty());
    store
        .update_instance(&Scope::Admin, "d1", updated.revision, true, &spec, updated.discord_token_sha256.as_deref())
        .await
        .unwrap();
    assert_eq!(
        store.renew_gateway_leases("n2", expired + 5, TTL, 2).await.unwrap(),
        ["id-d1"],
        "its lease was still unexpired"
    );
}

/// A node shutting down hands its leases back: another node claims the bots at once (same
/// `now`), without waiting for the leases to run out, and counts the leaving node out of the
/// shares. The other nodes' leases are untouched.
async fn released_gateway_leases_are_claimed_at_once(store: Shared) {
    for name in ["a", "b", "c", "d"] {
        store.create_instance(&record(name, Channel::Discord)).await.unwrap();
    }
    let t0 = now_millis();
    for id in ["na", "nb"] {
        let node = NodeRecord {
            id: id.into(),
            address: String::new(),
            version: "0.1.0".into(),
            applied_revision: 4,
            first_seen_at: t0,
            last_seen_at: t0,
            connected: true,
            last_error: String::new(),
        };
        store.node_connected(&node).await.unwrap();
    }
    assert_eq!(store.count_live_nodes(t0 - TTL).await.unwrap(), 2);
    assert_eq!(store.renew_gateway_leases("na", t0, TTL, 2).await.unwrap(), ["id-a", "id-b"]);
    assert_eq!(store.renew_gateway_leases("nb", t0, TTL, 2).await.unwrap(), ["id-c", "id-d"]);

    // Long before its leases would run out, na (seen, as every heartbeat) releases them.
    let t1 = t0 + 1_000;
    store.node_seen("na", t1).await.unwrap();
    assert_eq!(store.release_gateway_leases("na", t1).await.unwrap(), 2);
    assert_eq!(lease_holder(&store, "id-a").await, Some(("na".into(), t1)), "ended now");
    assert_eq!(lease_holder(&store, "id-c").await, Some(("nb".into(), t0 + TTL)), "nb's untouched");

    // nb, now the only live node, takes every bot at the same instant.
    let live = store.count_live_nodes(t1 - TTL).await.unwrap();
    assert_eq!(live, 1, "a node that released is not counted live");
    assert_eq!(store.renew_gateway_leases("nb", t1, TTL, live).await.unwrap(), ["id-a", "id-b", "id-c", "id-d"]);
    assert_eq!(lease_holder(&store, "id-a").await, Some(("nb".into(), t1 + TTL)));
    assert_eq!(lease_holder(&store, "id-c").await, Some(("nb".into(), t1 + TTL)));

    // Releasing again ends nothing: the bots are nb's now.
    assert_eq!(store.release_gateway_leases("na", t1 + 1).await.unwrap(), 0);
    assert_eq!(lease_holder(&store, "id-b").await, Some(("nb".into(), t1 + TTL)));
    // A node that speaks again is live again.
    store.node_seen("na", t1 + 2).await.unwrap();
    assert_eq!(store.count_live_nodes(t1 - TTL).await.unwrap(), 2);
}

/// Nodes renewing at once while bots are switched off and back on. Each of four nodes in turn
/// falls silent for two rounds (its leases outlive the first and end exactly at the second),
/// and a fifth falls silent for good while still counted live for a while. At any time a bot
/// has one holder, each node's answer is what the table says, and a bot moves to another node
/// only once the lease last granted to its previous holder has run out.
async fn concurrent_gateway_renewals_never_share_a_bot(store: Shared) {
    const ROUND_MS: i64 = 1_000;
    const TTL_MS: i64 = 3_000;
    let mut bots = Vec::new();
    for i in 0..8 {
        bots.push(store.create_instance(&record(&format!("bot{i}"), Channel::Discord)).await.unwrap());
    }
    let base = now_millis();
    let (mut moves, mut moves_from_silent) = (0, 0);
    // Per bot: the node last granted it, and when that lease ends unless renewed.
    let mut granted: std::collections::HashMap<String, (String, i64)> = Default::default();
    for round in 0..28_i64 {
        let now = base + round * ROUND_MS;
        // From round 4, bot k is off for one round, then back on (so its holder's lease, not
        // renewed meanwhile, is still running when it is eligible again).
        let mut off = None;
        if round >= 4 {
            let k = ((round - 4) / 2 % 8) as usize;
            let active = round % 2 == 1;
            let bot = &bots[k];
            bots[k] = store
                .update_instance(
                    &Scope::Admin,
                    &bot.name,
                    bot.revision,
                    active,
                    &bot.spec,
                    bot.discord_token_sha256.as_deref(),
                )
                .await
                .unwrap();
            if !active {
                off = Some(bots[k].id.clone());
            }
        }
        let mut live: Vec<i64> = (0..4).filter(|node| (round / 2 + node) % 4 != 0).collect();
        let counted = live.len() as i64 + i64::from(round < 8);
        if round < 6 {
            live.push(4);
        }
        let tasks: Vec<_> = live
            .iter()
            .map(|node| {
                let store = store.clone();
                let node = format!("n{node}");
                tokio::spawn(async move {
                    let held = store.renew_gateway_leases(&node, now, TTL_MS, counted).await.unwrap();
                    (node, held)
                })
            })
            .collect();
        let mut seen: std::collections::HashMap<String, String> = Default::default();
        for task in tasks {
            let (node, held) = task.await.unwrap();
            for id in held {
                assert_ne!(Some(&id), off.as_ref(), "round {round}: {node} was given a bot switched off");
                if let Some(other) = seen.insert(id.clone(), node.clone()) {
                    panic!("round {round}: {id} given to {other} and {node}");
                }
            }
        }
        for (id, node) in &seen {
            assert_eq!(lease_holder(&store, id).await, Some((node.clone(), now + TTL_MS)), "round {round}: {id}");
            let previous = granted.insert(id.clone(), (node.clone(), now + TTL_MS));
            if let Some((before, expires_at)) = previous.filter(|(before, _)| before != node) {
                assert!(
                    now >= expires_at,
                    "round {round}: {id} taken by {node} from {before}, whose lease ran until {expires_at} (now {now})"
                );
                moves += 1;
                moves_from_silent += i32::from(before == "n4");
            }
        }
    }
    assert!(moves > 0, "nodes skipping rounds lose their bots to others");
    assert!(moves_from_silent > 0, "the silent node's bots went to others once its leases ran out");
}

async fn leases_have_one_holder(store: Shared) {
    assert!(store.try_lease("job", "a", 1000, 4000).await.unwrap());
    assert!(!store.try_lease("job", "b", 2000, 5000).await.unwrap(), "held by a until 4000");
    assert!(store.try_lease("job", "a", 3000, 6000).await.unwrap(), "a renews");
    assert!(!store.try_lease("job", "b", 5000, 8000).await.unwrap());
    assert!(store.try_lease("job", "b", 6001, 9000).await.unwrap(), "expired: b takes it");
    assert!(!store.try_lease("job", "a", 7000, 10000).await.unwrap());
    assert!(store.try_lease("other-job", "a", 7000, 10000).await.unwrap());
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
        a_discord_token_fingerprint_is_unique,
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
        trace_pages_and_filters,
        finished_traces_are_announced,
        stats_are_computed_by_the_database,
        purges_and_retention_delete_old_traces,
        users_are_searched_and_paged,
        leases_have_one_holder,
        stages_in_pieces_add_up,
        a_large_batch_is_stored_whole,
        connection_events_keep_the_latest,
        gateway_leases_spread_renew_and_move,
        gateway_leases_follow_eligibility,
        gateway_errors_stop_a_bot_until_it_is_updated,
        concurrent_gateway_renewals_never_share_a_bot,
        released_gateway_leases_are_claimed_at_once,
    ],
    fixtures: [
        the_change_log_is_compacted_past_its_retention,
        other_writers_are_announced,
        payloads_are_compressed_and_only_read_when_asked,
        stages_stored_before_the_upgrade_are_still_read,
    ],
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
