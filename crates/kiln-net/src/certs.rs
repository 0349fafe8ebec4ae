//! Making and loading Kiln's certificates.
//!
//! Layout of a certificate directory (default `certs/`):
//!
//! ```text
//! certs/ca/ca.pem, key.pem          the certificate authority (keep key.pem secret)
//! certs/dispatcher/ca.pem, cert.pem, key.pem
//! certs/NAME/ca.pem, cert.pem, key.pem   one bundle per runner, observer, admin
//! ```
//!
//! A bundle is all a remote machine needs. The peer's role is the subject's
//! organizational unit (`runner`, `observer`, `admin`, `dispatcher`) and its
//! name the common name; extended key usage keeps client certificates from
//! serving as the dispatcher's and the other way round.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kiln_proto::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::validity::{OutOfDate, Whose, Window};

/// The organizational unit that marks the dispatcher's certificate.
const DISPATCHER_UNIT: &str = "dispatcher";

/// How long a new dispatcher or client certificate is valid unless told otherwise.
pub const DEFAULT_VALID_DAYS: u32 = 825;

/// How long a new CA is valid.
const CA_VALID_DAYS: u32 = 3650;

/// When a new certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// The first moment it is valid.
    pub not_before: SystemTime,
    /// The last moment it is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago (slack for clocks that disagree a little) until
    /// `days` days from now.
    pub fn days(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

impl Default for Validity {
    fn default() -> Self {
        Validity::days(DEFAULT_VALID_DAYS)
    }
}

/// Why certificates could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{action} {path}")]
    Io {
        /// What was being done, e.g. "read".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path} does not hold a PEM {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// rcgen could not make or sign a certificate.
    #[error("generate {what}")]
    Generate {
        /// What was being made.
        what: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// The certificate authority exists already.
    #[error("a certificate authority exists already in {0}; remove it to start over")]
    CaExists(PathBuf),
    /// A bundle exists already.
    #[error("a certificate bundle exists already in {0}; remove it to issue a new one")]
    BundleExists(PathBuf),
    /// The name is not usable as a peer name.
    #[error("`{0}` is not a usable name: use 1-64 letters, digits, `.`, `_` or `-`, not `ca` or `dispatcher`")]
    BadName(String),
    /// A subject alternative name is neither an IP address nor a DNS name.
    #[error("`{0}` is not a valid host name or IP address")]
    BadSan(String),
    /// The certificate's subject does not say what Kiln needs.
    #[error("the certificate in {path} is not a Kiln certificate")]
    NotKiln {
        /// The file.
        path: PathBuf,
        /// What is missing.
        #[source]
        source: SubjectError,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CertError + 'a {
    move |source| CertError::Io { action, path: path.to_owned(), source }
}

/// Who a peer is, as its certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// What the peer may do.
    pub role: Role,
    /// Its name, unique per deployment (e.g. `runner-1`).
    pub name: String,
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// One peer's certificate bundle: the CA to trust, its certificate and key.
pub struct Bundle {
    /// The directory it was loaded from (for messages).
    pub dir: PathBuf,
    /// The Kiln CA certificate: the only trust root.
    pub ca: CertificateDer<'static>,
    /// The peer's certificate.
    pub cert: CertificateDer<'static>,
    /// The peer's private key.
    pub key: PrivateKeyDer<'static>,
    /// The role written in the certificate (`dispatcher` or a client role).
    pub unit: String,
    /// The name written in the certificate.
    pub name: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Bundle").field("dir", &self.dir).field("unit", &self.unit).field("name", &self.name).finish()
    }
}

impl Bundle {
    /// Loads `dir/ca.pem`, `dir/cert.pem` and `dir/key.pem`.
    pub fn load(dir: &Path) -> Result<Bundle, CertError> {
        let ca = read_cert(&dir.join("ca.pem"))?;
        let cert_path = dir.join("cert.pem");
        let cert = read_cert(&cert_path)?;
        let key_path = dir.join("key.pem");
        let key_pem = fs::read(&key_path).map_err(io_err("read", &key_path))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| CertError::Pem { path: key_path.clone(), what: "private key" })?;
        let (unit, name) = subject_of(&cert).map_err(|source| CertError::NotKiln { path: cert_path, source })?;
        Ok(Bundle { dir: dir.to_owned(), ca, cert, key, unit, name })
    }

    /// The client identity this bundle carries, if it is a client bundle.
    pub fn identity(&self) -> Option<PeerIdentity> {
        Some(PeerIdentity { role: self.unit.parse().ok()?, name: self.name.clone() })
    }

    /// Whether this is the dispatcher's bundle.
    pub fn is_dispatcher(&self) -> bool {
        self.unit == DISPATCHER_UNIT
    }

    /// Checks that the certificate and the CA are within their validity
    /// windows at `now` (UNIX seconds); the error names the file, the window
    /// and the clock. (webpki never checks a trust root's dates, so an
    /// expired CA would otherwise go unnoticed until its certificates fail.)
    pub fn check_dates(&self, now: i64) -> Result<(), OutOfDate> {
        let cert_path = self.dir.join("cert.pem");
        let whose = if self.is_dispatcher() {
            Whose::DispatcherFile { path: cert_path }
        } else {
            Whose::Own { role: self.unit.clone(), name: self.name.clone(), path: cert_path }
        };
        if let Some(window) = Window::of(&self.cert) {
            OutOfDate::check(whose, window, now)?;
        }
        if let Some(window) = Window::of(&self.ca) {
            OutOfDate::check(Whose::CaFile { path: self.dir.join("ca.pem") }, window, now)?;
        }
        Ok(())
    }
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, CertError> {
    let pem = fs::read(path).map_err(io_err("read", path))?;
    CertificateDer::from_pem_slice(&pem).map_err(|_| CertError::Pem { path: path.to_owned(), what: "certificate" })
}

/// Why a certificate's subject does not say which Kiln peer it is.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    /// The bytes are not an X.509 certificate.
    #[error("unparseable certificate")]
    Unparseable(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The subject has no organizational unit, where Kiln writes the role.
    #[error("no organizational unit (role) in its subject")]
    NoRole,
    /// The subject has no common name, where Kiln writes the name.
    #[error("no common name in its subject")]
    NoName,
    /// The role is not one a client may have.
    #[error("its role is not a client role")]
    NotClient(#[source] kiln_proto::model::BadRole),
}

/// Reads the Kiln role (organizational unit) and name (common name) of a certificate.
pub fn subject_of(cert: &CertificateDer<'_>) -> Result<(String, String), SubjectError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(SubjectError::Unparseable)?;
    let subject = parsed.subject();
    let unit = subject.iter_organizational_unit().find_map(|a| a.as_str().ok()).ok_or(SubjectError::NoRole)?.to_owned();
    let name = subject.iter_common_name().find_map(|a| a.as_str().ok()).ok_or(SubjectError::NoName)?.to_owned();
    Ok((unit, name))
}

/// Reads the client identity from a certificate a peer presented.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<PeerIdentity, SubjectError> {
    let (unit, name) = subject_of(cert)?;
    let role = unit.parse::<Role>().map_err(SubjectError::NotClient)?;
    Ok(PeerIdentity { role, name })
}

fn check_name(name: &str) -> Result<(), CertError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.')
        && name != "ca"
        && name != DISPATCHER_UNIT;
    if ok { Ok(()) } else { Err(CertError::BadName(name.chars().take(80).collect())) }
}

/// Whether `s` is a DNS host name: dot-separated labels of letters, digits and `-`.
fn is_host_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = time::OffsetDateTime::from(validity.not_before);
    params.not_after = time::OffsetDateTime::from(validity.not_after);
}

