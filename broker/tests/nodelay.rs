//! The embedded broker, checked from inside the process that runs it: what it does to
//! the sockets it accepts, which no client can see from its own end.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

/// Every connection the embedded broker accepts has TCP_NODELAY on. Without it, each
/// small MQTT packet the broker sends waits for Nagle's algorithm and the peer's delayed
/// ACK, and one call through the broker takes ~44 ms instead of a fraction of one.
#[test]
fn the_embedded_broker_accepts_connections_with_tcp_nodelay() {
    let port = edge_broker::start(([127, 0, 0, 1], 0).into())
        .expect("broker starts")
        .addr
        .port();

    // A raw MQTT client, so that its own address is known; its CONNACK shows the
    // broker has accepted the connection and set the socket up.
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("client connects");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    client
        .write_all(&connect_packet("nodelay-probe"))
        .expect("CONNECT sent");
    let mut connack = [0u8; 4];
    client.read_exact(&mut connack).expect("CONNACK read");
    assert_eq!(
        connack,
        [0x20, 2, 0, 0],
        "the broker accepts the connection"
    );

    let accepted = accepted_socket(
        client.peer_addr().expect("peer address"),
        client.local_addr().expect("local address"),
    );
    assert!(
        rustix::net::sockopt::tcp_nodelay(&accepted).expect("getsockopt TCP_NODELAY"),
        "the broker's end of the connection has TCP_NODELAY off"
    );
}

/// An MQTT 3.1.1 CONNECT with a clean session, a 60 s keep-alive and `client_id`.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let id_len = u16::try_from(id.len()).expect("short client id");
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&id_len.to_be_bytes());
    body.extend_from_slice(id);
    let remaining = u8::try_from(body.len()).expect("one-byte remaining length");
    let mut packet = vec![0x10, remaining];
    packet.extend_from_slice(&body);
    packet
}

/// The socket of this process whose local address is `local` and whose peer is `peer`:
/// the broker's end of a connection. Each socket among this process's descriptors is
/// duplicated through a pidfd (no unsafe borrowing of raw descriptors) and asked for
/// its addresses.
fn accepted_socket(local: SocketAddr, peer: SocketAddr) -> OwnedFd {
    let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd of this process");
    for entry in std::fs::read_dir("/proc/self/fd").expect("list /proc/self/fd") {
        let entry = entry.expect("a /proc/self/fd entry");
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // The descriptor may have closed since it was listed: skip it then.
        let Ok(socket) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let addr = |a: Option<rustix::net::SocketAddrAny>| -> Option<SocketAddr> {
            a.and_then(|a| a.try_into().ok())
        };
        let local_of = addr(rustix::net::getsockname(&socket).ok());
        let peer_of = addr(rustix::net::getpeername(&socket).ok().flatten());
        if local_of == Some(local) && peer_of == Some(peer) {
            return socket;
        }
    }
    panic!("no socket of this process connects {local} to {peer}");
}
