//! The command line: global options (the broker, the namespace, a config file, the
//! output), then one subcommand per kind of work. [`GlobalArgs::settings`] turns the
//! global options and the config file into [`Settings`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use edge_proto::BrokerUrl;
use edge_proto::iothub::{ConnectionString, ConnectionStringError, ServiceConnectionString};
use edge_proto::topic::DEFAULT_NAMESPACE;
use edge_proto::transport::{Security, TlsFiles};

use crate::broadcast::DEFAULT_CONCURRENCY;
use crate::call::DEFAULT_RESPONSE_TIMEOUT;
use crate::caller::ConnectOptions;
use crate::config::{ConfigError, ConfigFile};
use crate::exit::Exit;

/// The broker when neither a flag, the environment nor the config file names one.
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";

const ABOUT: &str = "Call direct methods on edge devices over MQTT, as Azure IoT Hub does";

const LONG_ABOUT: &str = "\
Call direct methods on edge devices over MQTT, as Azure IoT Hub's service API does.

A device answers with a status (200 for success) and a JSON payload. A device whose
retained presence says it is offline fails at once with 404103 DeviceNotOnline, unless
it comes online within --connect-timeout; a device that publishes no presence is called
anyway. No answer within --response-timeout is 504101 GatewayTimeout; arguments out of
range are 400004 ArgumentInvalid.

The broker, namespace and timeouts come from the flags, else the environment
(EDGE_BROKER, EDGE_NAMESPACE), else the config file (--config or
EDGE_INVOKER_CONFIG: a TOML file with the keys broker, namespace, response_timeout
and connect_timeout), else the defaults.

On Azure IoT Hub (or edge-hub): with a service connection string
(EDGE_CONNECTION_STRING, --connection-string-file, or the config file's
connection_string_file) every command goes through the hub's REST API over HTTPS
instead of the broker: call as POST /twins/{id}/methods, devices from the registry,
methods from the twin's reported property `methods`, broadcast as a
scheduleDeviceMethod job. --ca-file trusts the hub's CA (else the system's roots);
HTTPS_PROXY and NO_PROXY apply. The hub's 404001 (device not registered) exits 6, and
401002 (the key refused) exits 7.";

const EXAMPLES: &str = "\
Examples:
  edge-invoker call my-device DeviceMethod '{\"method_number\":\"42\"}'
  edge-invoker devices 'pump-*'
  edge-invoker methods pump-7
  edge-invoker broadcast reboot '{\"delaySeconds\":30}' --devices 'pump-*'
  edge-invoker --broker mqtt://broker.plant:1883 devices
  EDGE_CONNECTION_STRING_FILE=hub.secret edge-invoker call my-device getInfo
  edge-invoker completions bash > ~/.local/share/bash-completion/completions/edge-invoker

Each command's --help has its own examples and exit codes. Those of call:
";

const CALL_EXAMPLES: &str = "\
Examples:
  edge-invoker call my-device DeviceMethod '{\"method_number\":\"42\"}'
  echo '{\"a\":1}' | edge-invoker call my-device echo -
  edge-invoker call my-device echo @payload.json
  edge-invoker --json call my-device reboot --response-timeout 60
  EDGE_BROKER=mqtt://broker.local edge-invoker call my-device getInfo
  EDGE_CONNECTION_STRING='HostName=...;SharedAccessKeyName=...;SharedAccessKey=...' \
    edge-invoker call my-device getInfo        # through IoT Hub's REST API

