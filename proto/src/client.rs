//! Connecting to the control plane: plaintext for `http://`, TLS for `https://` (trusting the
//! public web roots and, when given, an operator's CA certificate).

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{0:?} is not a valid URL")]
    Url(String),
    #[error("TLS: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// An endpoint for `url`; `ca_pem` adds a trusted CA for `https://` URLs.
pub fn endpoint(url: &str, ca_pem: Option<&[u8]>) -> Result<Endpoint, EndpointError> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|_| EndpointError::Url(url.to_owned()))?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new().with_webpki_roots();
    if let Some(pem) = ca_pem {
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    Ok(endpoint.tls_config(tls)?)
}
