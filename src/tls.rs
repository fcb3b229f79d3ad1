//! TLS with rustls and the `ring` provider (it builds with a C compiler
//! alone; aws-lc needs cmake on some machines): the ingest listener's server
//! configuration, reloaded when its files change, and the client
//! configuration of each replica.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::watch::Reloading;

/// What can go wrong building a TLS configuration. None is recoverable
/// without fixing the files; at startup the relay refuses to start, on a
/// reload it keeps the previous configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file cannot be opened or is not PEM.
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    /// A certificate file holds no `CERTIFICATE` block.
    #[error("{path}: no PEM certificate in the file")]
    NoCertificate { path: PathBuf },
    /// A key file holds no private key block.
    #[error("{path}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file")]
    NoKey { path: PathBuf },
    /// rustls refuses the material (key does not match the certificate, a
    /// CA certificate does not parse, ...).
    #[error("{what}: {message}")]
    Rustls { what: String, message: String },
}

impl TlsError {
    /// A stable label for metrics and tests.
    pub fn as_error_code(&self) -> &'static str {
        match self {
            TlsError::Pem { .. } => "pem",
            TlsError::NoCertificate { .. } => "no_certificate",
            TlsError::NoKey { .. } => "no_key",
            TlsError::Rustls { .. } => "rustls",
        }
    }
}

fn rustls_error(what: impl Into<String>, e: impl std::fmt::Display) -> TlsError {
    TlsError::Rustls {
        what: what.into(),
        message: e.to_string(),
    }
}

/// The crypto provider used everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes `ring` the process-wide default provider. reqwest (built without a
/// provider of its own) panics when it builds a TLS client with no default
/// installed; every client walrelay builds passes its own configuration, so
/// this only guards other users of reqwest in the process.
pub fn install_default_provider() {
    // An error means a provider is installed already: fine either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads every certificate of a PEM file.
///
/// # Errors
/// The file cannot be read, is not PEM, or holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
///
/// # Errors
/// The file cannot be read, is not PEM, or holds no private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        // The error names the PEM problem, never the key's bytes.
        other => TlsError::Pem {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| rustls_error(format!("CA file {}", path.display()), e))?;
    }
    Ok(roots)
}

/// Files of the ingest listener's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca_file: Option<PathBuf>,
}

/// Builds the listener's configuration from its files.
///
/// # Errors
/// A file is missing or bad, or the key does not match the certificate.
pub fn server_config(files: &ServerTlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let certs = load_certs(&files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_error("TLS versions", e))?;
    let builder = match &files.client_ca_file {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(root_store(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| rustls_error(format!("client CA file {}", ca.display()), e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        rustls_error(
            format!(
                "certificate {} with key {}",
                files.cert_file.display(),
                files.key_file.display()
            ),
            e,
        )
    })?;
    // Both protocols hyper serves; the server picks the connection's
    // protocol from ALPN instead of sniffing the first bytes.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// How often the listener's files are checked for a change (at a new
/// connection, never more often than this).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The listener's configuration, rebuilt when a file changes.
pub struct ServerTls {
    config: Reloading<rustls::ServerConfig>,
}

impl ServerTls {
    /// # Errors
    /// The files do not make a configuration.
    pub fn new(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let mut paths = vec![files.cert_file.clone(), files.key_file.clone()];
        paths.extend(files.client_ca_file.clone());
        let config = Reloading::new("TLS certificate", paths, RELOAD_INTERVAL, move |_| {
            server_config(&files)
        })?;
        Ok(Self { config })
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.get())
    }
}

/// TLS settings of one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientTlsOptions {
    /// CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key presented to the replica.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name the replica's certificate must carry, when it differs from the
    /// URL's host (e.g. the URL holds an IP address).
    pub server_name: Option<String>,
    /// Accept any certificate. For tests only; logged as a warning.
    pub insecure_skip_verify: bool,
}

/// Builds a replica's client configuration.
///
/// # Errors
/// A file is missing or bad, the server name is not a DNS name or an IP
/// address, or the system's roots cannot be loaded.
pub fn client_config(o: &ClientTlsOptions) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_error("TLS versions", e))?;
    let mut verifier: Arc<dyn ServerCertVerifier> = if o.insecure_skip_verify {
        Arc::new(AcceptAnyCertificate(Arc::clone(&provider)))
    } else if let Some(ca) = &o.ca_file {
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(root_store(ca)?),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| rustls_error(format!("CA file {}", ca.display()), e))?
    } else {
        Arc::new(
            rustls_platform_verifier::Verifier::new(Arc::clone(&provider))
                .map_err(|e| rustls_error("system CA certificates", e))?,
        )
    };
    if let (Some(name), false) = (&o.server_name, o.insecure_skip_verify) {
        let name = ServerName::try_from(name.clone())
            .map_err(|e| rustls_error(format!("tls_server_name {name:?}"), e))?;
        verifier = Arc::new(FixedServerName {
            inner: verifier,
            name,
        });
    }
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&o.cert_file, &o.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| {
                rustls_error(
                    format!(
                        "client certificate {} with key {}",
                        cert.display(),
                        key.display()
                    ),
                    e,
                )
            }),
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(rustls_error(
            "client certificate",
            "tls_cert_file and tls_key_file go together",
        )),
    }
}

/// Checks the replica's certificate against a configured name instead of the
/// URL's host (the name still sent as SNI is the URL's host).
#[derive(Debug)]
struct FixedServerName {
    inner: Arc<dyn ServerCertVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedServerName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `tls_insecure_skip_verify`: any certificate is accepted, but the
/// handshake signatures are still checked (so the peer holds the key of the
/// certificate it shows, whatever that certificate is).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = load_certs(&empty).unwrap_err();
        assert_eq!(e.as_error_code(), "no_certificate");
        assert!(e.to_string().contains("empty.pem"), "{e}");
        let e = load_key(&empty).unwrap_err();
        assert_eq!(e.as_error_code(), "no_key");
        let e = load_certs(&dir.path().join("missing.pem")).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }

    #[test]
    fn a_client_certificate_without_its_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let o = ClientTlsOptions {
            cert_file: Some(dir.path().join("c.pem")),
            insecure_skip_verify: true,
            ..Default::default()
        };
        let e = client_config(&o).unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
    }
}
