//! Requests to the URLs the node calls per message (an agent's, an Evolution server's), with
//! each URL parsed once. URL parsing took a tenth of the node's instructions per message, in
//! three parses per request: this one, and two that reqwest makes itself (for its redirect
//! bookkeeping, whatever the policy).

use reqwest::{Client, RequestBuilder, Url};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// URLs kept at most; past that the cache starts over (URLs come from tenants' config, and a
/// config with more of them than this is better served slower than by unbounded memory).
const KEEP: usize = 10_000;

#[derive(Clone, Default)]
pub struct ParsedUrls {
    urls: Arc<RwLock<HashMap<String, Url>>>,
}

impl ParsedUrls {
    /// A POST to `url`; one that does not parse is left to the client to refuse.
    pub fn post(&self, http: &Client, url: &str) -> RequestBuilder {
        match self.parsed(url) {
            Some(parsed) => http.post(parsed),
            None => http.post(url),
        }
    }

    fn parsed(&self, url: &str) -> Option<Url> {
        if let Some(parsed) = self.urls.read().expect("url cache poisoned").get(url) {
            return Some(parsed.clone());
        }
        let parsed = Url::parse(url).ok()?;
        let mut urls = self.urls.write().expect("url cache poisoned");
        if urls.len() >= KEEP {
            urls.clear();
        }
        urls.insert(url.to_owned(), parsed.clone());
        Some(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_parsed_once_and_a_bad_one_is_left_to_the_client() {
        let urls = ParsedUrls::default();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = Client::new();
        let request = urls.post(&http, "http://127.0.0.1:9/api/agent/chat").build().unwrap();
        assert_eq!(request.url().as_str(), "http://127.0.0.1:9/api/agent/chat");
        assert_eq!(urls.urls.read().unwrap().len(), 1);
        let _ = urls.post(&http, "http://127.0.0.1:9/api/agent/chat");
        assert_eq!(urls.urls.read().unwrap().len(), 1, "kept");
        assert!(urls.post(&http, "not a url").build().is_err());
        assert_eq!(urls.urls.read().unwrap().len(), 1, "nothing kept for what does not parse");
    }
}
