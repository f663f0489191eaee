//! `omnictl apikey ...`

use crate::client::Client;
use crate::output::{self, Format, time, time_json};
use clap::{Subcommand, ValueEnum};
use omni_proto::v1 as pb;
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key; it is printed once and only its hash is stored.
    Create {
        /// An admin key: every instance, and key management.
        #[arg(long, value_enum, conflicts_with = "instances", required_unless_present = "instances")]
        scope: Option<ScopeArg>,
        /// Or a key limited to these instance-name patterns ("acme-wa", "acme-*").
        #[arg(long, value_delimiter = ',', value_name = "PATTERN,...")]
        instances: Option<Vec<String>>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by id; it stops working at once.
    Revoke { id: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScopeArg {
    Admin,
}

fn scope(key: &pb::ApiKey) -> String {
    if key.admin { "admin".to_owned() } else { format!("instances: {}", key.instance_patterns.join(",")) }
}

fn key_json(key: &pb::ApiKey) -> Value {
    json!({
        "id": key.id,
        "admin": key.admin,
        "instance_patterns": key.instance_patterns,
        "description": key.description,
        "create_time": time_json(key.create_time.as_ref()),
        "last_used_time": time_json(key.last_used_time.as_ref()),
        "revoke_time": time_json(key.revoke_time.as_ref()),
    })
}

pub async fn run(command: ApiKeyCommand, client: &Client, format: Format) -> anyhow::Result<()> {
    let mut api = client.api_keys();
    match command {
        ApiKeyCommand::Create { scope: admin, instances, description } => {
            let created = api
                .create_api_key(pb::CreateApiKeyRequest {
                    admin: admin.is_some(),
                    instance_patterns: instances.unwrap_or_default(),
                    description,
                })
                .await
                .map_err(|s| client.error(s))?
                .into_inner();
            let key = created.api_key.unwrap_or_default();
            match format {
                Format::Json => output::json(&json!({ "api_key": key_json(&key), "key": created.key })),
                Format::Table => {
                    println!("created API key {} ({})", key.id, scope(&key));
                    println!("key: {}", created.key);
                    println!("(shown only now: store it safely)");
                }
            }
        }
        ApiKeyCommand::List => {
            let keys =
                api.list_api_keys(pb::ListApiKeysRequest {}).await.map_err(|s| client.error(s))?.into_inner().api_keys;
            match format {
                Format::Json => output::json(&Value::Array(keys.iter().map(key_json).collect())),
                Format::Table => output::table(
                    &["ID", "SCOPE", "DESCRIPTION", "CREATED", "LAST USED", "REVOKED"],
                    &keys
                        .iter()
                        .map(|k| {
                            vec![
                                k.id.clone(),
                                scope(k),
                                k.description.clone(),
                                time(k.create_time.as_ref()),
                                time(k.last_used_time.as_ref()),
                                time(k.revoke_time.as_ref()),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        ApiKeyCommand::Revoke { id } => {
            let key =
                api.revoke_api_key(pb::RevokeApiKeyRequest { id }).await.map_err(|s| client.error(s))?.into_inner();
            match format {
                Format::Json => output::json(&key_json(&key)),
                Format::Table => println!("revoked API key {}", key.id),
            }
        }
    }
    Ok(())
}
