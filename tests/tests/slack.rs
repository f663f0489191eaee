//! Slack through the real binaries: signed Events API webhooks in, `chat.postMessage` in the
//! thread out (against a loopback fake of Slack's Web API), traced, per tenant.

use omni_tests::fakes::FakeAgent;
use omni_tests::process::{
    ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, Outcome, http_post, omnictl,
};
use omni_tests::slack::{FakeSlack, app_mention, event, message_event, now_ts, sign, signed_headers, url_verification};
use omni_tests::wait_for;
use serde_json::{Value, json};
use std::time::Duration;

const BOT: &str = "UBOTACME";

struct Hub {
    cp: ControlPlane,
    node: DataPlane,
    admin: String,
    slack: FakeSlack,
    _dir: tempfile::TempDir,
}

impl Hub {
    async fn start() -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(&dir.path().join("cp"), &ControlPlaneOptions::default()).await;
        let admin = cp.admin_key();
        let slack = FakeSlack::start().await;
        let options =
            DataPlaneOptions { env: vec![("OMNI_SLACK_API_URL".into(), slack.api_url.clone())], ..Default::default() };
        let node = DataPlane::start_for(&cp, &dir.path().join("node"), options).await;
        Hub { cp, node, admin, slack, _dir: dir }
    }

    async fn ctl(&self, args: &[&str]) -> Outcome {
        omnictl(&self.cp.url(), &self.admin, args).await
    }

    /// A Slack instance answered by `agent`, once the node has it.
    async fn instance(&self, name: &str, agent: &FakeAgent, token: &str, secret: &str, extra: &[&str]) {
        self.slack.bot_token(token);
        let mut args = vec![
            "instance",
            "create",
            name,
            "--channel",
            "slack",
            "--agent-url",
            &agent.url,
            "--slack-bot-token",
            token,
            "--slack-signing-secret",
            secret,
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        let created = self.ctl(&args).await.json();
        self.node.wait_for_revision(created["instance"]["revision"].as_i64().unwrap()).await;
    }

    /// Posts `body` to the instance's Slack webhook, signed with `secret`.
    async fn deliver(&self, name: &str, secret: &str, body: &Value, extra: &[(&str, &str)]) -> (u16, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let signed = signed_headers(secret, &bytes);
        let mut headers: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (*k, v.as_str())).collect();
        headers.extend_from_slice(extra);
        let (status, answer) =
            http_post(&self.node.addr, &format!("/webhook/slack/{name}"), &headers, &bytes).await.unwrap();
        (status, serde_json::from_str(&answer).unwrap_or(Value::Null))
    }

    async fn traces(&self, instance: &str) -> Vec<Value> {
        let listed = self.ctl(&["trace", "list", "--instance", instance, "-o", "json"]).await.json();
        listed.as_array().cloned().unwrap_or_default()
    }

    /// Waits until the instance has `n` traces in a final status.
    async fn finished(&self, instance: &str, n: usize) -> Vec<Value> {
        omni_tests::finished_traces(&self.cp.url(), &self.admin, instance, n).await
    }

    async fn posts_to(&self, channel: &str, n: usize) -> Vec<omni_tests::slack::SlackPost> {
        wait_for(&format!("{n} posts to {channel}"), Duration::from_secs(15), || async {
            let posts: Vec<_> = self.slack.posts().into_iter().filter(|p| p.channel == channel).collect();
            (posts.len() >= n).then_some(posts)
        })
        .await
    }
}

