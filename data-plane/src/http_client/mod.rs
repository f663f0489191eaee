//! The HTTP client of the calls the node makes for each message (the tenant's agent, its
//! Evolution server): hyper's pooled client over rustls, each URL parsed once.
//!
//! Not reqwest, whose redirect and retry layers parse every request's URL twice more (the
//! pipeline's handling of a message took 38% fewer instructions without them); these calls
//! need neither (a POST is not to be redirected or resent behind the caller's back: the callers
//! decide what is retried).
//! HTTP/1.1 only: a stream an HTTP/2 server refuses would otherwise look like a request that may
//! have been delivered, and a reply chunk in that state is never sent again. Through the
//! environment's proxy, if it names one ([`proxy`]).

mod proxy;

pub use proxy::Proxies;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use omni_core::errors::root_cause;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use thiserror::Error;
use tower_service::Service;

/// For a connection in all: the name resolved, TCP connected, TLS negotiated.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// A pooled connection a middlebox dropped silently is found dead by keepalive probes (15 s idle,
/// then three 15 s apart), and unacknowledged data gives up after 30 s, as reqwest's defaults.
const KEEPALIVE: Duration = Duration::from_secs(15);
const USER_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read; an agent's reply text is far smaller.
const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// URLs kept parsed at most; past that the cache starts over (URLs come from tenants' config,
/// and a config with more of them than this is better served slower than by unbounded memory).
const KEEP_URLS: usize = 10_000;

#[derive(Debug, Error)]
pub enum CallError {
    /// A URL or header value that cannot be sent.
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request may have reached the server.
    #[error("{0}")]
    Failed(String),
    /// The server answered `status`, and reading the rest of its answer failed.
    #[error("answer (HTTP {status}) unreadable: {why}")]
    Unread { status: u16, why: String },
}

impl CallError {
    /// The server cannot have seen the request.
    pub fn never_sent(&self) -> bool {
        matches!(self, CallError::Invalid(_) | CallError::Connect(_))
    }
}

/// What the server answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

#[derive(Clone)]
pub struct HttpClient {
    client: Client<Bounded<HttpsConnector<proxy::ProxyConnector>>, Full<Bytes>>,
    uris: Arc<RwLock<HashMap<String, Uri>>>,
    proxies: Proxies,
}

#[derive(Debug, Error)]
#[error("HTTP client: {0}")]
pub struct ClientError(String);

impl HttpClient {
    /// Trusts what the platform trusts (see [`platform_tls`]); through the environment's proxy.
    pub fn new() -> Result<HttpClient, ClientError> {
        Ok(HttpClient::with_tls(platform_tls()?, Proxies::from_env()?))
    }

