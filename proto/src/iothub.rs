//! Azure IoT Hub's own dialect, as far as both ends of it need: connection strings
//! (device, module and service; symmetric key, ready token, X.509, gateway) and shared
//! access signatures (SAS), signed and verified.
//!
//! A SAS token is
//! `SharedAccessSignature sr={enc(resource)}&sig={enc(base64(HMAC-SHA256(key, enc(resource) + "\n" + expiry)))}&se={expiry}[&skn={policy}]`
//! where `enc` is percent-encoding with upper-case hex (`%2F`; lower case signs another
//! string and so gives another signature) and `skn` names a policy and is not signed.
//! Known answers from Azure's own tests pin this down (see the tests below).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;

/// How long a token signed here lives unless told otherwise: one hour, as the SDKs'.
pub const DEFAULT_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);

/// A connection string, either a device's (or module's) or a service policy's.
#[derive(Clone, PartialEq, Eq)]
pub enum ConnectionString {
    /// `HostName=..;DeviceId=..;SharedAccessKey=..` and its variants.
    Device(DeviceConnectionString),
    /// `HostName=..;SharedAccessKeyName=..;SharedAccessKey=..`.
    Service(ServiceConnectionString),
}

/// A device's (or a module's) connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceConnectionString {
    /// The hub, as tokens name it (`HostName`).
    pub host_name: String,
    /// The device id (`DeviceId`).
    pub device_id: String,
    /// The module id (`ModuleId`), for a module identity.
    pub module_id: Option<String>,
    /// A gateway to connect to instead of the hub (`GatewayHostName`); tokens still
    /// name `host_name`.
    pub gateway_host_name: Option<String>,
    /// How the device proves who it is.
    pub auth: DeviceAuth,
}

/// How a device authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum DeviceAuth {
    /// `SharedAccessKey=`: a base64 key to sign tokens with.
    SharedAccessKey(String),
    /// `SharedAccessSignature=`: a ready token (it cannot be renewed).
    SharedAccessSignature(String),
    /// `x509=true`: a client certificate.
    X509,
}

/// A service policy's connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceConnectionString {
    /// The hub (`HostName`), possibly with a port (`localhost:8443`).
    pub host_name: String,
    /// The policy (`SharedAccessKeyName`), such as `iothubowner`.
    pub key_name: String,
    /// The policy's base64 key (`SharedAccessKey`).
    pub key: String,
}

/// Why a connection string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    /// A segment is not `Name=value`.
    #[error("connection string segment '{0}' is not Name=value")]
    Segment(String),
    /// A name the connection string does not know.
    #[error(
        "connection string has unknown field '{0}' (known: HostName, DeviceId, ModuleId, \
         SharedAccessKey, SharedAccessKeyName, SharedAccessSignature, x509, GatewayHostName)"
    )]
    Unknown(String),
    /// A name given twice.
    #[error("connection string has '{0}' twice")]
    Duplicate(String),
    /// A field that must be there is missing.
    #[error("connection string has no {0}")]
    Missing(&'static str),
    /// Fields that do not go together, or a value that is malformed.
    #[error("connection string is invalid: {0}")]
    Invalid(String),
}

