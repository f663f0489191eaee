//! `omnictl node ...`

use crate::client::Client;
use crate::output::{self, Format, time, time_json};
use clap::Subcommand;
use omni_proto::v1 as pb;
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List data-plane nodes: applied config revision against the head, liveness, last error.
    List,
}

pub async fn run(command: NodeCommand, client: &Client, format: Format) -> anyhow::Result<()> {
    match command {
        NodeCommand::List => {
            let list =
                client.nodes().list_nodes(pb::ListNodesRequest {}).await.map_err(|s| client.error(s))?.into_inner();
            match format {
                Format::Json => output::json(&json!({
                    "head_revision": list.head_revision,
                    "nodes": list.nodes.iter().map(|n| json!({
                        "id": n.id,
                        "address": n.address,
                        "version": n.version,
                        "applied_revision": n.applied_revision,
                        "first_seen_time": time_json(n.first_seen_time.as_ref()),
                        "last_seen_time": time_json(n.last_seen_time.as_ref()),
                        "status": n.status,
                        "last_error": n.last_error,
                    })).collect::<Vec<_>>(),
                })),
                Format::Table => output::table(
                    &["ID", "ADDRESS", "VERSION", "APPLIED", "HEAD", "LAST SEEN", "STATUS", "LAST ERROR"],
                    &list
                        .nodes
                        .iter()
                        .map(|n| {
                            vec![
                                n.id.clone(),
                                n.address.clone(),
                                n.version.clone(),
                                n.applied_revision.to_string(),
                                list.head_revision.to_string(),
                                time(n.last_seen_time.as_ref()),
                                n.status.clone(),
                                n.last_error.clone(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
    }
    Ok(())
}
