//! The command line: global options, then one subcommand per kind of work.

use clap::{Args, Parser, Subcommand};
use edge_proto::BrokerUrl;
use edge_proto::topic::DEFAULT_NAMESPACE;

use crate::exit::Exit;

const ABOUT: &str = "Call direct methods on edge devices over MQTT, as Azure IoT Hub does";

const LONG_ABOUT: &str = "\
Call direct methods on edge devices over MQTT, as Azure IoT Hub's service API does.

A device answers with a status (200 for success) and a JSON payload. A device whose
retained presence says it is offline fails at once with 404103 DeviceNotOnline, unless
it comes online within --connect-timeout; a device that publishes no presence is called
anyway. No answer within --response-timeout is 504101 GatewayTimeout; arguments out of
range are 400004 ArgumentInvalid.";

const CALL_EXAMPLES: &str = "\
Examples:
  edge-invoker call my-device DeviceMethod '{\"method_number\":\"42\"}'
  echo '{\"a\":1}' | edge-invoker call my-device echo -
  edge-invoker --json call my-device reboot --response-timeout 60
  EDGE_BROKER=mqtt://broker.local edge-invoker call my-device getInfo

The 'Invoking method ...' line goes to stderr; the response status and payload go to
stdout (the payload indented when stdout is a terminal, compact JSON otherwise).
With --json, stdout gets exactly one JSON object: {\"status\":200,\"payload\":...} or
{\"errorCode\":404103,\"message\":\"...\"} (errorCode null when the broker failed).";

fn after_help(examples: &str) -> String {
    format!("{examples}\n\n{}", Exit::help())
}

/// `edge-invoker`: the parsed command line.
#[derive(Debug, Parser)]
#[command(
    name = "edge-invoker",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = after_help(CALL_EXAMPLES),
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
    /// The MQTT broker, mqtt://HOST[:PORT] (port 1883 when omitted)
    #[arg(
        long,
        env = "EDGE_BROKER",
        value_name = "URL",
        default_value = "mqtt://127.0.0.1:1883",
        global = true
    )]
    pub broker: BrokerUrl,

    /// The devices' topic namespace; {device-id} stands for the device id, and it may be
    /// empty for brokers that mount each client under a prefix
    #[arg(
        long,
        env = "EDGE_NAMESPACE",
        value_name = "TEMPLATE",
        default_value = DEFAULT_NAMESPACE,
        global = true
    )]
    pub namespace: String,

    /// Print exactly one JSON object on stdout instead of lines for people
    #[arg(long, global = true)]
    pub json: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Call a method on a device and print its answer
    #[command(after_help = after_help(CALL_EXAMPLES), allow_negative_numbers = true)]
    Call(CallArgs),
}

/// `edge-invoker call DEVICE METHOD [PAYLOAD|-]`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The device id
    pub device: String,

    /// The method name
    pub method: String,

    /// The payload, JSON text of at most 128 KiB; `-` reads it from stdin; JSON null when
    /// omitted
    pub payload: Option<String>,

    /// How long to wait for answers.
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

/// How long a call waits, in whole seconds as IoT Hub's service API takes them.
#[derive(Debug, Args)]
pub struct TimeoutArgs {
    /// Seconds to wait for the device's answer once the request is sent (5 to 300)
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub response_timeout: u64,

    /// Seconds to wait for an offline device to come online; 0 fails at once (0 to 300)
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub connect_timeout: u64,
}

#[cfg(test)]
mod tests {
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
        let Command::Call(call) = cli.command;
        assert_eq!(call.device, "my-device");
        assert_eq!(call.method, "DeviceMethod");
        assert_eq!(call.payload.as_deref(), Some("{\"a\":1}"));
        assert_eq!(call.timeouts.response_timeout, 30);
        assert_eq!(call.timeouts.connect_timeout, 0);

        let Command::Call(call) = parse(&["call", "d", "m"]).expect("parses").command;
        assert_eq!(call.payload, None);
        let Command::Call(call) = parse(&["call", "d", "m", "-"]).expect("parses").command;
        assert_eq!(call.payload.as_deref(), Some("-"));
        let Command::Call(call) = parse(&["call", "d", "m", "-5"]).expect("parses").command;
        assert_eq!(call.payload.as_deref(), Some("-5"));
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
        assert!(cli.global.json);
        assert_eq!(cli.global.broker.to_string(), "mqtt://[::1]:1884");
        assert_eq!(cli.global.namespace, "");
        let Command::Call(call) = cli.command;
        // Out of range, but that is 400004 from the call's own checks, not a clap error.
        assert_eq!(call.timeouts.response_timeout, 3);
        assert_eq!(call.timeouts.connect_timeout, 301);
        let cli = parse(&["--json", "--broker", "mqtt://h", "call", "d", "m"]).expect("parses");
        assert!(cli.global.json);
        assert_eq!(cli.global.broker.to_string(), "mqtt://h:1883");
    }

    #[test]
    fn a_broker_that_is_not_an_mqtt_url_is_a_usage_error() {
        for bad in [
            "localhost:1883",
            "mqtts://h:8883",
            "tcp://h",
            "mqtt://h:0",
            "mqtt://",
        ] {
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
    fn the_help_documents_exit_codes_and_an_example() {
        let mut command = Cli::command();
        let help = command.render_long_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        assert!(
            help.contains("  3  the device is not online (404103)"),
            "{help}"
        );
        let call = command
            .find_subcommand_mut("call")
            .expect("call subcommand")
            .render_long_help()
            .to_string();
        assert!(
            call.contains("edge-invoker call my-device DeviceMethod"),
            "{call}"
        );
        assert!(
            call.contains("  4  the device did not answer in time (504101)"),
            "{call}"
        );
    }
}
