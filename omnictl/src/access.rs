//! `omnictl access ...`

use crate::client::Client;
use crate::instance::access_action_name;
use crate::output::{self, Format, time, time_json};
use clap::Subcommand;
use omni_proto::v1 as pb;
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Let senders matching PATTERN (an identity, or a prefix ending in '*') talk to the bot.
    Allow { instance: String, pattern: String },
    /// Ignore senders matching PATTERN.
    Block { instance: String, pattern: String },
    /// List an instance's rules and its default.
    List { instance: String },
    /// Remove a rule by its id (see `access list`).
    Remove { instance: String, rule_id: i64 },
    /// Show what the rules decide for IDENTITY, and which rule decides it.
    Check { instance: String, identity: String },
}

fn rule_json(rule: &pb::AccessRule) -> Value {
    json!({
        "id": rule.id,
        "instance": rule.instance,
        "pattern": rule.pattern,
        "action": access_action_name(rule.action),
        "create_time": time_json(rule.create_time.as_ref()),
    })
}

fn describe(rule: &pb::AccessRule) -> String {
    format!("rule {}: {} {}", rule.id, access_action_name(rule.action), rule.pattern)
}

async fn add(
    client: &Client,
    api: &mut pb::access_service_client::AccessServiceClient<crate::client::Authed>,
    instance: String,
    pattern: String,
    action: pb::AccessAction,
    format: Format,
) -> anyhow::Result<()> {
    let rule = api
        .add_access_rule(pb::AddAccessRuleRequest { instance, pattern, action: action as i32 })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    match format {
        Format::Json => output::json(&rule_json(&rule)),
        Format::Table => println!("{} on {}", describe(&rule), rule.instance),
    }
    Ok(())
}

pub async fn run(command: AccessCommand, client: &Client, format: Format) -> anyhow::Result<()> {
    let mut api = client.access();
    match command {
        AccessCommand::Allow { instance, pattern } => {
            add(client, &mut api, instance, pattern, pb::AccessAction::Allow, format).await?
        }
        AccessCommand::Block { instance, pattern } => {
            add(client, &mut api, instance, pattern, pb::AccessAction::Block, format).await?
        }
        AccessCommand::List { instance } => {
            let list = api
                .list_access_rules(pb::ListAccessRulesRequest { instance })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            match format {
                Format::Json => output::json(&json!({
                    "default_access": access_action_name(list.default_access),
                    "rules": list.rules.iter().map(rule_json).collect::<Vec<_>>(),
                })),
                Format::Table => {
                    output::table(
                        &["ID", "PATTERN", "ACTION", "CREATED"],
                        &list
                            .rules
                            .iter()
                            .map(|r| {
                                vec![
                                    r.id.to_string(),
                                    r.pattern.clone(),
                                    access_action_name(r.action),
                                    time(r.create_time.as_ref()),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    );
                    println!("default: {}", access_action_name(list.default_access));
                }
            }
        }
        AccessCommand::Remove { instance, rule_id } => {
            api.remove_access_rule(pb::RemoveAccessRuleRequest { instance: instance.clone(), id: rule_id })
                .await
                .map_err(|s| client.error(s))?;
            match format {
                Format::Json => output::json(&json!({ "removed": rule_id, "instance": instance })),
                Format::Table => println!("removed rule {rule_id} from {instance}"),
            }
        }
        AccessCommand::Check { instance, identity } => {
            let decision = api
                .check_access(pb::CheckAccessRequest { instance, identity })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            let action = access_action_name(decision.action);
            match format {
                Format::Json => output::json(&json!({
                    "action": action,
                    "matched_rule": decision.matched_rule.as_ref().map(rule_json),
                })),
                Format::Table => match &decision.matched_rule {
                    Some(rule) => println!("{action} ({})", describe(rule)),
                    None => println!("{action} (instance default)"),
                },
            }
        }
    }
    Ok(())
}
