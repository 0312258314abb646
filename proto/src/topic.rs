//! Topics: a device's namespace and IoT Hub's direct-method topics under it.
//!
//! | what | topic |
//! |---|---|
//! | request | `NS$iothub/methods/POST/{method}/?$rid={request-id}` |
//! | response | `NS$iothub/methods/res/{status}/?$rid={request-id}` |
//! | presence | `NS$edge/presence` |
//! | catalog | `NS$edge/methods` |
//!
//! Parsing never panics: anything that is not a well-formed request is an error that
//! says whether the request can still be answered (it has a usable request id) or not.

use std::fmt;
use std::time::Duration;

/// The default namespace template: every device under `devices/{device-id}/`.
pub const DEFAULT_NAMESPACE: &str = "devices/{device-id}/";

/// The placeholder a namespace template replaces with the device id.
pub const DEVICE_ID_PLACEHOLDER: &str = "{device-id}";

/// Longest method name accepted, in bytes.
pub const MAX_METHOD_LEN: usize = 128;

/// Longest request id accepted, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Longest device id accepted, in bytes (IoT Hub's limit).
pub const MAX_DEVICE_ID_LEN: usize = 128;

const POST: &str = "$iothub/methods/POST/";
const RES: &str = "$iothub/methods/res/";
const RID: &str = "$rid=";
const TIMEOUT: &str = "$timeout-ms=";

/// A device's topic prefix, `devices/{device-id}/` unless configured otherwise.
///
/// It is either empty (for brokers that mount each client under a prefix of their own)
/// or ends with `/`, and holds no MQTT wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    prefix: String,
}

/// Why a name (device id, method, namespace) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{what} is empty")]
    Empty {
        /// What was being named.
        what: &'static str,
    },
    /// The name is longer than the protocol allows.
    #[error("{what} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// What was being named.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name holds a character the protocol does not allow there.
    #[error("{what} contains {found}, which is not allowed ({rule})")]
    BadChar {
        /// What was being named.
        what: &'static str,
        /// The offending character, quoted or as a code point.
        found: String,
        /// Which characters are allowed.
        rule: &'static str,
    },
    /// The namespace template is not empty and does not end with `/`.
    #[error("namespace {0:?} must be empty or end with '/'")]
    NamespaceEnd(String),
    /// The namespace template does not hold `{device-id}` once as a whole topic level,
    /// so no MQTT wildcard stands for every device.
    #[error(
        "namespace {0:?} does not hold {{device-id}} once as a whole topic level, so devices cannot be read all at once"
    )]
    NoDeviceLevel(String),
}

impl Namespace {
    /// The namespace of `device_id` under `template`, in which `{device-id}` stands
    /// for the device id (see [`DEFAULT_NAMESPACE`]).
    ///
    /// # Errors
    /// When the device id is not a valid IoT Hub device id, or the resulting prefix
    /// holds a wildcard or does not end with `/`.
    pub fn new(template: &str, device_id: &str) -> Result<Self, NameError> {
        check_device_id(device_id)?;
        let prefix = template.replace(DEVICE_ID_PLACEHOLDER, device_id);
        if prefix.contains(['+', '#']) || prefix.contains('\0') {
            return Err(NameError::BadChar {
                what: "namespace",
                found: "a wildcard".into(),
                rule: "no '+', '#' or NUL",
            });
        }
        if !prefix.is_empty() && !prefix.ends_with('/') {
            return Err(NameError::NamespaceEnd(prefix));
        }
        Ok(Self { prefix })
    }

    /// The namespace of `device_id` under the default template `devices/{device-id}/`.
    ///
    /// # Errors
    /// When the device id is not a valid IoT Hub device id.
    pub fn for_device(device_id: &str) -> Result<Self, NameError> {
        Self::new(DEFAULT_NAMESPACE, device_id)
    }

    /// The prefix of every device's namespace under `template` at once, with MQTT's
    /// single-level wildcard `+` for the device id: `devices/+/` for the default
    /// template. A caller subscribes to it followed by `$edge/presence` to read every
    /// device's presence; the device id is the topic level at
    /// [`Namespace::device_level`].
    ///
    /// # Errors
    /// [`NameError::NoDeviceLevel`] when `{device-id}` is not in the template exactly
    /// once as a whole topic level (`site-{device-id}/` cannot be a wildcard), and the
    /// errors of [`Namespace::new`] for a template that holds a wildcard or does not end
    /// with `/`.
    pub fn any_device(template: &str) -> Result<String, NameError> {
        let whole_level = template
            .split('/')
            .filter(|level| level.contains(DEVICE_ID_PLACEHOLDER))
            .collect::<Vec<_>>();
        if whole_level != [DEVICE_ID_PLACEHOLDER] {
            return Err(NameError::NoDeviceLevel(template.to_owned()));
        }
        // Any valid device id checks the rest of the template.
        Self::new(template, "d")?;
        Ok(template.replace(DEVICE_ID_PLACEHOLDER, "+"))
    }

