//! Where the broker is: `mqtt://host:port`, or `mqtts://host:port` over TLS, as the
//! host and the invoker take it.

use std::fmt;
use std::str::FromStr;

/// The MQTT port when a URL names none.
pub const DEFAULT_PORT: u16 = 1883;

/// The MQTT-over-TLS port when an `mqtts://` URL names none.
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// A broker address parsed from `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether the URL asks for TLS (`mqtts://`).
    pub tls: bool,
}

impl BrokerUrl {
    /// A plain-TCP URL for `host:port`.
    pub fn tcp(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            tls: false,
        }
    }
}

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker URL {url:?}: {reason} (expected mqtt://host:port or mqtts://host:port)")]
pub struct BrokerUrlError {
    url: String,
    reason: &'static str,
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let fail = |reason| BrokerUrlError {
            url: url.to_owned(),
            reason,
        };
        let (rest, tls) = match (url.strip_prefix("mqtt://"), url.strip_prefix("mqtts://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err(fail("the scheme must be mqtt:// or mqtts://")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('@') {
            return Err(fail("a path or user info is not allowed"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| fail("unclosed '['"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| fail("junk after ']'"))?,
                ),
            };
            (host, port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(fail("no host"));
        }
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| fail("the port is not a number from 1 to 65535"))?,
            None if tls => DEFAULT_TLS_PORT,
            None => DEFAULT_PORT,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

/// As a string in a config file: `broker = "mqtt://host:port"`.
impl<'de> serde::Deserialize<'de> for BrokerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let url = String::deserialize(de)?;
        url.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<BrokerUrl, BrokerUrlError> {
        url.parse()
    }

    #[test]
    fn parses_host_port_and_scheme() {
        assert_eq!(
            parse("mqtt://127.0.0.1:1884"),
            Ok(BrokerUrl::tcp("127.0.0.1", 1884))
        );
        assert_eq!(
            parse("mqtt://broker.local"),
            Ok(BrokerUrl::tcp("broker.local", 1883))
        );
        assert_eq!(parse("mqtt://[::1]:1885/"), Ok(BrokerUrl::tcp("::1", 1885)));
        assert_eq!(
            parse("mqtts://broker.local"),
            Ok(BrokerUrl {
                host: "broker.local".into(),
                port: 8883,
                tls: true
            })
        );
        assert_eq!(
            parse("mqtt://[::1]:1885").map(|u| u.to_string()),
            Ok("mqtt://[::1]:1885".into())
        );
        assert_eq!(
            parse("mqtts://h:9").map(|u| u.to_string()),
            Ok("mqtts://h:9".into())
        );
    }

    #[test]
    fn refuses_what_it_cannot_connect_to() {
        for bad in [
            "127.0.0.1:1883",
            "tcp://h:1",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://h:x",
            "mqtt://h/topic",
            "mqtt://u@h",
            "mqtt://[::1]junk",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
