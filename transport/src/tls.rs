//! Mutual TLS between sidecars, with SPIFFE identities: every connection is TLS 1.3 (rustls,
//! ring), both sides present an X.509 SVID whose URI SAN is
//! `spiffe://TRUST_DOMAIN/ns/NAMESPACE/APP_ID`, and both verify the other's chain against the
//! trust anchors, which may hold several roots at once (an old and a new one while a root is
//! rotated).
//!
//! - The dialling side checks that the peer is the app it meant to reach ([`PeerVerifier`]),
//!   so a connection to an address that now belongs to another app, or to an impostor, fails
//!   in the handshake.
//! - The serving side takes the caller's identity from its verified certificate
//!   ([`MeshTls::accept`]); [`crate::serve_grpc_tls`] puts it into every request's extensions
//!   as a [`PeerIdentity`], where nothing the caller sends can change it.
//! - The material is read from files (or from Dapr's environment variables, which hold the PEM
//!   itself) and read again by [`MeshTls::watch`]: when the files change and the new set is
//!   usable, new connections use it; a half-written rotation (a new certificate, the old key)
//!   is refused and the previous material stays in use until the set is whole again.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/APP_ID`, the form of Dapr's identities, or
/// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/APP_ID`, the form Kubernetes' issuers give a pod
/// (cert-manager's csi-driver-spiffe, SPIRE's default template, Istio): its service account,
/// which names the app when each app runs under a service account of its app-id (the prod
/// overlay does). Both forms name the same app: ids compare by trust domain, namespace and
/// app-id, and keep their form only to be shown as they were written.
#[derive(Debug, Clone)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub app_id: String,
    pub path: IdPath,
}

/// How a SPIFFE id's path names the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdPath {
    /// `/ns/NAMESPACE/APP_ID` (Dapr).
    #[default]
    AppId,
    /// `/ns/NAMESPACE/sa/APP_ID` (a Kubernetes service account named after the app-id).
    ServiceAccount,
}

impl PartialEq for SpiffeId {
    fn eq(&self, other: &SpiffeId) -> bool {
        self.trust_domain == other.trust_domain && self.namespace == other.namespace && self.app_id == other.app_id
    }
}

impl Eq for SpiffeId {}

impl std::hash::Hash for SpiffeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.trust_domain, &self.namespace, &self.app_id).hash(state);
    }
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, app_id: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            app_id: app_id.into(),
            path: IdPath::AppId,
        }
    }

    pub fn parse(uri: &str) -> Result<SpiffeId, String> {
        let invalid = || {
            format!(
                "'{uri}' is not a SPIFFE id of the form spiffe://TRUST_DOMAIN/ns/NAMESPACE/APP_ID (or .../ns/NAMESPACE/sa/APP_ID)"
            )
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(invalid)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (trust_domain, namespace, app_id, path) = match parts[..] {
            [trust_domain, "ns", namespace, app_id] => (trust_domain, namespace, app_id, IdPath::AppId),
            [trust_domain, "ns", namespace, "sa", account] => {
                (trust_domain, namespace, account, IdPath::ServiceAccount)
            }
            _ => return Err(invalid()),
        };
        if [trust_domain, namespace, app_id].iter().any(|part| part.is_empty()) {
            return Err(invalid());
        }
        Ok(SpiffeId { path, ..SpiffeId::new(trust_domain, namespace, app_id) })
    }

    /// The SPIFFE id of a certificate (DER): its one `spiffe://` URI SAN, as the X509-SVID
    /// specification requires.
    pub fn from_certificate(der: &[u8]) -> Result<SpiffeId, String> {
        let (_, certificate) =
            x509_parser::parse_x509_certificate(der).map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|e| format!("the certificate's subject alternative names cannot be parsed: {e}"))?;
        let uris: Vec<&str> = names
            .iter()
            .flat_map(|extension| extension.value.general_names.iter())
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            })
            .collect();
        match uris[..] {
            [uri] => SpiffeId::parse(uri),
            [] => Err("the certificate has no SPIFFE id (a URI SAN spiffe://TRUST_DOMAIN/ns/NAMESPACE/APP_ID)".into()),
            _ => {
                Err(format!("the certificate has {} SPIFFE ids where an SVID has one: {}", uris.len(), uris.join(", ")))
            }
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let account = match self.path {
            IdPath::AppId => "",
            IdPath::ServiceAccount => "sa/",
        };
        write!(f, "spiffe://{}/ns/{}/{account}{}", self.trust_domain, self.namespace, self.app_id)
    }
}

/// The verified identity of the sidecar at the other end of a connection, in the extensions of
/// every request served on it.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Arc<SpiffeId>);