    /// Which topic level (from 0) of a topic under `template` is the device id, when
    /// [`Namespace::any_device`] accepts the template.
    pub fn device_level(template: &str) -> Option<usize> {
        template
            .split('/')
            .position(|level| level == DEVICE_ID_PLACEHOLDER)
    }

    /// The prefix itself, such as `devices/my-device/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The filter a device subscribes to for its requests.
    pub fn request_filter(&self) -> String {
        format!("{}{POST}#", self.prefix)
    }

    /// The filter a caller subscribes to for the device's responses.
    pub fn response_filter(&self) -> String {
        format!("{}{RES}#", self.prefix)
    }

    /// The topic a caller publishes a request for `method` on.
    pub fn request_topic(&self, method: &str, request_id: &str) -> String {
        format!("{}{POST}{method}/?{RID}{request_id}", self.prefix)
    }

    /// The request topic with the caller's timeout as the `$timeout-ms` property, so
    /// that the device ends the handler in time to answer before the caller gives up.
    /// Devices that do not know the property ignore it (it follows `$rid`).
    pub fn request_topic_with_timeout(
        &self,
        method: &str,
        request_id: &str,
        timeout: Duration,
    ) -> String {
        format!(
            "{}{POST}{method}/?{RID}{request_id}&{TIMEOUT}{}",
            self.prefix,
            timeout.as_millis()
        )
    }

    /// The topic a device publishes its answer to request `request_id` on.
    pub fn response_topic(&self, status: u16, request_id: &str) -> String {
        format!("{}{RES}{status}/?{RID}{request_id}", self.prefix)
    }

    /// The retained presence topic.
    pub fn presence_topic(&self) -> String {
        format!("{}$edge/presence", self.prefix)
    }

    /// The retained method-catalog topic.
    pub fn catalog_topic(&self) -> String {
        format!("{}$edge/methods", self.prefix)
    }

    /// Parses a request topic received on [`Namespace::request_filter`].
    ///
    /// # Errors
    /// See [`RequestTopicError`]: whether the request can be answered depends on whether
    /// its request id could be read.
    pub fn parse_request<'t>(&self, topic: &'t str) -> Result<RequestTopic<'t>, RequestTopicError> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix(POST))
            .ok_or(RequestTopicError::NotARequest)?;
        // `{method}/?{properties}`: the method is everything before the last level.
        let (method, properties) = rest
            .rsplit_once('/')
            .ok_or(RequestTopicError::NoRequestId)?;
        let request_id = parse_request_id(properties)?;
        if let Err(reason) = check_method(method) {
            return Err(RequestTopicError::BadMethod {
                request_id: request_id.to_owned(),
                reason,
            });
        }
        let timeout = property(properties, TIMEOUT)
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis);
        Ok(RequestTopic {
            method,
            request_id,
            timeout,
        })
    }

    /// Parses a response topic received on [`Namespace::response_filter`]: `None` when
    /// the topic is not a response of this namespace, or its status or request id cannot
    /// be read.
    pub fn parse_response<'t>(&self, topic: &'t str) -> Option<ResponseTopic<'t>> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(RES)?;
        parse_response_levels(rest)
    }

    /// Parses a response topic of any namespace, for a caller that waits on many devices
    /// at once and finds the call by request id: the namespace prefix the response was
    /// published under (to compare with the call's [`Namespace::prefix`]), and the
    /// response. `None` as for [`Namespace::parse_response`]. The prefix is taken to end
    /// at the first `$iothub/methods/res/`, so a namespace that itself contains that
    /// text is not recognised.
    pub fn parse_any_response(topic: &str) -> Option<(&str, ResponseTopic<'_>)> {
        let at = topic.find(RES)?;
        let prefix = &topic[..at];
        if !prefix.is_empty() && !prefix.ends_with('/') {
            return None;
        }
        Some((prefix, parse_response_levels(&topic[at + RES.len()..])?))
    }
}

