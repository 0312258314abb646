//! The exit codes: one [`Exit`] per kind of outcome, so that scripts can tell a device's
//! error answer from an offline device, a timeout or a broker failure.

use std::process::ExitCode;

use edge_proto::ServiceError;

use crate::call::{CallError, MethodResponse};

/// How the command ended, as its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: the device answered with a 2xx status.
    Success,
    /// 1: the device answered with another status.
    DeviceError,
    /// 2: bad usage: a malformed command line, or an argument out of range or invalid
    /// (400004 ArgumentInvalid).
    Usage,
    /// 3: the device is not online (404103 DeviceNotOnline).
    NotOnline,
    /// 4: the device did not answer in time (504101 GatewayTimeout).
    Timeout,
    /// 5: the broker could not be reached, the connection was lost, or another failure.
    Failure,
    /// 6: no such device: IoT Hub does not know it (404001 DeviceNotFound), or nothing
    /// the broker retains names it.
    NoSuchDevice,
    /// 7: IoT Hub refused the connection string's credentials (401002).
    Unauthorized,
    /// 8: the device is known but lists no methods: the broker retains its presence but
    /// no catalog, or its twin reports none (`methods` only).
    NoCatalog,
}

impl Exit {
    /// Every exit, in the order of its code.
    pub const ALL: [Exit; 9] = [
        Self::Success,
        Self::DeviceError,
        Self::Usage,
        Self::NotOnline,
        Self::Timeout,
        Self::Failure,
        Self::NoSuchDevice,
        Self::Unauthorized,
        Self::NoCatalog,
    ];

    /// The exit for the outcome of a call.
    pub fn of_call(outcome: &Result<MethodResponse, CallError>) -> Self {
        match outcome {
            Ok(response) if response.is_success() => Self::Success,
            Ok(_) => Self::DeviceError,
            Err(error) => Self::of_error(error),
        }
    }

    /// The exit for a call that has no answer.
    pub fn of_error(error: &CallError) -> Self {
        match error {
            CallError::NotRegistered { .. } => return Self::NoSuchDevice,
            CallError::Unauthorized { .. } => return Self::Unauthorized,
            _ => {}
        }
        match error.service_error() {
            Some(ServiceError::ArgumentInvalid) => Self::Usage,
            Some(ServiceError::DeviceNotOnline) => Self::NotOnline,
            Some(ServiceError::GatewayTimeout) => Self::Timeout,
            None => Self::Failure,
        }
    }

    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::DeviceError => 1,
            Self::Usage => 2,
            Self::NotOnline => 3,
            Self::Timeout => 4,
            Self::Failure => 5,
            Self::NoSuchDevice => 6,
            Self::Unauthorized => 7,
            Self::NoCatalog => 8,
        }
    }

    /// What the code means, for `--help`.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::Success => "the device answered with a 2xx status",
            Self::DeviceError => "the device answered with another status",
            Self::Usage => "bad usage, or an argument out of range or invalid (400004)",
            Self::NotOnline => "the device is not online (404103)",
            Self::Timeout => "the device did not answer in time (504101)",
            Self::Failure => "the broker or hub could not be reached, or another failure",
            Self::NoSuchDevice => {
                "no such device: the hub does not know it (404001), or nothing on the broker names it"
            }
            Self::Unauthorized => "the hub refused the connection string's key (401002)",
            Self::NoCatalog => "the device is known but lists no methods (`methods` only)",
        }
    }

    /// Every exit code as a `--help` section, for the command as a whole.
    pub fn help() -> String {
        Self::table(&Self::ALL.map(|exit| (exit, exit.meaning())))
    }

    /// A `--help` section listing `rows`, each exit with what it means for a command.
    pub fn table(rows: &[(Exit, &str)]) -> String {
        let mut help = String::from("Exit codes:\n");
        for (exit, meaning) in rows {
            help.push_str(&format!("  {}  {meaning}\n", exit.code()));
        }
        help
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::call::ArgumentError;

    #[test]
    fn outcomes_map_to_their_exit_codes() {
        let answer = |status| Ok(MethodResponse::from_wire(status, b"{}"));
        assert_eq!(Exit::of_call(&answer(200)).code(), 0);
        assert_eq!(Exit::of_call(&answer(204)).code(), 0);
        assert_eq!(Exit::of_call(&answer(404)).code(), 1);
        assert_eq!(Exit::of_call(&answer(500)).code(), 1);
        let failed = |error: CallError| Exit::of_call(&Err(error)).code();
        assert_eq!(
            failed(ArgumentError::ConnectTimeout(Duration::from_secs(301)).into()),
            2
        );
        assert_eq!(failed(CallError::NotOnline { device: "d".into() }), 3);
        let timeout = CallError::Timeout {
            device: "d".into(),
            method: "m".into(),
            after: Duration::from_secs(5),
        };
        assert_eq!(failed(timeout), 4);
        assert_eq!(
            failed(CallError::Connect {
                broker: "b".into(),
                reason: "r".into()
            }),
            5
        );
        assert_eq!(failed(CallError::Broker("lost".into())), 5);
        assert_eq!(failed(CallError::NotRegistered { device: "d".into() }), 6);
        assert_eq!(Exit::NoSuchDevice.code(), 6);
        assert_eq!(Exit::NoCatalog.code(), 8);
        let refused = CallError::Unauthorized {
            policy: "iothubowner".into(),
            reason: "bad signature".into(),
        };
        assert_eq!(failed(refused), 7);
        let throttled = CallError::Service {
            code: 429_001,
            message: "slow down".into(),
        };
        assert_eq!(failed(throttled), 5);
    }

    #[test]
    fn the_help_lists_every_code_once() {
        let help = Exit::help();
        for (expected, exit) in Exit::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(exit.code()), expected);
            assert!(
                help.contains(&format!("  {expected}  {}", exit.meaning())),
                "{help}"
            );
        }
    }
}
