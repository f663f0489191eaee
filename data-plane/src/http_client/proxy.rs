//! Outbound proxies for the node's own calls, from the environment variables every HTTP client
//! reads (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`, upper or lower case, matched as
//! curl matches them): an https:// server is reached through a `CONNECT` tunnel, TLS end to end;
//! an http:// one by sending the request to the proxy in absolute form, with the proxy's
//! credentials (`http://user:password@proxy:3128`) as `Proxy-Authorization`.

use super::{BoxError, ClientError};
use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpStream;
use tower_service::Service;

/// Variables naming a proxy, in the order they are looked up (as curl and reqwest do).
const PROXY_VARIABLES: [&str; 6] = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"];

/// Which calls go through which proxy: none by default.
#[derive(Clone, Default)]
pub struct Proxies(Option<Arc<Matcher>>);

impl Proxies {
    /// The proxies the process's environment names. Refused (rather than bypassed, which could
    /// break an egress policy) when one is not an `http://` proxy: SOCKS and TLS to the proxy
    /// are not spoken here.
    pub fn from_env() -> Result<Proxies, ClientError> {
        let mut any = false;
        for name in PROXY_VARIABLES {
            let Some(value) = std::env::var(name).ok().filter(|v| !v.trim().is_empty()) else { continue };
            check(name, &value)?;
            any = true;
        }
        Ok(if any { Proxies(Some(Arc::new(Matcher::from_env()))) } else { Proxies::default() })
    }

    /// Proxies set in code: `http` for http:// servers, `https` for https:// ones (empty for
    /// none), and none for the hosts `no` lists.
    #[cfg(test)]
    pub(super) fn of(http: &str, https: &str, no: &str) -> Result<Proxies, ClientError> {
        for (name, value) in [("http", http), ("https", https)].into_iter().filter(|(_, v)| !v.is_empty()) {
            check(name, value)?;
        }
        Ok(Proxies(Some(Arc::new(Matcher::builder().http(http).https(https).no(no).build()))))
    }

    /// The proxy `uri` goes through, if any.
    pub(super) fn route(&self, uri: &Uri) -> Option<Route> {
        let proxy = self.0.as_ref()?.intercept(uri)?;
        Some(Route { proxy: proxy.uri().clone(), credentials: proxy.basic_auth().cloned() })
    }

    /// Each proxy in use, as `scheme://host:port` (credentials left out), for the start-up log.
    pub fn describe(&self) -> Option<String> {
        let matcher = self.0.as_ref()?;
        let shown: Vec<String> = ["http", "https"]
            .into_iter()
            .filter_map(|scheme| {
                let probe = Uri::try_from(format!("{scheme}://omni.invalid/")).ok()?;
                let proxy = matcher.intercept(&probe)?;
                Some(format!("{scheme}:// servers via http://{}", proxy.uri().authority()?))
            })
            .collect();
        (!shown.is_empty()).then(|| shown.join(", "))
    }
}

/// `value` of proxy variable `name` is an http:// proxy (a bare `host:port` means one).
fn check(name: &str, value: &str) -> Result<(), ClientError> {
    let refused = |why: &str| ClientError(format!("{name}: {why}"));
    let uri: Uri = value.parse().map_err(|_| refused("not a proxy URL"))?;
    match uri.scheme_str() {
        None | Some("http") if uri.host().is_some() => Ok(()),
        None | Some("http") => Err(refused("not a proxy URL")),
        Some(scheme) => {
            Err(refused(&format!("{scheme}:// proxies are not supported for agent and Evolution calls (http:// only)")))
        }
    }
}

/// How a request reaches its server through a proxy.
pub(super) struct Route {
    pub proxy: Uri,
    /// The `Proxy-Authorization` value, if the proxy's URL has credentials.
    pub credentials: Option<HeaderValue>,
}

/// Connects to the server, or to the proxy [`Proxies`] names for it.
#[derive(Clone)]
pub(super) struct ProxyConnector {
    pub direct: HttpConnector,
    pub proxies: Proxies,
}

impl Service<Uri> for ProxyConnector {
    type Response = ProxyStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, server: Uri) -> Self::Future {
        // HttpConnector is always ready, so a clone of it may be called without polling it.
        let mut direct = self.direct.clone();
        let Some(route) = self.proxies.route(&server) else {
            return Box::pin(async move { Ok(ProxyStream { io: direct.call(server).await?, forwarding: false }) });
        };
        if server.scheme_str() == Some("https") {
            let mut tunnel = Tunnel::new(route.proxy, direct);
            if let Some(credentials) = route.credentials {
                tunnel = tunnel.with_auth(credentials);
            }
            Box::pin(async move { Ok(ProxyStream { io: tunnel.call(server).await?, forwarding: false }) })
        } else {
            Box::pin(async move { Ok(ProxyStream { io: direct.call(route.proxy).await?, forwarding: true }) })
        }
    }
}

/// A connection to the server (perhaps tunnelled through a proxy), or to a proxy that forwards
/// the requests sent on it, which are then written in absolute form.
pub(super) struct ProxyStream {
    io: TokioIo<TcpStream>,
    forwarding: bool,
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forwarding)
    }
}

impl Read for ProxyStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for ProxyStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