impl FromStr for ConnectionString {
    type Err = ConnectionStringError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const KNOWN: [&str; 8] = [
            "HostName",
            "DeviceId",
            "ModuleId",
            "SharedAccessKey",
            "SharedAccessKeyName",
            "SharedAccessSignature",
            "x509",
            "GatewayHostName",
        ];
        let mut fields: [Option<String>; 8] = Default::default();
        for segment in text.trim().split(';').filter(|s| !s.trim().is_empty()) {
            let (name, value) = segment
                .split_once('=')
                .ok_or_else(|| ConnectionStringError::Segment(segment.to_owned()))?;
            let name = name.trim();
            let index = KNOWN
                .iter()
                .position(|known| known.eq_ignore_ascii_case(name))
                .ok_or_else(|| ConnectionStringError::Unknown(name.to_owned()))?;
            if fields[index].is_some() {
                return Err(ConnectionStringError::Duplicate(KNOWN[index].to_owned()));
            }
            let value = value.trim();
            if value.is_empty() {
                return Err(ConnectionStringError::Invalid(format!(
                    "{} is empty",
                    KNOWN[index]
                )));
            }
            fields[index] = Some(value.to_owned());
        }
        let [
            host_name,
            device_id,
            module_id,
            key,
            key_name,
            signature,
            x509,
            gateway_host_name,
        ] = fields;
        let host_name = host_name.ok_or(ConnectionStringError::Missing("HostName"))?;
        let x509 = match x509.as_deref() {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(v) => {
                return Err(ConnectionStringError::Invalid(format!(
                    "x509 is '{v}', not true or false"
                )));
            }
        };
        if let Some(key) = &key {
            decode_key(key).map_err(|e| ConnectionStringError::Invalid(e.to_string()))?;
        }
        let Some(device_id) = device_id else {
            let key_name = key_name.ok_or(ConnectionStringError::Missing(
                "DeviceId (device) or SharedAccessKeyName (service)",
            ))?;
            if module_id.is_some() || signature.is_some() || x509 || gateway_host_name.is_some() {
                return Err(ConnectionStringError::Invalid(
                    "a service connection string has only HostName, SharedAccessKeyName and \
                     SharedAccessKey"
                        .into(),
                ));
            }
            let key = key.ok_or(ConnectionStringError::Missing("SharedAccessKey"))?;
            return Ok(Self::Service(ServiceConnectionString {
                host_name,
                key_name,
                key,
            }));
        };
        if key_name.is_some() {
            return Err(ConnectionStringError::Invalid(
                "SharedAccessKeyName names a service policy; a device string has none".into(),
            ));
        }
        let auth = match (key, signature, x509) {
            (Some(key), None, false) => DeviceAuth::SharedAccessKey(key),
            (None, Some(token), false) => {
                SasToken::parse(&token)
                    .map_err(|e| ConnectionStringError::Invalid(e.to_string()))?;
                DeviceAuth::SharedAccessSignature(token)
            }
            (None, None, true) => DeviceAuth::X509,
            (None, None, false) => {
                return Err(ConnectionStringError::Missing(
                    "SharedAccessKey, SharedAccessSignature or x509=true",
                ));
            }
            _ => {
                return Err(ConnectionStringError::Invalid(
                    "give one of SharedAccessKey, SharedAccessSignature and x509=true".into(),
                ));
            }
        };
        Ok(Self::Device(DeviceConnectionString {
            host_name,
            device_id,
            module_id,
            gateway_host_name,
            auth,
        }))
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device(device) => device.fmt(f),
            Self::Service(service) => service.fmt(f),
        }
    }
}

/// Secrets stay out of logs: `Debug` shows everything but keys and tokens.
impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device(device) => device.fmt(f),
            Self::Service(service) => service.fmt(f),
        }
    }
}

impl fmt::Display for DeviceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName={};DeviceId={}", self.host_name, self.device_id)?;
        if let Some(module) = &self.module_id {
            write!(f, ";ModuleId={module}")?;
        }
        match &self.auth {
            DeviceAuth::SharedAccessKey(key) => write!(f, ";SharedAccessKey={key}")?,
            DeviceAuth::SharedAccessSignature(token) => {
                write!(f, ";SharedAccessSignature={token}")?;
            }
            DeviceAuth::X509 => write!(f, ";x509=true")?,
        }
        if let Some(gateway) = &self.gateway_host_name {
            write!(f, ";GatewayHostName={gateway}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("gateway_host_name", &self.gateway_host_name)
            .field("auth", &self.auth)
            .finish()
    }
}

/// Shows which kind of credential, never the key or token.
impl fmt::Debug for DeviceAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SharedAccessKey(_) => "SharedAccessKey(<hidden>)",
            Self::SharedAccessSignature(_) => "SharedAccessSignature(<hidden>)",
            Self::X509 => "X509",
        })
    }
}

