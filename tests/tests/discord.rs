//! Discord through the real binaries: gateways leased to one node at a time, messages in over
//! the gateway, replies out through the REST API (both loopback fakes of Discord), traced.

use omni_tests::discord::{FakeDiscord, dm_message, guild_message, snowflake};
use omni_tests::fakes::FakeAgent;
use omni_tests::postgres::TestDatabase;
use omni_tests::process::{ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, Outcome, omnictl};
use omni_tests::proxy::Partition;
use omni_tests::{free_port, wait_for};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// Short leases so that failover and lease expiry happen within a test.
const LEASE_TTL: &str = "2s";

/// A master key for control planes on Postgres (which will not generate one).
const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

async fn control_plane(dir: &Path, listen: &str) -> ControlPlane {
    control_plane_with(dir, listen, LEASE_TTL, None).await
}

/// A control plane on SQLite in `dir`, or on `database`.
async fn control_plane_with(dir: &Path, listen: &str, ttl: &str, database: Option<&TestDatabase>) -> ControlPlane {
    let options = ControlPlaneOptions {
        listen: Some(listen.to_owned()),
        extra_args: vec!["--gateway-lease-ttl".into(), ttl.into()],
        database_url: database.map(|db| db.url.clone()),
        master_key: database.map(|_| MASTER_KEY.to_owned()),
        ..Default::default()
    };
    ControlPlane::start(&dir.join("cp"), &options).await
}

async fn node(dir: &Path, cp: &ControlPlane, discord: &FakeDiscord, id: &str) -> DataPlane {
    node_via(dir, cp, &cp.url(), discord, id).await
}

/// A node that reaches the control plane at `control_plane`.
async fn node_via(dir: &Path, cp: &ControlPlane, control_plane: &str, discord: &FakeDiscord, id: &str) -> DataPlane {
    let options = DataPlaneOptions {
        control_plane: control_plane.to_owned(),
        node_token: cp.node_token(),
        node_id: Some(id.to_owned()),
        env: vec![
            ("OMNI_DISCORD_GATEWAY_URL".into(), discord.gateway_url.clone()),
            ("OMNI_DISCORD_API_URL".into(), discord.api_url.clone()),
        ],
        ..Default::default()
    };
    let node = DataPlane::start(&dir.join(id), &options).await;
    node.wait_for_revision(0).await;
    node
}

async fn ctl(cp: &ControlPlane, args: &[&str]) -> Outcome {
    omnictl(&cp.url(), &cp.admin_key(), args).await
}

/// The bots of the failover tests: bot-0..bot-3, one token each.
const TOKENS: [&str; 4] = ["t-one", "t-two", "t-three", "t-four"];

fn register_bots(discord: &FakeDiscord) {
    for (i, token) in TOKENS.iter().enumerate() {
        discord.bot(token, &format!("90{i}"), &format!("bot{i}"));
    }
}

/// Creates bot-0..bot-3; returns the revision of the last.
async fn create_bots(cp: &ControlPlane, agent: &FakeAgent) -> i64 {
    let mut revision = 0;
    for (i, token) in TOKENS.iter().enumerate() {
        revision = create_bot(cp, &format!("bot-{i}"), agent, token).await;
    }
    revision
}

/// Waits until `node` has received `more` gateway lease answers (renewals) beyond `since`;
/// returns its count then.
async fn lease_answers(node: &DataPlane, since: f64, more: f64) -> f64 {
    wait_for(&format!("{more} more lease answers"), Duration::from_secs(15), || async {
        let answers = node.metric("omni_node_discord_lease_answers_total").await;
        (answers >= since + more).then_some(answers)
    })
    .await
}

async fn create_bot(cp: &ControlPlane, name: &str, agent: &FakeAgent, token: &str) -> i64 {
    #[rustfmt::skip]
    let created = ctl(cp, &[
        "instance", "create", name, "--channel", "discord", "--agent-url", &agent.url, "--discord-token", token, "-o", "json",
    ]).await.json();
    created["instance"]["revision"].as_i64().unwrap_or_else(|| panic!("{created}"))
}