The 'Invoking method ...' line goes to stderr; the response status and payload go to
stdout (the payload indented when stdout is a terminal, compact JSON otherwise).
With --json, stdout gets exactly one JSON object: {\"status\":200,\"payload\":...} or
{\"errorCode\":404103,\"message\":\"...\"} (errorCode null when the broker failed).";

const DEVICES_EXAMPLES: &str = "\
Examples:
  edge-invoker devices
  edge-invoker devices 'pump-*'
  edge-invoker --json devices | jq -r 'select(.online) | .deviceId'

Lists the devices whose retained presence the broker holds (with a connection string:
the devices in the hub's registry, with their connection state and the methods their
twins report), online or not, read without calling any device: since when each is online, why it is offline,
and how many methods its retained catalog lists (and how many handler files failed to
load). A pattern matches whole device ids: * stands for any characters, ? for one;
quote it so that the shell leaves it alone.

With --json, stdout gets one JSON object per device, one a line:
{\"deviceId\":\"pump-1\",\"online\":true,\"since\":\"2026-11-26T12:30:36Z\",\"reason\":null,
 \"agent\":\"edge-host 0.1.0\",\"methods\":4,\"failedHandlers\":0}
(since, reason and agent are null when the presence does not say; methods is null when
the device publishes no catalog). Errors go to stderr.";

const METHODS_EXAMPLES: &str = "\
Examples:
  edge-invoker methods my-device
  edge-invoker --json methods my-device | jq -r '.methods[].name'

Shows the device's method catalog as it retains it on the broker (with a connection
string: as its twin reports it, properties.reported.methods): each method's name,
the handler file serving it and its digest, and its description; then the handler files
that failed to load, if any. No call is made to the device, so an offline device's last
catalog is shown too, with its state.

With --json, stdout gets one JSON object:
{\"deviceId\":\"my-device\",\"presence\":{\"online\":true,...},\"methods\":[{\"name\":...,
 \"description\":...,\"handler\":...,\"digest\":\"sha256:...\"}],\"failures\":[...]}
Errors go to stderr.";

const BROADCAST_EXAMPLES: &str = "\
Examples:
  edge-invoker broadcast reboot '{\"delaySeconds\":30}' --devices 'pump-*'
  edge-invoker broadcast getInfo --devices 'pump-*' --devices 'valve-*' --concurrency 64
  edge-invoker broadcast firmwareUpdate @update.json --devices-file plant-7.txt
  edge-invoker --json broadcast getInfo --devices '*' | jq -c 'select(.status != 200)'

A job, as IoT Hub's scheduleDeviceMethod: calls one method on every device chosen, at
most --concurrency at once, each with the response and connect timeouts of `call`.
--devices PATTERN (repeatable) chooses the devices whose retained presence the broker
holds and whose id matches (* any characters, ? one); a value without wildcards is one
device id, called whatever its presence. --devices-file FILE names one device id a line
(# starts a comment). A device that is not online fails at once with 404103: offline
devices are reported, not waited for, unless --connect-timeout says otherwise.

With a connection string, the hub runs the calls as a scheduleDeviceMethod job
(devices matched against its registry), and the invoker polls the job's statistics and
reads each device's result back from devices.jobs; a hub that answers no such query
(edge-hub) gives the totals only, and a hub without jobs gets the calls one by one.

While it runs, a progress bar on stderr (on a terminal only). At the end, on stdout, a
table with each device's status, time and answer or error, then the totals: succeeded,
failed, not online, timed out. With --json, stdout gets one JSON object per device, one
a line, as each call ends (no progress bar, no table):
{\"deviceId\":\"pump-1\",\"status\":200,\"payload\":...,\"elapsedMs\":12} or
{\"deviceId\":\"pump-2\",\"errorCode\":404103,\"message\":\"...\",\"elapsedMs\":0}";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  edge-invoker completions bash > ~/.local/share/bash-completion/completions/edge-invoker
  edge-invoker completions zsh > ~/.zfunc/_edge-invoker   # with fpath+=(~/.zfunc)
  edge-invoker completions fish > ~/.config/fish/completions/edge-invoker.fish

Prints the completion script for the shell on stdout.";

fn call_help() -> String {
    let codes = Exit::ALL
        .into_iter()
        .filter(|exit| *exit != Exit::NoCatalog)
        .map(|exit| (exit, exit.meaning()))
        .collect::<Vec<_>>();
    format!("{CALL_EXAMPLES}\n\n{}", Exit::table(&codes))
}

fn top_help() -> String {
    format!("{EXAMPLES}\n{}", Exit::help())
}

fn devices_help() -> String {
    let codes = Exit::table(&[
        (
            Exit::Success,
            "the devices were listed (none matching is not an error)",
        ),
        (
            Exit::Usage,
            "bad usage, or an invalid config file or namespace",
        ),
        (
            Exit::Failure,
            "the broker or hub could not be reached, or another failure",
        ),
        (Exit::Unauthorized, Exit::Unauthorized.meaning()),
    ]);
    format!("{DEVICES_EXAMPLES}\n\n{codes}")
}

fn methods_help() -> String {
    let codes = Exit::table(&[
        (Exit::Success, "the catalog was shown (online or not)"),
        (Exit::Usage, "bad usage, or an invalid device id"),
        (
            Exit::Failure,
            "the broker or hub could not be reached, or another failure",
        ),
        (Exit::NoSuchDevice, Exit::NoSuchDevice.meaning()),
        (Exit::Unauthorized, Exit::Unauthorized.meaning()),
        (
            Exit::NoCatalog,
            "the device is known but the broker holds no catalog for it, or its twin reports none",
        ),
    ]);
    format!("{METHODS_EXAMPLES}\n\n{codes}")
}

fn broadcast_help() -> String {
    let codes = Exit::table(&[
        (Exit::Success, "every device answered with a 2xx status"),
        (
            Exit::DeviceError,
            "some device answered another status, was not online or timed out",
        ),
        (
            Exit::Usage,
            "bad usage, or an argument out of range or invalid (400004)",
        ),
        (
            Exit::Failure,
            "the broker or hub could not be reached or was lost, or another failure",
        ),
        (
            Exit::NoSuchDevice,
            "no such device: no device matched, so nothing was called",
        ),
        (Exit::Unauthorized, Exit::Unauthorized.meaning()),
    ]);
    format!("{BROADCAST_EXAMPLES}\n\n{codes}")
}

fn completions_help() -> String {
    let codes = Exit::table(&[(Exit::Success, "printed"), (Exit::Usage, "bad usage")]);
    format!("{COMPLETIONS_EXAMPLES}\n\n{codes}")
}

/// `edge-invoker`: the parsed command line.
#[derive(Debug, Parser)]
#[command(
    name = "edge-invoker",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = top_help(),
    subcommand_required = true,
    arg_required_else_help = true,
)]
pub struct Cli {
    /// Options every subcommand takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes, before or after its name.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// How to reach the broker.
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// The devices' topic namespace; {device-id} stands for the device id, and it may be
    /// empty for brokers that mount each client under a prefix [default:
    /// devices/{device-id}/]
    #[arg(long, env = "EDGE_NAMESPACE", value_name = "TEMPLATE", global = true)]
    pub namespace: Option<String>,

    /// A TOML file with defaults for the broker, namespace and timeouts; flags and
    /// environment variables override it
    #[arg(long, env = "EDGE_INVOKER_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// Print JSON on stdout instead of lines for people (see each command's --help)
    #[arg(long, global = true)]
    pub json: bool,

    /// How to reach IoT Hub instead of the broker.
    #[command(flatten)]
    pub hub: HubArgs,
}

/// IoT Hub's service connection string: with one, every command goes through the
/// hub's REST API instead of the broker.
#[derive(Debug, Args)]
pub struct HubArgs {
    /// IoT Hub's service connection string, HostName=...;SharedAccessKeyName=...;
    /// SharedAccessKey=...: every command then uses the hub's REST API instead of the
    /// broker (--ca-file trusts the hub's CA). A secret: `ps` shows flags, so prefer
    /// the environment variable or --connection-string-file
    #[arg(
        long,
        env = "EDGE_CONNECTION_STRING",
        hide_env_values = true,
        value_name = "CS",
        global = true
    )]
    pub connection_string: Option<Secret>,

    /// A file whose first line is the service connection string
    #[arg(
        long,
        env = "EDGE_CONNECTION_STRING_FILE",
        value_name = "FILE",
        global = true
    )]
    pub connection_string_file: Option<PathBuf>,
}

