//! How a client reaches the broker beyond its address: TLS (a CA file, and a client
//! certificate and key for mutual TLS) and username/password, applied to rumqttc's
//! options the same way by the host and the invoker.
//!
//! Secrets never need to sit on a command line (where `ps` shows them): the password
//! comes from an environment variable or a file, and keys from files.
//!
//! The TLS configuration is built here, in full, before connecting: the CA file's
//! certificates, or else the system's trust store (`rustls-native-certs`, which
//! honours `SSL_CERT_FILE` and `SSL_CERT_DIR`), with or without a client certificate.
//! A file without what it should hold, or a system without any CA certificate, is an
//! error at once, naming what to do, rather than a failure at the first handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::BrokerUrl;

/// TLS settings: the files to trust and to present (also a config-file table:
/// `ca_file`, `cert_file`, `key_file`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// PEM file of the CA certificates to trust; none trusts the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (mutual TLS); needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any TLS file is set.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// Everything about the connection to the broker but its address.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// TLS files; with `mqtts://` (or any file set) the connection uses TLS.
    pub tls: TlsFiles,
    /// The MQTT username, if the broker wants one.
    pub username: Option<String>,
    /// The MQTT password, read from the environment or a file.
    pub password: Option<String>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// A secret setting (a connection string, a key): shown as `<hidden>` by `Debug`, so
/// that a logged configuration never carries it.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

/// Why the connection settings cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A TLS or password file cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    File {
        /// Which file.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate is given without its key, or the other way round.
    #[error(
        "a client certificate needs its key, and a key its certificate (--cert-file and --key-file)"
    )]
    HalfClientAuth,
    /// A password without a username.
    #[error("a password needs a username")]
    PasswordWithoutUsername,
    /// A PEM file holds no certificate (a CA file or a client certificate).
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate {
        /// Which file.
        what: &'static str,
        /// Where.
        path: PathBuf,
    },
    /// The client key file holds no PEM private key.
    #[error("client key {path} holds no PEM private key: {reason}")]
    NoKey {
        /// Where.
        path: PathBuf,
        /// What the PEM reader said.
        reason: String,
    },
    /// rustls refused the client certificate and key (say, a key of another
    /// certificate, or of a kind it does not support).
    #[error("the client certificate and key cannot be used: {0}")]
    ClientAuth(rustls::Error),
    /// No CA file is given and the system's trust store has no certificate (it is
    /// missing, or `SSL_CERT_FILE`/`SSL_CERT_DIR` point where there are none).
    #[error(
        "no CA certificate to trust: the system's trust store {why}; give the broker's CA \
         with --ca-file (EDGE_CA_FILE), or install the system's CA certificates \
         (Debian: ca-certificates)"
    )]
    NoSystemRoots {
        /// What the loader found or failed to read.
        why: String,
    },
}

impl Security {
    /// Whether the connection to `broker` uses TLS: `mqtts://`, or any TLS file set.
    pub fn uses_tls(&self, broker: &BrokerUrl) -> bool {
        broker.tls || self.tls.is_set()
    }

    /// Sets TLS and credentials on `options` for a connection to `broker`.
    ///
    /// # Errors
    /// When a file cannot be read, or a certificate comes without its key (or a
    /// password without a username).
    pub fn apply(
        &self,
        broker: &BrokerUrl,
        options: &mut MqttOptions,
    ) -> Result<(), TransportError> {
        if self.uses_tls(broker) {
            options.set_transport(self.transport()?);
        }
        match (&self.username, &self.password) {
            (Some(username), password) => {
                options.set_credentials(username, password.clone().unwrap_or_default());
            }
            (None, Some(_)) => return Err(TransportError::PasswordWithoutUsername),
            (None, None) => {}
        }
        Ok(())
    }

    /// The TLS transport: the CA file's certificates or the system's roots, and the
    /// client certificate when one is given.
    fn transport(&self) -> Result<Transport, TransportError> {
        Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
            self.tls.client_config()?,
        )))
    }
}

impl TlsFiles {
    /// The TLS client configuration: the CA file's certificates or the system's roots,
    /// and the client certificate when one is given.
    ///
    /// # Errors
    /// When a file cannot be read or holds nothing usable, half a client certificate
    /// is given, or the system has no CA certificate and no CA file is given.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TransportError> {
        let client_auth = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(TransportError::HalfClientAuth),
        };
        let roots = match &self.ca_file {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add_parsable_certificates(certificates(ca, "CA file")?);
                if roots.is_empty() {
                    return Err(TransportError::NoCertificate {
                        what: "CA file",
                        path: ca.clone(),
                    });
                }
                roots
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                system_roots(found.certs, &found.errors)?
            }
        };
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = match client_auth {
            Some((cert, key)) => builder
                .with_client_auth_cert(certificates(cert, "client certificate")?, private_key(key)?)
                .map_err(TransportError::ClientAuth)?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// The roots to trust when no CA file is given: what the system's trust store holds.
/// Errors reading parts of it are ignored while any certificate was found (a stray
/// unreadable file in `/etc/ssl/certs` must not stop TLS); with none, it is an error
/// that says what was tried.
fn system_roots(
    found: Vec<CertificateDer<'static>>,
    errors: &[impl std::fmt::Display],
) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found);
    if !roots.is_empty() {
        return Ok(roots);
    }
    let why = if errors.is_empty() {
        "holds no certificate".to_owned()
    } else {
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        format!("cannot be read ({})", errors.join("; "))
    };
    Err(TransportError::NoSystemRoots { why })
}

