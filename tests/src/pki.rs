//! Certificates for tests of mutual TLS: roots and SVIDs issued as `tandem certs` issues them,
//! written to files that tandemd reads (and reads again when they change).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_cli::certs::{self, Issued, Validity};
use tandem_transport::tls::{PemSource, TlsSources};
use tandem_transport::{MeshTls, SpiffeId};
use tempfile::TempDir;

use crate::Sidecar;

/// The trust domain and namespace of the tests' sidecars (tandemd's defaults).
pub const TRUST_DOMAIN: &str = "public";
pub const NAMESPACE: &str = "default";

/// The SPIFFE id of `app_id` in the tests' trust domain and namespace.
pub fn spiffe_id(app_id: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, NAMESPACE, app_id)
}

/// A root that signs SVIDs.
pub struct Root {
    pub issued: Issued,
}

impl Root {
    pub fn new(name: &str) -> Root {
        Root { issued: certs::new_root(name, Validity::from_now(Duration::from_secs(24 * 3600))).expect("a root") }
    }

    pub fn pem(&self) -> &str {
        &self.issued.cert_pem
    }

    /// An SVID for `app_id`, valid an hour.
    pub fn svid(&self, app_id: &str) -> Issued {
        self.svid_valid(app_id, Validity::from_now(Duration::from_secs(3600)))
    }

    pub fn svid_valid(&self, app_id: &str, validity: Validity) -> Issued {
        certs::issue(&self.issued, &spiffe_id(app_id), validity).expect("an SVID")
    }

    /// An SVID naming `id` as it is written (e.g. Kubernetes' `.../ns/NS/sa/ACCOUNT`), valid an hour.
    pub fn svid_for(&self, id: &str) -> Issued {
        let id = SpiffeId::parse(id).expect("a SPIFFE id");
        certs::issue(&self.issued, &id, Validity::from_now(Duration::from_secs(3600))).expect("an SVID")
    }
}

/// One sidecar's TLS files: its SVID, its key and its trust anchors.
pub struct TlsFiles {
    _dir: TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub anchors: PathBuf,
}

impl TlsFiles {
    /// `svid` and the roots of `anchors`, written to a fresh directory.
    pub fn new(svid: &Issued, anchors: &[&Root]) -> TlsFiles {
        let dir = tempfile::Builder::new().prefix("tandem-tls-").tempdir().expect("temp dir");
        let files = TlsFiles {
            cert: dir.path().join("svid.crt"),
            key: dir.path().join("svid.key"),
            anchors: dir.path().join("anchors.pem"),
            _dir: dir,
        };
        files.write_svid(svid);
        files.write_anchors(anchors);
        files
    }

    /// Replaces the SVID in place, the certificate first and then the key, as a simple
    /// rotation job would: for a moment the files do not match.
    pub fn write_svid(&self, svid: &Issued) {
        write(&self.cert, &svid.cert_pem);
        write(&self.key, &svid.key_pem);
    }

    pub fn write_anchors(&self, anchors: &[&Root]) {
        write(&self.anchors, &anchors.iter().map(|root| root.pem()).collect::<String>());
    }

    /// tandemd's flags for mutual TLS with these files.
    pub fn flags(&self) -> Vec<String> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        vec![
            "--enable-mtls".into(),
            "--cert-file".into(),
            path(&self.cert),
            "--key-file".into(),
            path(&self.key),
            "--trust-anchors-file".into(),
            path(&self.anchors),
        ]
    }

    /// `sidecar` with mutual TLS on these files.
    pub fn apply(&self, sidecar: Sidecar) -> Sidecar {
        self.flags().into_iter().fold(sidecar, Sidecar::arg)
    }

    /// This material as a client's (or server's) TLS, for `app_id`, as tandemd loads it.
    pub fn load(&self, app_id: &str) -> Arc<MeshTls> {
        let sources = TlsSources {
            cert_chain: PemSource::File(self.cert.clone()),
            key: PemSource::File(self.key.clone()),
            trust_anchors: PemSource::File(self.anchors.clone()),
        };
        MeshTls::load(sources, spiffe_id(app_id)).expect("usable TLS material")
    }
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A CA, a server certificate for etcd on 127.0.0.1 and a client certificate, written to `dir`.
pub fn etcd_tls_files(dir: &Path) -> crate::etcd::EtcdTlsFiles {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    let root = Root::new("etcd test CA");
    let issue = |name: &str, server: bool| {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        if server {
            params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        let purpose = if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth };
        params.extended_key_usages = vec![purpose];
        let issuer_key = KeyPair::from_pem(&root.issued.key_pem).expect("the CA's key");
        let issuer = Issuer::from_ca_cert_pem(root.pem(), issuer_key).expect("the CA");
        let cert = params.signed_by(&key, &issuer).expect("a certificate");
        (cert.pem(), key.serialize_pem())
    };
    let files = crate::etcd::EtcdTlsFiles {
        ca: dir.join("etcd-ca.crt"),
        server_cert: dir.join("etcd-server.crt"),
        server_key: dir.join("etcd-server.key"),
        client_cert: dir.join("etcd-client.crt"),
        client_key: dir.join("etcd-client.key"),
    };
    write(&files.ca, root.pem());
    let (cert, key) = issue("etcd", true);
    write(&files.server_cert, &cert);
    write(&files.server_key, &key);
    let (cert, key) = issue("tandem-test-client", false);
    write(&files.client_cert, &cert);
    write(&files.client_key, &key);
    files
}
