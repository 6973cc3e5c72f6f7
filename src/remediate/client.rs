//! One HTTP/1.1 request over one fresh connection: the Docker Engine's unix socket or the
//! Kubernetes API server (TLS with the service-account CA, or plain HTTP for tests).
//!
//! Restarts are rare, so a connection pool would only add state; each call connects, sends,
//! reads a bounded body and drops the connection.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// Responses we read are small JSON documents; a bigger one is a misbehaving peer.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("reading response body: {0}")]
    Body(String),
}

pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    /// A short, printable excerpt of the body for error messages.
    pub fn excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        match text.char_indices().nth(300) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text.to_owned(),
        }
    }
}

pub async fn send_unix(
    socket: &Path,
    request: Request<Full<Bytes>>,
) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            target: socket.display().to_string(),
            source,
        })?;
    send(stream, request).await
}

/// Sends `request` (whose URI is a path) to `base`, verifying TLS against the PEM file `ca_file`.
pub async fn send_to(
    base: &Uri,
    ca_file: &Path,
    request: Request<Full<Bytes>>,
) -> Result<Response, ClientError> {
    let host = base.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tls = base.scheme_str() == Some("https");
    let port = base.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|source| ClientError::Connect {
            target: format!("{host}:{port}"),
            source,
        })?;
    if !tls {
        return send(stream, request).await;
    }
    let connector = tls_connector(ca_file)?;
    let name =
        ServerName::try_from(host.to_owned()).map_err(|e| ClientError::Tls(e.to_string()))?;
    let stream = connector
        .connect(name, stream)
        .await
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    send(stream, request).await
}

fn tls_connector(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, ClientError> {
    let tls_err =
        |e: &dyn std::fmt::Display| ClientError::Tls(format!("{}: {e}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| tls_err(&e))? {
        roots
            .add(cert.map_err(|e| tls_err(&e))?)
            .map_err(|e| tls_err(&e))?;
    }
    if roots.is_empty() {
        return Err(tls_err(&"no certificate in file"));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn send<S>(stream: S, request: Request<Full<Bytes>>) -> Result<Response, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task ends by itself once `sender` is dropped or the peer closes.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "remediation client connection ended with an error");
        }
    });
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| ClientError::Body(e.to_string()))?
        .to_bytes();
    Ok(Response { status, body })
}
