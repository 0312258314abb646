//! edge-host's embedded broker as a process of its own (`edge-bench embedded-broker`,
//! started by [`crate::e2e`]), so that the floor responder is measured through it the
//! way it is through Mosquitto: with the broker's work in a process of its own.

use std::net::SocketAddr;

/// Options of the embedded broker process.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Where the broker listens.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
}

/// Runs edge-host's embedded broker until the process is ended (SIGTERM).
///
/// # Errors
/// When the broker cannot listen on the address.
pub async fn run(options: Options) -> anyhow::Result<()> {
    edge_broker::start(options.listen)?;
    std::future::pending().await
}
