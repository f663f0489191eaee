//! The control plane's calls to a tenant's Evolution API server: creating an instance there with
//! its webhook wired to the hub, re-wiring an existing one, deleting it, and reading its
//! connection state and QR code. Every call has a timeout; errors say what Evolution answered.

use omni_core::errors::root_cause;
use omni_data_plane::channels::evolution::webhook::TOKEN_HEADER;
use serde_json::{Value, json};
use std::time::Duration;
use thiserror::Error;

/// Events the hub subscribes an instance to.
pub const WEBHOOK_EVENTS: [&str; 3] = ["MESSAGES_UPSERT", "CONNECTION_UPDATE", "QRCODE_UPDATED"];

/// Evolution waits about 5 s for a QR code when it creates an instance.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Errors quote at most a short reason from Evolution, never its whole answer (which may hold
/// tokens and other tenants' data) nor the key the call used.
#[derive(Debug, Error)]
pub enum EvolutionError {
    #[error("Evolution at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Evolution refused {action}: HTTP {status}: {message}")]
    Refused { action: &'static str, status: u16, message: String },
    #[error("Evolution answered {action} without {missing}")]
    Unexpected { action: &'static str, missing: &'static str },
}

type Result<T> = std::result::Result<T, EvolutionError>;

/// Where Evolution should deliver an instance's events.
pub struct Webhook<'a> {
    pub url: &'a str,
    pub token: &'a str,
}

impl Webhook<'_> {
    fn body(&self) -> Value {
        json!({
            "enabled": true,
            "url": self.url,
            "headers": { TOKEN_HEADER: self.token },
            "byEvents": false,
            "base64": true,
            "events": WEBHOOK_EVENTS,
        })
    }
}

/// What `GET /instance/connect` answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Connect {
    AlreadyConnected,
    Qr { code: String, png_base64: String, pairing_code: String },
}

/// One Evolution server, reached with a key (the global key, or the instance's token).
pub struct Evolution<'a> {
    http: &'a reqwest::Client,
    base: String,
    key: String,
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(TIMEOUT).build().expect("a client without custom TLS always builds")
}

/// Longest piece of an Evolution answer quoted in an error.
const MAX_QUOTE: usize = 200;

/// The reason in Evolution's error bodies (`{"status":..,"error":..,"response":{"message":[..] |
/// ".."}}`), short, and with `key` blanked should the server echo it.
fn message_of(body: &Value, raw: &str, key: &str) -> String {
    let message = match &body["response"]["message"] {
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            items.iter().map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned)).collect::<Vec<_>>().join("; ")
        }
        _ if body["message"].is_string() => body["message"].as_str().unwrap_or_default().to_owned(),
        _ => raw.to_owned(),
    };
    let message: String = message.chars().take(MAX_QUOTE).collect();
    if key.is_empty() { message } else { message.replace(key, "[redacted]") }
}

impl<'a> Evolution<'a> {
    pub fn new(http: &'a reqwest::Client, url: &str, key: String) -> Evolution<'a> {
        Evolution { http, base: url.trim_end_matches('/').to_owned(), key }
    }

    async fn call(&self, action: &'static str, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request
            .header("apikey", &self.key)
            .send()
            .await
            .map_err(|e| EvolutionError::Unreachable { url: self.base.clone(), reason: root_cause(&e) })?;
        let status = response.status().as_u16();
        let raw = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            return Err(EvolutionError::Refused { action, status, message: message_of(&body, &raw, &self.key) });
        }
        Ok(body)
    }

    /// Whether the server has an instance of that name.
    pub async fn exists(&self, name: &str) -> Result<bool> {
        let url = format!("{}/instance/fetchInstances?instanceName={}", self.base, name);
        let named = |i: &Value| i["name"] == name || i["instance"]["instanceName"] == name;
        match self.call("fetching instances", self.http.get(url)).await {
            Ok(Value::Array(found)) => Ok(found.iter().any(named)),
            // Evolution 1.x answers a name with the one instance, not a list.
            Ok(one @ Value::Object(_)) => Ok(named(&one)),
            Ok(_) => Err(EvolutionError::Unexpected { action: "fetching instances", missing: "a list of instances" }),
            // Some versions answer an unknown name with 404.
            Err(EvolutionError::Refused { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates the instance with its webhook; returns the instance token Evolution issued.
    pub async fn create(&self, name: &str, webhook: &Webhook<'_>) -> Result<String> {
        let body = json!({
            "instanceName": name,
            "integration": "WHATSAPP-BAILEYS",
            "qrcode": true,
            "webhook": webhook.body(),
        });
        let url = format!("{}/instance/create", self.base);
        let created = self.call("creating the instance", self.http.post(url).json(&body)).await?;
        match created["hash"].as_str().or(created["hash"]["apikey"].as_str()) {
            Some(token) if !token.is_empty() => Ok(token.to_owned()),
            _ => Err(EvolutionError::Unexpected {
                action: "creating the instance",
                missing: "the instance token (hash)",
            }),
        }
    }

    pub async fn set_webhook(&self, name: &str, webhook: &Webhook<'_>) -> Result<()> {
        let url = format!("{}/webhook/set/{}", self.base, name);
        self.call("setting the webhook", self.http.post(url).json(&json!({ "webhook": webhook.body() }))).await?;
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        let url = format!("{}/instance/delete/{}", self.base, name);
        self.call("deleting the instance", self.http.delete(url)).await?;
        Ok(())
    }

    /// `open`, `connecting`, `close`, ...
    pub async fn connection_state(&self, name: &str) -> Result<String> {
        let url = format!("{}/instance/connectionState/{}", self.base, name);
        let body = self.call("reading the connection state", self.http.get(url)).await?;
        body["instance"]["state"]
            .as_str()
            .map(str::to_owned)
            .ok_or(EvolutionError::Unexpected { action: "reading the connection state", missing: "instance.state" })
    }

    pub async fn connect(&self, name: &str) -> Result<Connect> {
        let url = format!("{}/instance/connect/{}", self.base, name);
        let body = self.call("fetching the QR code", self.http.get(url)).await?;
        // Failures come back as 200 with {"error": true, "message": ...}.
        if body["error"] == true {
            let message = message_of(&body, "no reason given", &self.key);
            return Err(EvolutionError::Refused { action: "fetching the QR code", status: 200, message });
        }
        if body["instance"]["state"] == "open" {
            return Ok(Connect::AlreadyConnected);
        }
        match body["code"].as_str() {
            Some(code) if !code.is_empty() => Ok(Connect::Qr {
                code: code.to_owned(),
                png_base64: body["base64"].as_str().unwrap_or_default().to_owned(),
                pairing_code: body["pairingCode"].as_str().unwrap_or_default().to_owned(),
            }),
            _ => Err(EvolutionError::Unexpected { action: "fetching the QR code", missing: "a QR code" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_reasons_are_short_and_never_hold_the_key() {
        let body = json!({"status": 401, "response": {"message": ["bad apikey SECRET-KEY-1234"]}});
        assert_eq!(message_of(&body, "", "SECRET-KEY-1234"), "bad apikey [redacted]");
        let long = "x".repeat(5000);
        assert_eq!(message_of(&Value::Null, &long, "k").len(), MAX_QUOTE);
        let error = json!({"error": true, "message": "Connection Closed"});
        assert_eq!(message_of(&error, "", "k"), "Connection Closed");
    }
}