/// Where one PEM input comes from.
#[derive(Debug, Clone)]
pub enum PemSource {
    /// A file, read again when it may have changed.
    File(PathBuf),
    /// An environment variable that holds the PEM itself (Dapr's `DAPR_CERT_CHAIN` and the like).
    Env { name: String, pem: String },
}

impl PemSource {
    fn read(&self) -> Result<Vec<u8>, TlsError> {
        match self {
            PemSource::File(path) => std::fs::read(path).map_err(|e| self.error(format!("cannot be read: {e}"))),
            PemSource::Env { pem, .. } => Ok(pem.as_bytes().to_vec()),
        }
    }

    fn error(&self, reason: impl Into<String>) -> TlsError {
        TlsError { source: self.to_string(), reason: reason.into() }
    }
}

impl fmt::Display for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PemSource::File(path) => write!(f, "{}", path.display()),
            PemSource::Env { name, .. } => write!(f, "${name}"),
        }
    }
}

/// The three inputs of a sidecar's TLS identity.
#[derive(Debug, Clone)]
pub struct TlsSources {
    /// The SVID, then any intermediates.
    pub cert_chain: PemSource,
    /// The SVID's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PemSource,
    /// Every root accepted for peers (and for this sidecar's own SVID).
    pub trust_anchors: PemSource,
}

/// Unusable TLS material: names the file (or variable) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub source: String,
    pub reason: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.reason)
    }
}

impl std::error::Error for TlsError {}

/// One usable set of material, and the bytes it was read from (to notice a change).
struct Loaded {
    inputs: [Vec<u8>; 3],
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    server: Arc<ServerConfig>,
}

/// A sidecar's mTLS identity and trust anchors, reloaded when their files change.
pub struct MeshTls {
    sources: TlsSources,
    own_id: SpiffeId,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
    /// Counts the material sets taken into use, so that connections made with an older one
    /// can be replaced ([`MeshTls::generation`]).
    generation: AtomicU64,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls").field("own_id", &self.own_id).field("sources", &self.sources).finish()
    }
}

/// How long a TLS handshake may take, on either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl MeshTls {
    /// Reads and checks the material: the certificate must be an SVID for `own_id`, match
    /// the key, and be valid now under the trust anchors.
    pub fn load(sources: TlsSources, own_id: SpiffeId) -> Result<Arc<MeshTls>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inputs = read_inputs(&sources)?;
        let loaded = build(&sources, &own_id, &provider, inputs)?;
        Ok(Arc::new(MeshTls {
            sources,
            own_id,
            provider,
            current: RwLock::new(Arc::new(loaded)),
            generation: AtomicU64::new(0),
        }))
    }

    pub fn own_id(&self) -> &SpiffeId {
        &self.own_id
    }

    fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the sources again: `Ok(true)` when they changed and the new material is in use,
    /// `Ok(false)` when nothing changed, an error when they changed into something unusable
    /// (the material in use stays).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let inputs = read_inputs(&self.sources)?;
        if inputs == self.current().inputs {
            return Ok(false);
        }
        let loaded = build(&self.sources, &self.own_id, &self.provider, inputs)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(true)
    }

    /// Which material set is in use; changes when a reload takes a new one. A client makes
    /// its next call on a new connection once this moved (calls in flight finish on the old
    /// one), so a rotated certificate or a root taken out of the anchors is not relied on for
    /// longer than a connection's life.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reloads every `every` until the process ends; logs each change, and each distinct
    /// reason a changed set is not used yet.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut last_error: Option<TlsError> = None;
        loop {
            tokio::time::sleep(every).await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(identity = %self.own_id, "new TLS certificates read; new connections use them");
                    last_error = None;
                }
                Ok(false) => last_error = None,
                Err(error) => {
                    if last_error.as_ref() != Some(&error) {
                        tracing::warn!(%error, "the TLS files changed but cannot be used (yet); keeping the certificates in use");
                    }
                    last_error = Some(error);
                }
            }
        }
    }

    /// TLS over `stream` to the sidecar at `host`, which must prove to be `peer`.
    pub async fn connect<S>(
        &self,
        stream: S,
        host: &str,
        peer: &SpiffeId,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let loaded = self.current();
        let verifier =
            PeerVerifier { roots: loaded.roots.clone(), expected: peer.clone(), provider: self.provider.clone() };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(loaded.certified.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("'{host}' is not a host name: {e}")))?;
        let handshake = TlsConnector::from(Arc::new(config)).connect(name, stream);
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("the TLS handshake with {peer} timed out")))?
    }

    /// Accepts TLS on `stream` from a sidecar with a valid SVID of this trust domain; returns
    /// the stream and the caller's identity.
    pub async fn accept<S>(&self, stream: S) -> io::Result<(tokio_rustls::server::TlsStream<S>, SpiffeId)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.current().server.clone());
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake timed out"))??;
        let refused = |reason: String| io::Error::new(io::ErrorKind::PermissionDenied, reason);
        let certificate = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or_else(|| refused("the caller presented no certificate".into()))?;
        let peer = SpiffeId::from_certificate(certificate).map_err(|e| refused(format!("the caller's {e}")))?;
        if peer.trust_domain != self.own_id.trust_domain {
            return Err(refused(format!(
                "the caller is {peer}, outside this sidecar's trust domain '{}'",
                self.own_id.trust_domain
            )));
        }
        Ok((stream, peer))
    }
}