fn distinguished(unit: &str, name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Kiln");
    dn.push(DnType::OrganizationalUnitName, unit);
    dn.push(DnType::CommonName, name);
    dn
}

fn generate(what: &str) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.to_owned();
    move |source| CertError::Generate { what, source }
}

/// Writes `contents` to a new file with `mode`, refusing to overwrite.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_err("create", path))?;
    file.write_all(contents).map_err(io_err("write", path))?;
    // The umask may have narrowed the mode; make it exact.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("set permissions on", path))?;
    file.sync_all().map_err(io_err("sync", path))
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))
}

/// Creates a certificate authority in `dir/ca/` and the dispatcher's bundle in
/// `dir/dispatcher/`, valid for the given host names and IP addresses.
pub fn init(dir: &Path, sans: &[String]) -> Result<(), CertError> {
    init_with(dir, sans, Validity::default())
}

/// Like [`init`], with the dispatcher's certificate valid for `dispatcher` (the CA is valid ten years).
pub fn init_with(dir: &Path, sans: &[String], dispatcher: Validity) -> Result<(), CertError> {
    let ca_dir = dir.join("ca");
    if ca_dir.join("key.pem").exists() || ca_dir.join("ca.pem").exists() {
        return Err(CertError::CaExists(ca_dir));
    }
    let params = dispatcher_params(sans, dispatcher)?;
    let dispatcher_dir = dir.join(DISPATCHER_UNIT);
    if dispatcher_dir.join("key.pem").exists() {
        return Err(CertError::BundleExists(dispatcher_dir));
    }

    let ca_key = KeyPair::generate().map_err(generate("CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = distinguished("ca", "Kiln CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca_params, Validity::days(CA_VALID_DAYS));
    let ca_cert = ca_params.self_signed(&ca_key).map_err(generate("CA certificate"))?;

    create_dir(&ca_dir)?;
    write_new(&ca_dir.join("key.pem"), ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&ca_dir.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644)?;

    let issuer = Issuer::new(ca_params, ca_key);
    write_bundle(&dispatcher_dir, &ca_cert.pem(), &params, &issuer, "dispatcher certificate")
}

/// Issues a new dispatcher bundle in `dir/dispatcher/` from the CA in
/// `dir/ca/` (when the old certificate expires, or the dispatcher moves),
/// valid for the given host names and IP addresses.
pub fn issue_dispatcher(dir: &Path, sans: &[String], validity: Validity) -> Result<PathBuf, CertError> {
    let params = dispatcher_params(sans, validity)?;
    let (ca_pem, issuer) = load_ca(dir)?;
    let bundle_dir = dir.join(DISPATCHER_UNIT);
    if bundle_dir.join("key.pem").exists() {
        return Err(CertError::BundleExists(bundle_dir));
    }
    write_bundle(&bundle_dir, &ca_pem, &params, &issuer, "dispatcher certificate")?;
    Ok(bundle_dir)
}

fn dispatcher_params(sans: &[String], v: Validity) -> Result<CertificateParams, CertError> {
    let san_types = sans
        .iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) if is_host_name(s) => {
                s.clone().try_into().map(SanType::DnsName).map_err(|_| CertError::BadSan(s.clone()))
            }
            Err(_) => Err(CertError::BadSan(s.chars().take(80).collect())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished(DISPATCHER_UNIT, "dispatcher");
    params.subject_alt_names = san_types;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, v);
    Ok(params)
}

