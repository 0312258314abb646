//! edge-broker: the embedded MQTT 3.1.1 broker that `edge-host` and `edge-hub` run when
//! no `--broker` is given, so that one command serves a whole machine.
//!
//! It runs one event loop (a single-threaded Tokio runtime) for every connection, as
//! Mosquitto does: a message read from one client is routed and written to its
//! subscribers on that same thread, so a call through it wakes no other thread. That
//! loop is a thread of its own ([`start`]), or the loop of a program that runs on one
//! thread ([`start_here`]): edge-host and edge-hub run it on theirs by default, so
//! that what passes between them and the broker stays on that thread. Every accepted
//! socket has `TCP_NODELAY`. Clients in the broker's own process connect through its
//! [`Link`] instead: the same MQTT over an in-memory pipe, without a socket, so that
//! what they exchange with the broker costs no system call.
//!
//! What it does: MQTT 3.1.1 (protocol level 4) over TCP (and over its [`Link`]); QoS 0
//! and 1 (QoS 2 publishes are taken and acknowledged as MQTT says, and delivered at QoS
//! 1; subscriptions are granted at most QoS 1); `+` and `#` wildcards, with `$` topics
//! out of their reach at the first level; retained messages; wills, published when a
//! connection ends without DISCONNECT (lost, timed out, malformed, or taken over); a
//! second connection with the same client id replaces the first; keep-alive (1.5 times
//! the client's); packets up to [`edge_proto::client::MAX_PACKET`].
//!
//! What it does not, on purpose: authentication and TLS (it listens on loopback unless
//! told otherwise; fleets use their own broker), MQTT 5, and sessions that outlive their
//! connection (a client asking for one is told none was present, as after an expiry).
//! A subscriber that stops reading is sent at most [`router::MAX_QUEUED`] messages more;
//! the rest are dropped and counted in the log, as Mosquitto's `max_queued_messages`.
//!
//! Modules: [`router`] holds the state (clients, the subscription tree, retained
//! messages); `session` serves one connection.

pub mod router;
mod session;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use edge_proto::BrokerUrl;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;

/// How many bytes an in-process connection buffers each way before a writer waits
/// (as much as a session writes in one batch).
const PIPE_BYTES: usize = 256 * 1024;

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address is taken or not ours.
    #[error(
        "cannot start the embedded broker on {listen}: is another broker running there? \
         Use --broker mqtt://HOST:PORT to connect to it, or --listen to pick another address"
    )]
    Bind {
        /// The address asked for.
        listen: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The thread or its runtime could not be made.
    #[error("cannot start the embedded broker's thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A broker that was started: where it listens. It runs until the process ends.
#[derive(Debug, Clone)]
pub struct Running {
    /// The address it is bound to (the real port when port 0 was asked for).
    pub addr: SocketAddr,
    /// How clients reach it: the bound address, or loopback when bound to all.
    pub url: BrokerUrl,
    /// How clients in this process reach it without a socket.
    pub link: Link,
}

/// Opens connections to a broker of this process over in-memory pipes: the client
/// speaks MQTT as it would over TCP, and the broker serves the other end as it serves
/// a socket. Clones open connections to the same broker, from any thread.
#[derive(Clone)]
pub struct Link {
    /// Hands the broker's end of each new pipe to its accept loop.
    pipes: mpsc::UnboundedSender<DuplexStream>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Link")
    }
}

impl Link {
    /// A new connection: the client's end of a pipe whose other end the broker serves.
    ///
    /// # Errors
    /// When the broker has stopped (its event loop ended).
    pub fn open(&self) -> std::io::Result<DuplexStream> {
        let (client, broker) = tokio::io::duplex(PIPE_BYTES);
        self.pipes.send(broker).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the embedded broker has stopped",
            )
        })?;
        Ok(client)
    }

    /// The transport an MQTT client (rumqttc) connects through, each time it
    /// (re)connects.
    pub fn connector(&self) -> rumqttc::Connector {
        let link = self.clone();
        rumqttc::Connector::new(move || {
            let opened = link
                .open()
                .map(|pipe| Box::new(pipe) as Box<dyn rumqttc::AsyncReadWrite>);
            std::future::ready(opened)
        })
    }
}

