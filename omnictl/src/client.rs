//! The gRPC connection: endpoint, API key on every call, and readable errors.

use omni_core::errors::root_cause;
use omni_proto::v1::access_service_client::AccessServiceClient;
use omni_proto::v1::api_key_service_client::ApiKeyServiceClient;
use omni_proto::v1::instance_service_client::InstanceServiceClient;
use omni_proto::v1::message_service_client::MessageServiceClient;
use omni_proto::v1::node_service_client::NodeServiceClient;
use omni_proto::v1::trace_service_client::TraceServiceClient;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

#[derive(Clone)]
pub struct BearerKey(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for BearerKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, BearerKey>;

pub struct Client {
    server: String,
    channel: Channel,
    key: BearerKey,
}

impl Client {
    pub async fn connect(
        server: &str,
        ca_cert: Option<&std::path::Path>,
        api_key: Option<&str>,
    ) -> anyhow::Result<Client> {
        let api_key = api_key
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| anyhow::anyhow!("no API key: set OMNI_API_KEY or pass --api-key"))?;
        let mut header: MetadataValue<_> = format!("Bearer {}", api_key.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("the API key contains characters that cannot be sent"))?;
        header.set_sensitive(true);
        let ca_pem = match ca_cert {
            Some(path) => Some(std::fs::read(path).map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", path.display()))?),
            None => None,
        };
        let channel = omni_proto::client::endpoint(server, ca_pem.as_deref())
            .map_err(|e| anyhow::anyhow!("--server {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the control plane at {server}: {}", root_cause(&e)))?;
        Ok(Client { server: server.to_owned(), channel, key: BearerKey(header) })
    }

    pub fn instances(&self) -> InstanceServiceClient<Authed> {
        InstanceServiceClient::with_interceptor(self.channel.clone(), self.key.clone())
    }

    pub fn access(&self) -> AccessServiceClient<Authed> {
        AccessServiceClient::with_interceptor(self.channel.clone(), self.key.clone())
    }

    pub fn api_keys(&self) -> ApiKeyServiceClient<Authed> {
        ApiKeyServiceClient::with_interceptor(self.channel.clone(), self.key.clone())
    }

    pub fn nodes(&self) -> NodeServiceClient<Authed> {
        NodeServiceClient::with_interceptor(self.channel.clone(), self.key.clone())
    }

    pub fn traces(&self) -> TraceServiceClient<Authed> {
        TraceServiceClient::with_interceptor(self.channel.clone(), self.key.clone())
    }

    pub fn messages(&self) -> MessageServiceClient<Authed> {
        MessageServiceClient::with_interceptor(self.channel.clone(), self.key.clone())
            .max_encoding_message_size(16 * 1024 * 1024)
    }

    /// Turns a failed call into one readable line.
    pub fn error(&self, status: Status) -> anyhow::Error {
        let message = status.message();
        anyhow::anyhow!(match status.code() {
            Code::Unauthenticated => format!("not authenticated: {message} (check OMNI_API_KEY or --api-key)"),
            Code::PermissionDenied => format!("permission denied: {message}"),
            Code::Unavailable => format!("control plane at {} is unavailable: {message}", self.server),
            // With a message the control plane answered, saying what ran out: a send whose
            // outcome is unknown, which must not read as a request that never arrived.
            Code::DeadlineExceeded if message.is_empty() => {
                format!("control plane at {} did not answer in time", self.server)
            }
            _ => message.to_owned(),
        })
    }
}
