//! `omnictl send ...`: messages the hub initiates, through the same API other services use.

use crate::client::Client;
use crate::output::{self, Format};
use clap::Subcommand;
use omni_proto::v1::{self as pb, send_media_request};
use serde_json::json;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum SendCommand {
    /// Send a text (split like replies at the instance's limit).
    Text {
        instance: String,
        /// WhatsApp: a phone number or JID. Slack and Discord: a channel id.
        #[arg(long)]
        to: String,
        #[arg(long)]
        text: String,
    },
    /// Send a file, from disk or by URL, with an optional caption.
    Media {
        instance: String,
        #[arg(long)]
        to: String,
        /// A file to upload (at most 12 MiB).
        #[arg(long, conflicts_with = "url", required_unless_present = "url")]
        file: Option<PathBuf>,
        /// A URL the channel fetches.
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        caption: Option<String>,
        /// image, video, audio or document (default: from the MIME type).
        #[arg(long)]
        media_type: Option<String>,
        /// Default: from the file's extension.
        #[arg(long)]
        mime_type: Option<String>,
    },
}

/// A MIME type from a file name's extension.
fn mime_type_of(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase()).as_deref() {
        Some("pdf") => "application/pdf",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("mp4") => "video/mp4",
        Some("mp3") => "audio/mpeg",
        Some("ogg" | "opus") => "audio/ogg",
        Some("txt") => "text/plain",
        Some("csv") => "text/csv",
        _ => "application/octet-stream",
    }
}

pub async fn run(command: SendCommand, client: &Client, format: Format) -> anyhow::Result<()> {
    let mut api = client.messages();
    let sent = match command {
        SendCommand::Text { instance, to, text } => {
            api.send_text(pb::SendTextRequest { instance, to, text }).await.map_err(|s| client.error(s))?
        }
        SendCommand::Media { instance, to, file, url, caption, media_type, mime_type } => {
            let (source, file_name) = match (file, url) {
                (Some(path), _) => {
                    let data = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    (send_media_request::Source::Data(data), name)
                }
                (None, Some(url)) => {
                    let name = url.rsplit('/').next().unwrap_or_default().to_owned();
                    (send_media_request::Source::Url(url), name)
                }
                (None, None) => anyhow::bail!("give --file or --url"),
            };
            let mime_type = mime_type.unwrap_or_else(|| mime_type_of(&file_name).to_owned());
            let request = pb::SendMediaRequest {
                instance,
                to,
                source: Some(source),
                media_type: media_type.unwrap_or_default(),
                mime_type,
                file_name,
                caption: caption.unwrap_or_default(),
            };
            api.send_media(request).await.map_err(|s| client.error(s))?
        }
    }
    .into_inner();
    match format {
        Format::Json => output::json(&json!({
            "trace_id": sent.trace_id,
            "message_ids": sent.message_ids,
            "node_id": sent.node_id,
        })),
        Format::Table => {
            println!("sent {} message(s): {}", sent.message_ids.len(), sent.message_ids.join(", "));
            println!("trace: {} (node {})", sent.trace_id, sent.node_id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_from_names() {
        assert_eq!(mime_type_of("invoice.PDF"), "application/pdf");
        assert_eq!(mime_type_of("photo.jpeg"), "image/jpeg");
        assert_eq!(mime_type_of("noext"), "application/octet-stream");
    }
}