async fn status(cp: &ControlPlane, name: &str) -> Value {
    ctl(cp, &["instance", "status", name, "-o", "json"]).await.json()
}

async fn wait_live(discord: &FakeDiscord, tokens: &[&str]) {
    wait_for(&format!("gateways of {tokens:?} to be up"), Duration::from_secs(20), || async {
        tokens.iter().all(|t| discord.live(t)).then_some(())
    })
    .await
}

/// Waits until `n` messages were posted in `channel` (replies and API sends), and returns them.
async fn posts_in(discord: &FakeDiscord, channel: &str, n: usize) -> Vec<omni_tests::discord::DiscordPost> {
    wait_for(&format!("{n} posts in channel {channel}"), Duration::from_secs(15), || async {
        let posts: Vec<_> = discord.messages().into_iter().filter(|p| p.channel_id == channel).collect();
        (posts.len() >= n).then_some(posts)
    })
    .await
}

async fn finished_traces(cp: &ControlPlane, instance: &str, n: usize) -> Vec<Value> {
    omni_tests::finished_traces(&cp.url(), &cp.admin_key(), instance, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_bots_answer_dms_and_mentions_once_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let discord = FakeDiscord::start().await;
    discord.bot("acme-token", "999", "acmebot");
    discord.bot("beta-token", "888", "betabot");
    discord.reject_token("bad-token", 4004);
    let cp = control_plane(dir.path(), &format!("127.0.0.1:{}", free_port())).await;
    let node = node(dir.path(), &cp, &discord, "node-a").await;
    let (acme_agent, beta_agent) = (FakeAgent::start().await, FakeAgent::start().await);
    let fence = format!("Here:\n\n```rust\n{}```", "let x = 1;\n".repeat(300));
    let long_answer = fence.clone();
    acme_agent.script(move |body| {
        let text = body["message"].as_str().unwrap_or_default();
        let answer = if text == "code please" { long_answer.clone() } else { format!("echo: {text}") };
        // A slow first answer: typing shows while the agent works.
        let delay = if text == "hello" { Duration::from_millis(600) } else { Duration::ZERO };
        (200, json!({ "message": answer }), delay)
    });
    beta_agent.script(|body| {
        (200, json!({ "message": format!("beta: {}", body["message"].as_str().unwrap()) }), Duration::ZERO)
    });
    create_bot(&cp, "acme-discord", &acme_agent, "acme-token").await;
    let revision = create_bot(&cp, "beta-discord", &beta_agent, "beta-token").await;
    node.wait_for_revision(revision).await;
    wait_live(&discord, &["acme-token", "beta-token"]).await;
    assert_eq!(discord.intents("acme-token"), [37376], "GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT");
    let shown = wait_for("status to show the gateway ready", Duration::from_secs(10), || async {
        let s = status(&cp, "acme-discord").await;
        (s["gateway_state"] == "ready").then_some(s)
    })
    .await;
    assert_eq!(shown["node_id"], "node-a", "{shown}");
    assert_eq!(shown["channel"], "discord", "the status says which channel it describes");
    wait_for("the node's gateway metrics", Duration::from_secs(10), || async {
        let (leases, gateways) =
            (node.metric("omni_node_discord_leases").await, node.metric("omni_node_discord_gateways").await);
        (leases == 2.0 && gateways == 2.0).then_some(())
    })
    .await;

    // A DM, a mention (stripped), chatter without a mention, another bot: two answers.
    let dm_id = snowflake();
    assert!(discord.dispatch_message("acme-token", dm_message(&dm_id, "501", "42", "alice", "hello")));
    let dm_replies = posts_in(&discord, "501", 1).await;
    assert_eq!((dm_replies[0].content.as_str(), dm_replies[0].token.as_str()), ("echo: hello", "acme-token"));
    assert!(discord.typing("501") >= 1, "typing shown while the agent worked");
    // The same event delivered again (as a resumed session replays it), and once more: not
    // answered again.
    assert!(discord.replay_last("acme-token"));
    discord.dispatch_message("acme-token", dm_message(&dm_id, "501", "42", "alice", "hello"));
    let mention =
        guild_message(&snowflake(), "502", "456", "42", "alice", "<@999> how are you?", &[("999", "acmebot")], false);
    assert!(discord.dispatch_message("acme-token", mention));
    discord.dispatch_message(
        "acme-token",
        guild_message(&snowflake(), "502", "456", "42", "alice", "chatter", &[], false),
    );
    discord.dispatch_message(
        "acme-token",
        guild_message(&snowflake(), "502", "456", "77", "otherbot", "<@999> hi", &[("999", "acmebot")], true),
    );
    let mention_replies = posts_in(&discord, "502", 1).await;
    assert_eq!(mention_replies[0].content, "echo: how are you?");
    let traces = finished_traces(&cp, "acme-discord", 6).await;
    let count = |status: &str| traces.iter().filter(|t| t["status"] == status).count();
    assert_eq!((count("completed"), count("ignored")), (2, 4), "{traces:#?}");
    assert_eq!(discord.messages().len(), 2, "one reply per message");
    assert_eq!(posts_in(&discord, "501", 1).await.len(), 1, "the DM delivered three times was answered once");

    // A long answer: chunks of at most 2000 characters, every code fence closed and reopened.
    discord.dispatch_message("acme-token", dm_message(&snowflake(), "503", "42", "alice", "code please"));
    let chunks = posts_in(&discord, "503", 2).await;
    assert_eq!(chunks.len(), 2, "3,300 characters in two chunks");
    for chunk in &chunks {
        // The fake refuses (400) anything over 2000 characters: both arrived, so both fit.
        assert_eq!(chunk.content.matches("```").count() % 2, 0, "balanced: {}", chunk.content);
    }
    assert!(chunks[0].content.starts_with("Here:") && chunks[1].content.starts_with("```rust\n"));
    let lines: usize = chunks.iter().map(|c| c.content.matches("let x = 1;").count()).sum();
    assert_eq!(lines, 300, "no line lost or repeated across the chunks");

    // Beta's bot is beta's: its own agent and token.
    discord.dispatch_message("beta-token", dm_message(&snowflake(), "601", "43", "bob", "hi beta"));
    let beta = posts_in(&discord, "601", 1).await;
    assert_eq!((beta[0].content.as_str(), beta[0].token.as_str()), ("beta: hi beta", "beta-token"));
    assert!(acme_agent.requests().iter().all(|r| r.body["message"] != "hi beta"));

    // The send API posts to a channel id through the bot's REST client; files are attached.
    let sent = ctl(&cp, &["send", "text", "acme-discord", "--to", "777", "--text", "Release is out", "-o", "json"])
        .await
        .json();
    assert_eq!(sent["message_ids"].as_array().map(Vec::len), Some(1), "{sent}");
    assert_eq!(posts_in(&discord, "777", 1).await[0].content, "Release is out");
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"release notes").unwrap();
    let attached = ctl(
        &cp,
        &["send", "media", "acme-discord", "--to", "777", "--file", file.to_str().unwrap(), "--caption", "Notes"],
    )
    .await;
    assert!(attached.ok().starts_with("sent 1 message(s)"), "{attached:?}");
    let posted = posts_in(&discord, "777", 2).await;
    assert_eq!(
        (posted[1].content.as_str(), posted[1].files.as_slice()),
        ("Notes", [("notes.txt".to_owned(), 13)].as_slice())
    );
    let bad = ctl(&cp, &["send", "text", "acme-discord", "--to", "not-a-channel", "--text", "x"]).await;
    assert!(bad.failed().contains("not a channel id"), "{bad:?}");

    // One bot serves one instance: a second instance with beta's token would answer twice.
    #[rustfmt::skip]
    let twice = ctl(&cp, &[
        "instance", "create", "beta-again", "--channel", "discord", "--agent-url", &acme_agent.url, "--discord-token", "beta-token",
    ]).await;
    assert!(twice.failed().contains("already used by another instance"), "{twice:?}");
    assert!(!twice.stderr.contains("beta-discord"), "the other instance is not named: {twice:?}");

    // A token change restarts only that bot.
    let before = discord.identifies("beta-token");
    discord.bot("acme-token-2", "999", "acmebot");
    let updated =
        ctl(&cp, &["instance", "update", "acme-discord", "--discord-token", "acme-token-2", "-o", "json"]).await.json();
    node.wait_for_revision(updated["revision"].as_i64().unwrap()).await;
    wait_live(&discord, &["acme-token-2"]).await;
    wait_for("the old token's gateway to close", Duration::from_secs(10), || async {
        (!discord.live("acme-token")).then_some(())
    })
    .await;
    assert_eq!(discord.identifies("beta-token"), before, "beta's gateway was not touched");

    // A fatal close (bad token): the instance shows the error, and the bot is not retried.
    create_bot(&cp, "bad-discord", &acme_agent, "bad-token").await;
    let failed = wait_for("the fatal close to show", Duration::from_secs(15), || async {
        let s = status(&cp, "bad-discord").await;
        (s["gateway_state"] == "error").then_some(s)
    })
    .await;
    assert!(failed["gateway_error"].as_str().unwrap().contains("4004"), "{failed}");
    wait_for("the fatal close to be counted", Duration::from_secs(10), || async {
        (node.metric("omni_node_discord_fatal_closes_total").await == 1.0).then_some(())
    })
    .await;
    // Three lease renewals later, still one attempt.
    let answers = node.metric("omni_node_discord_lease_answers_total").await;
    let answers = lease_answers(&node, answers, 3.0).await;
    assert_eq!(discord.identifies("bad-token"), 1, "no reconnect loop after a fatal close");
    // Updating the instance (say, after enabling the intent in Discord's portal) lets it try
    // once more, on the new config; the token is still refused, so once.
    ctl(&cp, &["instance", "update", "bad-discord", "--agent-timeout", "30"]).await.ok();
    wait_for("a new attempt after the update", Duration::from_secs(15), || async {
        (discord.identifies("bad-token") == 2).then_some(())
    })
    .await;
    // The error about the new config keeps the bot down again, and shows.
    wait_for("the new config's error to show", Duration::from_secs(15), || async {
        let s = status(&cp, "bad-discord").await;
        s["gateway_error"].as_str().is_some_and(|e| e.contains("4004")).then_some(())
    })
    .await;
    let answers = answers.max(node.metric("omni_node_discord_lease_answers_total").await);
    lease_answers(&node, answers, 3.0).await;
    assert_eq!(discord.identifies("bad-token"), 2, "one attempt per config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_bots_move_on_partition_and_death_and_never_run_twice_sqlite() {
    bots_move_on_partition_and_death(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_bots_move_on_partition_and_death_and_never_run_twice_postgres() {
    let Some(db) = TestDatabase::create().await else { return };
    bots_move_on_partition_and_death(Some(db)).await;
}

async fn bots_move_on_partition_and_death(database: Option<TestDatabase>) {
    let dir = tempfile::tempdir().unwrap();
    let discord = FakeDiscord::start().await;
    register_bots(&discord);
    let tokens = TOKENS;
    let listen = format!("127.0.0.1:{}", free_port());
    let cp = control_plane_with(dir.path(), &listen, LEASE_TTL, database.as_ref()).await;
    // Node A reaches the control plane through a link the test can cut; B directly. Both
    // always reach Discord.
    let link = Partition::start(&cp.addr).await;
    let node_a = node_via(dir.path(), &cp, &format!("http://{}", link.addr), &discord, "node-a").await;
    let node_b = node(dir.path(), &cp, &discord, "node-b").await;
    let agent = FakeAgent::start().await;
    let revision = create_bots(&cp, &agent).await;
    node_a.wait_for_revision(revision).await;
    node_b.wait_for_revision(revision).await;
    wait_live(&discord, &tokens).await;
    let spread = holders(&cp).await;
    assert!(spread.contains(&"node-a".to_owned()) && spread.contains(&"node-b".to_owned()), "spread: {spread:?}");

    // A loses the control plane but not Discord: it must close its gateways before its leases
    // can be given to B, which then runs every bot.
    link.cut();
    wait_for("every bot to run on node B", Duration::from_secs(30), || async {
        let now = holders(&cp).await;
        (now.iter().all(|h| h == "node-b") && tokens.iter().all(|t| discord.live(t))).then_some(())
    })
    .await;
    for token in tokens {
        assert_eq!(discord.max_concurrent(token), 1, "{token} ran on two nodes at once");
    }
    discord.dispatch_message("t-one", dm_message(&snowflake(), "701", "42", "alice", "still there?"));
    assert_eq!(posts_in(&discord, "701", 1).await[0].content, "echo: still there?");

    // A is back; B dies: its bots come up on A once B's leases ran out.
    link.heal();
    node_b.kill().await;
    wait_for("every bot to run on node A", Duration::from_secs(30), || async {
        let now = holders(&cp).await;
        (now.iter().all(|h| h == "node-a") && tokens.iter().all(|t| discord.live(t))).then_some(())
    })
    .await;

    // The control plane goes away: A closes its gateways when its leases run out...
    cp.kill().await;
    wait_for("gateways to close without the control plane", Duration::from_secs(15), || async {
        tokens.iter().all(|t| !discord.live(t)).then_some(())
    })
    .await;
    // ...and opens them again when it is back.
    let cp = control_plane_with(dir.path(), &listen, LEASE_TTL, database.as_ref()).await;
    wait_live(&discord, &tokens).await;
    assert!(holders(&cp).await.iter().all(|h| h == "node-a"));
    for token in tokens {
        assert_eq!(discord.max_concurrent(token), 1, "{token} ran on two nodes at once");
    }
    drop(node_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_hands_its_bots_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let discord = FakeDiscord::start().await;
    register_bots(&discord);
    let tokens = TOKENS;
    // Leases long enough that only handing them back can move the bots within the test.
    let cp = control_plane_with(dir.path(), &format!("127.0.0.1:{}", free_port()), "120s", None).await;
    let node_a = node(dir.path(), &cp, &discord, "node-a").await;
    let agent = FakeAgent::start().await;
    let revision = create_bots(&cp, &agent).await;
    node_a.wait_for_revision(revision).await;
    wait_live(&discord, &tokens).await;
    assert!(holders(&cp).await.iter().all(|h| h == "node-a"));
    let node_b = node(dir.path(), &cp, &discord, "node-b").await;
    // B has heartbeated (and got nothing: A holds every bot), so only a lease offered between
    // heartbeats can reach it before its next one, 10 s later.
    lease_answers(&node_b, 0.0, 1.0).await;
    let answered = std::time::Instant::now();
    // SIGTERM: A closes its gateways, hands the leases back, and B takes every bot.
    let log_a = node_a.log_path.clone();
    assert!(node_a.terminate().await.success());
    let log_a = std::fs::read_to_string(log_a).unwrap();
    for failure in ["not handed back", "leases left to expire"] {
        assert!(!log_a.contains(failure), "A closed its gateways and the release was confirmed: {log_a}");
    }
    wait_for("every bot to run on node B, well before its next heartbeat", Duration::from_secs(5), || async {
        let now = holders(&cp).await;
        (now.iter().all(|h| h == "node-b") && tokens.iter().all(|t| discord.live(t))).then_some(())
    })
    .await;
    assert!(answered.elapsed() < Duration::from_secs(10), "B took the bots before its next heartbeat");
    assert!(cp.log().contains("released=4"), "{}", cp.log());
    for token in tokens {
        assert_eq!(discord.max_concurrent(token), 1, "{token} ran on two nodes at once");
    }
    drop(node_b);
}

/// The node holding each of bot-0..bot-3's lease.
async fn holders(cp: &ControlPlane) -> Vec<String> {
    let mut holders = Vec::new();
    for i in 0..TOKENS.len() {
        let s = status(cp, &format!("bot-{i}")).await;
        holders.push(s["node_id"].as_str().unwrap_or_default().to_owned());
    }
    holders
}
