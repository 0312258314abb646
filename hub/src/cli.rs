//! The command line: with no command it runs the hub; `device add|list|remove`,
//! `certificate add|list|remove` and `connection-string` manage the registry in the
//! data folder, in the spirit of `az iot hub`. Commands print for people, and the one thing a script wants (a
//! connection string) as the last line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use edge_proto::BrokerUrl;
use edge_proto::iothub::{
    ConnectionString, DeviceAuth, DeviceConnectionString, ServiceConnectionString,
};

use crate::config::{self, Config};
use crate::registry::{DeviceChange, Registry};

/// A local Azure IoT Hub for direct methods: IoT Hub's device protocol (MQTT over
/// TLS) and service API (HTTPS), relayed to an edge-methods MQTT backend.
#[derive(Debug, Parser)]
#[command(
    name = "edge-hub",
    version,
    after_help = "Examples:\n  \
        edge-hub device add my-device       registers a device, prints its connection string\n  \
        edge-hub connection-string          prints the service connection string (iothubowner)\n  \
        edge-hub                            runs the hub: devices on :8883, service API on 127.0.0.1:8443,\n                                      \
        embedded backend broker on 127.0.0.1:1883\n\n\
        Clients trust the hub's local CA at DATA_DIR/ca.pem (SSL_CERT_FILE for the Python device SDK,\n\
        REQUESTS_CA_BUNDLE for the Python service SDK). Logging: RUST_LOG (default info)."
)]
pub struct Cli {
    /// Where the registry and the local CA live [default: $XDG_DATA_HOME/edge-hub or
    /// ~/.local/share/edge-hub].
    #[arg(long, env = "EDGE_HUB_DATA_DIR", value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// The hub's name in connection strings, tokens and its server certificate.
    #[arg(long, env = "EDGE_HUB_HOSTNAME", default_value = config::DEFAULT_HOSTNAME, global = true)]
    pub hostname: String,

    /// Where devices connect, MQTT over TLS (IoT Hub's port is 8883).
    #[arg(long, env = "EDGE_HUB_MQTTS_LISTEN", value_name = "ADDR", default_value = config::DEFAULT_MQTTS_LISTEN)]
    pub mqtts_listen: SocketAddr,

    /// Where the service API listens, HTTPS (IoT Hub's port is 443).
    #[arg(long, env = "EDGE_HUB_HTTPS_LISTEN", value_name = "ADDR", default_value = config::DEFAULT_HTTPS_LISTEN, global = true)]
    pub https_listen: SocketAddr,

    /// The backend MQTT broker; without it the hub runs its own.
    #[arg(long, env = "EDGE_BROKER", value_name = "mqtt[s]://HOST:PORT")]
    pub broker: Option<BrokerUrl>,

    /// Where the embedded backend broker listens (no authentication: keep it on
    /// loopback).
    #[arg(long, env = "EDGE_LISTEN", value_name = "ADDR", conflicts_with = "broker", default_value = config::DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// PEM file of CA certificates to trust for TLS to the backend broker.
    #[arg(long, env = "EDGE_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// The hub's server certificate chain (PEM), instead of the local CA's.
    #[arg(
        long,
        env = "EDGE_HUB_CERT_FILE",
        value_name = "FILE",
        requires = "key_file"
    )]
    pub cert_file: Option<PathBuf>,

    /// The server certificate's private key (PEM).
    #[arg(
        long,
        env = "EDGE_HUB_KEY_FILE",
        value_name = "FILE",
        requires = "cert_file"
    )]
    pub key_file: Option<PathBuf>,

    /// Threads the hub runs on [default: 1 with the embedded broker, one per CPU with
    /// --broker]. 1 runs every connection on one event loop, as Mosquitto does, and
    /// the embedded broker's with them.
    #[arg(long, env = "EDGE_HUB_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// What to do; without a command, run the hub.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The registry commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Devices in the registry.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// CA certificates that may sign devices' client certificates (as `az iot hub
    /// certificate`).
    #[command(subcommand)]
    Certificate(CertificateCommand),
    /// Prints a service connection string (last line).
    ConnectionString {
        /// The shared access policy.
        #[arg(long, default_value = "iothubowner")]
        policy: String,
    },
}