/// A secret from the command line or the environment: kept out of `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

/// IoT Hub, reached through its service API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The service connection string: the hub's host, the policy and its key.
    pub connection: ServiceConnectionString,
    /// PEM file of the CA certificates to trust for the hub; none trusts the system's.
    pub ca_file: Option<PathBuf>,
}

impl HubArgs {
    /// The hub to use, if a connection string is given: the flag or
    /// `EDGE_CONNECTION_STRING`, else the first line of the file (flag, environment,
    /// or the config file's `connection_string_file`).
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read;
    /// [`ConfigError::ConnectionString`] when the string is not a service connection
    /// string (the error never repeats the key).
    pub fn settings(
        &self,
        config: &ConfigFile,
        ca_file: Option<PathBuf>,
    ) -> Result<Option<HubSettings>, ConfigError> {
        let (text, from) = match (&self.connection_string, &self.connection_string_file) {
            (Some(Secret(text)), _) => (
                text.clone(),
                "--connection-string or EDGE_CONNECTION_STRING".to_owned(),
            ),
            (None, file) => match file.as_ref().or(config.connection_string_file.as_ref()) {
                None => return Ok(None),
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                    (line.trim().to_owned(), path.display().to_string())
                }
            },
        };
        let unusable = |reason: String| ConfigError::ConnectionString {
            from: from.clone(),
            reason,
        };
        match text.parse::<ConnectionString>() {
            Ok(ConnectionString::Service(connection)) => Ok(Some(HubSettings {
                connection,
                ca_file,
            })),
            Ok(ConnectionString::Device(_)) => Err(unusable(
                "it is a device's connection string (it has DeviceId); edge-invoker needs the \
                 hub's service connection string, HostName=...;SharedAccessKeyName=...;\
                 SharedAccessKey=... (`edge-hub connection-string`, or a shared access \
                 policy of the hub in Azure)"
                    .into(),
            )),
            Err(error) => Err(unusable(match error {
                // Both would repeat part of the text, which may be the key or a token.
                ConnectionStringError::Segment(_) => {
                    "a part between semicolons is not Name=value".into()
                }
                // A pasted key splits at its '=' padding into a "name": not shown.
                ConnectionStringError::Unknown(name) if name.len() > 24 => {
                    "a part between semicolons has an unknown name (known: HostName, \
                     SharedAccessKeyName, SharedAccessKey)"
                        .into()
                }
                ConnectionStringError::Invalid(why) if why.contains("signature") => {
                    "its SharedAccessSignature is malformed".into()
                }
                other => other.to_string(),
            })),
        }
    }
}

