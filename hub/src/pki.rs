//! The hub's TLS identity: a local CA and a server certificate made on first start (or
//! real files given with `--cert-file/--key-file`), as a rustls server configuration.
//!
//! The CA is written to `DIR/ca.pem` for clients to trust (`SSL_CERT_FILE`,
//! `REQUESTS_CA_BUNDLE`, `--ca-file`); its key stays in `DIR/ca.key` so that the server
//! certificate can be made again for another `--hostname` with the same CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The CA certificate clients trust, in the data folder.
pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const SERVER_CERT_FILE: &str = "server.pem";
const SERVER_KEY_FILE: &str = "server.key";
/// The names the server certificate was made for, one a line.
const SERVER_NAMES_FILE: &str = "server.names";

/// Where the server's certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Made (once) in the data folder for these names, signed by the local CA.
    Local {
        /// The data folder.
        dir: PathBuf,
        /// The names (DNS names and IP addresses) the certificate is for.
        names: Vec<String>,
    },
    /// Given files: a PEM certificate chain and its PEM key.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
}

/// The names a local server certificate covers: the hostname, plus `localhost`,
/// `127.0.0.1` and `::1`.
pub fn local_names(hostname: &str) -> Vec<String> {
    let mut names = vec![hostname.to_owned()];
    for extra in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(extra)) {
            names.push(extra.to_owned());
        }
    }
    names
}

/// Makes sure the local CA and a server certificate for `names` exist in `dir`
/// (making what is missing or stale) and returns the paths of the certificate and key.
///
/// # Errors
/// When generating or writing fails, or existing files cannot be read.
pub fn ensure_local(dir: &Path, names: &[String]) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_key = if ca_key_path.exists() {
        let pem = std::fs::read_to_string(&ca_key_path)
            .with_context(|| format!("cannot read {}", ca_key_path.display()))?;
        KeyPair::from_pem(&pem)
            .with_context(|| format!("{} is not a key", ca_key_path.display()))?
    } else {
        let key = KeyPair::generate().context("generating the CA key")?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        key
    };
    let ca_path = dir.join(CA_FILE);
    if !ca_path.exists() {
        let ca = ca_params()?
            .self_signed(&ca_key)
            .context("signing the CA")?;
        write(&ca_path, &ca.pem())?;
    }
    let cert_path = dir.join(SERVER_CERT_FILE);
    let key_path = dir.join(SERVER_KEY_FILE);
    let names_path = dir.join(SERVER_NAMES_FILE);
    let wanted = names.join("\n");
    let current = std::fs::read_to_string(&names_path).unwrap_or_default();
    if current != wanted || !cert_path.exists() || !key_path.exists() {
        let issuer = Issuer::new(ca_params()?, ca_key);
        let key = KeyPair::generate().context("generating the server key")?;
        let mut params =
            CertificateParams::new(names.to_vec()).context("the server certificate's names")?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2045, 1, 1);
        let cert = params
            .signed_by(&key, &issuer)
            .context("signing the server certificate")?;
        write_private(&key_path, &key.serialize_pem())?;
        write(&cert_path, &cert.pem())?;
        write(&names_path, &wanted)?;
        tracing::info!(names = ?names, cert = %cert_path.display(), "made a server certificate");
    }
    Ok((cert_path, key_path))
}

/// The CA's parameters: the same every time, so a server certificate made later with
/// the stored key chains to the stored CA certificate.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "edge-hub local CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    Ok(params)
}

/// Asks every client for a certificate and requires none: a device may authenticate
/// with a SAS token instead. Any certificate is taken at the TLS layer (its handshake
/// signature is checked, proving the client holds its key); the device endpoint then
/// compares its thumbprint with the registry's (IoT Hub's self-signed X.509 devices),
/// or checks its chain to a registered CA and its CN ([`verify_ca_signed`]).
#[derive(Debug)]
struct AnyClientCertificate {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The SHA-256 and SHA-1 thumbprints of a certificate (DER), upper-case hex, as IoT
/// Hub shows them.
pub fn thumbprints(der: &[u8]) -> [String; 2] {
    let hex = |digest: ring::digest::Digest| {
        digest
            .as_ref()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    };
    [
        hex(ring::digest::digest(&ring::digest::SHA256, der)),
        hex(ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            der,
        )),
    ]
}