/// A well-formed request topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTopic<'t> {
    /// The method the caller named, checked with [`check_method`].
    pub method: &'t str,
    /// The caller's request id, checked with [`check_request_id`].
    pub request_id: &'t str,
    /// How long the caller waits for the answer (`$timeout-ms`), when it said; a value
    /// that is not a number of milliseconds is ignored.
    pub timeout: Option<Duration>,
}

/// A well-formed response topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseTopic<'t> {
    /// The status the device answered with.
    pub status: u16,
    /// The request id the response answers.
    pub request_id: &'t str,
}

/// Why a request topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestTopicError {
    /// Not `NS$iothub/methods/POST/...`: not a request of this device at all.
    #[error("not a method request topic of this device")]
    NotARequest,
    /// No `?$rid=` property: there is no topic to answer on.
    #[error("the topic has no request id ('?$rid=...')")]
    NoRequestId,
    /// The request id is there but unusable: there is no topic to answer on.
    #[error("bad request id: {0}")]
    BadRequestId(NameError),
    /// The method name is invalid; the request can be answered with 400.
    #[error("bad method name: {reason}")]
    BadMethod {
        /// The request id to answer on.
        request_id: String,
        /// What is wrong with the method name.
        reason: NameError,
    },
}

impl RequestTopicError {
    /// The request id to answer on, when the request can be answered at all.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::BadMethod { request_id, .. } => Some(request_id),
            _ => None,
        }
    }
}

/// Reads `{status}/?$rid={request-id}`, the levels of a response topic after `res/`.
fn parse_response_levels(rest: &str) -> Option<ResponseTopic<'_>> {
    let (status, properties) = rest.split_once('/')?;
    let status = status.parse().ok()?;
    let request_id = parse_request_id(properties).ok()?;
    Some(ResponseTopic { status, request_id })
}

/// The value of property `key` (with its `=`) in a topic's last level, `?a=1&b=2`.
fn property<'t>(properties: &'t str, key: &str) -> Option<&'t str> {
    properties
        .strip_prefix('?')?
        .split('&')
        .find_map(|property| property.strip_prefix(key))
}

/// Reads `$rid` from a topic's last level, `?$rid=42` or `?$rid=42&other=x`.
fn parse_request_id(properties: &str) -> Result<&str, RequestTopicError> {
    let request_id = property(properties, RID).ok_or(RequestTopicError::NoRequestId)?;
    check_request_id(request_id).map_err(RequestTopicError::BadRequestId)?;
    Ok(request_id)
}

/// Checks a method name: 1 to 128 bytes of printable ASCII, without space, `/`, `+`,
/// `#`, `?` or `&` (which would make the topic ambiguous).
///
/// # Errors
/// Names the first rule the name breaks.
pub fn check_method(method: &str) -> Result<(), NameError> {
    check_name(
        "method name",
        method,
        MAX_METHOD_LEN,
        |c| c.is_ascii_graphic() && !matches!(c, '/' | '+' | '#' | '?' | '&'),
        "printable ASCII without space, '/', '+', '#', '?' or '&'",
    )
}

/// Checks a request id: 1 to 128 bytes of printable ASCII, without space, `/`, `+`,
/// `#` or `&`.
///
/// # Errors
/// Names the first rule the id breaks.
pub fn check_request_id(request_id: &str) -> Result<(), NameError> {
    check_name(
        "request id",
        request_id,
        MAX_REQUEST_ID_LEN,
        |c| c.is_ascii_graphic() && !matches!(c, '/' | '+' | '#' | '&'),
        "printable ASCII without space, '/', '+', '#' or '&'",
    )
}

/// Checks a device id as IoT Hub does: 1 to 128 characters, ASCII letters and digits
/// and `- . % _ * ? ! ( ) , : = @ $ '`.
///
/// # Errors
/// Names the first rule the id breaks.
pub fn check_device_id(device_id: &str) -> Result<(), NameError> {
    check_name(
        "device id",
        device_id,
        MAX_DEVICE_ID_LEN,
        |c| c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(c),
        "ASCII letters, digits and - . % _ * ? ! ( ) , : = @ $ '",
    )
}

fn check_name(
    what: &'static str,
    name: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    rule: &'static str,
) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            what,
            len: name.len(),
            max,
        });
    }
    match name.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(NameError::BadChar {
            what,
            found: Printable(c).to_string(),
            rule,
        }),
        None => Ok(()),
    }
}

/// A character shown so that a log reader can see it: quoted when printable, as a
/// code point otherwise.
struct Printable(char);