/// How to reach the broker: every option that ends up in [`ConnectOptions`], turned
/// into them in one place, [`BrokerArgs::connect_options`].
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// The MQTT broker, mqtt://HOST:PORT or mqtt://HOST (port 1883), or mqtts:// for TLS
    /// (port 8883) [default: mqtt://127.0.0.1:1883]
    #[arg(long, env = "EDGE_BROKER", value_name = "URL", global = true)]
    pub broker: Option<BrokerUrl>,

    /// PEM file of the CA certificates to trust; turns TLS on (with mqtts:// and no CA
    /// file, the system's roots are trusted). With a connection string, the hub's CA
    #[arg(long, env = "EDGE_CA_FILE", value_name = "FILE", global = true)]
    pub ca_file: Option<PathBuf>,

    /// PEM file of a client certificate, for mutual TLS (with --key-file)
    #[arg(long, env = "EDGE_CERT_FILE", value_name = "FILE", global = true)]
    pub cert_file: Option<PathBuf>,

    /// PEM file of the client certificate's private key
    #[arg(long, env = "EDGE_KEY_FILE", value_name = "FILE", global = true)]
    pub key_file: Option<PathBuf>,

    /// The MQTT username; the password comes from EDGE_PASSWORD or --password-file, never
    /// from a flag (`ps` would show it)
    #[arg(long, env = "EDGE_USERNAME", global = true)]
    pub username: Option<String>,

    /// A file whose first line is the MQTT password
    #[arg(long, env = "EDGE_PASSWORD_FILE", value_name = "FILE", global = true)]
    pub password_file: Option<PathBuf>,
}