/// `device ...`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Registers a device (keys generated) and prints its connection string (last line).
    Add {
        /// The device id.
        id: String,
        /// A self-signed client certificate's thumbprint (SHA-256 or SHA-1, hex) the
        /// device may connect with instead of a SAS token; twice for a second one.
        #[arg(long = "x509-thumbprint", value_name = "HEX")]
        x509_thumbprints: Vec<String>,
        /// The device may connect with a client certificate whose CN is its id, signed
        /// by a CA certificate the registry trusts (`certificate add`).
        #[arg(long = "x509-ca")]
        x509_ca: bool,
    },
    /// Lists the registered devices.
    List,
    /// Removes a device.
    Remove {
        /// The device id.
        id: String,
    },
    /// Prints a registered device's connection string (last line).
    ConnectionString {
        /// The device id.
        id: String,
    },
}

/// `certificate ...`.
#[derive(Debug, Subcommand)]
pub enum CertificateCommand {
    /// Trusts a CA certificate (PEM) to sign devices' client certificates: a device
    /// added with `--x509-ca` connects with a certificate whose CN is its id, signed by
    /// it. Whoever runs this vouches for the CA (IoT Hub's `--verified`).
    Add {
        /// Its name in the registry.
        name: String,
        /// The CA certificate, PEM.
        #[arg(long, value_name = "FILE")]
        path: PathBuf,
    },
    /// Lists the trusted CA certificates.
    List,
    /// No longer trusts a CA certificate.
    Remove {
        /// Its name in the registry.
        name: String,
    },
}

impl Cli {
    /// The threads the hub runs on: `--threads`, else one with the embedded broker
    /// (which then runs on the hub's event loop too), else one per CPU (`None`).
    ///
    /// Measured with `edge-bench hub --embedded` (2 CPUs, interleaved runs, before the
    /// hub reached its broker in memory): on one thread with the broker, a device
    /// through the hub answered at 125-129 us p50 against 161-172 us on a pool with the
    /// broker on a thread of its own, and calls per second at 64 in flight went from
    /// 0.49-0.52x the direct paths to 0.62-0.65x.
    /// With `--broker`, one thread took less CPU per call but answered no sooner, and
    /// relayed a device later (1.9x the direct path at p50 against 1.4-1.5x), so a pool
    /// stays the default there.
    pub fn threads(&self) -> Option<u16> {
        self.threads.or(self.broker.is_none().then_some(1))
    }

