//! A throwaway PKI for tests and the devnet: a private CA and server certificates signed by it
//! (ECDSA P-256, which rustls with ring verifies). Never for production: real federations use
//! certificates from a public CA, which the webpki roots already trust.
//!
//! A PKI directory holds `ca.pem` (the CA certificate, to put in `federation.extra_ca_file`),
//! `ca.key` (its private key, so later runs can issue more certificates) and, per server,
//! `<stem>.pem` and `<stem>.key` (see [`file_stem`]). Private keys are written with mode 0600.

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::client::WebPkiServerVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use zeroize::Zeroizing;

/// Common name of the CA that [`write_pki`] creates.
pub const DEVNET_CA_NAME: &str = "Parley devnet CA";

const DAY: Duration = Duration::from_secs(24 * 3600);
/// Leaf certificates are valid from a day ago (clock skew) for a year.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// The CA outlives its leaves, so re-issuing a leaf never needs a new CA.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A certificate authority: its self-signed certificate and its signing key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A server certificate issued by a [`Ca`].
pub struct Issued {
    /// The leaf certificate, PEM (without the CA: the CA is the peers' trust anchor).
    pub cert_pem: String,
    /// Its PKCS#8 private key, PEM.
    pub key_pem: Zeroizing<String>,
}

impl Ca {
    /// A new CA with a fresh key, valid from a day ago for ten years.
    pub fn generate(common_name: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let params = ca_params(common_name)?;
        let cert = params.self_signed(&key).context("signing the CA certificate")?;
        Ok(Ca { issuer: Issuer::new(params, key), cert_pem: cert.pem() })
    }

    /// Loads a CA made by [`Ca::generate`] with the same `common_name` from its certificate and
    /// key. A mismatch shows up when a certificate it issues fails [`Ca::verify`].
    pub fn from_pem(common_name: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        Ok(Ca { issuer: Issuer::new(ca_params(common_name)?, key), cert_pem: cert_pem.to_owned() })
    }

    /// The CA certificate, PEM: what peers trust (`federation.extra_ca_file`).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA's private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// A server certificate for `names` (DNS names, or IP addresses which become IP SANs),
    /// with a fresh key, valid from a day ago for a year. The first name is also its common name.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<Issued> {
        let first = names.first().context("a certificate needs at least one name")?;
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(sans).with_context(|| format!("certificate names {names:?}"))?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, *first);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial());
        set_validity(&mut params, LEAF_VALIDITY)?;
        let key = KeyPair::generate().context("generating a server key")?;
        let cert = params.signed_by(&key, &self.issuer).context("signing a server certificate")?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }

    /// Checks, as a TLS client would, that `cert_pem` (a leaf) chains to this CA and is valid
    /// now for `name` (a DNS name or an IP address).
    pub fn verify(&self, cert_pem: &str, name: &str) -> anyhow::Result<()> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).context("parsing the CA certificate")?)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("parsing the certificate")?;
        let server_name = ServerName::try_from(name.to_owned()).with_context(|| format!("{name:?} is not a DNS name or IP"))?;
        verifier.verify_server_cert(&leaf, &[], &server_name, &[], UnixTime::now())?;
        Ok(())
    }
}

fn ca_params(common_name: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    set_validity(&mut params, CA_VALIDITY)?;
    Ok(params)
}

/// Valid from a day ago (for clocks behind ours) to `length` from now.
fn set_validity(params: &mut CertificateParams, length: Duration) -> anyhow::Result<()> {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).context("the clock is before 1970")?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(DAY);
    params.not_after = epoch + now + length;
    Ok(())
}

/// 128 random bits, positive as DER integers must be for serial numbers.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// The file name (without extension) of a server's certificate and key: the server name with
/// `:` replaced by `_` and IPv6 brackets dropped (`localhost:8448` → `localhost_8448`,
/// `parley1` → `parley1`, `[::1]:8448` → `__1_8448`).
pub fn file_stem(server_name: &str) -> String {
    server_name.chars().filter(|c| !matches!(c, '[' | ']')).map(|c| if c == ':' { '_' } else { c }).collect()
}

