//! The subcommands, run from a parsed command line with injected streams, so that tests
//! can drive a whole command and read what it printed.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use clap::CommandFactory;
use edge_proto::Namespace;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::debug;

use crate::broadcast::{self, DeviceResult, Ran, Totals};
use crate::call::{
    ArgumentError, CallError, CallRequest, MethodResponse, ResponsePayload, read_payload,
};
use crate::cli::{
    BroadcastArgs, CallArgs, Cli, Command, CompletionsArgs, DevicesArgs, GlobalArgs, MethodsArgs,
    Settings,
};
use crate::exit::Exit;
use crate::output::{self, Format, Paint};
use crate::pattern::DevicePattern;
use crate::via::Via;

/// The streams a command reads and writes, and what they are connected to.
pub struct Io<'a> {
    /// Where `-` reads a payload from.
    pub stdin: &'a mut (dyn Read + Send),
    /// Where answers go (and, with `call --json`, errors).
    pub stdout: &'a mut (dyn Write + Send),
    /// Where progress and, for people, errors go.
    pub stderr: &'a mut (dyn Write + Send),
    /// Whether stdout is a terminal: JSON payloads are then indented.
    pub stdout_is_terminal: bool,
    /// Whether stderr is a terminal: a broadcast then shows a progress bar there.
    pub stderr_is_terminal: bool,
    /// Whether to colour what goes to stdout.
    pub color_stdout: bool,
    /// Whether to colour what goes to stderr.
    pub color_stderr: bool,
}

impl Io<'_> {
    /// How answers are printed: JSON, or for people (indented on a terminal).
    fn format(&self, settings: &Settings) -> Format {
        if settings.json {
            Format::Json
        } else {
            Format::Human {
                pretty: self.stdout_is_terminal,
            }
        }
    }

    /// Colours for stdout; never with `--json`.
    fn paint_stdout(&self, format: Format) -> Paint {
        Paint::new(self.color_stdout && format != Format::Json)
    }

    /// Colours for stderr.
    fn paint_stderr(&self) -> Paint {
        Paint::new(self.color_stderr)
    }

    /// Prints `error: <what>` on stderr.
    fn fail(&mut self, what: &str) {
        let line = output::failure(what, self.paint_stderr());
        let _ = self.stderr.write_all(line.as_bytes());
    }

    /// Prints why a broadcast's devices could not be chosen, and returns its exit.
    fn fail_target(&mut self, error: &broadcast::TargetError) -> Exit {
        self.fail(&error.to_string());
        error.exit()
    }

    /// Prints a call error on stderr, for people, and returns its exit.
    fn fail_call(&mut self, error: &CallError) -> Exit {
        let line = output::error(Format::Human { pretty: false }, error, self.paint_stderr());
        let _ = self.stderr.write_all(line.as_bytes());
        Exit::of_error(error)
    }
}

