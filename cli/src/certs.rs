//! Certificates for local use (`tandem certs`), issued with rcgen: a root (`init`) and SPIFFE
//! SVIDs signed by it (`issue`), as PEM files tandemd reads with `--enable-mtls`. In production
//! the SVIDs come from cert-manager's csi-driver-spiffe, SPIRE or any CA that writes the same
//! files; nothing here runs while the mesh runs, so there is no control plane to lose.
//!
//! An SVID carries its SPIFFE id as its one URI SAN, both the serverAuth and clientAuth key
//! purposes (a sidecar is both ends of mTLS) and an ECDSA P-256 key.
//!
//! `renew` keeps the SVIDs of several apps fresh, one directory per app with the file names
//! cert-manager's csi-driver-spiffe writes (`tls.crt`, `tls.key`, `ca.crt`), so a sidecar's
//! flags are the same in compose and in Kubernetes; with `--every` it is the small CA that
//! compose's `certs` service runs. `check` says whether such directories hold usable SVIDs
//! (that service's health check).

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

/// The files of one app's SVID in its directory, named as csi-driver-spiffe names them.
pub const SVID_CERT: &str = "tls.crt";
pub const SVID_KEY: &str = "tls.key";
pub const SVID_ANCHORS: &str = "ca.crt";

/// Writes `contents` to `path` through a temporary file and a rename, so that a sidecar
/// reloading its files never reads half of one; `owner` (uid, gid) is given the file.
fn replace_file(path: &Path, contents: &str, secret: bool, owner: Option<(u32, u32)>) -> Result<(), CliError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    write(&temporary, contents, secret, true)?;
    let failed = |e: std::io::Error| CliError::failed(format!("cannot write {}: {e}", path.display()));
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&temporary, Some(uid), Some(gid)).map_err(failed)?;
    }
    fs::rename(&temporary, path).map_err(failed)
}

/// The first certificate of a PEM file, parsed.
fn first_certificate(pem: &[u8]) -> Result<x509_parser::pem::Pem, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("holds no PEM certificate: {e}"))?;
    Ok(pem)
}

/// When the certificate in `pem` expires.
fn not_after(pem: &x509_parser::pem::Pem) -> Result<SystemTime, String> {
    let certificate = pem.parse_x509().map_err(|e| format!("holds a certificate that cannot be parsed: {e}"))?;
    let seconds = certificate.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64))
}

/// An SVID directory's files, as the sources a sidecar would load.
fn svid_sources(dir: &Path) -> tandem_transport::tls::TlsSources {
    use tandem_transport::tls::PemSource;
    tandem_transport::tls::TlsSources {
        cert_chain: PemSource::File(dir.join(SVID_CERT)),
        key: PemSource::File(dir.join(SVID_KEY)),
        trust_anchors: PemSource::File(dir.join(SVID_ANCHORS)),
    }
}