    pub fn with_tls(tls: rustls::ClientConfig, proxies: Proxies) -> HttpClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(KEEPALIVE));
        http.set_keepalive_interval(Some(KEEPALIVE));
        http.set_keepalive_retries(Some(3));
        http.set_tcp_user_timeout(Some(USER_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(proxy::ProxyConnector { direct: http, proxies: proxies.clone() });
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .build(Bounded(connector));
        HttpClient { client, uris: Arc::default(), proxies }
    }

    /// POSTs `body` as JSON to `url` with `headers`, and reads the answer, all within `timeout`.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(HeaderName, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        let uri = self.uri(url)?;
        // A proxy that forwards plain HTTP reads its credentials from each request; one that
        // tunnels HTTPS was given them with the CONNECT.
        let proxy_credentials =
            if uri.scheme_str() == Some("http") { self.proxies.route(&uri).and_then(|r| r.credentials) } else { None };
        *request.uri_mut() = uri;
        let fields = request.headers_mut();
        if let Some(credentials) = proxy_credentials {
            fields.insert(header::PROXY_AUTHORIZATION, credentials);
        }
        fields.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        fields.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        for (name, value) in headers {
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| CallError::Invalid(format!("{name} is not a valid header value")))?;
            // The callers' headers carry keys: never shown in a header map's Debug output.
            value.set_sensitive(true);
            fields.insert(name, value);
        }
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() { CallError::Connect(root_cause(&e)) } else { CallError::Failed(root_cause(&e)) }
            })?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| CallError::Unread { status, why: root_cause(&*e) })?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| CallError::Timeout(timeout))?
    }

    fn uri(&self, url: &str) -> Result<Uri, CallError> {
        if let Some(uri) = self.uris.read().expect("uri cache poisoned").get(url) {
            return Ok(uri.clone());
        }
        let uri: Uri = url.parse().map_err(|_| CallError::Invalid(format!("URL {url:?}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(CallError::Invalid(format!("URL {url:?}")));
        }
        let mut uris = self.uris.write().expect("uri cache poisoned");
        if uris.len() >= KEEP_URLS {
            uris.clear();
        }
        uris.insert(url.to_owned(), uri.clone());
        Ok(uri)
    }
}

/// TLS that trusts what the platform trusts (its CA store, read here: build it once per
/// process), as browsers and reqwest do. Uses the process's rustls provider, which must be
/// installed first.
pub fn platform_tls() -> Result<rustls::ClientConfig, ClientError> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .ok_or_else(|| ClientError("no rustls crypto provider installed".into()))?;
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone()).map_err(|e| ClientError(e.to_string()))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// A connector that gives up on a connection after [`CONNECT_TIMEOUT`], name resolution and TLS
/// included (hyper's own timeout covers the TCP connect only), so that a server that never
/// completes a handshake is known not to have seen the request.
#[derive(Clone)]
struct Bounded<C>(C);

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> Service<Uri> for Bounded<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(format!("no connection within {CONNECT_TIMEOUT:?}").into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn client() -> HttpClient {
        let _ = rustls::crypto::ring::default_provider().install_default();
        HttpClient::new().unwrap()
    }

    /// A server that answers each connection's first request with `answer` after `delay`, and
    /// hands over what it read.
    async fn server(answer: &'static str, delay: Duration) -> (String, tokio::sync::mpsc::Receiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    let mut buf = [0; 4096];
                    // Headers, then as much body as Content-Length says.
                    loop {
                        let n = socket.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        read.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&read).into_owned();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .and_then(|n| n.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if read.len() >= end + 4 + length {
                                let _ = tx.send(text).await;
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(delay).await;
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        (url, rx)
    }

    #[tokio::test]
    async fn posts_json_with_its_headers_and_reads_the_answer() {
        let (url, mut seen) =
            server("HTTP/1.1 201 Created\r\ncontent-length: 11\r\n\r\n{\"ok\":true}", Duration::ZERO).await;
        let http = client();
        let key = HeaderName::from_static("apikey");
        let answer = http
            .post_json(&url, &[(key, "k-1")], Bytes::from_static(b"{\"a\":1}"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((answer.status, answer.text().as_ref()), (201, "{\"ok\":true}"));
        assert!(answer.is_success());
        let request = seen.recv().await.unwrap();
        assert!(request.starts_with("POST /hook HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains("content-type: application/json\r\n")
                && request.contains("accept: */*\r\n")
                && request.contains("apikey: k-1\r\n"),
            "{request}"
        );
        assert!(request.ends_with("{\"a\":1}"), "{request}");
    }

    #[tokio::test]
    async fn says_whether_the_request_can_have_been_seen() {
        let http = client();
        let body = || Bytes::from_static(b"{}");
        // A port nothing listens on: refused, never sent.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let refused =
            http.post_json(&format!("http://{closed}/"), &[], body(), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(refused, CallError::Connect(_)) && refused.never_sent(), "{refused:?}");
        for bad in ["not a url", "ftp://example.com/x", "/relative"] {
            let error = http.post_json(bad, &[], body(), Duration::from_secs(5)).await.unwrap_err();
            assert!(matches!(error, CallError::Invalid(_)) && error.never_sent(), "{bad}: {error:?}");
        }
        // Read, then no answer in time: perhaps delivered.
        let (url, mut seen) = server("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", Duration::from_secs(30)).await;
        let late = http.post_json(&url, &[], body(), Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(late, CallError::Timeout(_)) && !late.never_sent(), "{late:?}");
        assert!(seen.recv().await.is_some());
        // Answered, then cut short: the server saw it.
        let (url, _seen) = server("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", Duration::ZERO).await;
        let cut = http.post_json(&url, &[], body(), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(cut, CallError::Unread { status: 200, .. }) && !cut.never_sent(), "{cut:?}");
    }

    /// An HTTPS server for "localhost" with a self-signed certificate, answering 200 `ok`: its
    /// URL and its certificate.
    async fn https_server() -> (String, rustls::pki_types::CertificateDer<'static>) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
        let config =
            rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![cert.clone()], key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://localhost:{}/hook", listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else { return };
                    let mut read = Vec::new();
                    let mut buf = [0; 4096];
                    while !read.ends_with(b"{}") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    let _ = tls.flush().await;
                });
            }
        });
        (url, cert)
    }

    #[tokio::test]
    async fn https_certificates_are_verified() {
        let (url, cert) = https_server().await;
        let body = || Bytes::from_static(b"{}");
        // Self-signed: not trusted by the platform, and nothing was sent.
        let untrusted = client().post_json(&url, &[], body(), Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(untrusted, CallError::Connect(_)) && untrusted.never_sent(), "{untrusted:?}");
        assert!(untrusted.to_string().to_lowercase().contains("certificate"), "{untrusted}");
        // Trusted: the request goes through TLS.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let trusting = HttpClient::with_tls(
            rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth(),
            Proxies::default(),
        );
        let answer = trusting.post_json(&url, &[], body(), Duration::from_secs(10)).await.unwrap();
        assert_eq!((answer.status, answer.text().as_ref()), (200, "ok"));
    }

    /// A proxy that tunnels `CONNECT` requests (only), handing over each request's line and
    /// `Proxy-Authorization`.
    async fn tunnelling_proxy() -> (String, tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if client.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let line = head.lines().next().unwrap_or_default().to_owned();
                    let credentials = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("proxy-authorization: ").or(l.strip_prefix("Proxy-Authorization: "))
                        })
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send((line.clone(), credentials));
                    let target = line.strip_prefix("CONNECT ").and_then(|rest| rest.split(' ').next());
                    let Some(mut server) = (match target {
                        Some(target) => tokio::net::TcpStream::connect(target).await.ok(),
                        None => None,
                    }) else {
                        let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n").await;
                        return;
                    };
                    let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        (url, rx)
    }

    #[tokio::test]
    async fn https_calls_go_through_a_tunnel_of_the_proxy_with_its_credentials() {
        let (url, cert) = https_server().await;
        let (proxy, mut seen) = tunnelling_proxy().await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let tls = || rustls::ClientConfig::builder().with_root_certificates(roots.clone()).with_no_client_auth();
        let with_credentials = proxy.replace("http://", "http://omni:s%40cret@");
        let proxied = HttpClient::with_tls(tls(), Proxies::of("", &with_credentials, "").unwrap());
        let answer = proxied.post_json(&url, &[], Bytes::from_static(b"{}"), Duration::from_secs(10)).await.unwrap();
        assert_eq!((answer.status, answer.text().as_ref()), (200, "ok"), "TLS to the server, through the tunnel");
        let port = url.trim_start_matches("https://localhost:").split('/').next().unwrap().to_owned();
        // Told before the proxy connected onwards, so known by the time the answer came.
        let (line, credentials) = seen.try_recv().expect("the call went through the proxy");
        assert_eq!(line, format!("CONNECT localhost:{port} HTTP/1.1"));
        // base64("omni:s@cret"): the URL's credentials, percent-decoded.
        assert_eq!(credentials, "Basic b21uaTpzQGNyZXQ=");
        // A host NO_PROXY names is called directly: the call is done, and the proxy saw nothing.
        let bypassing = HttpClient::with_tls(tls(), Proxies::of("", &proxy, "localhost").unwrap());
        bypassing.post_json(&url, &[], Bytes::from_static(b"{}"), Duration::from_secs(10)).await.unwrap();
        assert!(seen.try_recv().is_err(), "NO_PROXY's host went through the proxy");
        // A proxy that refuses the tunnel: the server never saw the request.
        let (refusing, _) =
            server("HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n", Duration::ZERO).await;
        let refused = HttpClient::with_tls(tls(), Proxies::of("", &refusing.replace("/hook", ""), "").unwrap());
        let error = refused.post_json(&url, &[], Bytes::from_static(b"{}"), Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(error, CallError::Connect(_)) && error.never_sent(), "{error:?}");
        assert!(error.to_string().to_lowercase().contains("auth"), "the proxy's refusal is named: {error}");
    }

    #[test]
    fn only_http_proxies_are_taken() {
        for taken in ["http://proxy.internal:3128", "proxy.internal:3128", "http://user:pass@10.0.0.1:8080"] {
            assert!(Proxies::of(taken, taken, "").is_ok(), "{taken}");
        }
        for (refused, why) in [
            ("socks5://proxy.internal:1080", "socks5:// proxies are not supported"),
            ("https://proxy.internal:3128", "https:// proxies are not supported"),
            ("http://", "not a proxy URL"),
        ] {
            let error = Proxies::of(refused, "", "").err().unwrap_or_else(|| panic!("{refused} taken"));
            assert!(error.to_string().contains(why), "{refused}: {error}");
        }
        let shown = Proxies::of("http://u:secret@proxy.internal:3128", "", "").unwrap().describe().unwrap();
        assert_eq!(shown, "http:// servers via http://proxy.internal:3128", "credentials are never shown");
    }

    #[tokio::test]
    async fn a_server_that_never_completes_a_handshake_never_saw_the_request() {
        // TCP accepted, TLS never answered: given up after the connect timeout, not the request's.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/hook", listener.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let error =
            client().post_json(&url, &[], Bytes::from_static(b"{}"), Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(error, CallError::Connect(_)) && error.never_sent(), "{error:?}");
        held.abort();
    }
}