/// Every certificate in a PEM file; none is an error.
fn certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bytes = read(path, what)?;
    // A block that is not a certificate (a key, a comment) is skipped, as OpenSSL does.
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TransportError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let bytes = read(path, "client key")?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| TransportError::NoKey {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::File {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The password from `$var` if it is set, else from the first line of `file` if one
/// is given: never from a command-line argument, which `ps` would show.
///
/// # Errors
/// When the file cannot be read.
pub fn password(var: &str, file: Option<&Path>) -> Result<Option<String>, TransportError> {
    if let Some(password) = std::env::var_os(var) {
        return Ok(Some(password.to_string_lossy().into_owned()));
    }
    let Some(file) = file else {
        return Ok(None);
    };
    let bytes = read(file, "password file")?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(Some(text.lines().next().unwrap_or_default().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(url: &str) -> BrokerUrl {
        url.parse().expect("valid URL")
    }

    #[test]
    fn tls_is_used_for_mqtts_or_when_a_file_is_set() {
        let plain = Security::default();
        assert!(!plain.uses_tls(&broker("mqtt://h")));
        assert!(plain.uses_tls(&broker("mqtts://h")));
        let with_ca = Security {
            tls: TlsFiles {
                ca_file: Some("ca.pem".into()),
                ..TlsFiles::default()
            },
            ..Security::default()
        };
        assert!(with_ca.uses_tls(&broker("mqtt://h")));
    }

    #[test]
    fn bad_settings_are_refused_with_what_is_wrong() {
        let mut options = MqttOptions::new("c", "h", 1);
        let half = Security {
            tls: TlsFiles {
                cert_file: Some("c.pem".into()),
                ..TlsFiles::default()
            },
            ..Security::default()
        };
        assert!(matches!(
            half.apply(&broker("mqtts://h"), &mut options),
            Err(TransportError::HalfClientAuth)
        ));
        let missing = Security {
            tls: TlsFiles {
                ca_file: Some("/no/such/ca.pem".into()),
                ..TlsFiles::default()
            },
            ..Security::default()
        };
        let error = missing
            .apply(&broker("mqtts://h"), &mut options)
            .expect_err("missing file");
        assert!(
            error
                .to_string()
                .contains("cannot read CA file /no/such/ca.pem"),
            "{error}"
        );
        let anonymous_password = Security {
            password: Some("p".into()),
            ..Security::default()
        };
        assert!(
            anonymous_password
                .apply(&broker("mqtt://h"), &mut options)
                .is_err()
        );
    }

    #[test]
    fn with_no_system_roots_tls_is_an_error_that_says_what_to_do() {
        let missing = ["failed to read PEM from file: /nowhere/ca.pem: No such file"];
        let error = system_roots(Vec::new(), &missing).expect_err("no roots at all");
        let text = error.to_string();
        assert!(
            matches!(error, TransportError::NoSystemRoots { .. }),
            "{text}"
        );
        assert!(
            text.contains("cannot be read (failed to read PEM"),
            "{text}"
        );
        assert!(text.contains("--ca-file"), "{text}");
        let empty: [&str; 0] = [];
        let error = system_roots(Vec::new(), &empty).expect_err("an empty store");
        assert!(
            error.to_string().contains("holds no certificate"),
            "{error}"
        );
    }

    #[test]
    fn a_file_without_what_it_should_hold_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("folder");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").expect("written");
        let mut options = MqttOptions::new("c", "h", 1);
        let ca = Security {
            tls: TlsFiles {
                ca_file: Some(empty.clone()),
                ..TlsFiles::default()
            },
            ..Security::default()
        };
        let error = ca
            .apply(&broker("mqtts://h"), &mut options)
            .expect_err("a CA file with no certificate");
        assert_eq!(
            error.to_string(),
            format!("CA file {} holds no PEM certificate", empty.display())
        );
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let security = Security {
            username: Some("u".into()),
            password: Some("hunter2".into()),
            ..Security::default()
        };
        assert!(!format!("{security:?}").contains("hunter2"));
    }
}