/// Runs the command on the process's own stdin, stdout and stderr. Colour follows
/// the terminal and the conventions (`NO_COLOR`, `CLICOLOR`, `CLICOLOR_FORCE`).
pub async fn run(cli: Cli) -> Exit {
    let (mut stdin, mut stdout, mut stderr) =
        (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let colour = |choice| choice != anstream::ColorChoice::Never;
    let (color_stdout, color_stderr) = (
        colour(anstream::AutoStream::choice(&stdout)),
        colour(anstream::AutoStream::choice(&stderr)),
    );
    let (stdout_is_terminal, stderr_is_terminal) = (stdout.is_terminal(), stderr.is_terminal());
    run_with(
        cli,
        Io {
            stdin: &mut stdin,
            stdout: &mut stdout,
            stderr: &mut stderr,
            stdout_is_terminal,
            stderr_is_terminal,
            color_stdout,
            color_stderr,
        },
    )
    .await
}

/// How a subcommand ends: `Err` when it stopped early, after printing why. Either way
/// the exit says how, so that a step that fails is one `?`.
type Ended = Result<Exit, Exit>;

/// Runs the command on the given streams. Failures are printed, not returned: the exit
/// says how the command ended.
pub async fn run_with(cli: Cli, mut io: Io<'_>) -> Exit {
    let ended = match cli.command {
        Command::Call(args) => call(&cli.global, args, &mut io).await,
        Command::Devices(args) => devices(&cli.global, args, &mut io).await,
        Command::Methods(args) => methods(&cli.global, args, &mut io).await,
        Command::Broadcast(args) => broadcast(&cli.global, args, &mut io).await,
        Command::Completions(args) => completions(&args, &mut io),
    };
    let exit = ended.unwrap_or_else(|stopped| stopped);
    if let Err(e) = io.stdout.flush() {
        debug!(error = %e, "stdout");
        return Exit::Failure;
    }
    exit
}

/// The global settings, or the usage exit after saying why there are none.
fn settings(global: &GlobalArgs, io: &mut Io<'_>) -> Result<Settings, Exit> {
    global.settings().map_err(|error| {
        io.fail(&error.to_string());
        Exit::Usage
    })
}

/// `edge-invoker call`.
async fn call(global: &GlobalArgs, args: CallArgs, io: &mut Io<'_>) -> Ended {
    let settings = settings(global, io)?;
    let format = io.format(&settings);
    let request = match request(&settings, &args, io.stdin) {
        Ok(request) => request,
        Err(error) => return Ok(report(format, io, Err(error))),
    };
    if let Format::Human { .. } = format {
        let line = output::invoking(
            &request.device,
            &request.method,
            &request.payload,
            io.paint_stderr(),
        );
        let _ = io.stderr.write_all(line.as_bytes());
    }
    let outcome = call_once(&settings, &request).await;
    Ok(report(format, io, outcome))
}

/// The request the command line asks for, checked before anything is sent.
fn request(
    settings: &Settings,
    args: &CallArgs,
    stdin: &mut (dyn Read + Send),
) -> Result<CallRequest, CallError> {
    let payload = read_payload(args.payload.as_deref(), stdin)?;
    let (response_timeout, connect_timeout) = args.timeouts.resolve(&settings.config);
    let request = CallRequest {
        device: args.device.clone(),
        method: args.method.clone(),
        payload,
        response_timeout,
        connect_timeout,
        namespace: settings.namespace.clone(),
    };
    request.check()?;
    Ok(request)
}

/// Connects (to the broker or the hub), calls once, and disconnects.
async fn call_once(
    settings: &Settings,
    request: &CallRequest,
) -> Result<MethodResponse, CallError> {
    let via = Via::connect(settings).await?;
    let outcome = via.call(request).await;
    via.close().await;
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
            let paint = io.paint_stdout(format);
            io.stdout
                .write_all(output::response(format, response, paint).as_bytes())
        }
        (Err(error), Format::Json) => io
            .stdout
            .write_all(output::error(format, error, Paint::NONE).as_bytes()),
        (Err(error), Format::Human { .. }) => {
            io.fail_call(error);
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

/// `edge-invoker devices`.
async fn devices(global: &GlobalArgs, args: DevicesArgs, io: &mut Io<'_>) -> Ended {
    let settings = settings(global, io)?;
    let format = io.format(&settings);
    let nobody = match (&settings.hub, Namespace::any_device(&settings.namespace)) {
        (Some(_), _) => "The hub's registry holds no device.\n".to_owned(),
        (None, Ok(prefix)) => format!("The broker holds no device's presence under {prefix}.\n"),
        (None, Err(error)) => return Err(io.fail_call(&ArgumentError::Name(error).into())),
    };
    let pattern = args
        .pattern
        .map_or_else(DevicePattern::any, DevicePattern::new);
    let via = Via::connect(&settings)
        .await
        .map_err(|error| io.fail_call(&error))?;
    let listed = via.devices(&settings.namespace).await;
    via.close().await;
    let listed = listed.map_err(|error| io.fail_call(&error))?;
    let known = listed.len();
    let matching: Vec<_> = listed
        .into_iter()
        .filter(|d| pattern.matches(&d.device))
        .collect();
    let text = match format {
        Format::Json => matching.iter().map(output::fleet::device_json).collect(),
        Format::Human { .. } if matching.is_empty() => {
            let note = if known == 0 {
                nobody
            } else {
                format!(
                    "No device matches '{pattern}' ({known} device{} known).\n",
                    if known == 1 { "" } else { "s" }
                )
            };
            let _ = io.stderr.write_all(note.as_bytes());
            String::new()
        }
        Format::Human { .. } => output::fleet::devices_table(&matching, io.paint_stdout(format)),
    };
    Ok(written(io, &text, Exit::Success))
}

/// `edge-invoker methods`.
async fn methods(global: &GlobalArgs, args: MethodsArgs, io: &mut Io<'_>) -> Ended {
    let settings = settings(global, io)?;
    let format = io.format(&settings);
    Namespace::new(&settings.namespace, &args.device)
        .map_err(|error| io.fail_call(&ArgumentError::Name(error).into()))?;
    let via = Via::connect(&settings)
        .await
        .map_err(|error| io.fail_call(&error))?;
    let state = via.device(&settings.namespace, &args.device).await;
    via.close().await;
    let state = state.map_err(|error| io.fail_call(&error))?;
    if state.catalog.is_none() {
        let (why, exit) = match (&via, &state.presence) {
            (Via::Hub(_), _) => (
                format!(
                    "device '{}' reports no method catalog in its twin \
                     (properties.reported.methods is missing or not a list of methods)",
                    args.device
                ),
                Exit::NoCatalog,
            ),
            (Via::Broker(_), None) => (
                format!(
                    "no such device: the broker holds neither a presence nor a method catalog \
                     for device '{}'",
                    args.device
                ),
                Exit::NoSuchDevice,
            ),
            (Via::Broker(_), Some(presence)) => (
                format!(
                    "device '{}' is {} but the broker holds no method catalog for it",
                    args.device,
                    if presence.online { "online" } else { "offline" }
                ),
                Exit::NoCatalog,
            ),
        };
        io.fail(&why);
        return Err(exit);
    }
    let text = match format {
        Format::Json => output::fleet::methods_json(&state),
        Format::Human { .. } => output::fleet::methods_table(&state, io.paint_stdout(format)),
    };
    Ok(written(io, &text, Exit::Success))
}

/// `edge-invoker broadcast`.
async fn broadcast(global: &GlobalArgs, args: BroadcastArgs, io: &mut Io<'_>) -> Ended {
    let settings = settings(global, io)?;
    let format = io.format(&settings);
    let payload =
        read_payload(args.payload.as_deref(), io.stdin).map_err(|error| io.fail_call(&error))?;
    let (response_timeout, connect_timeout) = args.timeouts.resolve(&settings.config);
    let mut request = CallRequest {
        // Each call names its device; any valid id checks the rest before connecting.
        device: "device".to_owned(),
        method: args.method.clone(),
        payload,
        response_timeout,
        connect_timeout,
        namespace: settings.namespace.clone(),
    };
    request.check().map_err(|error| io.fail_call(&error))?;
    let patterns: Vec<DevicePattern> = args.devices.iter().map(DevicePattern::new).collect();
    broadcast::check_literals(&patterns).map_err(|error| io.fail_target(&error))?;
    let named = match &args.devices_file {
        Some(path) => broadcast::read_devices_file(path).map_err(|error| io.fail_target(&error))?,
        None => Vec::new(),
    };
    let needs_listing = patterns.iter().any(|p| !p.is_literal());
    let namespace_ok = Namespace::any_device(&settings.namespace);
    if let (true, None, Err(error)) = (needs_listing, &settings.hub, namespace_ok) {
        return Err(io.fail_call(&ArgumentError::Name(error).into()));
    }

    let via = Via::connect(&settings)
        .await
        .map_err(|error| io.fail_call(&error))?;
    let known = if needs_listing {
        match via.devices(&settings.namespace).await {
            Ok(known) => known,
            Err(error) => {
                via.close().await;
                return Err(io.fail_call(&error));
            }
        }
    } else {
        Vec::new()
    };
    let targets = match broadcast::select_from(&patterns, &known, &named, via.known_by()) {
        Ok(targets) => targets,
        Err(error) => {
            via.close().await;
            return Err(io.fail_target(&error));
        }
    };
    request.device.clear();

    if let Format::Human { .. } = format {
        let line = output::job::invoking(
            &request.method,
            targets.len(),
            &request.payload,
            io.paint_stderr(),
        );
        let _ = io.stderr.write_all(line.as_bytes());
    }
    let bar = progress_bar(format, io, targets.len());
    let mut totals = Totals::default();
    let mut stdout_failed = false;
    let stdout = &mut *io.stdout;
    let ran = broadcast::broadcast(
        &via,
        &request,
        &targets,
        usize::try_from(args.concurrency).unwrap_or(usize::MAX),
        |stats| {
            bar.set_position(stats.succeeded_count + stats.failed_count);
            bar.set_message(output::job::progress(&Totals {
                failed: usize::try_from(stats.failed_count).unwrap_or(usize::MAX),
                ..Totals::default()
            }));
        },
        |result: &DeviceResult| {
            totals.add(broadcast::Outcome::of(result));
            bar.inc(1);
            bar.set_message(output::job::progress(&totals));
            if format == Format::Json && !stdout_failed {
                let line = output::job::result_json(result);
                stdout_failed = stdout
                    .write_all(line.as_bytes())
                    .and_then(|()| stdout.flush())
                    .is_err();
            }
        },
    )
    .await;
    bar.finish_and_clear();
    via.close().await;
    let results = match ran {
        Ok(Ran::Calls(results)) => results,
        Ok(Ran::Job(job)) => return Ok(job_report(format, io, &job)),
        Err(error) => return Err(io.fail_call(&error)),
    };

    let exit = broadcast::exit(&results);
    Ok(match format {
        Format::Json if stdout_failed => Exit::Failure,
        Format::Json => exit,
        Format::Human { .. } => {
            let text = results_text(io, format, &results, &Totals::of(&results));
            written(io, &text, exit)
        }
    })
}

/// The table of results and the totals, for people.
fn results_text(io: &Io<'_>, format: Format, results: &[DeviceResult], totals: &Totals) -> String {
    let paint = io.paint_stdout(format);
    format!(
        "{}\n{}",
        output::job::results_table(results, paint),
        output::job::totals(totals, paint)
    )
}

/// Prints what a job on the hub came to, as a broadcast's results, and returns its
/// exit. When the hub gives no per-device results, a note on stderr says so.
fn job_report(format: Format, io: &mut Io<'_>, job: &broadcast::JobOutcome) -> Exit {
    let mut notes = Vec::new();
    if job.status.status != "completed" {
        let reason = job
            .status
            .failure_reason
            .as_deref()
            .unwrap_or("no reason given");
        notes.push(format!(
            "Job '{}' {}: {reason}",
            job.job_id, job.status.status
        ));
    }
    if !job.per_device {
        notes.push(format!(
            "Job '{}': the hub gives no per-device results (it does not answer queries on \
             devices.jobs); the totals are the job's statistics.",
            job.job_id
        ));
    }
    for note in notes {
        // What the hub said is escaped, as anything a device or hub supplies.
        let _ = writeln!(io.stderr, "{}", output::escape::text(&note));
    }
    let text = match format {
        Format::Json => job.results.iter().map(output::job::result_json).collect(),
        Format::Human { .. } => results_text(io, format, &job.results, &job.totals()),
    };
    written(io, &text, job.exit())
}

/// A progress bar on stderr for people at a terminal; hidden otherwise.
fn progress_bar(format: Format, io: &Io<'_>, devices: usize) -> ProgressBar {
    if format == Format::Json || !io.stderr_is_terminal {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(devices as u64), ProgressDrawTarget::stderr());
    let template = if io.color_stderr {
        "{spinner:.green} {elapsed_precise} [{wide_bar:.cyan/blue}] {pos}/{len} devices {msg:.yellow}"
    } else {
        "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} devices {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// `edge-invoker completions`.
fn completions(args: &CompletionsArgs, io: &mut Io<'_>) -> Ended {
    clap_complete::generate(args.shell, &mut Cli::command(), "edge-invoker", io.stdout);
    Ok(Exit::Success)
}

/// Writes `text` on stdout: `exit` when it went, a failure when it did not (a closed
/// pipe).
fn written(io: &mut Io<'_>, text: &str, exit: Exit) -> Exit {
    match io.stdout.write_all(text.as_bytes()) {
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
                stderr_is_terminal: false,
                color_stdout: false,
                color_stderr: false,
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