    /// The hub's configuration from the command line.
    pub fn config(&self) -> Config {
        let mut security = edge_proto::transport::Security::default();
        security.tls.ca_file = self.ca_file.clone();
        Config {
            data_dir: self
                .data_dir
                .clone()
                .unwrap_or_else(config::default_data_dir),
            hostname: self.hostname.clone(),
            mqtts_listen: self.mqtts_listen,
            https_listen: self.https_listen,
            broker: self.broker.clone(),
            listen: self.listen,
            broker_on_hub_thread: self.broker.is_none() && self.threads() == Some(1),
            backend_security: security,
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

/// Runs a registry command, writing what it prints to `out`.
///
/// # Errors
/// When the registry cannot be opened or written, or refuses the change (an invalid or
/// existing id, an unknown device or policy).
pub fn execute(config: &Config, command: &Command, out: &mut dyn Write) -> anyhow::Result<()> {
    let registry = Registry::open(&config.data_dir)?;
    match command {
        Command::Device(DeviceCommand::Add {
            id,
            x509_thumbprints,
            x509_ca,
        }) => {
            let change = DeviceChange {
                thumbprints: (!x509_thumbprints.is_empty()).then(|| x509_thumbprints.clone()),
                x509_ca: x509_ca.then_some(true),
                ..DeviceChange::default()
            };
            registry.put_device(id, change, None)?;
            writeln!(
                out,
                "Registered device '{id}' in {}.",
                registry.path().display()
            )?;
            writeln!(out, "{}", device_string(config, &registry, id)?)?;
        }
        Command::Device(DeviceCommand::List) => {
            let devices = registry.devices()?;
            if devices.is_empty() {
                writeln!(out, "No devices. Register one with: edge-hub device add ID")?;
            }
            for (id, device) in devices {
                writeln!(out, "{id}\t{}", device.status)?;
            }
        }
        Command::Device(DeviceCommand::Remove { id }) => {
            registry.remove_device(id, None)?;
            writeln!(out, "Removed device '{id}'.")?;
        }
        Command::Device(DeviceCommand::ConnectionString { id }) => {
            writeln!(out, "{}", device_string(config, &registry, id)?)?;
        }
        Command::Certificate(CertificateCommand::Add { name, path }) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let added = registry
                .add_certificate(name, &pem)
                .with_context(|| format!("{} was not added", path.display()))?;
            writeln!(
                out,
                "Trusting CA certificate '{name}' ({}, SHA-256 {}) in {}.",
                added.subject,
                added.thumbprint,
                registry.path().display()
            )?;
        }
        Command::Certificate(CertificateCommand::List) => {
            let certificates = registry.certificates()?;
            if certificates.is_empty() {
                writeln!(
                    out,
                    "No CA certificates. Trust one with: edge-hub certificate add NAME --path FILE"
                )?;
            }
            for ca in certificates {
                writeln!(out, "{}\t{}\t{}", ca.name, ca.thumbprint, ca.subject)?;
            }
        }
        Command::Certificate(CertificateCommand::Remove { name }) => {
            registry.remove_certificate(name)?;
            writeln!(out, "Removed CA certificate '{name}'.")?;
        }
        Command::ConnectionString { policy } => {
            let found = registry
                .policy(policy)?
                .with_context(|| format!("no policy '{policy}' in the registry"))?;
            let string = ConnectionString::Service(ServiceConnectionString {
                host_name: config.service_host_name(),
                key_name: found.name,
                key: found.primary_key,
            });
            writeln!(out, "{string}")?;
        }
    }
    Ok(())
}

fn device_string(config: &Config, registry: &Registry, id: &str) -> anyhow::Result<String> {
    let device = registry
        .device(id)?
        .with_context(|| format!("device '{id}' is not registered"))?;
    let auth = if device.x509_thumbprints.is_empty() && !device.x509_ca {
        DeviceAuth::SharedAccessKey(device.primary_key)
    } else {
        DeviceAuth::X509
    };
    Ok(ConnectionString::Device(DeviceConnectionString {
        host_name: config.hostname.clone(),
        device_id: id.to_owned(),
        module_id: None,
        gateway_host_name: None,
        auth,
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
        let mut argv = vec!["edge-hub", "--data-dir"];
        argv.push(dir.to_str().expect("utf-8 path"));
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv)?;
        let mut out = Vec::new();
        execute(
            &cli.config(),
            cli.command.as_ref().expect("a command"),
            &mut out,
        )?;
        Ok(String::from_utf8(out)?)
    }

    #[test]
    fn the_hub_runs_on_one_thread_with_its_broker_a_pool_with_another_and_never_on_none() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["edge-hub"], args].concat());
        let broker = ["--broker", "mqtt://127.0.0.1:1883"];
        let cases: [(&[&str], Option<u16>, bool); 5] = [
            (&[], Some(1), true),
            (&["--threads", "4"], Some(4), false),
            (&broker, None, false),
            (&[&broker[..], &["--threads", "1"]].concat(), Some(1), false),
            (&[&broker[..], &["--threads", "2"]].concat(), Some(2), false),
        ];
        for (args, threads, on_hub_thread) in cases {
            let cli = parse(args).expect("parses");
            assert_eq!(cli.threads(), threads, "{args:?}");
            assert_eq!(cli.config().broker_on_hub_thread, on_hub_thread, "{args:?}");
        }
        let error = parse(&["--threads", "0"]).expect_err("zero threads");
        assert!(error.to_string().contains("--threads"), "{error}");
    }

