//! The subcommands, run from a parsed command line with injected streams, so that tests
//! can drive a whole command and read what it printed.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use edge_proto::BrokerUrl;
use tracing::debug;

use crate::call::{CallError, CallRequest, MethodResponse, ResponsePayload, read_payload};
use crate::caller::{Caller, ConnectOptions};
use crate::cli::{CallArgs, Cli, Command, GlobalArgs};
use crate::exit::Exit;
use crate::output::{self, Format};

/// The streams a command reads and writes.
pub struct Io<'a> {
    /// Where `-` reads a payload from.
    pub stdin: &'a mut (dyn Read + Send),
    /// Where answers go (and, with `--json`, errors).
    pub stdout: &'a mut (dyn Write + Send),
    /// Where progress and, for people, errors go.
    pub stderr: &'a mut (dyn Write + Send),
    /// Whether stdout is a terminal: JSON payloads are then indented.
    pub stdout_is_terminal: bool,
}

/// Runs the command on the process's own stdin, stdout and stderr.
pub async fn run(cli: Cli) -> Exit {
    let (mut stdin, mut stdout, mut stderr) =
        (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let stdout_is_terminal = stdout.is_terminal();
    run_with(
        cli,
        Io {
            stdin: &mut stdin,
            stdout: &mut stdout,
            stderr: &mut stderr,
            stdout_is_terminal,
        },
    )
    .await
}

/// Runs the command on the given streams. Failures are printed, not returned: the exit
/// says how the command ended.
pub async fn run_with(cli: Cli, mut io: Io<'_>) -> Exit {
    let format = if cli.global.json {
        Format::Json
    } else {
        Format::Human {
            pretty: io.stdout_is_terminal,
        }
    };
    let exit = match cli.command {
        Command::Call(args) => call(&cli.global, args, format, &mut io).await,
    };
    if let Err(e) = io.stdout.flush() {
        debug!(error = %e, "stdout");
        return Exit::Failure;
    }
    exit
}

/// `edge-invoker call`.
async fn call(global: &GlobalArgs, args: CallArgs, format: Format, io: &mut Io<'_>) -> Exit {
    let request = match request(global, &args, io.stdin) {
        Ok(request) => request,
        Err(error) => return report(format, io, Err(error)),
    };
    if let Format::Human { .. } = format {
        let line = output::invoking(&request.device, &request.method, &request.payload);
        let _ = io.stderr.write_all(line.as_bytes());
    }
    let outcome = call_once(&global.broker, &request).await;
    report(format, io, outcome)
}

/// The request the command line asks for, checked before anything is sent.
fn request(
    global: &GlobalArgs,
    args: &CallArgs,
    stdin: &mut (dyn Read + Send),
) -> Result<CallRequest, CallError> {
    let payload = read_payload(args.payload.as_deref(), stdin)?;
    let request = CallRequest {
        device: args.device.clone(),
        method: args.method.clone(),
        payload,
        response_timeout: Duration::from_secs(args.timeouts.response_timeout),
        connect_timeout: Duration::from_secs(args.timeouts.connect_timeout),
        namespace: global.namespace.clone(),
    };
    request.check()?;
    Ok(request)
}

/// Connects, calls once, and disconnects.
async fn call_once(broker: &BrokerUrl, request: &CallRequest) -> Result<MethodResponse, CallError> {
    let caller = Caller::connect(ConnectOptions::new(broker.clone())).await?;
    let outcome = caller.call(request).await;
    caller.disconnect().await;
    outcome
}

/// Prints a call's outcome and returns its exit.
fn report(format: Format, io: &mut Io<'_>, outcome: Result<MethodResponse, CallError>) -> Exit {
    let exit = Exit::of_call(&outcome);
    let written = match (&outcome, format) {
        (Ok(response), _) => {
            if let (ResponsePayload::NotJson(_), Format::Human { .. }) = (&response.payload, format)
            {
                let _ = io.stderr.write_all(
                    b"warning: the device's payload is not JSON; it is shown as a JSON string\n",
                );
            }
            io.stdout
                .write_all(output::response(format, response).as_bytes())
        }
        (Err(error), Format::Json) => io.stdout.write_all(output::error(format, error).as_bytes()),
        (Err(error), Format::Human { .. }) => {
            let _ = io.stderr.write_all(output::error(format, error).as_bytes());
            Ok(())
        }
    };
    match written {
        Ok(()) => exit,
        Err(e) => {
            debug!(error = %e, "stdout");
            Exit::Failure
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Runs a command line with `stdin`, returning the exit, stdout and stderr.
    async fn run_args(args: &[&str], stdin: &[u8]) -> (Exit, String, String) {
        let cli = Cli::try_parse_from(std::iter::once("edge-invoker").chain(args.iter().copied()))
            .expect("the command line parses");
        let (mut stdin, mut stdout, mut stderr) = (stdin, Vec::new(), Vec::new());
        let exit = run_with(
            cli,
            Io {
                stdin: &mut stdin,
                stdout: &mut stdout,
                stderr: &mut stderr,
                stdout_is_terminal: false,
            },
        )
        .await;
        let text = |bytes| String::from_utf8(bytes).expect("UTF-8 output");
        (exit, text(stdout), text(stderr))
    }

    #[tokio::test]
    async fn timeouts_out_of_range_are_400004_and_usage_before_connecting() {
        // Port 1 on loopback refuses connections: had the command tried, it would exit 5.
        let (exit, stdout, stderr) = run_args(
            &[
                "--broker",
                "mqtt://127.0.0.1:1",
                "call",
                "d",
                "m",
                "--response-timeout",
                "4",
            ],
            b"",
        )
        .await;
        assert_eq!(exit, Exit::Usage);
        assert_eq!(stdout, "");
        assert_eq!(
            stderr,
            "error: response timeout 4s is out of range: it must be 5 to 300 seconds (400004 ArgumentInvalid)\n"
        );

        let (exit, stdout, _) = run_args(
            &[
                "--json",
                "--broker",
                "mqtt://127.0.0.1:1",
                "call",
                "d",
                "m",
                "--connect-timeout",
                "301",
            ],
            b"",
        )
        .await;
        assert_eq!(exit, Exit::Usage);
        assert_eq!(
            stdout,
            "{\"errorCode\":400004,\"message\":\"connect timeout 301s is out of range: it must be 0 to 300 seconds\"}\n"
        );
    }

    #[tokio::test]
    async fn an_invalid_payload_on_stdin_is_a_usage_error_naming_the_problem() {
        let (exit, stdout, stderr) = run_args(
            &["--broker", "mqtt://127.0.0.1:1", "call", "d", "m", "-"],
            b"{\"a\": }",
        )
        .await;
        assert_eq!(exit, Exit::Usage);
        assert_eq!(stdout, "");
        assert!(
            stderr.starts_with("error: payload is not JSON: "),
            "{stderr}"
        );
        assert!(stderr.ends_with("(400004 ArgumentInvalid)\n"), "{stderr}");
    }

    #[tokio::test]
    async fn an_unreachable_broker_fails_quickly_with_exit_5_naming_the_url() {
        let started = std::time::Instant::now();
        let (exit, stdout, stderr) = run_args(
            &["--broker", "mqtt://127.0.0.1:1", "call", "d", "m", "-"],
            b"{\"a\":1}",
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(exit, Exit::Failure);
        assert_eq!(stdout, "");
        assert!(
            stderr.starts_with("Invoking method 'm' on device 'd' with payload: {\"a\":1}\n"),
            "{stderr}"
        );
        assert!(
            stderr.contains("error: could not reach the broker at mqtt://127.0.0.1:1: "),
            "{stderr}"
        );

        let (exit, stdout, stderr) = run_args(
            &["--json", "--broker", "mqtt://127.0.0.1:1", "call", "d", "m"],
            b"",
        )
        .await;
        assert_eq!(exit, Exit::Failure);
        assert_eq!(stderr, "");
        let parsed: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
        assert_eq!(parsed["errorCode"], serde_json::Value::Null);
    }
}
