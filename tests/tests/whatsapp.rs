//! The core job on WhatsApp, through the real binaries: Evolution webhook → node → tenant's
//! agent → reply through the tenant's Evolution server, with traces in the control plane.

use omni_tests::evolution::{fixture, text};
use omni_tests::fakes::{FakeAgent, FakeEvolution, FakeHttpProxy, ProxyRequest};
use omni_tests::process::{ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, http_post, omnictl};
use omni_tests::wait_for;
use serde_json::{Value, json};
use std::time::Duration;

const EVOLUTION_APIKEY_IN_BODY: &str = "EVO-INSTANCE-TOKEN-DO-NOT-LEAK";

/// A control plane, one node, and the instances' tokens.
struct Hub {
    cp: ControlPlane,
    node: DataPlane,
    admin: String,
    dir: tempfile::TempDir,
}

impl Hub {
    async fn start() -> Hub {
        Self::start_with(DataPlaneOptions::default()).await
    }

    async fn start_with(node_options: DataPlaneOptions) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(&dir.path().join("cp"), &ControlPlaneOptions::default()).await;
        let admin = cp.admin_key();
        let node = DataPlane::start_for(&cp, &dir.path().join("node"), node_options).await;
        Hub { cp, node, admin, dir }
    }

    async fn ctl(&self, args: &[&str]) -> omni_tests::process::Outcome {
        omnictl(&self.cp.url(), &self.admin, args).await
    }

    /// Creates a WhatsApp instance served by `agent` and `evolution` (Evolution instance
    /// `evo_name` with key `evo_key`); returns its webhook token once the node has it.
    async fn instance(
        &self,
        name: &str,
        agent: &FakeAgent,
        evolution: &FakeEvolution,
        evo_name: &str,
        evo_key: &str,
        extra: &[&str],
    ) -> String {
        evolution.instance(evo_name, evo_key);
        let mut args = vec![
            "instance",
            "create",
            name,
            "--channel",
            "whatsapp",
            "--agent-url",
            &agent.url,
            "--agent-key",
            "agent-key-of-this-tenant",
            "--evolution-url",
            &evolution.url,
            "--evolution-key",
            evo_key,
            "--evolution-instance",
            evo_name,
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        let created = self.ctl(&args).await.json();
        self.node.wait_for_revision(created["instance"]["revision"].as_i64().unwrap()).await;
        created["webhook_token"].as_str().unwrap().to_owned()
    }

    async fn webhook(&self, instance: &str, token: &str, body: &Value) -> (u16, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let (status, answer) = http_post(
            &self.node.addr,
            &format!("/webhook/evolution/{instance}"),
            &[("x-omni-webhook-token", token)],
            &bytes,
        )
        .await
        .unwrap();
        (status, serde_json::from_str(&answer).unwrap_or(Value::Null))
    }

    async fn traces(&self, instance: &str) -> Vec<Value> {
        self.ctl(&["trace", "list", "--instance", instance, "-o", "json"]).await.json().as_array().unwrap().clone()
    }

    /// Waits until `count` traces of `instance` reached a final status, and returns them.
    async fn finished_traces(&self, instance: &str, count: usize) -> Vec<Value> {
        omni_tests::finished_traces(&self.cp.url(), &self.admin, instance, count).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_answered_by_the_tenants_agent_through_its_evolution() {
    let hub = Hub::start().await;
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    let token = hub.instance("acme-wa", &agent, &evolution, "acme", "acme-evolution-key", &[]).await;

    let webhook = fixture("text_dm.json");
    let (status, answer) = hub.webhook("acme-wa", &token, &webhook).await;
    assert_eq!((status, &answer["accepted"]), (200, &json!(1)), "{answer}");
    let replies = wait_for("the reply at Evolution", Duration::from_secs(10), || async {
        let replies = evolution.replies();
        (!replies.is_empty()).then_some(replies)
    })
    .await;
    let question = fixture("text_dm.json")["data"]["message"]["conversation"].as_str().unwrap().to_owned();
    assert_eq!(replies, [("5511999999999@s.whatsapp.net".to_owned(), format!("echo: {question}"))]);
    assert_eq!(evolution.texts()[0].headers["apikey"], "acme-evolution-key");
    assert_eq!(evolution.texts()[0].path, "/message/sendText/acme");

    let call = &agent.requests()[0];
    assert_eq!(call.path, "/api/agent/chat");
    assert_eq!(call.headers["authorization"], "Bearer agent-key-of-this-tenant");
    assert_eq!(call.headers["x-api-key"], "agent-key-of-this-tenant");
    assert_eq!(call.body["session_name"], "acme-wa_5511999999999");
    assert_eq!(call.body["message"], question);
    assert_eq!(call.body["user"]["phone_number"], "+5511999999999");
    assert_eq!(call.body["context"]["conversation_id"], "5511999999999@s.whatsapp.net");
    assert!(!call.body.to_string().contains(EVOLUTION_APIKEY_IN_BODY), "the webhook's apikey never reaches the agent");
    // The webhook itself goes along, as Evolution sent it but for the apikey.
    let mut sent = webhook.clone();
    sent.as_object_mut().unwrap().remove("apikey");
    assert_eq!(call.body["channel_payload"], sent);

    let traces = hub.finished_traces("acme-wa", 1).await;
    let trace = &traces[0];
    assert_eq!((trace["status"].as_str(), trace["sender"].as_str()), (Some("completed"), Some("5511999999999")));
    assert!(trace["user_id"].is_string(), "{trace}");
    assert_eq!(trace["user_id"], call.body["user_id"], "one user id, the node's and the control plane's");
    let full = hub.ctl(&["trace", "get", trace["id"].as_str().unwrap(), "--payloads", "-o", "json"]).await.json();
    let stages: Vec<&str> = full["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["received", "access", "agent_request", "agent_response", "send_chunk", "completed"]);
    let everything = full.to_string();
    for secret in [EVOLUTION_APIKEY_IN_BODY, "agent-key-of-this-tenant", "acme-evolution-key", token.as_str()] {
        assert!(!everything.contains(secret), "{secret} in the trace");
    }
    let users = hub.ctl(&["user", "list", "acme-wa", "-o", "json"]).await.json();
    assert_eq!(users[0]["identity"], "5511999999999");
    assert_eq!(users[0]["message_count"], 1);
    let table = hub.ctl(&["trace", "get", trace["id"].as_str().unwrap()]).await;
    assert!(table.ok().contains("send_chunk"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_is_handled_as_its_readme_says() {
    let hub = Hub::start().await;
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    let token = hub.instance("acme-wa", &agent, &evolution, "acme", "evo-key-1", &[]).await;
    let answered = [
        ("text_dm.json", vec!["5511999999999@s.whatsapp.net"]),
        ("text_dm_lid.json", vec!["137180000000001@lid"]),
        ("extended_text_legacy.json", vec!["5511999999999@s.whatsapp.net"]),
        ("group_mention.json", vec!["120363025246125888@g.us"]),
        ("image_base64.json", vec!["5511999999999@s.whatsapp.net"]),
        ("audio_ptt.json", vec!["5511999999999@s.whatsapp.net"]),
        ("legacy_messages_array.json", vec!["5511944444444@s.whatsapp.net", "5511944444444@s.whatsapp.net"]),
        ("data_base64_string.json", vec!["5511933333333@s.whatsapp.net"]),
    ];
    let ignored = ["group_no_mention.json", "from_me.json", "status_broadcast.json"];
    for (name, _) in &answered {
        let (status, answer) = hub.webhook("acme-wa", &token, &fixture(name)).await;
        assert_eq!(status, 200, "{name}: {answer}");
        // One at a time, so the order of replies is the order of fixtures.
        let expected: usize = answered.iter().take_while(|(n, _)| n != name).map(|(_, r)| r.len()).sum::<usize>()
            + answered.iter().find(|(n, _)| n == name).unwrap().1.len();
        wait_for(&format!("the reply to {name}"), Duration::from_secs(10), || async {
            (evolution.replies().len() >= expected).then_some(())
        })
        .await;
    }
    for name in ignored {
        let (status, answer) = hub.webhook("acme-wa", &token, &fixture(name)).await;
        assert_eq!((status, &answer["ignored"]), (200, &json!(1)), "{name}");
    }
    for name in ["connection_update_open.json", "qrcode_updated.json"] {
        assert_eq!(hub.webhook("acme-wa", &token, &fixture(name)).await.0, 200, "{name}");
    }
    let numbers: Vec<String> = evolution.replies().into_iter().map(|(n, _)| n).collect();
    let expected: Vec<&str> = answered.iter().flat_map(|(_, r)| r.iter().copied()).collect();
    assert_eq!(numbers, expected);
    let legacy: Vec<String> = evolution.replies()[6..8].iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(legacy, ["echo: first", "echo: second"], "both legacy messages, in order");

    let calls = agent.requests();
    assert_eq!(calls.len(), 9, "no agent call for the ignored ones");
    let image = calls.iter().find(|c| c.body["message"] == "what is this?").unwrap();
    assert_eq!(image.body["media"][0]["data"], "/9j/4CBub3QgcmVhbGx5IGEganBlZw==");
    let voice = calls.iter().find(|c| c.body["media"][0]["type"] == "audio").unwrap();
    assert_eq!(voice.body["media"][0]["voice_note"], true);
    assert!(voice.body["media"][0]["url"].as_str().unwrap().starts_with("https://"));
    let lid = calls.iter().find(|c| c.body["context"]["conversation_id"] == "137180000000001@lid").unwrap();
    assert_eq!(lid.body["session_name"], "acme-wa_5511977777777", "a LID sender is known by phone");
    assert!(calls.iter().all(|c| !c.body.to_string().contains(EVOLUTION_APIKEY_IN_BODY)));

    let traces = hub.finished_traces("acme-wa", 12).await;
    let count = |status: &str| traces.iter().filter(|t| t["status"] == status).count();
    assert_eq!((count("completed"), count("ignored")), (9, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_never_cross() {
    let hub = Hub::start().await;
    let (agent_a, evolution_a) = (FakeAgent::start().await, FakeEvolution::start().await);
    let (agent_b, evolution_b) = (FakeAgent::start().await, FakeEvolution::start().await);
    agent_b.script(|body| {
        (200, json!({ "text": format!("B says: {}", body["message"].as_str().unwrap_or_default()) }), Duration::ZERO)
    });
    let token_a = hub.instance("tenant-a", &agent_a, &evolution_a, "evo-a", "key-of-a", &[]).await;
    let token_b = hub.instance("tenant-b", &agent_b, &evolution_b, "evo-b", "key-of-b", &[]).await;

    assert_eq!(
        hub.webhook("tenant-a", &token_b, &text("5511000000001", "A1", "for a")).await.0,
        401,
        "tokens are per instance"
    );
    hub.webhook("tenant-a", &token_a, &text("5511000000001", "A1", "for a")).await;
    hub.webhook("tenant-b", &token_b, &text("5511000000001", "B1", "for b")).await;
    hub.finished_traces("tenant-a", 1).await;
    hub.finished_traces("tenant-b", 1).await;

    assert_eq!(evolution_a.replies(), [("5511000000001@s.whatsapp.net".to_owned(), "echo: for a".to_owned())]);
    assert_eq!(evolution_b.replies(), [("5511000000001@s.whatsapp.net".to_owned(), "B says: for b".to_owned())]);
    assert_eq!(evolution_a.texts()[0].headers["apikey"], "key-of-a");
    assert_eq!(evolution_b.texts()[0].headers["apikey"], "key-of-b");
    let (a_calls, b_calls) = (agent_a.requests(), agent_b.requests());
    assert_eq!((a_calls.len(), b_calls.len()), (1, 1));
    assert_eq!(a_calls[0].body["message"], "for a");
    assert_eq!(b_calls[0].body["message"], "for b");
    assert_ne!(a_calls[0].body["user_id"], b_calls[0].body["user_id"], "one phone, two tenants, two users");

    let scoped = hub.ctl(&["apikey", "create", "--instances", "tenant-a", "-o", "json"]).await.json();
    let key = scoped["key"].as_str().unwrap();
    let seen = omnictl(&hub.cp.url(), key, &["trace", "list", "-o", "json"]).await.json();
    assert!(seen.as_array().unwrap().iter().all(|t| t["instance"] == "tenant-a"));
    assert_eq!(seen.as_array().unwrap().len(), 1);
    let other = hub.traces("tenant-b").await[0]["id"].as_str().unwrap().to_owned();
    assert!(omnictl(&hub.cp.url(), key, &["trace", "get", &other]).await.failed().contains("not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_is_answered_once() {
    let hub = Hub::start().await;
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    agent.script(|_| (200, json!({ "message": "once" }), Duration::from_millis(300)));
    let token = hub.instance("acme-wa", &agent, &evolution, "acme", "k1", &[]).await;
    let body = text("5511999990000", "SAME-ID", "hello");
    let (first, second, third) = tokio::join!(
        hub.webhook("acme-wa", &token, &body),
        hub.webhook("acme-wa", &token, &body),
        hub.webhook("acme-wa", &token, &body)
    );
    let accepted: i64 = [&first, &second, &third].iter().map(|(_, a)| a["accepted"].as_i64().unwrap()).sum();
    assert_eq!(accepted, 1);
    let traces = hub.finished_traces("acme-wa", 3).await;
    assert_eq!(traces.iter().filter(|t| t["status"] == "completed").count(), 1);
    assert_eq!(traces.iter().filter(|t| t["status"] == "ignored").count(), 2);
    // And once more, after it was answered.
    assert_eq!(hub.webhook("acme-wa", &token, &body).await.1["duplicates"], 1);
    assert_eq!(evolution.replies().len(), 1);
    assert_eq!(agent.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_record_nothing() {
    let hub = Hub::start_with(DataPlaneOptions { max_body_bytes: Some(64 * 1024), ..Default::default() }).await;
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    let token = hub.instance("acme-wa", &agent, &evolution, "acme", "k1", &[]).await;
    let body = serde_json::to_vec(&fixture("text_dm.json")).unwrap();
    let post = |path: String, headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        let addr = hub.node.addr.clone();
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http_post(&addr, &path, &headers, &body).await.unwrap().0
        }
    };
    let good = || vec![("x-omni-webhook-token", token.clone())];
    assert_eq!(post("/webhook/evolution/nobody".into(), good(), body.clone()).await, 404);
    assert_eq!(post("/webhook/evolution/acme-wa".into(), vec![], body.clone()).await, 401);
    assert_eq!(
        post("/webhook/evolution/acme-wa".into(), vec![("x-omni-webhook-token", "wrong".into())], body.clone()).await,
        401
    );
    assert_eq!(post("/webhook/evolution/acme-wa".into(), good(), b"{not json".to_vec()).await, 400);
    assert_eq!(
        post("/webhook/evolution/acme-wa".into(), good(), br#"{"event":"messages.upsert","data":{}}"#.to_vec()).await,
        400
    );
    let mut big = fixture("text_dm.json");
    big["data"]["message"]["conversation"] = json!("x".repeat(100 * 1024));
    assert_eq!(post("/webhook/evolution/acme-wa".into(), good(), serde_json::to_vec(&big).unwrap()).await, 413);

    assert_eq!(hub.node.metric("omni_node_spool_depth").await, 0.0);
    // Traces reach the control plane later: a good message after the bad ones, once traced,
    // shows that nothing before it was recorded.
    let mut last = fixture("text_dm.json");
    last["data"]["key"]["id"] = json!("GOOD-AFTER-BAD");
    assert_eq!(post("/webhook/evolution/acme-wa".into(), good(), serde_json::to_vec(&last).unwrap()).await, 200);
    let traces = hub.finished_traces("acme-wa", 1).await;
    assert_eq!(traces.len(), 1, "only the good message was recorded: {traces:?}");
    assert_eq!(traces[0]["external_id"], "GOOD-AFTER-BAD");
    assert_eq!(agent.requests().len(), 1);
    let _ = &hub.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_agent_failures_and_suppressed_answers() {
    let hub = Hub::start().await;
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    agent.script(|body| match body["message"].as_str().unwrap_or_default() {
        "fail" => (503, json!({ "error": "overloaded" }), Duration::ZERO),
        "quiet" => (200, json!({ "message": "AUTOMAGIK:SILENCE" }), Duration::ZERO),
        "refuse" => (200, json!({ "success": false, "error": "cannot help" }), Duration::ZERO),
        "long" => (200, json!({ "message": format!("{}\n\n{}", "a".repeat(30), "b".repeat(30)) }), Duration::ZERO),
        other => (200, json!({ "message": format!("echo: {other}") }), Duration::ZERO),
    });
    let token = hub
        .instance(
            "acme-wa",
            &agent,
            &evolution,
            "acme",
            "k1",
            &["--fallback-text", "Sorry, try again later", "--agent-timeout", "2", "--split-limit", "40"],
        )
        .await;
    hub.ctl(&["access", "block", "acme-wa", "+5599*"]).await.ok();
    let revision = hub.ctl(&["instance", "get", "acme-wa", "-o", "json"]).await.json()["revision"].as_i64().unwrap();
    hub.node.wait_for_revision(revision).await;

    hub.webhook("acme-wa", &token, &text("5599123", "D1", "hello")).await;
    hub.webhook("acme-wa", &token, &text("5511001", "F1", "fail")).await;
    hub.webhook("acme-wa", &token, &text("5511002", "Q1", "quiet")).await;
    hub.webhook("acme-wa", &token, &text("5511003", "R1", "refuse")).await;
    hub.webhook("acme-wa", &token, &text("5511004", "L1", "long")).await;
    let traces = hub.finished_traces("acme-wa", 5).await;
    let by_sender = |s: &str| traces.iter().find(|t| t["sender"] == s).unwrap().clone();

    assert_eq!(by_sender("5599123")["status"], "denied");
    assert!(agent.requests().iter().all(|r| r.body["message"] != "hello"), "a denied sender costs no agent call");
    let failed = by_sender("5511001");
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error_stage"], "agent_request");
    assert!(failed["error"].as_str().unwrap().contains("503"), "{failed}");
    let fail_calls = agent.requests().iter().filter(|r| r.body["message"] == "fail").count();
    assert!(fail_calls >= 2, "5xx is retried within the budget ({fail_calls} calls)");
    assert_eq!(by_sender("5511002")["status"], "ignored");
    assert_eq!(by_sender("5511003")["status"], "failed");
    assert_eq!(by_sender("5511004")["status"], "completed");

    let replies = evolution.replies();
    let to = |n: &str| replies.iter().filter(|(num, _)| num.starts_with(n)).map(|(_, t)| t.clone()).collect::<Vec<_>>();
    assert!(to("5599123").is_empty());
    assert_eq!(to("5511001"), ["Sorry, try again later"]);
    assert!(to("5511002").is_empty(), "AUTOMAGIK: answers are not sent");
    assert_eq!(to("5511003"), ["Sorry, try again later"]);
    assert_eq!(to("5511004"), ["a".repeat(30), "b".repeat(30)], "split at the paragraph, in order");
}

/// A tenant whose agent hangs holds only its own capacity: another tenant is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_agent_does_not_delay_another_tenant() {
    let hub = Hub::start_with(DataPlaneOptions { tenant_concurrency: Some(2), ..Default::default() }).await;
    let (slow, fast) = (FakeAgent::start().await, FakeAgent::start().await);
    let evolution = FakeEvolution::start().await;
    slow.script(|_| (200, json!({ "message": "late" }), Duration::from_secs(8)));
    let slow_token = hub.instance("slow-wa", &slow, &evolution, "slow", "k-slow", &["--agent-timeout", "30"]).await;
    let fast_token = hub.instance("fast-wa", &fast, &evolution, "fast", "k-fast", &[]).await;
    for i in 0..6 {
        hub.webhook("slow-wa", &slow_token, &text(&format!("55110000{i}"), &format!("S{i}"), "hi")).await;
    }
    wait_for("the slow agent to be busy", Duration::from_secs(5), || async {
        (slow.requests().len() >= 2).then_some(())
    })
    .await;
    hub.webhook("fast-wa", &fast_token, &text("5522000000", "F1", "quick")).await;
    wait_for("the other tenant's reply", Duration::from_secs(5), || async {
        evolution.replies().iter().any(|(_, t)| t == "echo: quick").then_some(())
    })
    .await;
    assert!(evolution.replies().iter().all(|(_, t)| t != "late"), "answered while the slow tenant still waits");
    assert_eq!(slow.requests().len(), 2, "the slow tenant is held to its cap of 2");
}

/// kill -9 of the node while messages are in flight, after its spool's first checkpoint (so
/// that what it redoes spans a checkpoint and both log files); after a restart every accepted
/// message is answered, and none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_answers_every_accepted_message_once() {
    let hub = Hub::start_with(DataPlaneOptions { tenant_concurrency: Some(4), ..Default::default() }).await;
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    agent.script(|body| {
        (
            200,
            json!({ "message": format!("re: {}", body["message"].as_str().unwrap_or_default()) }),
            Duration::from_millis(150),
        )
    });
    let token = hub.instance("acme-wa", &agent, &evolution, "acme", "k1", &[]).await;
    // At 4 at a time and 150 ms each, these take longer than the second before a checkpoint.
    const MESSAGES: usize = 48;
    for i in 0..MESSAGES {
        let (status, _) = hub
            .webhook("acme-wa", &token, &text(&format!("55119{:04}", i % 6), &format!("M{i}"), &format!("m{i}")))
            .await;
        assert_eq!(status, 200);
    }
    wait_for("some replies and a spool checkpoint before the crash", Duration::from_secs(10), || async {
        let checkpoints = hub.node.metric("omni_node_spool_checkpoint_seconds_count").await;
        (evolution.replies().len() >= 4 && checkpoints >= 1.0).then_some(())
    })
    .await;
    let Hub { cp, node, admin, dir } = hub;
    node.kill().await;
    let before = evolution.replies().len();
    assert!(before < MESSAGES, "the crash came mid-stream ({before} answered)");

    let node = DataPlane::start_for(&cp, &dir.path().join("node"), DataPlaneOptions::default()).await;
    let hub = Hub { cp, node, admin, dir };
    let traces = hub.finished_traces("acme-wa", MESSAGES).await;
    let replies = evolution.replies();
    let unknown: Vec<&Value> =
        traces.iter().filter(|t| t["error"].as_str().unwrap_or_default().contains("unknown")).collect();
    for i in 0..MESSAGES {
        let times = replies.iter().filter(|(_, t)| *t == format!("re: m{i}")).count();
        let trace = traces.iter().find(|t| t["external_id"] == format!("M{i}")).unwrap();
        if trace["status"] == "completed" {
            assert_eq!(times, 1, "m{i} answered exactly once");
        } else {
            // Only a chunk whose send was cut by the crash may be unaccounted for, never doubled.
            assert!(trace["error"].as_str().unwrap().contains("unknown"), "m{i}: {trace}");
            assert!(times <= 1, "m{i} sent {times} times");
        }
    }
    assert!(unknown.len() <= 4, "at most the in-flight sends are unknown");
    // Per conversation, replies kept the order of the messages.
    for phone in 0..6 {
        let number = format!("55119{phone:04}@s.whatsapp.net");
        let order: Vec<usize> = replies
            .iter()
            .filter(|(n, _)| *n == number)
            .map(|(_, t)| t.trim_start_matches("re: m").parse().unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{number}: {order:?}");
    }
}

/// A node stopped with SIGTERM leaves everything on disk: started again, it has nothing to
/// redo or resume, and sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_starts_again_with_nothing_to_redo() {
    let hub = Hub::start().await;
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    let token = hub.instance("acme-wa", &agent, &evolution, "acme", "k1", &[]).await;
    for i in 0..5 {
        let (status, _) = hub.webhook("acme-wa", &token, &text("5511888", &format!("S{i}"), &format!("s{i}"))).await;
        assert_eq!(status, 200);
    }
    hub.finished_traces("acme-wa", 5).await;
    let Hub { cp, node, admin, dir } = hub;
    assert!(node.terminate().await.success(), "SIGTERM is a clean stop");

    let node = DataPlane::start_for(&cp, &dir.path().join("node"), DataPlaneOptions::default()).await;
    assert_eq!(node.metric("omni_node_spool_depth").await, 0.0, "every message was finished on disk:\n{}", node.log());
    let log = node.log();
    assert!(!log.contains("redid"), "nothing left in the spool's log to redo:\n{log}");
    let hub = Hub { cp, node, admin, dir };
    // A message sent after the restart is answered, after the five before it, none twice.
    let (status, _) = hub.webhook("acme-wa", &token, &text("5511888", "S5", "s5")).await;
    assert_eq!(status, 200);
    hub.finished_traces("acme-wa", 6).await;
    let replies: Vec<String> = evolution.replies().into_iter().map(|(_, t)| t).collect();
    assert_eq!(replies.len(), 6, "{replies:?}");
    assert!(!hub.node.log().contains("resumed"), "nothing to resume");
}

/// A control-plane outage delays traces and stops nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_answered_while_the_control_plane_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let options = ControlPlaneOptions {
        listen: Some(std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()),
        ..Default::default()
    };
    let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
    let admin = cp.admin_key();
    let node = DataPlane::start_for(&cp, &dir.path().join("node"), DataPlaneOptions::default()).await;
    let hub = Hub { cp, node, admin, dir };
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    let token = hub.instance("acme-wa", &agent, &evolution, "acme", "k1", &[]).await;

    let Hub { cp, node, admin, dir } = hub;
    cp.kill().await;
    let body = serde_json::to_vec(&text("5511777", "OUT1", "are you there")).unwrap();
    let (status, _) =
        http_post(&node.addr, "/webhook/evolution/acme-wa", &[("x-omni-webhook-token", &token)], &body).await.unwrap();
    assert_eq!(status, 200);
    wait_for("the reply with the control plane down", Duration::from_secs(10), || async {
        (evolution.replies().len() == 1).then_some(())
    })
    .await;
    assert!(node.metric("omni_node_trace_outbox_depth").await > 0.0, "traces wait in the outbox");

    let cp = ControlPlane::start(&dir.path().join("cp"), &options).await;
    let hub = Hub { cp, node, admin, dir };
    let traces = hub.finished_traces("acme-wa", 1).await;
    assert_eq!(traces[0]["status"], "completed");
    wait_for("the outbox to drain", Duration::from_secs(10), || async {
        (hub.node.metric("omni_node_trace_outbox_depth").await == 0.0).then_some(())
    })
    .await;
}

/// A node behind an egress proxy (`HTTP_PROXY` in its environment, with the proxy's
/// credentials): its agent and Evolution calls go through the proxy, and the message is
/// answered; the credentials are for the proxy alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_evolution_calls_go_through_the_environments_proxy() {
    let proxy = FakeHttpProxy::start().await;
    let env = vec![("HTTP_PROXY".to_owned(), proxy.url.replace("http://", "http://egress:pass%21word@"))];
    let hub = Hub::start_with(DataPlaneOptions { env, ..Default::default() }).await;
    let (agent, evolution) = (FakeAgent::start().await, FakeEvolution::start().await);
    let no_typing = ["--typing-indicator", "false"];
    let token = hub.instance("proxied-wa", &agent, &evolution, "proxied", "proxied-evolution-key", &no_typing).await;

    let (status, answer) = hub.webhook("proxied-wa", &token, &fixture("text_dm.json")).await;
    assert_eq!((status, &answer["accepted"]), (200, &json!(1)), "{answer}");
    let replies = wait_for("the reply at Evolution", Duration::from_secs(10), || async {
        let replies = evolution.replies();
        (!replies.is_empty()).then_some(replies)
    })
    .await;
    assert_eq!(replies.len(), 1);
    // base64("egress:pass!word"): the URL's credentials, percent-decoded.
    let credentials = "Basic ZWdyZXNzOnBhc3Mhd29yZA==".to_owned();
    assert_eq!(
        proxy.requests(),
        [
            ProxyRequest { line: format!("POST {}/api/agent/chat", agent.url), credentials: credentials.clone() },
            ProxyRequest { line: format!("POST {}/message/sendText/proxied", evolution.url), credentials },
        ]
    );
    assert!(!agent.requests()[0].headers.contains_key("proxy-authorization"));
    assert!(!evolution.texts()[0].headers.contains_key("proxy-authorization"));
    assert!(hub.node.log().contains("agent and Evolution calls go through a proxy"), "{}", hub.node.log());
    for secret in ["pass%21word", "pass!word", "ZWdyZXNzOnBhc3Mhd29yZA=="] {
        assert!(!hub.node.log().contains(secret), "the proxy's password is never logged: {secret}");
    }
}
