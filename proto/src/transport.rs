//! How a client reaches the broker beyond its address: TLS (a CA file, and a client
//! certificate and key for mutual TLS) and username/password, applied to rumqttc's
//! options the same way by the host and the invoker.
//!
//! Secrets never need to sit on a command line (where `ps` shows them): the password
//! comes from an environment variable or a file, and keys from files.

use std::path::{Path, PathBuf};

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use crate::BrokerUrl;

/// TLS settings: the files to trust and to present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

    fn transport(&self) -> Result<Transport, TransportError> {
        let client_auth = match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(cert), Some(key)) => {
                Some((read(cert, "client certificate")?, read(key, "client key")?))
            }
            (None, None) => None,
            _ => return Err(TransportError::HalfClientAuth),
        };
        Ok(match &self.tls.ca_file {
            Some(ca) => Transport::tls_with_config(TlsConfiguration::Simple {
                ca: read(ca, "CA file")?,
                alpn: None,
                client_auth,
            }),
            None if client_auth.is_none() => Transport::tls_with_default_config(),
            None => Transport::tls_with_config(TlsConfiguration::Simple {
                ca: Vec::new(),
                alpn: None,
                client_auth,
            }),
        })
    }
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
    fn the_password_never_shows_in_debug_output() {
        let security = Security {
            username: Some("u".into()),
            password: Some("hunter2".into()),
            ..Security::default()
        };
        assert!(!format!("{security:?}").contains("hunter2"));
    }
}