/// One server certificate to keep in a PKI directory.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Files `<file_stem>.pem` and `<file_stem>.key`.
    pub file_stem: String,
    /// The names it is valid for (DNS names or IP addresses).
    pub names: Vec<String>,
}

/// Makes sure `dir` holds a CA and the `leaves`, and returns the files it wrote. What exists is
/// kept: a leaf is issued only when its `.pem` or `.key` is missing, with the CA loaded from
/// `ca.pem` and `ca.key`. Without `ca.pem` a new CA is made and every leaf is issued again.
pub fn ensure_pki(dir: &Path, leaves: &[Leaf]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let missing = |leaf: &&Leaf| !dir.join(format!("{}.pem", leaf.file_stem)).exists() || !key_path(dir, leaf).exists();
    let mut written = Vec::new();
    let (ca, todo): (Ca, Vec<&Leaf>) = if ca_cert.exists() {
        let todo: Vec<&Leaf> = leaves.iter().filter(missing).collect();
        if todo.is_empty() {
            return Ok(written);
        }
        if !ca_key.exists() {
            let stems: Vec<&str> = todo.iter().map(|leaf| leaf.file_stem.as_str()).collect();
            bail!("{} exists but {} does not: cannot issue certificates {stems:?}", ca_cert.display(), ca_key.display());
        }
        let cert_pem = std::fs::read_to_string(&ca_cert).with_context(|| format!("reading {}", ca_cert.display()))?;
        let key_pem = Zeroizing::new(std::fs::read_to_string(&ca_key).with_context(|| format!("reading {}", ca_key.display()))?);
        (Ca::from_pem(DEVNET_CA_NAME, &cert_pem, &key_pem)?, todo)
    } else {
        let ca = Ca::generate(DEVNET_CA_NAME)?;
        write_file(&ca_key, ca.key_pem().as_bytes(), true)?;
        write_file(&ca_cert, ca.cert_pem().as_bytes(), false)?;
        written.extend([ca_key.clone(), ca_cert.clone()]);
        (ca, leaves.iter().collect())
    };
    for leaf in todo {
        let names: Vec<&str> = leaf.names.iter().map(String::as_str).collect();
        let issued = ca.issue(&names)?;
        // A CA loaded from files that do not belong together would issue unusable certificates.
        ca.verify(&issued.cert_pem, names[0]).with_context(|| {
            format!("a certificate issued with {} does not verify against {}", ca_key.display(), ca_cert.display())
        })?;
        let (cert_path, key_path) = (dir.join(format!("{}.pem", leaf.file_stem)), key_path(dir, leaf));
        write_file(&key_path, issued.key_pem.as_bytes(), true)?;
        write_file(&cert_path, issued.cert_pem.as_bytes(), false)?;
        written.extend([key_path, cert_path]);
    }
    Ok(written)
}

fn key_path(dir: &Path, leaf: &Leaf) -> PathBuf {
    dir.join(format!("{}.key", leaf.file_stem))
}

