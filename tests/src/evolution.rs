//! Evolution webhook bodies for tests, from the fixtures in `tests/fixtures/evolution`.

use serde_json::{Value, json};

/// A fixture with its message timestamps set to now (they would be stale otherwise).
pub fn fixture(name: &str) -> Value {
    let path = format!("{}/fixtures/evolution/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut body: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    fn refresh(data: &mut Value, now: u64) {
        if let Some(messages) = data.get_mut("messages").and_then(Value::as_array_mut) {
            messages.iter_mut().for_each(|m| m["messageTimestamp"] = json!(now));
        } else if data.get("key").is_some() {
            data["messageTimestamp"] = json!(now);
        }
    }
    match body["data"].clone() {
        Value::String(encoded) => {
            use base64::Engine as _;
            let engine = base64::engine::general_purpose::STANDARD;
            let mut inner: Value = serde_json::from_slice(&engine.decode(encoded).unwrap()).unwrap();
            refresh(&mut inner["data"], now);
            body["data"] = json!(engine.encode(serde_json::to_vec(&inner).unwrap()));
        }
        _ => refresh(&mut body["data"], now),
    }
    body
}

/// A text DM from `phone` with message id `id`.
pub fn text(phone: &str, id: &str, words: &str) -> Value {
    let mut body = fixture("text_dm.json");
    body["data"]["key"]["remoteJid"] = json!(format!("{phone}@s.whatsapp.net"));
    body["data"]["key"]["id"] = json!(id);
    body["data"]["message"] = json!({ "conversation": words });
    body
}