impl DeviceConnectionString {
    /// The resource a device token names: `{host}/devices/{id}`, plus `/modules/{m}`
    /// for a module.
    pub fn resource(&self) -> String {
        match &self.module_id {
            Some(module) => format!(
                "{}/devices/{}/modules/{module}",
                self.host_name, self.device_id
            ),
            None => format!("{}/devices/{}", self.host_name, self.device_id),
        }
    }

    /// The host to connect to: the gateway when there is one, else the hub.
    pub fn connect_host(&self) -> &str {
        self.gateway_host_name.as_deref().unwrap_or(&self.host_name)
    }
}

impl fmt::Display for ServiceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.host_name, self.key_name, self.key
        )
    }
}

impl fmt::Debug for ServiceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl ServiceConnectionString {
    /// A token for this policy on the hub, valid until `expiry` (unix seconds).
    ///
    /// # Errors
    /// When the key is not base64.
    pub fn token(&self, expiry: u64) -> Result<String, SasError> {
        sign(&self.host_name, &self.key, expiry, Some(&self.key_name))
    }
}

/// Why a token could not be made, read or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The key is not base64, or empty.
    #[error("the shared access key is not a base64 key")]
    BadKey,
    /// The token does not have the `SharedAccessSignature sr=..&sig=..&se=..` form.
    #[error("malformed shared access signature: {0}")]
    Malformed(String),
    /// The signature does not match the key.
    #[error("the shared access signature does not match the key")]
    BadSignature,
    /// The token's expiry is past.
    #[error("the shared access signature expired at {expiry} (now {now})")]
    Expired {
        /// When it expired, unix seconds.
        expiry: u64,
        /// Now, unix seconds.
        now: u64,
    },
}

/// A parsed SAS token. `resource` is percent-decoded; `signed_resource` is exactly as
/// the token carried it, which is what was signed.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// The resource the token grants, decoded (`hub/devices/id`).
    pub resource: String,
    /// `sr` as written in the token (encoded), the string that was signed.
    pub signed_resource: String,
    /// The signature, base64 (decoded from the token's `sig`).
    pub signature: String,
    /// Expiry, unix seconds.
    pub expiry: u64,
    /// The policy (`skn`), for service tokens.
    pub key_name: Option<String>,
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl SasToken {
    /// Reads `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]` (fields in any order).
    ///
    /// # Errors
    /// [`SasError::Malformed`] saying what is missing or wrong.
    pub fn parse(token: &str) -> Result<Self, SasError> {
        let malformed = |why: &str| SasError::Malformed(why.to_owned());
        let rest = token
            .trim()
            .strip_prefix("SharedAccessSignature ")
            .ok_or_else(|| malformed("it does not start with 'SharedAccessSignature '"))?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in rest.trim().split('&') {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| malformed(&format!("'{pair}' is not name=value")))?;
            let slot = match name {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            if slot.replace(value.to_owned()).is_some() {
                return Err(malformed(&format!("'{name}' is given twice")));
            }
        }
        let signed_resource = sr.ok_or_else(|| malformed("no sr (resource)"))?;
        let signature = decode(&sig.ok_or_else(|| malformed("no sig (signature)"))?)
            .ok_or_else(|| malformed("sig is not percent-encoded UTF-8"))?;
        let expiry = se
            .ok_or_else(|| malformed("no se (expiry)"))?
            .parse()
            .map_err(|_| malformed("se (expiry) is not a number of seconds"))?;
        let resource =
            decode(&signed_resource).ok_or_else(|| malformed("sr is not percent-encoded UTF-8"))?;
        let key_name = skn
            .map(|s| decode(&s).ok_or_else(|| malformed("skn is not percent-encoded UTF-8")))
            .transpose()?;
        Ok(Self {
            resource,
            signed_resource,
            signature,
            expiry,
            key_name,
        })
    }

    /// Checks that the token was signed with `key` (base64) and has not expired at `now`
    /// (unix seconds). The signature is compared in constant time.
    ///
    /// # Errors
    /// [`SasError::BadKey`], [`SasError::BadSignature`] or [`SasError::Expired`].
    pub fn verify(&self, key: &str, now: u64) -> Result<(), SasError> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &decode_key(key)?);
        let signature = BASE64
            .decode(self.signature.as_bytes())
            .map_err(|_| SasError::BadSignature)?;
        let signed = format!("{}\n{}", self.signed_resource, self.expiry);
        hmac::verify(&key, signed.as_bytes(), &signature).map_err(|_| SasError::BadSignature)?;
        if self.expiry <= now {
            return Err(SasError::Expired {
                expiry: self.expiry,
                now,
            });
        }
        Ok(())
    }
}