impl BrokerArgs {
    /// How to reach the broker: each option from its flag or environment variable,
    /// else from the config file, else its default.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the password file cannot be read.
    pub fn connect_options(&self, config: &ConfigFile) -> Result<ConnectOptions, ConfigError> {
        let broker = self
            .broker
            .clone()
            .or_else(|| config.broker.clone())
            .unwrap_or_else(default_broker);
        let password_file = self
            .password_file
            .as_ref()
            .or(config.password_file.as_ref());
        let password =
            edge_proto::transport::password("EDGE_PASSWORD", password_file.map(PathBuf::as_path))
                .map_err(|e| ConfigError::Read {
                path: password_file.cloned().unwrap_or_default(),
                reason: e.to_string(),
            })?;
        let mut options = ConnectOptions::new(broker);
        options.security = Security {
            tls: TlsFiles {
                ca_file: self.ca_file.clone().or_else(|| config.ca_file.clone()),
                cert_file: self.cert_file.clone().or_else(|| config.cert_file.clone()),
                key_file: self.key_file.clone().or_else(|| config.key_file.clone()),
            },
            username: self.username.clone().or_else(|| config.username.clone()),
            password,
        };
        Ok(options)
    }
}

fn default_broker() -> BrokerUrl {
    DEFAULT_BROKER
        .parse()
        .expect("the default broker URL is valid")
}

/// What the global options and the config file come to.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How to reach the broker.
    pub connect: ConnectOptions,
    /// The namespace template.
    pub namespace: String,
    /// Whether to print JSON.
    pub json: bool,
    /// The config file's content (all defaults when there is none), for what
    /// subcommands take from it.
    pub config: ConfigFile,
    /// IoT Hub, when a service connection string is given: then every command goes
    /// through it, and the broker settings are not used.
    pub hub: Option<HubSettings>,
}

impl GlobalArgs {
    /// Reads the config file, if one is named, and resolves every global option:
    /// flag or environment variable, else config file, else default.
    ///
    /// # Errors
    /// [`ConfigError`] when the config file cannot be read or is invalid.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let config = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let connect = self.broker.connect_options(&config)?;
        let hub = self
            .hub
            .settings(&config, connect.security.tls.ca_file.clone())?;
        Ok(Settings {
            connect,
            hub,
            namespace: self
                .namespace
                .clone()
                .or_else(|| config.namespace.clone())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            json: self.json,
            config,
        })
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Call a method on a device and print its answer
    #[command(after_help = call_help(), allow_negative_numbers = true)]
    Call(CallArgs),

    /// List the devices whose presence the broker holds, online or not
    #[command(after_help = devices_help())]
    Devices(DevicesArgs),

    /// Show a device's method catalog (no call is made to the device)
    #[command(after_help = methods_help())]
    Methods(MethodsArgs),

    /// Call a method on many devices: a job, with totals at the end
    #[command(after_help = broadcast_help(), allow_negative_numbers = true)]
    Broadcast(BroadcastArgs),

    /// Print a shell completion script
    #[command(after_help = completions_help())]
    Completions(CompletionsArgs),
}

/// `edge-invoker call DEVICE METHOD [PAYLOAD|-|@FILE]`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The device id
    pub device: String,

    /// The method name
    pub method: String,

    /// The payload, JSON text of at most 128 KiB; `-` reads it from stdin, `@FILE` from
    /// a file; JSON null when omitted
    pub payload: Option<String>,

    /// How long to wait for answers.
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

/// `edge-invoker devices [PATTERN]`.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Only the devices whose id matches: * stands for any characters, ? for one
    #[arg(value_name = "PATTERN")]
    pub pattern: Option<String>,
}

/// `edge-invoker methods DEVICE`.
#[derive(Debug, Args)]
pub struct MethodsArgs {
    /// The device id
    pub device: String,
}

/// `edge-invoker broadcast METHOD [PAYLOAD|-|@FILE] --devices PATTERN|--devices-file F`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("targets").required(true).multiple(true)))]
pub struct BroadcastArgs {
    /// The method name
    pub method: String,

    /// The payload, JSON text of at most 128 KiB; `-` reads it from stdin, `@FILE` from
    /// a file; JSON null when omitted
    pub payload: Option<String>,

    /// The devices whose id matches (* any characters, ? one), among those whose
    /// presence the broker holds; without wildcards, one device id. Repeatable
    #[arg(long = "devices", value_name = "PATTERN", group = "targets")]
    pub devices: Vec<String>,

