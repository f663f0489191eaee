//! WhatsApp through Evolution API v2: webhook payloads in, `sendText` and presence out.

pub mod parse;
pub mod send;
pub mod webhook;