/// Signs a token for `resource` (not yet encoded) with `key` (base64), valid until
/// `expiry` (unix seconds); `key_name` adds `skn` for a service policy.
///
/// # Errors
/// [`SasError::BadKey`] when the key is not base64.
pub fn sign(
    resource: &str,
    key: &str,
    expiry: u64,
    key_name: Option<&str>,
) -> Result<String, SasError> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &decode_key(key)?);
    let encoded = encode(resource);
    let tag = hmac::sign(&key, format!("{encoded}\n{expiry}").as_bytes());
    let sig = encode(&BASE64.encode(tag.as_ref()));
    let mut token = format!("SharedAccessSignature sr={encoded}&sig={sig}&se={expiry}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&encode(name));
    }
    Ok(token)
}

/// A new random key: 32 bytes, base64, as IoT Hub generates them.
pub fn generate_key() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    // The system's random source does not fail on the platforms ring supports; should
    // it, a key of zeros would be worse than a panic at registration time.
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source failed");
    BASE64.encode(bytes)
}

/// Seconds since the unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn decode_key(key: &str) -> Result<Vec<u8>, SasError> {
    match BASE64.decode(key.trim().as_bytes()) {
        Ok(bytes) if !bytes.is_empty() => Ok(bytes),
        _ => Err(SasError::BadKey),
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, with upper-case
/// hex, as the SDKs' `urlencode` does.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Percent-decodes `text` (`+` stays `+`); `None` when an escape is malformed or the
/// result is not UTF-8.
pub fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The api-version devices name in their MQTT username, as the SDKs do.
pub const API_VERSION: &str = "2021-04-12";

/// The path of MQTT over WebSockets on IoT Hub's HTTPS port.
pub const WEBSOCKET_PATH: &str = "/$iothub/websocket";

/// How a device reaches IoT Hub: the SDKs' `MQTT` and `MQTT_WS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HubTransport {
    /// MQTT 3.1.1 over TLS, port 8883.
    #[default]
    Mqtt,
    /// MQTT over WebSockets over TLS, port 443, at [`WEBSOCKET_PATH`].
    MqttWs,
}

impl HubTransport {
    /// IoT Hub's port for this transport.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Mqtt => 8883,
            Self::MqttWs => 443,
        }
    }
}

impl FromStr for HubTransport {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "mqtt" => Ok(Self::Mqtt),
            "mqtt-ws" => Ok(Self::MqttWs),
            other => Err(format!(
                "unknown transport '{other}' (expected mqtt or mqtt-ws)"
            )),
        }
    }
}

impl fmt::Display for HubTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mqtt => "mqtt",
            Self::MqttWs => "mqtt-ws",
        })
    }
}

/// Why a device cannot connect to IoT Hub with what it was given.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The connection string's key cannot sign a token.
    #[error("cannot sign a token with the connection string's SharedAccessKey: {0}")]
    Sas(#[from] SasError),
    /// The connection string's ready token cannot be read.
    #[error("the connection string's SharedAccessSignature cannot be used: {0}")]
    ReadyToken(SasError),
    /// The connection string's ready token expired; it cannot be renewed here.
    #[error(
        "the connection string's SharedAccessSignature expired at {expiry} (now {now}); a ready \
         token cannot be renewed: give a connection string with SharedAccessKey, or a fresh token"
    )]
    ReadyTokenExpired {
        /// When it expired, unix seconds.
        expiry: u64,
        /// Now, unix seconds.
        now: u64,
    },
    /// `x509=true` without a client certificate and key.
    #[error(
        "the connection string says x509=true: give the device's certificate and key (--cert-file and --key-file)"
    )]
    X509WithoutCertificate,
    /// TLS cannot be set up.
    #[error(transparent)]
    Tls(#[from] crate::transport::TransportError),
}