    /// A file of device ids, one a line (blank lines and lines starting with # are
    /// skipped)
    #[arg(long, value_name = "FILE", group = "targets")]
    pub devices_file: Option<PathBuf>,

    /// How many calls may be in flight at once (1 to 1000)
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_CONCURRENCY as u64,
        value_parser = clap::value_parser!(u64).range(1..=1000),
    )]
    pub concurrency: u64,

    /// How long to wait for answers.
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

/// `edge-invoker completions SHELL`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in
    pub shell: clap_complete::Shell,
}

/// How long a call waits, in whole seconds as IoT Hub's service API takes them.
#[derive(Debug, Args)]
pub struct TimeoutArgs {
    /// Seconds to wait for the device's answer once the request is sent (5 to 300)
    /// [default: 30, or the config file's response_timeout]
    #[arg(long, value_name = "SECONDS")]
    pub response_timeout: Option<u64>,

    /// Seconds to wait for an offline device to come online; 0 fails at once (0 to 300)
    /// [default: 0, or the config file's connect_timeout]
    #[arg(long, value_name = "SECONDS")]
    pub connect_timeout: Option<u64>,
}

impl TimeoutArgs {
    /// The response and connect timeouts: each from its flag, else the config file,
    /// else IoT Hub's default (30 s, 0 s). Not range-checked here: a call's own checks
    /// refuse them with 400004.
    pub fn resolve(&self, config: &ConfigFile) -> (Duration, Duration) {
        let response = self
            .response_timeout
            .or(config.response_timeout)
            .map_or(DEFAULT_RESPONSE_TIMEOUT, Duration::from_secs);
        let connect = self
            .connect_timeout
            .or(config.connect_timeout)
            .map_or(Duration::ZERO, Duration::from_secs);
        (response, connect)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("edge-invoker").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn call_takes_device_method_and_an_optional_payload() {
        let cli = parse(&["call", "my-device", "DeviceMethod", "{\"a\":1}"]).expect("parses");
        let Command::Call(call) = cli.command else {
            panic!("call")
        };
        assert_eq!(call.device, "my-device");
        assert_eq!(call.method, "DeviceMethod");
        assert_eq!(call.payload.as_deref(), Some("{\"a\":1}"));
        assert_eq!(
            call.timeouts.resolve(&ConfigFile::default()),
            (Duration::from_secs(30), Duration::ZERO)
        );

        for payload in ["-", "-5", "@payload.json"] {
            let Command::Call(call) = parse(&["call", "d", "m", payload]).expect("parses").command
            else {
                panic!("call")
            };
            assert_eq!(call.payload.as_deref(), Some(payload));
        }
        let Command::Call(call) = parse(&["call", "d", "m"]).expect("parses").command else {
            panic!("call")
        };
        assert_eq!(call.payload, None);
    }

    #[test]
    fn global_options_go_before_or_after_the_subcommand() {
        let cli = parse(&[
            "call",
            "d",
            "m",
            "--json",
            "--broker",
            "mqtt://[::1]:1884",
            "--namespace",
            "",
            "--response-timeout",
            "3",
            "--connect-timeout",
            "301",
        ])
        .expect("parses");
        let settings = cli.global.settings().expect("no config file");
        assert!(settings.json);
        assert_eq!(settings.connect.broker.to_string(), "mqtt://[::1]:1884");
        assert_eq!(settings.namespace, "");
        let Command::Call(call) = cli.command else {
            panic!("call")
        };
        // Out of range, but that is 400004 from the call's own checks, not a clap error.
        assert_eq!(
            call.timeouts.resolve(&settings.config),
            (Duration::from_secs(3), Duration::from_secs(301))
        );
        let cli = parse(&["--json", "--broker", "mqtt://h", "devices"]).expect("parses");
        assert!(cli.global.json);
        let settings = cli.global.settings().expect("no config file");
        assert_eq!(settings.connect.broker.to_string(), "mqtt://h:1883");
    }

    #[test]
    fn flags_override_the_config_file_which_overrides_the_defaults() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("edge-invoker.toml");
        std::fs::write(
            &path,
            "broker = \"mqtt://plant:1884\"\nnamespace = \"plant/{device-id}/\"\n\
             response_timeout = 60\nconnect_timeout = 5\n",
        )
        .expect("write");
        let config = path.to_str().expect("UTF-8 path");

        let cli = parse(&["--config", config, "call", "d", "m"]).expect("parses");
        let settings = cli.global.settings().expect("valid config");
        assert_eq!(settings.connect.broker.to_string(), "mqtt://plant:1884");
        assert_eq!(settings.namespace, "plant/{device-id}/");
        let Command::Call(call) = cli.command else {
            panic!("call")
        };
        assert_eq!(
            call.timeouts.resolve(&settings.config),
            (Duration::from_secs(60), Duration::from_secs(5))
        );

        let cli = parse(&[
            "call",
            "d",
            "m",
            "--config",
            config,
            "--broker",
            "mqtt://other",
            "--namespace",
            "x/{device-id}/",
            "--response-timeout",
            "7",
        ])
        .expect("parses");
        let settings = cli.global.settings().expect("valid config");
        assert_eq!(settings.connect.broker.to_string(), "mqtt://other:1883");
        assert_eq!(settings.namespace, "x/{device-id}/");
        let Command::Call(call) = cli.command else {
            panic!("call")
        };
        assert_eq!(
            call.timeouts.resolve(&settings.config),
            (Duration::from_secs(7), Duration::from_secs(5))
        );

        let cli = parse(&["devices"]).expect("parses");
        let settings = cli.global.settings().expect("no config file");
        assert_eq!(settings.connect.broker.to_string(), DEFAULT_BROKER);
        assert_eq!(settings.namespace, DEFAULT_NAMESPACE);

        let cli = parse(&["--config", "/nonexistent.toml", "devices"]).expect("parses");
        assert!(matches!(
            cli.global.settings(),
            Err(ConfigError::Read { path, .. }) if path == Path::new("/nonexistent.toml")
        ));
    }