/// Writes `dir/ca.pem` (and `ca.key`) and, for each server name, `dir/<stem>.pem` and
/// `dir/<stem>.key` valid for the name's host part (see [`file_stem`] and
/// [`ServerName::tls_name`](parley_spec::ServerName::tls_name): `[::1]:8448` gets the IP SAN `::1`).
/// Idempotent: files that exist are kept, so running it again with the same names does nothing.
pub fn write_pki(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    let leaves = names
        .iter()
        .map(|name| {
            let parsed =
                parley_spec::ServerName::parse(name).map_err(|e| anyhow::anyhow!("{name:?} is not a server name: {e}"))?;
            Ok(Leaf { file_stem: file_stem(parsed.as_str()), names: vec![parsed.tls_name()] })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure_pki(dir, &leaves)?;
    Ok(())
}

/// Writes through a temporary file and a rename, so a reader never sees half a file; `secret`
/// files get mode 0600.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_verifies_for_its_names_only() {
        let ca = Ca::generate("test CA").unwrap();
        let issued = ca.issue(&["parley1", "127.0.0.1", "::1"]).unwrap();
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(issued.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        ca.verify(&issued.cert_pem, "parley1").unwrap();
        ca.verify(&issued.cert_pem, "127.0.0.1").unwrap();
        ca.verify(&issued.cert_pem, "::1").unwrap();
        let wrong_name = |cert: &str, name: &str| {
            let error = format!("{:#}", ca.verify(cert, name).unwrap_err());
            assert!(error.contains("not valid for name"), "{name}: {error}");
        };
        wrong_name(&issued.cert_pem, "parley2");
        wrong_name(&issued.cert_pem, "127.0.0.2");
        // A DNS name does not match an IP address.
        let dns_only = ca.issue(&["localhost"]).unwrap();
        wrong_name(&dns_only.cert_pem, "127.0.0.1");
        // Another CA does not vouch for it.
        let other = Ca::generate("test CA").unwrap();
        let error = format!("{:#}", other.verify(&issued.cert_pem, "parley1").unwrap_err());
        assert!(error.contains("UnknownIssuer") || error.contains("BadSignature"), "{error}");
    }

    #[test]
    fn reloaded_ca_issues_verifiable_certificates() {
        let ca = Ca::generate(DEVNET_CA_NAME).unwrap();
        let reloaded = Ca::from_pem(DEVNET_CA_NAME, &ca.cert_pem(), &ca.key_pem()).unwrap();
        let issued = reloaded.issue(&["localhost"]).unwrap();
        ca.verify(&issued.cert_pem, "localhost").unwrap();
        // The wrong key: the signature does not verify.
        let stranger = Ca::generate(DEVNET_CA_NAME).unwrap();
        let mixed = Ca::from_pem(DEVNET_CA_NAME, &ca.cert_pem(), &stranger.key_pem()).unwrap();
        let error = format!("{:#}", mixed.verify(&mixed.issue(&["localhost"]).unwrap().cert_pem, "localhost").unwrap_err());
        assert!(error.contains("BadSignature"), "{error}");
    }

    #[test]
    fn names_map_to_files() {
        assert_eq!(file_stem("localhost:8448"), "localhost_8448");
        assert_eq!(file_stem("parley1"), "parley1");
        assert_eq!(file_stem("[::1]:8448"), "__1_8448");
    }

    #[test]
    fn write_pki_issues_for_the_host_of_each_name() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["localhost:8448", "127.0.0.1:8449", "[::1]:8450"].map(str::to_owned);
        write_pki(dir.path(), &names).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        let ca = Ca::from_pem(DEVNET_CA_NAME, &read("ca.pem"), &read("ca.key")).unwrap();
        ca.verify(&read("localhost_8448.pem"), "localhost").unwrap();
        ca.verify(&read("127.0.0.1_8449.pem"), "127.0.0.1").unwrap();
        // An IPv6 literal gets an IP SAN, checked as a client connecting to `[::1]` would.
        ca.verify(&read("__1_8450.pem"), "::1").unwrap();
        assert!(ca.verify(&read("__1_8450.pem"), "localhost").is_err());
    }

    #[test]
    fn write_pki_is_idempotent_and_completes_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["parley1".to_owned(), "localhost:8448".to_owned()];
        write_pki(dir.path(), &names).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        let ca = Ca::from_pem(DEVNET_CA_NAME, &read("ca.pem"), &read("ca.key")).unwrap();
        ca.verify(&read("parley1.pem"), "parley1").unwrap();
        ca.verify(&read("localhost_8448.pem"), "localhost").unwrap();
        assert!(ca.verify(&read("parley1.pem"), "parley2").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode("parley1.key"), 0o600);
            assert_eq!(mode("ca.key"), 0o600);
            assert_eq!(mode("parley1.pem"), 0o644);
        }

        // Again: nothing changes.
        let before = (read("ca.pem"), read("parley1.pem"), read("parley1.key"));
        write_pki(dir.path(), &names).unwrap();
        assert_eq!(before, (read("ca.pem"), read("parley1.pem"), read("parley1.key")));

        // A new name: issued by the same CA, the others kept.
        write_pki(dir.path(), &["parley2".to_owned()]).unwrap();
        ca.verify(&read("parley2.pem"), "parley2").unwrap();
        assert_eq!(before.1, read("parley1.pem"));
        assert!(write_pki(dir.path(), &["not a name".to_owned()]).is_err());
    }
}
