//! A certificate authority of the test's own, for TLS brokers and clients.

use std::path::PathBuf;

use tempfile::TempDir;

/// A certificate authority of the test's own, with a server certificate for
/// 127.0.0.1/::1/localhost and a client certificate, as PEM files in a temporary folder.
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// Generates a CA named `name` and the certificates it signs.
    ///
    /// # Errors
    /// When generating or writing fails.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        for (file, names) in [
            (
                "server",
                vec![
                    "localhost".to_owned(),
                    "127.0.0.1".to_owned(),
                    "::1".to_owned(),
                ],
            ),
            ("client", vec!["edge-test-client".to_owned()]),
        ] {
            let key = KeyPair::generate()?;
            let cert = CertificateParams::new(names)?.signed_by(&key, &ca)?;
            std::fs::write(dir.path().join(format!("{file}.pem")), cert.pem())?;
            std::fs::write(dir.path().join(format!("{file}.key")), key.serialize_pem())?;
        }
        Ok(Self { dir })
    }

    /// A file of the PKI: `ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