fn load_ca(dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), CertError> {
    let ca_dir = dir.join("ca");
    let ca_pem_path = ca_dir.join("ca.pem");
    let ca_pem = fs::read_to_string(&ca_pem_path).map_err(io_err("read", &ca_pem_path))?;
    let key_path = ca_dir.join("key.pem");
    let key_pem = fs::read_to_string(&key_path).map_err(io_err("read", &key_path))?;
    let ca_key = KeyPair::from_pem(&key_pem).map_err(generate("CA key from ca/key.pem"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(generate("CA from ca/ca.pem"))?;
    Ok((ca_pem, issuer))
}

/// Issues a client bundle for `role` named `name` in `dir/NAME/`, signed by the CA in `dir/ca/`.
pub fn issue(dir: &Path, role: Role, name: &str) -> Result<PathBuf, CertError> {
    issue_with(dir, role, name, Validity::default())
}

/// Like [`issue`], valid for `validity` (e.g. short-lived certificates, renewed often).
pub fn issue_with(dir: &Path, role: Role, name: &str, v: Validity) -> Result<PathBuf, CertError> {
    check_name(name)?;
    let (ca_pem, issuer) = load_ca(dir)?;
    let bundle_dir = dir.join(name);
    if bundle_dir.join("key.pem").exists() {
        return Err(CertError::BundleExists(bundle_dir));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished(role.as_str(), name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, v);
    write_bundle(&bundle_dir, &ca_pem, &params, &issuer, &format!("{role} certificate"))?;
    Ok(bundle_dir)
}

fn write_bundle(
    dir: &Path,
    ca_pem: &str,
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
    what: &str,
) -> Result<(), CertError> {
    let key = KeyPair::generate().map_err(generate(what))?;
    let cert = params.signed_by(&key, issuer).map_err(generate(what))?;
    create_dir(dir)?;
    write_new(&dir.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&dir.join("cert.pem"), cert.pem().as_bytes(), 0o644)?;
    write_new(&dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_issue_write_bundles_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let bundle = issue(dir.path(), Role::Runner, "runner-1").unwrap();
        let b = Bundle::load(&bundle).unwrap();
        assert_eq!(b.identity(), Some(PeerIdentity { role: Role::Runner, name: "runner-1".into() }));
        let d = Bundle::load(&dir.path().join("dispatcher")).unwrap();
        assert!(d.is_dispatcher());
        assert_eq!(d.identity(), None);
        for key in ["ca/key.pem", "runner-1/key.pem", "dispatcher/key.pem"] {
            let mode = fs::metadata(dir.path().join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        // Nothing is overwritten.
        assert!(matches!(init(dir.path(), &[]), Err(CertError::CaExists(_))));
        assert!(matches!(issue(dir.path(), Role::Admin, "runner-1"), Err(CertError::BundleExists(_))));
    }

    #[test]
    fn bad_names_and_sans_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(init(dir.path(), &["not a host!".into()]), Err(CertError::BadSan(_))));
        init(dir.path(), &[]).unwrap();
        for name in ["", "../x", "a/b", "ca", "dispatcher", ".hidden"] {
            assert!(matches!(issue(dir.path(), Role::Runner, name), Err(CertError::BadName(_))), "{name}");
        }
    }

    #[test]
    fn missing_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = Bundle::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }
}
