//! Channels: each turns its platform's payloads into [`Inbound`] messages and sends replies.

pub mod evolution;

use serde::{Deserialize, Serialize};

/// One inbound message, normalized, as it waits in the spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    /// Also the trace id.
    pub id: String,
    pub instance: String,
    pub instance_id: String,
    /// The channel's id of the message (Evolution: `key.id`).
    pub external_id: String,
    /// Where replies go: the JID (or channel id) the message came from.
    pub conversation: String,
    /// Who wrote it, as access rules and users know them: a phone number when the channel
    /// reveals one, else the channel's user id.
    pub sender: String,
    pub sender_name: String,
    pub text: String,
    pub message_type: String,
    pub media: Vec<Media>,
    pub is_group: bool,
    /// Unix seconds, as the channel stamped it.
    pub sent_at: i64,
    /// Unix milliseconds, when the hub accepted it.
    pub received_at: i64,
    /// The channel's payload with secrets removed, for the agent and the trace.
    pub raw: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Media {
    /// image, video, audio, document, sticker.
    pub kind: String,
    pub mime_type: String,
    /// Where the channel keeps it (may need the channel's decryption).
    pub url: String,
    /// The file itself, when the channel sent it.
    pub base64: Option<String>,
    pub file_name: String,
    pub seconds: Option<u64>,
    pub voice_note: bool,
}

impl Inbound {
    /// Conversations are processed one message at a time, in order; this names one.
    pub fn conversation_key(&self) -> String {
        format!("{}\u{0}{}", self.instance, self.conversation)
    }
}