/// Every trace with its payloads, as one text.
async fn trace_texts(ids: impl Iterator<Item = String>, hub: &Hub) -> String {
    let mut all = String::new();
    for id in ids {
        all.push_str(&hub.ctl(&["trace", "get", &id, "--payloads", "-o", "json"]).await.stdout);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_events_are_verified_answered_in_thread_once_and_isolated() {
    let hub = Hub::start().await;
    let (acme_agent, beta_agent) = (FakeAgent::start().await, FakeAgent::start().await);
    beta_agent.script(|body| {
        (200, json!({ "message": format!("beta says: {}", body["message"].as_str().unwrap()) }), Duration::ZERO)
    });
    hub.instance("acme-slack", &acme_agent, "xoxb-acme-0000", "acme-signing-secret", &["--slack-bot-user-id", BOT])
        .await;
    hub.instance("beta-slack", &beta_agent, "xoxb-beta-1111", "beta-signing-secret", &[]).await;

    // The Request URL check: signed like everything else.
    let (status, answer) = hub.deliver("acme-slack", "acme-signing-secret", &url_verification("ch4llenge"), &[]).await;
    assert_eq!((status, answer["challenge"].as_str()), (200, Some("ch4llenge")));

    // Bad signatures, another tenant's secret, replays and unknown instances change nothing.
    let dm = event("Ev-dm-1", BOT, message_event("D1", "im", "U1", "hi there", &now_ts()));
    let bytes = serde_json::to_vec(&dm).unwrap();
    let (status, _) = hub.deliver("acme-slack", "beta-signing-secret", &dm, &[]).await;
    assert_eq!(status, 401, "another tenant's secret");
    let stale = (omni_tests::now_millis() / 1000 - 301).to_string();
    let signature = sign("acme-signing-secret", stale.parse().unwrap(), &bytes);
    let headers = [("x-slack-request-timestamp", stale.as_str()), ("x-slack-signature", signature.as_str())];
    let (status, _) = http_post(&hub.node.addr, "/webhook/slack/acme-slack", &headers, &bytes).await.unwrap();
    assert_eq!(status, 401, "a signature older than five minutes");
    let (status, _) = http_post(&hub.node.addr, "/webhook/slack/acme-slack", &[], &bytes).await.unwrap();
    assert_eq!(status, 401, "no signature");
    let (status, _) = hub.deliver("nobody", "acme-signing-secret", &dm, &[]).await;
    assert_eq!(status, 404);
    let (status, _) = hub.deliver("acme-slack", "acme-signing-secret", &json!("not an event"), &[]).await;
    assert_eq!(status, 200, "a verified body of no known type is acknowledged");

    // A DM: answered in its thread (the message's own ts), with the tenant's token.
    let (status, answer) = hub.deliver("acme-slack", "acme-signing-secret", &dm, &[]).await;
    assert_eq!((status, answer["accepted"].as_u64()), (200, Some(1)), "{answer}");
    let posts = hub.posts_to("D1", 1).await;
    assert_eq!(posts[0].text, "echo: hi there");
    assert_eq!(posts[0].token, "xoxb-acme-0000");
    assert_eq!(posts[0].thread_ts.as_deref(), dm["event"]["ts"].as_str());
    // Slack's retry of the same event: 200, nothing done again.
    let (status, answer) = hub
        .deliver(
            "acme-slack",
            "acme-signing-secret",
            &dm,
            &[("x-slack-retry-num", "1"), ("x-slack-retry-reason", "http_timeout")],
        )
        .await;
    assert_eq!((status, answer["duplicates"].as_u64()), (200, Some(1)), "{answer}");

    // A channel mention arrives as `message` and as `app_mention`: answered once, in the thread.
    let ts = now_ts();
    let thread = "1700000000.000001";
    let mut as_message = message_event("C1", "channel", "U2", &format!("<@{BOT}> what is up?"), &ts);
    as_message["thread_ts"] = json!(thread);
    let mut as_mention = app_mention("C1", "U2", &format!("<@{BOT}> what is up?"), &ts);
    as_mention["thread_ts"] = json!(thread);
    hub.deliver("acme-slack", "acme-signing-secret", &event("Ev-m-1", BOT, as_message), &[]).await;
    hub.deliver("acme-slack", "acme-signing-secret", &event("Ev-m-2", BOT, as_mention), &[]).await;
    // Chatter without a mention, a bot's post and an edit are not answered.
    let chatter = message_event("C1", "channel", "U2", "just chatting", &now_ts());
    let mut bot_post = message_event("C1", "channel", "U9", "I am a bot", &now_ts());
    bot_post["bot_id"] = json!("B123");
    let mut edit = message_event("D1", "im", "U1", "edited", &now_ts());
    edit["subtype"] = json!("message_changed");
    for (i, body) in [chatter, bot_post, edit].into_iter().enumerate() {
        let (status, _) =
            hub.deliver("acme-slack", "acme-signing-secret", &event(&format!("Ev-x-{i}"), BOT, body), &[]).await;
        assert_eq!(status, 200);
    }
    let posts = hub.posts_to("C1", 1).await;
    assert_eq!((posts[0].text.as_str(), posts[0].thread_ts.as_deref()), ("echo: what is up?", Some(thread)));
    // Seven events, six traces: the mention's second event is no news (the retry is). Stages
    // ship in order, so once the last event's trace is stored, a trace of the mention's second
    // event would be too.
    let traces = wait_for("the last event's trace", Duration::from_secs(15), || async {
        let traces = hub.finished("acme-slack", 6).await;
        traces.iter().any(|t| t["text"] == "edited").then_some(traces)
    })
    .await;
    // No credential of the app reaches a trace or the agent: not the verification token in the
    // envelope, not the signing secret, not the bot token.
    let everything: String = trace_texts(traces.iter().map(|t| t["id"].as_str().unwrap().to_owned()), &hub).await;
    let agent_saw = acme_agent.requests().iter().map(|r| r.body.to_string()).collect::<String>();
    for secret in ["Jhj5dZrVaK7ZwHHjRyZWjbDl", "acme-signing-secret", "xoxb-acme-0000"] {
        assert!(!everything.contains(secret) && !agent_saw.contains(secret), "{secret} leaked");
    }
    assert!(everything.contains("what is up?"), "the payloads were read");
    let count = |status: &str| traces.iter().filter(|t| t["status"] == status).count();
    assert_eq!((traces.len(), count("completed"), count("ignored")), (6, 2, 4), "{traces:#?}");
    assert_eq!(hub.slack.posts().len(), 2, "one reply per message, never two");
    assert_eq!(acme_agent.requests().len(), 2);
    assert!(acme_agent.requests().iter().all(|r| r.body["message"] != "just chatting"));

    // Beta's message goes to beta's agent and out with beta's token; acme's agent never sees it.
    let beta_dm = event("Ev-b-1", "UBOTBETA", message_event("D7", "im", "U7", "hello beta", &now_ts()));
    hub.deliver("beta-slack", "beta-signing-secret", &beta_dm, &[]).await;
    let posts = hub.posts_to("D7", 1).await;
    assert_eq!((posts[0].text.as_str(), posts[0].token.as_str()), ("beta says: hello beta", "xoxb-beta-1111"));
    assert_eq!(acme_agent.requests().len(), 2);
    // Users are recorded from the trace, which is shipped after the reply went out.
    let users = wait_for("beta's user", Duration::from_secs(15), || async {
        let users = hub.ctl(&["user", "list", "beta-slack", "-o", "json"]).await.json();
        (!users.as_array()?.is_empty()).then_some(users)
    })
    .await;
    assert_eq!(users.as_array().unwrap().len(), 1, "{users}");
    assert_eq!(users[0]["identity"], "U7");
    let scoped = hub.ctl(&["apikey", "create", "--instances", "beta-*", "-o", "json"]).await.json();
    let theirs =
        omnictl(&hub.cp.url(), scoped["key"].as_str().unwrap(), &["trace", "list", "--instance", "acme-slack"]).await;
    assert!(theirs.failed().contains("not found"), "{theirs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_long_answers_rate_limits_and_api_errors() {
    let hub = Hub::start().await;
    let agent = FakeAgent::start().await;
    let paragraph = "word ".repeat(700);
    let long = format!("{}\n\n{}", paragraph.trim(), paragraph.trim());
    let long_answer = long.clone();
    agent.script(move |body| {
        let text = body["message"].as_str().unwrap_or_default();
        let answer = if text == "long please" { long_answer.clone() } else { format!("echo: {text}") };
        (200, json!({ "message": answer }), Duration::ZERO)
    });
    hub.instance("acme-slack", &agent, "xoxb-acme-0000", "acme-signing-secret", &["--slack-bot-user-id", BOT]).await;

    // Split at 4000 characters, every chunk in the same thread, in order.
    let ts = now_ts();
    hub.deliver(
        "acme-slack",
        "acme-signing-secret",
        &event("Ev-l", BOT, message_event("D1", "im", "U1", "long please", &ts)),
        &[],
    )
    .await;
    let posts = hub.posts_to("D1", 2).await;
    assert!(posts.iter().all(|p| p.text.chars().count() <= 4000 && p.thread_ts.as_deref() == Some(ts.as_str())));
    assert_eq!(posts.iter().map(|p| p.text.as_str()).collect::<Vec<_>>().join("\n\n"), long);

    // A 429 with Retry-After: the post waits as told, then goes once.
    hub.slack.rate_limit_next(1, 1);
    hub.deliver(
        "acme-slack",
        "acme-signing-secret",
        &event("Ev-r", BOT, message_event("D2", "im", "U1", "after a limit", &now_ts())),
        &[],
    )
    .await;
    let posts = hub.posts_to("D2", 1).await;
    let limited = hub.slack.rate_limited();
    assert_eq!(limited.len(), 1);
    assert!(posts[0].at.duration_since(limited[0]) >= Duration::from_millis(950), "Retry-After was honoured");
    // Once the message is finished, still one post: the 429 was not counted as a maybe-sent.
    hub.finished("acme-slack", 2).await;
    assert_eq!(hub.slack.posts().iter().filter(|p| p.channel == "D2").count(), 1);

    // ok:false is a refusal: recorded in the trace with Slack's error code.
    hub.slack.fail_channel("C_GONE", "channel_not_found");
    let mention = app_mention("C_GONE", "U1", &format!("<@{BOT}> hello?"), &now_ts());
    hub.deliver("acme-slack", "acme-signing-secret", &event("Ev-f", BOT, mention), &[]).await;
    let failed = wait_for("the failed trace", Duration::from_secs(15), || async {
        hub.traces("acme-slack").await.into_iter().find(|t| t["status"] == "failed")
    })
    .await;
    let trace = hub.ctl(&["trace", "get", failed["id"].as_str().unwrap(), "-o", "json"]).await.json();
    assert!(trace.to_string().contains("channel_not_found"), "{trace:#}");
    assert_eq!(trace["error_stage"], "send_chunk");

    // The send API posts to a channel id, split like replies, traced as outbound.
    let sent =
        hub.ctl(&["send", "text", "acme-slack", "--to", "C42", "--text", "Deploy finished", "-o", "json"]).await.json();
    assert_eq!(sent["message_ids"].as_array().map(Vec::len), Some(1), "{sent}");
    let posts = hub.posts_to("C42", 1).await;
    assert_eq!((posts[0].text.as_str(), posts[0].thread_ts.as_deref()), ("Deploy finished", None));
    let refused = hub.ctl(&["send", "text", "acme-slack", "--to", "C_GONE", "--text", "anyone?"]).await;
    assert!(refused.failed().contains("channel_not_found"), "{refused:?}");

    // Files: a URL is posted for Slack to unfurl; bytes go through the external upload flow.
    let linked = hub
        .ctl(&[
            "send",
            "media",
            "acme-slack",
            "--to",
            "C42",
            "--url",
            "https://files.example/chart.png",
            "--caption",
            "Chart",
        ])
        .await;
    assert!(linked.ok().starts_with("sent 1 message(s)"), "{linked:?}");
    assert_eq!(hub.posts_to("C42", 2).await[1].text, "Chart\nhttps://files.example/chart.png");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.csv");
    std::fs::write(&file, b"day,orders\nmon,42\n").unwrap();
    #[rustfmt::skip]
    let uploaded = hub.ctl(&[
        "send", "media", "acme-slack", "--to", "C42", "--file", file.to_str().unwrap(), "--caption", "Weekly report",
    ]).await;
    assert!(uploaded.ok().starts_with("sent 1 message(s)"), "{uploaded:?}");
    let shared = hub.slack.shared_files();
    assert_eq!(shared.len(), 1);
    let (name, bytes, call) = &shared[0];
    assert_eq!((name.as_str(), bytes.as_slice()), ("report.csv", b"day,orders\nmon,42\n".as_slice()));
    assert_eq!((call["channel_id"].as_str(), call["initial_comment"].as_str()), (Some("C42"), Some("Weekly report")));
}