/// Binds `listen` and starts the broker on a thread of its own, accepting connections
/// when this returns.
///
/// # Errors
/// When `listen` cannot be bound (another broker may already be there), or the thread
/// cannot be started.
pub fn start(listen: SocketAddr) -> Result<Running, StartError> {
    let bound = bind(listen)?;
    let running = bound.running.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Thread)?;
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, bound.serve());
        })
        .map_err(StartError::Thread)?;
    Ok(running)
}

/// Binds `listen` and starts the broker on the calling thread's event loop, as tasks
/// of the `tokio::task::LocalSet` it runs in; it serves as long as that set runs.
///
/// # Errors
/// When `listen` cannot be bound (another broker may already be there).
///
/// # Panics
/// When not called inside a `LocalSet`.
pub fn start_here(listen: SocketAddr) -> Result<Running, StartError> {
    let bound = bind(listen)?;
    let running = bound.running.clone();
    tokio::task::spawn_local(bound.serve());
    Ok(running)
}

/// Starts the broker a program embeds: on the calling thread's event loop
/// ([`start_here`]) when `on_this_loop`, else on a thread of its own ([`start`]).
///
/// # Errors
/// As those two.
///
/// # Panics
/// With `on_this_loop`, when not called inside a `LocalSet`.
pub fn embed(listen: SocketAddr, on_this_loop: bool) -> Result<Running, StartError> {
    if on_this_loop {
        start_here(listen)
    } else {
        start(listen)
    }
}

/// A broker bound to its address, serving once [`Bound::serve`] runs: on a thread of
/// its own ([`start`]), or on the caller's event loop ([`start_here`]).
#[derive(Debug)]
struct Bound {
    /// Where it listens.
    running: Running,
    listener: std::net::TcpListener,
    /// The broker's ends of the pipes its [`Link`] opens.
    pipes: mpsc::UnboundedReceiver<DuplexStream>,
}

impl Bound {
    /// Serves for ever. Every connection is a task of its own spawned with
    /// `spawn_local`: run this inside a `tokio::task::LocalSet` (one made with a
    /// current-thread runtime, for one event loop).
    async fn serve(self) {
        tracing::info!(addr = %self.running.addr, "embedded broker listening");
        accept(self.listener, self.pipes).await;
    }
}

/// Binds `listen` for a broker that [`Bound::serve`] will run; connections made
/// before that wait in the listen backlog.
///
/// # Errors
/// When `listen` cannot be bound (another broker may already be there).
fn bind(listen: SocketAddr) -> Result<Bound, StartError> {
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .map_err(|source| StartError::Bind { listen, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { listen, source })?;
    let host = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "::1".to_owned(),
        ip => ip.to_string(),
    };
    let (link, pipes) = mpsc::unbounded_channel();
    Ok(Bound {
        running: Running {
            addr,
            url: BrokerUrl::tcp(host, addr.port()),
            link: Link { pipes: link },
        },
        listener,
        pipes,
    })
}

/// Accepts connections for ever, on the socket and from the [`Link`], a session task
/// each.
async fn accept(listener: std::net::TcpListener, mut pipes: mpsc::UnboundedReceiver<DuplexStream>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "the embedded broker cannot listen");
            return;
        }
    };
    let router = Rc::new(RefCell::new(router::Router::default()));
    let mut serial: router::Serial = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    serial += 1;
                    tokio::task::spawn_local(session::serve_tcp(stream, peer, serial, Rc::clone(&router)));
                }
                Err(error) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!(%error, "the embedded broker cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            // Every Link gone (the Running dropped): only the socket remains.
            Some(pipe) = pipes.recv() => {
                serial += 1;
                tokio::task::spawn_local(session::serve_pipe(pipe, serial, Rc::clone(&router)));
            }
        }
    }
}
