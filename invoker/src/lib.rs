//! edge-invoker: calls direct methods on edge devices over MQTT and shows the answers,
//! as Azure IoT Hub's service API does (statuses, 404103 / 504101 / 400004); or, given
//! a service connection string, calls them through IoT Hub's REST API itself.
//!
//! Layout:
//! - [`caller`]: [`Caller`], one MQTT session shared by concurrent calls: learns each
//!   device's presence, publishes requests and gets each response back to its call by
//!   request id. Inside: `session` (connecting, the event-loop task), `routes` (who
//!   waits for what) and `snapshot` (reads of what the broker retains: presence,
//!   catalogs).
//! - [`call`]: what one call is: [`CallRequest`] and its argument checks,
//!   [`MethodResponse`], [`CallError`].
//! - [`iothub`]: [`HubClient`], IoT Hub's service REST API (calls, registry, twins,
//!   jobs) over one HTTPS connection pool, with SAS tokens signed by `edge-proto`.
//! - [`via`]: [`Via`], the broker or the hub, whichever the command line says: the
//!   commands ask it and do not care which.
//! - [`fleet`]: devices as the broker knows them (retained presence and catalog),
//!   for `devices` and `methods`.
//! - [`broadcast`]: a job calling one method on many devices (as a hub job, or from
//!   here with bounded concurrency), choosing its devices,
//!   its results and totals.
//! - [`pattern`]: device patterns, globs over device ids (`pump-*`).
//! - [`cli`]: the command line (clap): global options and subcommands.
//! - [`config`]: the optional TOML config file (defaults for broker, namespace,
//!   timeouts).
//! - [`command`]: runs a subcommand from a parsed command line with injected streams
//!   ([`run`], [`run_with`]).
//! - [`output`]: how answers, lists, results and errors are printed, for people (in
//!   colour on a terminal) or as JSON.
//! - [`exit`]: [`Exit`], the exit code of each kind of outcome.
//!
//! The wire protocol (topics, codes, payload rules) comes from `edge-proto`.

pub mod broadcast;
pub mod call;
pub mod caller;
pub mod cli;
pub mod command;
pub mod config;
pub mod exit;
pub mod fleet;
pub mod iothub;
pub mod output;
pub mod pattern;
pub mod via;

pub use call::{CallError, CallRequest, MethodResponse, ResponsePayload};
pub use caller::{Caller, ConnectOptions};
pub use cli::Cli;
pub use command::{Io, run, run_with};
pub use exit::Exit;
pub use iothub::HubClient;
pub use via::Via;
