//! Certificates for local use (`tandem certs`), issued with rcgen: a root (`init`) and SPIFFE
//! SVIDs signed by it (`issue`), as PEM files tandemd reads with `--enable-mtls`. In production
//! the SVIDs come from cert-manager's csi-driver-spiffe, SPIRE or any CA that writes the same
//! files; nothing here runs while the mesh runs, so there is no control plane to lose.
//!
//! An SVID carries its SPIFFE id as its one URI SAN, both the serverAuth and clientAuth key
//! purposes (a sidecar is both ends of mTLS) and an ECDSA P-256 key.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use tandem_transport::SpiffeId;

use crate::CliError;

/// The root's files in `tandem certs`' directory.
pub const ROOT_CERT: &str = "ca.crt";
pub const ROOT_KEY: &str = "ca.key";

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a minute ago (clocks differ a little between machines) for `ttl`.
    pub fn from_now(ttl: Duration) -> Validity {
        let now = SystemTime::now();
        Validity { not_before: now - Duration::from_secs(60), not_after: now + ttl }
    }
}

fn failed(what: &str) -> impl Fn(rcgen::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A new self-signed root that can sign SVIDs.
pub fn new_root(name: &str, validity: Validity) -> Result<Issued, String> {
    let key = KeyPair::generate().map_err(failed("generating the root's key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    let cert = params.self_signed(&key).map_err(failed("signing the root"))?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// An SVID for `id`, signed by `root`.
pub fn issue(root: &Issued, id: &SpiffeId, validity: Validity) -> Result<Issued, String> {
    let root_key = KeyPair::from_pem(&root.key_pem).map_err(failed("the root's key"))?;
    let issuer = Issuer::from_ca_cert_pem(&root.cert_pem, root_key).map_err(failed("the root's certificate"))?;
    let key = KeyPair::generate().map_err(failed("generating the SVID's key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, id.app_id.as_str());
    let uri = Ia5String::try_from(id.to_string()).map_err(|e| format!("'{id}' cannot be a URI SAN: {e}"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    let cert = params.signed_by(&key, &issuer).map_err(failed("signing the SVID"))?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Writes `contents` to `path`, readable by its owner only when `secret`; refuses to replace
/// a file unless `force`.
fn write(path: &Path, contents: &str, secret: bool, force: bool) -> Result<(), CliError> {
    if path.exists() && !force {
        return Err(CliError::usage(format!("{} exists; pass --force to replace it", path.display())));
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(path).and_then(|mut file| file.write_all(contents.as_bytes()));
    written.map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))
}

fn create_dir(dir: &Path) -> Result<(), CliError> {
    fs::create_dir_all(dir).map_err(|e| CliError::failed(format!("cannot create {}: {e}", dir.display())))
}

/// `tandem certs init`: a root in `dir`; returns the paths written.
pub fn init(dir: &Path, name: &str, ttl: Duration, force: bool) -> Result<Vec<PathBuf>, CliError> {
    create_dir(dir)?;
    let root = new_root(name, Validity::from_now(ttl)).map_err(CliError::failed)?;
    let (cert, key) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
    // The key first: a root certificate without its key is no use, the reverse can be redone.
    write(&key, &root.key_pem, true, force)?;
    write(&cert, &root.cert_pem, false, force)?;
    Ok(vec![cert, key])
}

/// `tandem certs issue`: an SVID for `id` from the root in `dir`, written to `out` as
/// `APP_ID.crt` and `APP_ID.key`; returns the paths written.
pub fn issue_files(dir: &Path, id: &SpiffeId, ttl: Duration, out: &Path) -> Result<Vec<PathBuf>, CliError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(|e| {
            CliError::usage(format!(
                "cannot read {}: {e} (run `tandem certs init --dir {}` first)",
                path.display(),
                dir.display()
            ))
        })
    };
    let root = Issued { cert_pem: read(ROOT_CERT)?, key_pem: read(ROOT_KEY)? };
    let svid = issue(&root, id, Validity::from_now(ttl)).map_err(CliError::usage)?;
    create_dir(out)?;
    let (cert, key) = (out.join(format!("{}.crt", id.app_id)), out.join(format!("{}.key", id.app_id)));
    write(&key, &svid.key_pem, true, true)?;
    write(&cert, &svid.cert_pem, false, true)?;
    Ok(vec![cert, key])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_svid_names_its_spiffe_id_and_chains_to_the_root() {
        let root = new_root("test root", Validity::from_now(Duration::from_secs(3600))).unwrap();
        let id = SpiffeId::new("public", "default", "train");
        let svid = issue(&root, &id, Validity::from_now(Duration::from_secs(600))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            fs::write(&path, pem).unwrap();
            tandem_transport::tls::PemSource::File(path)
        };
        let sources = tandem_transport::tls::TlsSources {
            cert_chain: path("train.crt", &svid.cert_pem),
            key: path("train.key", &svid.key_pem),
            trust_anchors: path("ca.crt", &root.cert_pem),
        };
        // Loading checks the SPIFFE id, the key and the chain.
        tandem_transport::MeshTls::load(sources.clone(), id).unwrap();
        let error = tandem_transport::MeshTls::load(sources, SpiffeId::new("public", "default", "serve")).unwrap_err();
        assert!(error.to_string().contains("train.crt"), "{error}");
        assert!(error.to_string().contains("spiffe://public/ns/default/train"), "{error}");
    }
}