fn read_inputs(sources: &TlsSources) -> Result<[Vec<u8>; 3], TlsError> {
    Ok([sources.cert_chain.read()?, sources.key.read()?, sources.trust_anchors.read()?])
}

fn certificates(source: &PemSource, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| source.error(format!("is not valid PEM: {e}")))?;
    if certificates.is_empty() {
        return Err(source.error("holds no certificate (a PEM CERTIFICATE block)"));
    }
    Ok(certificates)
}

/// Checks one set of inputs and builds what connections need from it.
fn build(
    sources: &TlsSources,
    own_id: &SpiffeId,
    provider: &Arc<CryptoProvider>,
    inputs: [Vec<u8>; 3],
) -> Result<Loaded, TlsError> {
    let [chain_pem, key_pem, anchors_pem] = &inputs;
    let chain = certificates(&sources.cert_chain, chain_pem)?;
    let anchors = certificates(&sources.trust_anchors, anchors_pem)?;
    let mut roots = RootCertStore::empty();
    for anchor in anchors {
        roots.add(anchor).map_err(|e| sources.trust_anchors.error(format!("holds an unusable root: {e}")))?;
    }
    let roots = Arc::new(roots);

    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| sources.key.error(format!("holds no usable private key: {e}")))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| sources.key.error(format!("holds a key of a kind this sidecar cannot use: {e}")))?;
    let certified = CertifiedKey::new(chain.clone(), signing_key);
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) = certified.keys_match() {
        return Err(sources
            .key
            .error(format!("does not hold the private key of the certificate in {}", sources.cert_chain)));
    }

    let found = SpiffeId::from_certificate(&chain[0]).map_err(|e| sources.cert_chain.error(e))?;
    if found != *own_id {
        return Err(sources.cert_chain.error(format!("is the SVID of {found}, but this sidecar is {own_id}")));
    }
    let parsed = ParsedCertificate::try_from(&chain[0])
        .map_err(|e| sources.cert_chain.error(format!("cannot be parsed: {e}")))?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &chain[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| {
        sources.cert_chain.error(format!("is not valid under the trust anchors in {}: {e}", sources.trust_anchors))
    })?;

    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| sources.trust_anchors.error(format!("cannot verify clients: {e}")))?;
    let certified = Arc::new(certified);
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| sources.cert_chain.error(e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified.clone())));
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { inputs, certified, roots, server: Arc::new(server) })
}

/// Verifies the serving sidecar's chain against the trust anchors and its SPIFFE id against
/// the one the caller meant to reach (no DNS names: SVIDs identify apps, not hosts).
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let found =
            SpiffeId::from_certificate(end_entity).map_err(|e| rustls::Error::General(format!("the peer's {e}")))?;
        if found != self.expected {
            return Err(rustls::Error::General(format!(
                "the peer is {found}, not {}, the app this connection is for",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_and_print_in_daprs_and_kubernetes_forms() {
        let id = SpiffeId::parse("spiffe://public/ns/default/train").unwrap();
        assert_eq!(id, SpiffeId::new("public", "default", "train"));
        assert_eq!(id.to_string(), "spiffe://public/ns/default/train");
        // A service account named after the app-id is that app, shown as it was written.
        let account = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/serve").unwrap();
        assert_eq!(account, SpiffeId::new("cluster.local", "prod", "serve"));
        assert_eq!(account.path, IdPath::ServiceAccount);
        assert_eq!(account.to_string(), "spiffe://cluster.local/ns/prod/sa/serve");
        assert_ne!(account, SpiffeId::new("cluster.local", "default", "serve"), "another namespace");
        assert_ne!(account, SpiffeId::new("cluster.local", "prod", "sa"), "'sa' is not the app");
        for bad in [
            "spiffe://public/ns/default/sa/",
            "spiffe://public/ns/default/sa/serve/extra",
            "spiffe://public/ns/default/xa/serve",
            "https://public/ns/default/train",
            "spiffe://public/default/train",
            "spiffe://public/ns/default/train/extra",
            "spiffe:///ns/default/train",
            "spiffe://public/ns//train",
        ] {
            let error = SpiffeId::parse(bad).unwrap_err();
            assert!(error.contains(bad), "{error}");
        }
    }
}