impl fmt::Display for Printable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0)
        } else {
            write!(f, "U+{:04X}", u32::from(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace::for_device("my-device").expect("valid device id")
    }

    #[test]
    fn builds_iot_hub_topics_under_the_device_namespace() {
        let ns = ns();
        assert_eq!(
            ns.request_filter(),
            "devices/my-device/$iothub/methods/POST/#"
        );
        assert_eq!(
            ns.response_filter(),
            "devices/my-device/$iothub/methods/res/#"
        );
        assert_eq!(
            ns.request_topic("DeviceMethod", "7"),
            "devices/my-device/$iothub/methods/POST/DeviceMethod/?$rid=7"
        );
        assert_eq!(
            ns.response_topic(200, "7"),
            "devices/my-device/$iothub/methods/res/200/?$rid=7"
        );
        assert_eq!(ns.presence_topic(), "devices/my-device/$edge/presence");
        assert_eq!(ns.catalog_topic(), "devices/my-device/$edge/methods");
    }

    #[test]
    fn an_empty_namespace_gives_iot_hubs_bare_topics() {
        let ns = Namespace::new("", "dev").expect("empty namespace is allowed");
        assert_eq!(ns.request_filter(), "$iothub/methods/POST/#");
        let parsed = ns
            .parse_request("$iothub/methods/POST/reboot/?$rid=1")
            .expect("bare IoT Hub topic parses");
        assert_eq!(parsed.method, "reboot");
    }

    #[test]
    fn a_request_topic_round_trips() {
        let ns = ns();
        let topic = ns.request_topic("DeviceMethod", "abc-1");
        let parsed = ns.parse_request(&topic).expect("own topic parses");
        assert_eq!(
            parsed,
            RequestTopic {
                method: "DeviceMethod",
                request_id: "abc-1",
                timeout: None,
            }
        );
    }

    #[test]
    fn the_callers_timeout_travels_after_the_request_id() {
        let ns = ns();
        let topic = ns.request_topic_with_timeout("m", "r1", Duration::from_millis(4750));
        assert_eq!(
            topic,
            "devices/my-device/$iothub/methods/POST/m/?$rid=r1&$timeout-ms=4750"
        );
        let parsed = ns.parse_request(&topic).expect("parses");
        assert_eq!(
            (parsed.request_id, parsed.timeout),
            ("r1", Some(Duration::from_millis(4750)))
        );
        let odd = ns
            .parse_request("devices/my-device/$iothub/methods/POST/m/?$rid=r&$timeout-ms=soon")
            .expect("parses");
        assert_eq!(
            odd.timeout, None,
            "a timeout that is not a number is ignored"
        );
    }

    #[test]
    fn the_request_id_is_read_among_other_properties() {
        let parsed = ns()
            .parse_request("devices/my-device/$iothub/methods/POST/m/?a=1&$rid=9&b=2")
            .expect("property bag parses");
        assert_eq!(parsed.request_id, "9");
    }

    #[test]
    fn a_response_topic_round_trips() {
        let ns = ns();
        let topic = ns.response_topic(404, "r-2");
        assert_eq!(
            ns.parse_response(&topic),
            Some(ResponseTopic {
                status: 404,
                request_id: "r-2"
            })
        );
    }

    #[test]
    fn malformed_request_topics_are_refused_without_panicking() {
        let ns = ns();
        let p = |t: &str| ns.parse_request(t).map(|_| ());
        let base = "devices/my-device/$iothub/methods/POST/";
        assert_eq!(
            p("devices/other/$iothub/methods/POST/m/?$rid=1"),
            Err(RequestTopicError::NotARequest)
        );
        assert_eq!(
            p("devices/my-device/$iothub/methods/res/200/?$rid=1"),
            Err(RequestTopicError::NotARequest)
        );
        assert_eq!(p(base), Err(RequestTopicError::NoRequestId));
        assert_eq!(p(&format!("{base}m")), Err(RequestTopicError::NoRequestId));
        assert_eq!(p(&format!("{base}m/")), Err(RequestTopicError::NoRequestId));
        assert_eq!(
            p(&format!("{base}m/?x=1")),
            Err(RequestTopicError::NoRequestId)
        );
        assert!(matches!(
            p(&format!("{base}m/?$rid=")),
            Err(RequestTopicError::BadRequestId(NameError::Empty { .. }))
        ));
        let huge = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(matches!(
            p(&format!("{base}m/?$rid={huge}")),
            Err(RequestTopicError::BadRequestId(NameError::TooLong { .. }))
        ));
        assert!(matches!(
            p(&format!("{base}m/?$rid=a b")),
            Err(RequestTopicError::BadRequestId(NameError::BadChar { .. }))
        ));
    }

    #[test]
    fn bad_method_names_keep_the_request_id_so_they_can_be_answered() {
        let ns = ns();
        let base = "devices/my-device/$iothub/methods/POST/";
        for topic in [
            format!("{base}/?$rid=5"),          // empty method
            format!("{base}a/b/?$rid=5"),       // extra level
            format!("{base}a b/?$rid=5"),       // space
            format!("{base}caf\u{e9}/?$rid=5"), // not ASCII
            format!("{base}{}/?$rid=5", "m".repeat(MAX_METHOD_LEN + 1)),
        ] {
            let err = ns.parse_request(&topic).expect_err(&topic);
            assert_eq!(err.request_id(), Some("5"), "{topic}: {err}");
        }
    }

    #[test]
    fn malformed_response_topics_are_ignored() {
        let ns = ns();
        assert_eq!(
            ns.parse_response("devices/my-device/$iothub/methods/res/abc/?$rid=1"),
            None
        );
        assert_eq!(
            ns.parse_response("devices/my-device/$iothub/methods/res/200"),
            None
        );
        assert_eq!(
            ns.parse_response("devices/my-device/$iothub/methods/res/200/?$rid="),
            None
        );
        assert_eq!(
            ns.parse_response("devices/x/$iothub/methods/res/200/?$rid=1"),
            None
        );
    }

    #[test]
    fn a_response_of_any_namespace_gives_its_prefix() {
        let topic = ns().response_topic(200, "r-3");
        assert_eq!(
            Namespace::parse_any_response(&topic),
            Some((
                "devices/my-device/",
                ResponseTopic {
                    status: 200,
                    request_id: "r-3"
                }
            ))
        );
        let bare = Namespace::new("", "d")
            .expect("empty namespace")
            .response_topic(504, "x");
        assert_eq!(
            Namespace::parse_any_response(&bare),
            Some((
                "",
                ResponseTopic {
                    status: 504,
                    request_id: "x"
                }
            ))
        );
        let p = Namespace::parse_any_response;
        assert_eq!(p("devices/d$iothub/methods/res/200/?$rid=1"), None);
        assert_eq!(p("devices/d/$iothub/methods/res/abc/?$rid=1"), None);
        assert_eq!(p("devices/d/$iothub/methods/res/200/?$rid="), None);
        assert_eq!(p("devices/d/$iothub/methods/POST/m/?$rid=1"), None);
        assert_eq!(p("devices/d/$edge/presence"), None);
    }

    #[test]
    fn every_devices_namespace_is_one_wildcard_level() {
        assert_eq!(
            Namespace::any_device(DEFAULT_NAMESPACE).expect("default"),
            "devices/+/"
        );
        assert_eq!(Namespace::device_level(DEFAULT_NAMESPACE), Some(1));
        let site = "site-1/{device-id}/edge/";
        assert_eq!(
            Namespace::any_device(site).expect("custom"),
            "site-1/+/edge/"
        );
        assert_eq!(Namespace::device_level(site), Some(1));
        assert_eq!(Namespace::any_device("{device-id}/").expect("first"), "+/");
        assert_eq!(Namespace::device_level("{device-id}/"), Some(0));
        for bad in [
            "",
            "devices/",
            "site-{device-id}/",
            "{device-id}/{device-id}/",
        ] {
            assert_eq!(
                Namespace::any_device(bad),
                Err(NameError::NoDeviceLevel(bad.to_owned())),
                "{bad}"
            );
        }
        assert!(Namespace::any_device("a/+/{device-id}/").is_err());
        assert!(Namespace::any_device("devices/{device-id}").is_err());
        // The level of a real topic is the device id.
        let topic = Namespace::new(site, "pump-7")
            .expect("valid")
            .presence_topic();
        assert_eq!(topic.split('/').nth(1), Some("pump-7"));
    }

    #[test]
    fn device_ids_and_namespaces_are_checked() {
        assert!(Namespace::for_device("").is_err());
        assert!(Namespace::for_device("a/b").is_err());
        assert!(Namespace::for_device("a+b").is_err());
        assert!(Namespace::for_device(&"d".repeat(MAX_DEVICE_ID_LEN + 1)).is_err());
        assert!(Namespace::new("site/{device-id}", "d").is_err());
        assert!(Namespace::new("site/#/{device-id}/", "d").is_err());
        let ns = Namespace::new("site-1/{device-id}/", "d").expect("custom template");
        assert_eq!(ns.presence_topic(), "site-1/d/$edge/presence");
    }
}
