//! The optional config file (`--config FILE` or `EDGE_INVOKER_CONFIG`): defaults for
//! the broker, the namespace and the timeouts, so that an operator need not repeat them.
//! Flags and environment variables override it; `invoker/edge-invoker.example.toml`
//! is a commented example.

use std::path::{Path, PathBuf};

use edge_proto::BrokerUrl;
use serde::{Deserialize, Deserializer};

/// What the config file may set; every key is optional, and an unknown key is an error
/// (a misspelt key would otherwise be silently ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The broker, `mqtt://host[:port]`.
    #[serde(default, deserialize_with = "broker_url")]
    pub broker: Option<BrokerUrl>,
    /// The devices' namespace template, in which `{device-id}` stands for the device id.
    pub namespace: Option<String>,
    /// Seconds to wait for a device's answer (5 to 300).
    pub response_timeout: Option<u64>,
    /// Seconds to wait for an offline device to come online (0 to 300).
    pub connect_timeout: Option<u64>,
    /// PEM file of the CA certificates to trust (TLS).
    pub ca_file: Option<PathBuf>,
    /// PEM file of a client certificate (mutual TLS).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's key.
    pub key_file: Option<PathBuf>,
    /// The MQTT username.
    pub username: Option<String>,
    /// A file whose first line is the MQTT password (`EDGE_PASSWORD` wins over it).
    pub password_file: Option<PathBuf>,
    /// A file whose first line is IoT Hub's service connection string: every command
    /// then goes through the hub (`EDGE_CONNECTION_STRING` wins over it).
    pub connection_string_file: Option<PathBuf>,
}

/// Why the config file could not be used; always a usage error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("could not read the config file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The connection string is not a service connection string; `from` says where it
    /// came from. The message never holds the key.
    #[error("the connection string from {from} is not usable: {reason}")]
    ConnectionString {
        /// `--connection-string or EDGE_CONNECTION_STRING`, or the file.
        from: String,
        /// What is wrong.
        reason: String,
    },
    /// The file is not valid TOML, or holds an unknown key or a bad value.
    #[error("config file {path}, line {line}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line of the problem, from 1.
        line: usize,
        /// What is wrong, in one line.
        message: String,
    },
}

impl ConfigFile {
    /// Reads and parses the config file at `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and the line where its content is wrong.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// Parses config file text; `path` is only for the error.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with the line where the text is wrong.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |span| span.start).min(text.len());
            ConfigError::Invalid {
                path: path.to_owned(),
                line: text[..at].matches('\n').count() + 1,
                // toml's own message may run over several lines; an error is one line.
                message: e.message().trim().replace('\n', " "),
            }
        })
    }
}

fn broker_url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<BrokerUrl>, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(text, Path::new("site.toml"))
    }

    #[test]
    fn every_key_is_optional() {
        assert_eq!(parse("").expect("empty"), ConfigFile::default());
        let config = parse(
            "# the plant's broker\n\
             broker = \"mqtt://broker.plant:1884\"\n\
             namespace = \"plant-7/{device-id}/\"\n\
             response_timeout = 60\n\
             connect_timeout = 10\n",
        )
        .expect("valid");
        assert_eq!(
            config.broker.map(|b| b.to_string()).as_deref(),
            Some("mqtt://broker.plant:1884")
        );
        assert_eq!(config.namespace.as_deref(), Some("plant-7/{device-id}/"));
        assert_eq!(config.response_timeout, Some(60));
        assert_eq!(config.connect_timeout, Some(10));
    }

    #[test]
    fn mistakes_are_one_line_naming_the_file_and_line() {
        let error = parse("response_timeout = 60\nbrokr = \"mqtt://x\"\n").expect_err("unknown");
        let text = error.to_string();
        assert!(
            text.starts_with("config file site.toml, line 2: unknown field `brokr`"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");

        let error = parse("broker = \"localhost:1883\"").expect_err("not a URL");
        let text = error.to_string();
        assert!(
            text.starts_with("config file site.toml, line 1: "),
            "{text}"
        );
        assert!(text.contains("invalid broker URL"), "{text}");

        let error = parse("connect_timeout = -1").expect_err("negative");
        assert!(
            matches!(error, ConfigError::Invalid { line: 1, .. }),
            "{error}"
        );

        let error = parse("[broker\n").expect_err("not TOML");
        assert!(!error.to_string().contains('\n'), "{error}");
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/edge-invoker.example.toml"
        ));
        let config = ConfigFile::load(path).expect("the example parses");
        assert_eq!(config.namespace.as_deref(), Some("devices/{device-id}/"));
        assert_eq!(
            (config.response_timeout, config.connect_timeout),
            (Some(30), Some(0))
        );
    }

    #[test]
    fn a_file_that_cannot_be_read_is_named() {
        let error = ConfigFile::load(Path::new("/nonexistent/edge-invoker.toml"))
            .expect_err("no such file");
        assert!(
            error
                .to_string()
                .starts_with("could not read the config file /nonexistent/edge-invoker.toml: "),
            "{error}"
        );
    }
}