/// Loads the SVID in `dir` as a sidecar would (its key matches, it chains to the anchors
/// beside it now, it names `id`, or the id it names when `id` is `None`); its id and expiry.
fn load_svid(dir: &Path, id: Option<&SpiffeId>) -> Result<(SpiffeId, SystemTime), String> {
    let cert = dir.join(SVID_CERT);
    let pem = fs::read(&cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let pem = first_certificate(&pem).map_err(|e| format!("{} {e}", cert.display()))?;
    let named = SpiffeId::from_certificate(&pem.contents).map_err(|e| format!("{}: {e}", cert.display()))?;
    let id = id.cloned().unwrap_or(named);
    tandem_transport::MeshTls::load(svid_sources(dir), id.clone()).map_err(|e| e.to_string())?;
    let expires = not_after(&pem).map_err(|e| format!("{} {e}", cert.display()))?;
    Ok((id, expires))
}

/// What `renew` wants: SVIDs for `ids` under `out` (one directory per app-id), signed by the
/// root in `root_dir` (created when there is none), each valid for `ttl` and issued again
/// once less than half of it is left.
#[derive(Debug, Clone)]
pub struct RenewPlan {
    pub root_dir: PathBuf,
    pub root_ttl: Duration,
    pub out: PathBuf,
    pub ids: Vec<SpiffeId>,
    pub ttl: Duration,
    /// The uid and gid the SVID files are given (a sidecar running as another user than
    /// `renew` must read its key, which only its owner may).
    pub owner: Option<(u32, u32)>,
}

/// What `renew` did for one app.
#[derive(Debug, Clone, PartialEq)]
pub enum Renewal {
    /// Its SVID was usable with more than half its life left.
    Kept { expires: SystemTime },
    /// Issued anew, and why.
    Issued { reason: String, expires: SystemTime },
}

/// The root in `dir`, created when neither of its files exists.
fn root(dir: &Path, ttl: Duration) -> Result<Issued, CliError> {
    let (cert, key) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
    if !cert.exists() && !key.exists() {
        init(dir, "Tandem root", ttl, false)?;
    }
    let read = |path: &Path| {
        fs::read_to_string(path)
            .map_err(|e| CliError::failed(format!("cannot read the root's {}: {e}", path.display())))
    };
    Ok(Issued { cert_pem: read(&cert)?, key_pem: read(&key)? })
}

/// One pass of `tandem certs renew`: what it did for each app, in the order of `plan.ids`.
pub fn renew(plan: &RenewPlan) -> Result<Vec<(SpiffeId, Renewal)>, CliError> {
    let root = root(&plan.root_dir, plan.root_ttl)?;
    let mut done = Vec::new();
    for id in &plan.ids {
        let dir = plan.out.join(&id.app_id);
        create_dir(&dir)?;
        let anchors = fs::read_to_string(dir.join(SVID_ANCHORS)).unwrap_or_default();
        let reason = match load_svid(&dir, Some(id)) {
            _ if anchors != root.cert_pem => "the root is not its trust anchor".to_string(),
            Err(error) => error,
            Ok((_, expires)) => {
                let left = expires.duration_since(SystemTime::now()).unwrap_or_default();
                if left >= plan.ttl / 2 {
                    done.push((id.clone(), Renewal::Kept { expires }));
                    continue;
                }
                format!("{}s of its life left", left.as_secs())
            }
        };
        let validity = Validity::from_now(plan.ttl);
        let svid = issue(&root, id, validity).map_err(CliError::failed)?;
        // The anchors first, the certificate last: a sidecar that reloads in between sees a
        // key that does not match its certificate, refuses the set and keeps the one in use.
        replace_file(&dir.join(SVID_ANCHORS), &root.cert_pem, false, plan.owner)?;
        replace_file(&dir.join(SVID_KEY), &svid.key_pem, true, plan.owner)?;
        replace_file(&dir.join(SVID_CERT), &svid.cert_pem, false, plan.owner)?;
        done.push((id.clone(), Renewal::Issued { reason, expires: validity.not_after }));
    }
    Ok(done)
}

/// `tandem certs check`: every directory under `out` holds a usable SVID (the files
/// `renew` writes); its id and expiry per directory, or what is wrong with each that fails.
pub fn check(out: &Path) -> Result<Vec<(PathBuf, SpiffeId, SystemTime)>, CliError> {
    let entries = fs::read_dir(out).map_err(|e| CliError::failed(format!("cannot read {}: {e}", out.display())))?;
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(CliError::failed(format!("{} holds no SVID directories", out.display())));
    }
    let mut usable = Vec::new();
    let mut problems = Vec::new();
    for dir in dirs {
        match load_svid(&dir, None) {
            Ok((id, expires)) => usable.push((dir, id, expires)),
            Err(error) => problems.push(error),
        }
    }
    if problems.is_empty() { Ok(usable) } else { Err(CliError::failed(problems.join("\n"))) }
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

    fn plan(root: &Path, out: &Path, apps: &[&str], ttl: Duration) -> RenewPlan {
        RenewPlan {
            root_dir: root.to_path_buf(),
            root_ttl: Duration::from_secs(86_400),
            out: out.to_path_buf(),
            ids: apps.iter().map(|app| SpiffeId::new("public", "default", app)).collect(),
            ttl,
            owner: None,
        }
    }

    fn issued(done: &[(SpiffeId, Renewal)]) -> Vec<String> {
        done.iter()
            .filter_map(|(id, renewal)| match renewal {
                Renewal::Issued { reason, .. } => Some(format!("{}: {reason}", id.app_id)),
                Renewal::Kept { .. } => None,
            })
            .collect()
    }

    #[test]
    fn renew_issues_what_is_missing_keeps_what_is_fresh_and_replaces_what_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (root, out) = (dir.path().join("ca"), dir.path().join("svids"));
        let hour = Duration::from_secs(3600);
        let plan = plan(&root, &out, &["serve", "train"], hour);

        // First pass: a root, and an SVID per app that a sidecar would load.
        let first = renew(&plan).unwrap();
        assert_eq!(issued(&first).len(), 2, "{first:?}");
        assert!(root.join(ROOT_KEY).exists() && root.join(ROOT_CERT).exists());
        let checked = check(&out).unwrap();
        let ids: Vec<String> = checked.iter().map(|(_, id, _)| id.to_string()).collect();
        assert_eq!(ids, ["spiffe://public/ns/default/serve", "spiffe://public/ns/default/train"]);
        for (_, _, expires) in &checked {
            let left = expires.duration_since(SystemTime::now()).unwrap();
            assert!(left > hour - Duration::from_secs(120) && left <= hour, "{left:?}");
        }

        // Second pass: nothing to do.
        assert_eq!(issued(&renew(&plan).unwrap()), Vec::<String>::new());

        // Less than half its life left (an hour of a four-hour TTL): issued again.
        let longer = RenewPlan { ttl: 4 * hour, ..plan.clone() };
        let again = issued(&renew(&longer).unwrap());
        assert_eq!(again.len(), 2, "{again:?}");
        assert!(again[0].contains("of its life left"), "{again:?}");

        // A key that is not the certificate's (another app's): issued again, saying why.
        fs::copy(out.join("train").join(SVID_KEY), out.join("serve").join(SVID_KEY)).unwrap();
        assert!(check(&out).unwrap_err().message.contains("does not hold the private key"));
        let again = issued(&renew(&plan).unwrap());
        assert_eq!(again.len(), 1, "{again:?}");
        assert!(again[0].starts_with("serve: ") && again[0].contains("private key"), "{again:?}");

        // A new root (the old one deleted): every SVID is issued under it.
        fs::remove_file(root.join(ROOT_CERT)).unwrap();
        fs::remove_file(root.join(ROOT_KEY)).unwrap();
        let again = issued(&renew(&plan).unwrap());
        assert_eq!(again, ["serve: the root is not its trust anchor", "train: the root is not its trust anchor"]);
        check(&out).unwrap();
    }

    #[test]
    fn renew_refuses_half_a_root_and_check_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (root, out) = (dir.path().join("ca"), dir.path().join("svids"));
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join(ROOT_CERT), "not a root").unwrap();
        // A root certificate without its key is not replaced by a new root.
        let error = renew(&plan(&root, &out, &["serve"], Duration::from_secs(3600))).unwrap_err();
        assert!(error.message.contains("ca.key"), "{error}");
        assert_eq!(fs::read_to_string(root.join(ROOT_CERT)).unwrap(), "not a root");

        assert!(check(&out).is_err(), "no directory at all");
        fs::create_dir_all(out.join("serve")).unwrap();
        let error = check(&out).unwrap_err();
        assert!(error.message.contains("serve/tls.crt"), "{error}");
    }
}