/// What the registry keeps of a CA certificate besides its PEM.
#[derive(Debug, Clone)]
pub struct CaInfo {
    /// Its SHA-256 thumbprint, upper-case hex.
    pub thumbprint: String,
    /// Its subject, for people.
    pub subject: String,
}

/// Checks that `pem` holds exactly one certificate, and that it is a CA (basic
/// constraints `cA: true`).
///
/// # Errors
/// When it is not PEM, holds no or several certificates, or is not a CA.
pub fn ca_certificate(pem: &str) -> anyhow::Result<CaInfo> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the CA certificate is not PEM")?;
    let [der] = certs.as_slice() else {
        bail!(
            "a CA certificate file must hold exactly one certificate (PEM), not {}",
            certs.len()
        );
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("the CA certificate is not X.509: {e}"))?;
    if !cert.is_ca() {
        bail!(
            "'{}' is not a CA certificate (its basic constraints do not say cA: true)",
            cert.subject()
        );
    }
    Ok(CaInfo {
        thumbprint: thumbprints(der)[0].clone(),
        subject: cert.subject().to_string(),
    })
}

/// Checks a device's client certificate `chain` (leaf first, as presented in the TLS
/// handshake, whose signature proved the device holds the leaf's key) as IoT Hub checks
/// CA-signed X.509 devices: it chains to one of the `cas` (PEM), is valid now, may be
/// used for client authentication, and its subject's CN is `device_id`.
///
/// # Errors
/// Why not, in words for the log.
pub fn verify_ca_signed(
    chain: &[CertificateDer<'static>],
    cas: &[String],
    device_id: &str,
) -> Result<(), String> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "no client certificate".to_owned())?;
    let mut roots = rustls::RootCertStore::empty();
    for pem in cas {
        for der in rustls_pemfile::certs(&mut pem.as_bytes()).flatten() {
            // A registered CA rustls cannot use as a trust anchor is skipped: the
            // others may still sign the device's certificate.
            let _ = roots.add(der);
        }
    }
    if roots.is_empty() {
        return Err("the registry trusts no CA certificate".to_owned());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("the registry's CA certificates: {e}"))?;
    verifier
        .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
        .map_err(|e| format!("the client certificate does not chain to a registered CA: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("the client certificate is not X.509: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    match cn {
        Some(cn) if cn == device_id => Ok(()),
        Some(cn) => Err(format!(
            "the client certificate's CN is '{cn}', not the device id '{device_id}'"
        )),
        None => Err("the client certificate's subject has no CN".to_owned()),
    }
}

/// The rustls server configuration for `identity`, offering `alpn` protocols; with
/// `client_certificates`, clients may present a certificate (see
/// `AnyClientCertificate`).
///
/// # Errors
/// When the files cannot be made or read, or hold no certificate or key.
pub fn server_config(
    identity: &Identity,
    alpn: &[&[u8]],
    client_certificates: bool,
) -> anyhow::Result<Arc<ServerConfig>> {
    let (cert_path, key_path) = match identity {
        Identity::Local { dir, names } => ensure_local(dir, names)?,
        Identity::Files { cert, key } => (cert.clone(), key.clone()),
    };
    let certs = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if client_certificates {
        builder.with_client_cert_verifier(Arc::new(AnyClientCertificate { algorithms }))
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "{} and {} are not a certificate and its key",
            cert_path.display(),
            key_path.display()
        )
    })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .with_context(|| format!("{} is not PEM", path.display()))?
        .with_context(|| format!("{} holds no private key", path.display()))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a key readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_identity_is_made_once_and_remade_for_new_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = local_names("hub.local");
        assert_eq!(names, ["hub.local", "localhost", "127.0.0.1", "::1"]);
        let (cert, _) = ensure_local(dir.path(), &names).expect("makes");
        let first = std::fs::read(&cert).expect("reads");
        let ca = std::fs::read(dir.path().join(CA_FILE)).expect("CA written");
        ensure_local(dir.path(), &names).expect("keeps");
        assert_eq!(
            std::fs::read(&cert).expect("reads"),
            first,
            "kept as it was"
        );
        ensure_local(dir.path(), &local_names("other")).expect("remakes");
        assert_ne!(std::fs::read(&cert).expect("reads"), first, "made again");
        assert_eq!(
            std::fs::read(dir.path().join(CA_FILE)).expect("reads"),
            ca,
            "same CA"
        );
        server_config(
            &Identity::Local {
                dir: dir.path().to_owned(),
                names,
            },
            &[],
            true,
        )
        .expect("loads");
    }
}