    #[test]
    fn a_connection_string_comes_from_the_flag_else_a_file_else_the_config_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (file, config_file) = (dir.path().join("a.secret"), dir.path().join("b.secret"));
        let service = |host: &str| {
            format!("HostName={host};SharedAccessKeyName=service;SharedAccessKey=AAAA")
        };
        std::fs::write(&file, format!("\n{}\n", service("from-file"))).expect("write");
        std::fs::write(&config_file, service("from-config")).expect("write");
        let config = ConfigFile {
            connection_string_file: Some(config_file),
            ..ConfigFile::default()
        };
        let host = |args: &HubArgs| {
            args.settings(&config, None)
                .expect("usable")
                .map(|hub| hub.connection.host_name)
        };
        let flag = Some(Secret(service("from-flag")));
        let (none, named) = (None, Some(file.clone()));
        for (string, file, expected) in [
            (&flag, &named, "from-flag"),
            (&None, &named, "from-file"),
            (&None, &none, "from-config"),
        ] {
            let args = HubArgs {
                connection_string: string.clone(),
                connection_string_file: file.clone(),
            };
            assert_eq!(host(&args).as_deref(), Some(expected));
        }
        let unset = HubArgs {
            connection_string: None,
            connection_string_file: None,
        };
        assert_eq!(unset.settings(&ConfigFile::default(), None), Ok(None));
        assert!(!format!("{:?}", flag).contains("AAAA"), "Debug hides it");
    }

    #[test]
    fn a_broker_that_is_not_an_mqtt_url_is_a_usage_error() {
        for bad in ["localhost:1883", "tcp://h", "mqtt://h:0", "mqtt://"] {
            let error = parse(&["--broker", bad, "call", "d", "m"]).expect_err(bad);
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad}"
            );
            assert_eq!(error.exit_code(), 2);
        }
        let error = parse(&["call", "d", "m", "--response-timeout", "1.5"]).expect_err("integers");
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn devices_methods_and_completions_take_their_arguments() {
        let Command::Devices(devices) = parse(&["devices"]).expect("parses").command else {
            panic!("devices")
        };
        assert_eq!(devices.pattern, None);
        let Command::Devices(devices) = parse(&["devices", "pump-*"]).expect("parses").command
        else {
            panic!("devices")
        };
        assert_eq!(devices.pattern.as_deref(), Some("pump-*"));
        let Command::Methods(methods) = parse(&["methods", "d"]).expect("parses").command else {
            panic!("methods")
        };
        assert_eq!(methods.device, "d");
        assert!(parse(&["methods"]).is_err());
        for shell in ["bash", "zsh", "fish"] {
            assert!(parse(&["completions", shell]).is_ok(), "{shell}");
        }
        assert_eq!(
            parse(&["completions", "cmd"])
                .expect_err("no such shell")
                .exit_code(),
            2
        );
    }

    #[test]
    fn broadcast_needs_devices_and_bounds_its_concurrency() {
        let cli = parse(&[
            "broadcast",
            "reboot",
            "{}",
            "--devices",
            "pump-*",
            "--devices",
            "valve-1",
        ])
        .expect("parses");
        let Command::Broadcast(job) = cli.command else {
            panic!("broadcast")
        };
        assert_eq!(job.method, "reboot");
        assert_eq!(job.payload.as_deref(), Some("{}"));
        assert_eq!(job.devices, ["pump-*", "valve-1"]);
        assert_eq!(job.devices_file, None);
        assert_eq!(job.concurrency, DEFAULT_CONCURRENCY as u64);

        let cli = parse(&[
            "broadcast",
            "m",
            "--devices-file",
            "f.txt",
            "--concurrency",
            "1",
        ])
        .expect("parses");
        let Command::Broadcast(job) = cli.command else {
            panic!("broadcast")
        };
        assert_eq!(job.devices_file.as_deref(), Some(Path::new("f.txt")));
        assert_eq!(job.concurrency, 1);

        let missing = parse(&["broadcast", "m"]).expect_err("no devices");
        assert_eq!(
            missing.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        for bad in ["0", "1001", "x"] {
            let error =
                parse(&["broadcast", "m", "--devices", "*", "--concurrency", bad]).expect_err(bad);
            assert_eq!(error.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn the_help_documents_exit_codes_and_an_example() {
        let mut command = Cli::command();
        let help = command.render_long_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        assert!(
            help.contains("  3  the device is not online (404103)"),
            "{help}"
        );
        for (name, example, code) in [
            (
                "call",
                "edge-invoker call my-device DeviceMethod",
                "  4  the device did not answer in time (504101)",
            ),
            (
                "devices",
                "edge-invoker devices 'pump-*'",
                "  0  the devices were listed",
            ),
            (
                "methods",
                "edge-invoker methods my-device",
                "  6  no such device: the hub does not know it (404001), or nothing on the broker names it",
            ),
            (
                "broadcast",
                "edge-invoker broadcast reboot",
                "  1  some device answered another status",
            ),
            (
                "completions",
                "edge-invoker completions bash",
                "  0  printed",
            ),
        ] {
            let sub = command
                .find_subcommand_mut(name)
                .expect("subcommand")
                .render_long_help()
                .to_string();
            assert!(sub.contains(example), "{name}: {sub}");
            assert!(sub.contains("Exit codes:"), "{name}: {sub}");
            assert!(sub.contains(code), "{name}: {sub}");
        }
        let help_of = |name| {
            Cli::command()
                .find_subcommand_mut(name)
                .expect("subcommand")
                .render_long_help()
                .to_string()
        };
        // "Not online" is not "no such device", and only `methods` ends with 8.
        let methods = help_of("methods");
        assert!(
            methods.contains("  8  the device is known but"),
            "{methods}"
        );
        assert!(!methods.contains("  3  "), "{methods}");
        let broadcast = help_of("broadcast");
        assert!(
            broadcast.contains("  6  no such device: no device matched"),
            "{broadcast}"
        );
        assert!(!broadcast.contains("  3  "), "{broadcast}");
        let call = help_of("call");
        assert!(call.contains("  6  no such device"), "{call}");
        assert!(!call.contains("  8  "), "{call}");
    }
}
