//! Slack through the Events API: signed webhooks in, `chat.postMessage` in the thread out.

pub mod client;
pub mod parse;
pub mod webhook;