    #[test]
    fn device_add_prints_a_connection_string_that_parses_as_the_last_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = run(dir.path(), &["device", "add", "pump-7"]).expect("adds");
        let last = out.lines().last().expect("a line");
        let Ok(ConnectionString::Device(device)) = last.parse::<ConnectionString>() else {
            panic!("not a device string: {last}")
        };
        assert_eq!(device.device_id, "pump-7");
        assert_eq!(device.host_name, "localhost");
        let list = run(dir.path(), &["device", "list"]).expect("lists");
        assert_eq!(list, "pump-7\tenabled\n");
        let error = run(dir.path(), &["device", "add", "pump-7"]).expect_err("twice");
        assert!(error.to_string().contains("already registered"), "{error}");
        let x509 = run(
            dir.path(),
            &[
                "device",
                "add",
                "cam-1",
                "--x509-thumbprint",
                &"AB".repeat(32),
            ],
        )
        .expect("adds");
        assert!(
            x509.ends_with("HostName=localhost;DeviceId=cam-1;x509=true\n"),
            "{x509}"
        );
        let error = run(
            dir.path(),
            &["device", "add", "cam-2", "--x509-thumbprint", "xyz"],
        )
        .expect_err("a bad thumbprint");
        assert!(error.to_string().contains("hex digits"), "{error}");
        let list = run(dir.path(), &["device", "list"]).expect("lists");
        assert!(list.contains("cam-1"), "{list}");
        assert!(
            !list.contains("cam-2"),
            "a refused device is not left behind: {list}"
        );
        run(dir.path(), &["device", "remove", "pump-7"]).expect("removes");
        let error = run(dir.path(), &["device", "remove", "pump-7"]).expect_err("gone");
        assert!(error.to_string().contains("not registered"), "{error}");
    }

    #[test]
    fn certificate_add_trusts_a_ca_and_refuses_what_is_not_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = dir.path().join("fleet-ca.pem");
        std::fs::write(&ca, params.self_signed(&key).expect("signs").pem()).expect("writes");
        let leaf = dir.path().join("leaf.pem");
        let not_ca = rcgen::CertificateParams::new(vec!["x".to_owned()]).expect("params");
        std::fs::write(&leaf, not_ca.self_signed(&key).expect("signs").pem()).expect("writes");
        let ca_arg = ca.to_str().expect("utf-8");
        let out = run(
            dir.path(),
            &["certificate", "add", "fleet", "--path", ca_arg],
        )
        .expect("adds");
        assert!(out.starts_with("Trusting CA certificate 'fleet'"), "{out}");
        let error = run(
            dir.path(),
            &["certificate", "add", "fleet", "--path", ca_arg],
        )
        .expect_err("twice");
        assert!(
            format!("{error:#}").contains("already registered"),
            "{error:#}"
        );
        let leaf_arg = leaf.to_str().expect("utf-8");
        let error = run(
            dir.path(),
            &["certificate", "add", "leaf", "--path", leaf_arg],
        )
        .expect_err("not a CA");
        assert!(
            format!("{error:#}").contains("not a CA certificate"),
            "{error:#}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("writes");
        let error = run(
            dir.path(),
            &[
                "certificate",
                "add",
                "junk",
                "--path",
                junk.to_str().expect("utf-8"),
            ],
        )
        .expect_err("not PEM");
        assert!(
            format!("{error:#}").contains("exactly one certificate"),
            "{error:#}"
        );
        let list = run(dir.path(), &["certificate", "list"]).expect("lists");
        assert!(list.starts_with("fleet\t"), "{list}");
        assert_eq!(list.lines().count(), 1, "{list}");
        let out = run(dir.path(), &["device", "add", "cam-9", "--x509-ca"]).expect("adds");
        assert!(out.ends_with("DeviceId=cam-9;x509=true\n"), "{out}");
        run(dir.path(), &["certificate", "remove", "fleet"]).expect("removes");
        let error = run(dir.path(), &["certificate", "remove", "fleet"]).expect_err("gone");
        assert!(
            error.to_string().contains("no CA certificate named"),
            "{error}"
        );
    }

    #[test]
    fn the_service_string_names_the_https_port_unless_it_is_443() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = run(dir.path(), &["connection-string"]).expect("prints");
        assert!(
            out.starts_with("HostName=localhost:8443;SharedAccessKeyName=iothubowner;"),
            "{out}"
        );
        let out = run(
            dir.path(),
            &[
                "--https-listen",
                "127.0.0.1:443",
                "--hostname",
                "hub.local",
                "connection-string",
                "--policy",
                "service",
            ],
        )
        .expect("prints");
        assert!(
            out.starts_with("HostName=hub.local;SharedAccessKeyName=service;"),
            "{out}"
        );
        let error =
            run(dir.path(), &["connection-string", "--policy", "nope"]).expect_err("no policy");
        assert!(error.to_string().contains("no policy 'nope'"), "{error}");
    }
}