/// Everything a device needs to connect to IoT Hub (or to a gateway, or edge-hub).
#[derive(Clone)]
pub struct DeviceEndpoint {
    /// Who the device is, which hub, and how it authenticates.
    pub connection: DeviceConnectionString,
    /// MQTT or MQTT over WebSockets.
    pub transport: HubTransport,
    /// The port, when not IoT Hub's for the transport (tests, gateways).
    pub port: Option<u16>,
    /// TLS: the CA to trust (the system's roots if none), and the client certificate
    /// for `x509=true`.
    pub tls: crate::transport::TlsFiles,
    /// How long the tokens signed here live.
    pub token_lifetime: std::time::Duration,
}

impl fmt::Debug for DeviceEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceEndpoint")
            .field("connection", &self.connection)
            .field("transport", &self.transport)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("token_lifetime", &self.token_lifetime)
            .finish()
    }
}

impl DeviceEndpoint {
    /// The port connected to.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(self.transport.default_port())
    }

    /// The MQTT client id: the device id, or `{device}/{module}` for a module.
    pub fn client_id(&self) -> String {
        match &self.connection.module_id {
            Some(module) => format!("{}/{module}", self.connection.device_id),
            None => self.connection.device_id.clone(),
        }
    }

    /// The MQTT username: `{hub}/{client id}/?api-version=..`.
    pub fn username(&self) -> String {
        format!(
            "{}/{}/?api-version={API_VERSION}",
            self.connection.host_name,
            self.client_id()
        )
    }

    /// Whether a token can be signed here (a `SharedAccessKey`), so that an expiring
    /// or refused token is a reason to sign afresh.
    pub fn signs_tokens(&self) -> bool {
        matches!(self.connection.auth, DeviceAuth::SharedAccessKey(_))
    }

    /// The MQTT password for a connection made at `now` (unix seconds), and when it
    /// expires: a token signed for [`DeviceEndpoint::token_lifetime`], the connection
    /// string's ready token, or none with X.509.
    ///
    /// # Errors
    /// When the key cannot sign, or the ready token is malformed or expired.
    pub fn password(&self, now: u64) -> Result<(String, Option<u64>), EndpointError> {
        match &self.connection.auth {
            DeviceAuth::SharedAccessKey(key) => {
                let expiry = now.saturating_add(self.token_lifetime.as_secs().max(1));
                Ok((
                    sign(&self.connection.resource(), key, expiry, None)?,
                    Some(expiry),
                ))
            }
            DeviceAuth::SharedAccessSignature(token) => {
                let parsed = SasToken::parse(token).map_err(EndpointError::ReadyToken)?;
                if parsed.expiry <= now {
                    return Err(EndpointError::ReadyTokenExpired {
                        expiry: parsed.expiry,
                        now,
                    });
                }
                Ok((token.clone(), Some(parsed.expiry)))
            }
            DeviceAuth::X509 => Ok((String::new(), None)),
        }
    }

    /// The MQTT options of a connection made at `now` (unix seconds), and when its
    /// token expires (none with X.509): TLS always, over WebSockets for
    /// [`HubTransport::MqttWs`]; the username and password IoT Hub expects; the
    /// limits of [`crate::client::options`].
    ///
    /// # Errors
    /// As [`DeviceEndpoint::password`], and when TLS cannot be set up.
    pub fn options(
        &self,
        keep_alive: std::time::Duration,
        now: u64,
    ) -> Result<(rumqttc::MqttOptions, Option<u64>), EndpointError> {
        if matches!(self.connection.auth, DeviceAuth::X509)
            && (self.tls.cert_file.is_none() || self.tls.key_file.is_none())
        {
            return Err(EndpointError::X509WithoutCertificate);
        }
        let (password, expiry) = self.password(now)?;
        let tls = rumqttc::TlsConfiguration::Rustls(self.tls.client_config()?);
        let host = self.connection.connect_host();
        let (address, transport) = match self.transport {
            HubTransport::Mqtt => (host.to_owned(), rumqttc::Transport::Tls(tls)),
            HubTransport::MqttWs => (
                format!("wss://{host}:{}{WEBSOCKET_PATH}", self.port()),
                rumqttc::Transport::Wss(tls),
            ),
        };
        let mut options = rumqttc::MqttOptions::new(self.client_id(), address, self.port());
        options
            .set_clean_session(true)
            .set_keep_alive(keep_alive.max(std::time::Duration::from_secs(1)))
            .set_max_packet_size(crate::client::MAX_PACKET, crate::client::MAX_PACKET)
            .set_transport(transport)
            .set_credentials(self.username(), password);
        Ok((options, expiry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "+XLy+MVZ+aTeOnVzN2kLeB16O+kSxmz6g3rS6fAf6rw=";

    fn sig_of(token: &str) -> &str {
        token
            .split('&')
            .find_map(|p| p.strip_prefix("sig="))
            .expect("token has a sig")
    }

    #[test]
    fn device_token_matches_azure_cli_known_answer() {
        let token = sign(
            "iot-hub-for-test.azure-devices.net/devices/iot-device-for-test",
            KEY,
            1471940363,
            None,
        )
        .expect("signs");
        assert_eq!(
            sig_of(&token),
            "SIumZ1ACqqPJZ2okHDlW9MSYKykEpqsQY3z6FMOICd4%3D"
        );
        assert_eq!(
            token,
            "SharedAccessSignature sr=iot-hub-for-test.azure-devices.net%2Fdevices%2Fiot-device-for-test&sig=SIumZ1ACqqPJZ2okHDlW9MSYKykEpqsQY3z6FMOICd4%3D&se=1471940363"
        );
    }

    #[test]
    fn service_token_matches_known_answer_and_skn_is_not_signed() {
        let token = sign(
            "iot-hub-for-test.azure-devices.net",
            KEY,
            1471940363,
            Some("iothubowner"),
        )
        .expect("signs");
        assert_eq!(
            sig_of(&token),
            "770sPjjYxRYpNz8%2FhEN7XR5XU5KDGYGTinSP8YyeTXw%3D"
        );
        assert!(token.ends_with("&skn=iothubowner"));
    }

    #[test]
    fn node_sdk_known_answer() {
        let key = BASE64.encode("password");
        let token = sign("uri", &key, 12345, None).expect("signs");
        assert_eq!(
            sig_of(&token),
            "kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk%3D"
        );
    }

    #[test]
    fn verify_accepts_its_own_tokens_and_refuses_other_keys_and_expiry() {
        let token = sign("hub:8443/devices/d1", KEY, 2000, None).expect("signs");
        let parsed = SasToken::parse(&token).expect("parses");
        assert_eq!(parsed.resource, "hub:8443/devices/d1");
        assert_eq!(parsed.signed_resource, "hub%3A8443%2Fdevices%2Fd1");
        assert_eq!(parsed.verify(KEY, 1999), Ok(()));
        assert_eq!(
            parsed.verify(KEY, 2000),
            Err(SasError::Expired {
                expiry: 2000,
                now: 2000
            })
        );
        let other = generate_key();
        assert_eq!(parsed.verify(&other, 1), Err(SasError::BadSignature));
        // A changed expiry breaks the signature.
        let forged = token.replace("se=2000", "se=9999");
        let forged = SasToken::parse(&forged).expect("parses");
        assert_eq!(forged.verify(KEY, 1), Err(SasError::BadSignature));
    }

    #[test]
    fn lower_case_encoding_signs_something_else() {
        let token = sign("a/b", KEY, 10, None).expect("signs");
        let lower = token.replace("%2F", "%2f");
        let parsed = SasToken::parse(&lower).expect("parses");
        assert_eq!(parsed.resource, "a/b");
        assert_eq!(parsed.verify(KEY, 1), Err(SasError::BadSignature));
    }

    #[test]
    fn malformed_tokens_say_why() {
        for (token, why) in [
            ("sr=a&sig=b&se=1", "SharedAccessSignature"),
            ("SharedAccessSignature sig=b&se=1", "no sr"),
            ("SharedAccessSignature sr=a&se=1", "no sig"),
            ("SharedAccessSignature sr=a&sig=b", "no se"),
            ("SharedAccessSignature sr=a&sig=b&se=x", "not a number"),
            ("SharedAccessSignature sr=%zz&sig=b&se=1", "sr is not"),
            ("SharedAccessSignature sr=a&sr=b&sig=b&se=1", "twice"),
        ] {
            let error = SasToken::parse(token).expect_err(token).to_string();
            assert!(error.contains(why), "{token}: {error}");
        }
        assert_eq!(sign("r", "not base64!", 1, None), Err(SasError::BadKey));
    }

    #[test]
    fn device_connection_strings_round_trip() {
        for text in [
            "HostName=hub.example;DeviceId=d1;SharedAccessKey=AAAA",
            "HostName=hub.example;DeviceId=d1;ModuleId=m1;SharedAccessKey=AAAA",
            "HostName=hub.example;DeviceId=d1;x509=true",
            "HostName=hub.example;DeviceId=d1;SharedAccessKey=AAAA;GatewayHostName=gw.local",
            "HostName=hub.example;DeviceId=d1;SharedAccessSignature=SharedAccessSignature sr=hub.example%2Fdevices%2Fd1&sig=abc%3D&se=1",
        ] {
            let parsed: ConnectionString = text.parse().expect(text);
            assert_eq!(parsed.to_string(), text);
        }
        let Ok(ConnectionString::Device(device)) =
            "hostname=h;deviceid=d;ModuleId=m;SharedAccessKey=AAAA;GatewayHostName=g;"
                .parse::<ConnectionString>()
        else {
            panic!("a device string")
        };
        assert_eq!(device.resource(), "h/devices/d/modules/m");
        assert_eq!(device.connect_host(), "g");
        assert_eq!(device.auth, DeviceAuth::SharedAccessKey("AAAA".into()));
    }

    #[test]
    fn service_connection_string_round_trips_and_signs_its_host() {
        let text = "HostName=localhost:18443;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAA";
        let Ok(ConnectionString::Service(service)) = text.parse::<ConnectionString>() else {
            panic!("a service string")
        };
        assert_eq!(service.to_string(), text);
        let token = service.token(100).expect("signs");
        let parsed = SasToken::parse(&token).expect("parses");
        assert_eq!(parsed.signed_resource, "localhost%3A18443");
        assert_eq!(parsed.key_name.as_deref(), Some("iothubowner"));
        assert_eq!(parsed.verify("AAAA", 1), Ok(()));
        assert!(
            !format!("{service:?}").contains("AAAA"),
            "Debug hides the key"
        );
    }

    #[test]
    fn bad_connection_strings_say_why() {
        for (text, why) in [
            ("DeviceId=d;SharedAccessKey=AAAA", "no HostName"),
            ("HostName=h;SharedAccessKey=AAAA", "no DeviceId"),
            ("HostName=h;DeviceId=d", "no SharedAccessKey"),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=AAAA;x509=true",
                "one of",
            ),
            ("HostName=h;DeviceId=d;Key=AAAA", "unknown field 'Key'"),
            ("HostName=h;HostName=i;DeviceId=d;x509=true", "twice"),
            ("HostName=h;DeviceId=d;SharedAccessKey=!!", "base64"),
            ("HostName=h;DeviceId;x509=true", "not Name=value"),
            ("HostName=h;DeviceId=d;x509=maybe", "not true or false"),
            ("HostName=h;SharedAccessKeyName=p", "no SharedAccessKey"),
            (
                "HostName=h;DeviceId=d;SharedAccessSignature=abc",
                "malformed",
            ),
        ] {
            let error = text
                .parse::<ConnectionString>()
                .expect_err(text)
                .to_string();
            assert!(error.contains(why), "{text}: {error}");
        }
    }

    #[test]
    fn encoding_is_upper_case_and_decodes_back() {
        assert_eq!(encode("a/b:c=d+e f"), "a%2Fb%3Ac%3Dd%2Be%20f");
        assert_eq!(decode("a%2fb%2Fc").as_deref(), Some("a/b/c"));
        assert_eq!(decode("%4"), None);
    }
}
