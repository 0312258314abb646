//! A broadcast job: one method called on many devices, a bounded number at a time, as
//! IoT Hub's scheduleDeviceMethod does. Every device chosen gets exactly one
//! [`DeviceResult`]: its answer, or why there is none. A device that is not online
//! fails at once with 404103 (unless the connect timeout lets it come online), so
//! offline devices cost the job nothing.
//!
//! Which devices: [`select`] expands patterns over the devices whose presence the
//! broker holds (or, on IoT Hub, the devices in its registry), and adds the ids named
//! outright (a literal `--devices` or a line of `--devices-file`), which are called
//! whatever the broker knows of them, as `call` does.
//!
//! How: [`broadcast`] picks one of two ways. [`run`] makes the calls itself, a bounded
//! number at once; on IoT Hub, [`run_job`] has the hub run them as a
//! `scheduleDeviceMethod` job and reads each device's result back from it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edge_proto::NameError;
use edge_proto::topic::check_device_id;
use tokio::task::JoinSet;

use crate::call::{CallError, CallRequest, MethodResponse};
use crate::exit::Exit;
use crate::fleet::DeviceState;
use crate::iothub::{HubClient, JOB_POLL, JobStart, JobStatistics, JobStatus};
use crate::pattern::DevicePattern;
use crate::via::Via;

/// The calls in flight at once when the command line does not say.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// The outcome of the job's call on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceResult {
    /// The device called.
    pub device: String,
    /// What it answered, or why there is no answer.
    pub outcome: Result<MethodResponse, CallError>,
    /// How long the call took, from the start of its turn to its end.
    pub elapsed: Duration,
}

/// How one device's call ended, as the job's totals count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The device answered with a 2xx status.
    Succeeded,
    /// The device answered with another status, or the call failed otherwise (the
    /// broker was lost, the hub gave no result).
    Failed,
    /// The device is not online (404103).
    NotOnline,
    /// The device did not answer in time (504101).
    TimedOut,
}

impl Outcome {
    /// How `result` counts.
    pub fn of(result: &DeviceResult) -> Self {
        match &result.outcome {
            Ok(response) if response.is_success() => Self::Succeeded,
            Ok(_) => Self::Failed,
            Err(CallError::NotOnline { .. }) => Self::NotOnline,
            Err(CallError::Timeout { .. }) => Self::TimedOut,
            Err(_) => Self::Failed,
        }
    }
}

/// How many devices ended which way; they add up to the devices called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Answered 2xx.
    pub succeeded: usize,
    /// Answered another status, or failed otherwise.
    pub failed: usize,
    /// Not online.
    pub not_online: usize,
    /// No answer in time.
    pub timed_out: usize,
}

impl Totals {
    /// The totals of `results`.
    pub fn of(results: &[DeviceResult]) -> Self {
        let mut totals = Self::default();
        for result in results {
            totals.add(Outcome::of(result));
        }
        totals
    }

    /// Counts one more device.
    pub fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Succeeded => self.succeeded += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::NotOnline => self.not_online += 1,
            Outcome::TimedOut => self.timed_out += 1,
        }
    }

    /// How many devices were counted.
    pub fn devices(&self) -> usize {
        self.succeeded + self.failed + self.not_online + self.timed_out
    }
}

/// The exit of a job: success only when every device answered 2xx; a failure of the
/// session (the broker or hub lost, the key refused) before one that only some devices
/// had.
pub fn exit(results: &[DeviceResult]) -> Exit {
    let failed = |matches: fn(&CallError) -> bool| {
        results
            .iter()
            .any(|r| r.outcome.as_ref().err().is_some_and(matches))
    };
    if failed(|e| matches!(e, CallError::Unauthorized { .. })) {
        Exit::Unauthorized
    } else if failed(|e| {
        matches!(
            e,
            CallError::Connect { .. } | CallError::Broker(_) | CallError::Hub { .. }
        )
    }) {
        Exit::Failure
    } else if results.iter().all(|r| Outcome::of(r) == Outcome::Succeeded) {
        Exit::Success
    } else {
        Exit::DeviceError
    }
}

/// Why the devices of a job could not be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The devices file could not be read.
    #[error("could not read the devices file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A line of the devices file is not a valid device id.
    #[error("devices file {path}, line {line}: {reason}")]
    FileLine {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with the id.
        reason: NameError,
    },
    /// A `--devices` value without wildcards is not a valid device id.
    #[error("--devices {pattern}: {reason}")]
    Literal {
        /// The value.
        pattern: String,
        /// What is wrong with it as a device id.
        reason: NameError,
    },
    /// No device matches: the job would call nobody.
    #[error("no device to call: {0}")]
    NoDevice(String),
}

impl TargetError {
    /// The exit for this error: no device to call is 6 (no such device), a bad argument
    /// is 2.
    pub fn exit(&self) -> Exit {
        match self {
            Self::NoDevice(_) => Exit::NoSuchDevice,
            _ => Exit::Usage,
        }
    }
}

/// Reads a devices file: one device id a line; blank lines and lines starting with `#`
/// are skipped, and so is the space around an id.
///
/// # Errors
/// [`TargetError::File`] when it cannot be read, [`TargetError::FileLine`] naming the
/// first line that is not a valid device id.
pub fn read_devices_file(path: &Path) -> Result<Vec<String>, TargetError> {
    let text = std::fs::read_to_string(path).map_err(|e| TargetError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut devices = Vec::new();
    for (at, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() || id.starts_with('#') {
            continue;
        }
        check_device_id(id).map_err(|reason| TargetError::FileLine {
            path: path.to_owned(),
            line: at + 1,
            reason,
        })?;
        devices.push(id.to_owned());
    }
    Ok(devices)
}

/// Checks that every pattern without wildcards is a valid device id, so that a typo is
/// refused before connecting.
///
/// # Errors
/// [`TargetError::Literal`] naming the first that is not.
pub fn check_literals(patterns: &[DevicePattern]) -> Result<(), TargetError> {
    for pattern in patterns.iter().filter(|p| p.is_literal()) {
        check_device_id(pattern.as_str()).map_err(|reason| TargetError::Literal {
            pattern: pattern.to_string(),
            reason,
        })?;
    }
    Ok(())
}

/// The devices to call, sorted and each once: the `known` devices that match a
/// wildcard pattern, the literal patterns, and the ids `named` outright.
///
/// # Errors
/// [`TargetError::Literal`] for a literal pattern that is not a device id;
/// [`TargetError::NoDevice`] when nothing is left to call.
pub fn select(
    patterns: &[DevicePattern],
    known: &[DeviceState],
    named: &[String],
) -> Result<Vec<String>, TargetError> {
    select_from(patterns, known, named, "the broker")
}

/// As [`select`], where `known_by` says who knows the `known` devices, for the error
/// (`the broker`, `the hub's registry`).
///
/// # Errors
/// As [`select`].
pub fn select_from(
    patterns: &[DevicePattern],
    known: &[DeviceState],
    named: &[String],
    known_by: &str,
) -> Result<Vec<String>, TargetError> {
    check_literals(patterns)?;
    let mut devices = BTreeSet::new();
    for pattern in patterns {
        if pattern.is_literal() {
            devices.insert(pattern.to_string());
        } else {
            devices.extend(
                known
                    .iter()
                    .filter(|d| pattern.matches(&d.device))
                    .map(|d| d.device.clone()),
            );
        }
    }
    devices.extend(named.iter().cloned());
    if devices.is_empty() {
        let wanted = patterns
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let why = match (wanted.is_empty(), known.len()) {
            (true, _) => "the devices file names none".to_owned(),
            (false, 0) => format!("{known_by} knows no device, so none matches {wanted}"),
            (false, n) => format!(
                "none of the {n} device{} {known_by} knows matches {wanted}",
                if n == 1 { "" } else { "s" }
            ),
        };
        return Err(TargetError::NoDevice(why));
    }
    Ok(devices.into_iter().collect())
}

/// Calls `request`'s method with its payload and timeouts on each of `devices` (its own
/// `device` is ignored), at most `concurrency` at once, on one session. `each` sees
/// every result as it comes; the results are returned sorted by device.
pub async fn run(
    caller: &Via,
    request: &CallRequest,
    devices: &[String],
    concurrency: usize,
    mut each: impl FnMut(&DeviceResult),
) -> Vec<DeviceResult> {
    let concurrency = concurrency.max(1);
    let mut queue = devices.iter();
    let mut calls = JoinSet::new();
    // Which device each task calls, to report a task that panicked as that device's.
    let mut running = HashMap::new();
    let mut results = Vec::with_capacity(devices.len());
    loop {
        while calls.len() < concurrency {
            let Some(device) = queue.next() else { break };
            let (caller, mut request) = (caller.clone(), request.clone());
            request.device = device.clone();
            let task = calls.spawn(async move {
                let started = Instant::now();
                let outcome = caller.call(&request).await;
                DeviceResult {
                    device: request.device,
                    outcome,
                    elapsed: started.elapsed(),
                }
            });
            running.insert(task.id(), device.clone());
        }
        let result = match calls.join_next_with_id().await {
            None => break,
            Some(Ok((id, result))) => {
                running.remove(&id);
                result
            }
            Some(Err(error)) => DeviceResult {
                device: running.remove(&error.id()).unwrap_or_default(),
                outcome: Err(CallError::Broker(format!("the call failed: {error}"))),
                elapsed: Duration::ZERO,
            },
        };
        each(&result);
        results.push(result);
    }
    results.sort_by(|a, b| a.device.cmp(&b.device));
    results
}

/// How a broadcast ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran {
    /// The hub ran it as a `scheduleDeviceMethod` job.
    Job(JobOutcome),
    /// The calls were made from here: one result per device, sorted by device.
    Calls(Vec<DeviceResult>),
}

/// Calls `request`'s method on `devices` through `via`: on a hub that runs jobs, as a
/// job ([`run_job`], `progress` seeing its statistics as it goes); else from here
/// ([`run`], at most `concurrency` at once, `each` seeing every result as it comes).
///
/// # Errors
/// When the hub refuses or fails the job, or the job outlives its time limit.
pub async fn broadcast(
    via: &Via,
    request: &CallRequest,
    devices: &[String],
    concurrency: usize,
    progress: impl FnMut(&JobStatistics),
    each: impl FnMut(&DeviceResult),
) -> Result<Ran, CallError> {
    if let Via::Hub(hub) = via
        && let Some(job) = run_job(hub, request, devices, progress).await?
    {
        return Ok(Ran::Job(job));
    }
    // On the broker, or a hub without jobs: the calls are made from here.
    Ok(Ran::Calls(
        run(via, request, devices, concurrency, each).await,
    ))
}

/// What a job on the hub came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// The job's id.
    pub job_id: String,
    /// How it ended, and its statistics.
    pub status: JobStatus,
    /// One result per device, sorted by device; [`CallError::Unreported`] for each when
    /// the hub gives no per-device results.
    pub results: Vec<DeviceResult>,
    /// Whether the results are the hub's per-device ones (else only the statistics
    /// are known).
    pub per_device: bool,
}

impl JobOutcome {
    /// The totals: counted from the per-device results, else the job's statistics.
    pub fn totals(&self) -> Totals {
        if self.per_device {
            return Totals::of(&self.results);
        }
        let stats = &self.status.device_job_statistics;
        let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Totals {
            succeeded: count(stats.succeeded_count),
            failed: count(stats.device_count.saturating_sub(stats.succeeded_count)),
            not_online: 0,
            timed_out: 0,
        }
    }

    /// The exit: as [`exit`] with per-device results; else success only when the job
    /// completed and every device succeeded.
    pub fn exit(&self) -> Exit {
        if self.per_device {
            return exit(&self.results);
        }
        let stats = &self.status.device_job_statistics;
        if self.status.status == "completed" && stats.succeeded_count == stats.device_count {
            Exit::Success
        } else {
            Exit::DeviceError
        }
    }
}

/// Has the hub run `request`'s method on `devices` as a `scheduleDeviceMethod` job:
/// starts it, asks for its progress every second (`progress` sees each answer's
/// statistics) until it ends, then reads each device's result. `None` when the hub
/// cannot take this job (it has no jobs API, or the devices do not fit in one query
/// condition): the caller makes the calls itself with [`run`].
///
/// # Errors
/// When the hub refuses the job or fails, or the job outlives its own time limit by a
/// minute.
pub async fn run_job(
    hub: &HubClient,
    request: &CallRequest,
    devices: &[String],
    mut progress: impl FnMut(&JobStatistics),
) -> Result<Option<JobOutcome>, CallError> {
    let job_id = format!(
        "edge-invoker-{}-{:08x}",
        edge_proto::iothub::unix_now(),
        rand::random::<u32>()
    );
    let mut status = match hub.start_job(&job_id, request, devices).await? {
        JobStart::NoJobs => return Ok(None),
        JobStart::Started(status) => status,
    };
    let limit = crate::iothub::max_execution(request, devices.len()) + Duration::from_secs(60);
    let started = Instant::now();
    while !status.is_over() {
        progress(&status.device_job_statistics);
        if started.elapsed() > limit {
            return Err(CallError::Hub {
                host: hub.host().to_owned(),
                reason: format!("job '{job_id}' is still {} after {limit:?}", status.status),
            });
        }
        tokio::time::sleep(JOB_POLL).await;
        status = hub.job(&job_id).await?;
    }
    progress(&status.device_job_statistics);
    let reported = hub.job_results(&job_id).await?;
    let per_device = reported.is_some();
    let mut by_device: HashMap<String, DeviceResult> = reported
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.device.clone(), r))
        .collect();
    let results = devices
        .iter()
        .map(|device| {
            by_device.remove(device).unwrap_or_else(|| DeviceResult {
                device: device.clone(),
                outcome: Err(CallError::Unreported {
                    job: job_id.clone(),
                }),
                elapsed: Duration::ZERO,
            })
        })
        .collect();
    Ok(Some(JobOutcome {
        job_id,
        status,
        results,
        per_device,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(ids: &[&str]) -> Vec<DeviceState> {
        ids.iter()
            .map(|id| DeviceState {
                device: (*id).to_owned(),
                presence: None,
                catalog: None,
            })
            .collect()
    }

    fn patterns(globs: &[&str]) -> Vec<DevicePattern> {
        globs.iter().map(|g| DevicePattern::new(*g)).collect()
    }

    #[test]
    fn patterns_expand_over_known_devices_and_literals_are_called_anyway() {
        let fleet = known(&["pump-1", "pump-2", "valve-1"]);
        assert_eq!(
            select(&patterns(&["pump-*"]), &fleet, &[]).expect("matches"),
            ["pump-1", "pump-2"]
        );
        // Overlapping patterns and names: each device once, sorted.
        assert_eq!(
            select(
                &patterns(&["*-1", "pump-*", "sdk-device"]),
                &fleet,
                &["valve-1".to_owned(), "zeta".to_owned()]
            )
            .expect("matches"),
            ["pump-1", "pump-2", "sdk-device", "valve-1", "zeta"]
        );
    }

    #[test]
    fn nothing_to_call_is_an_error_that_says_why() {
        let error = select(&patterns(&["nope-*"]), &known(&["a", "b"]), &[]).expect_err("none");
        assert_eq!(
            error.to_string(),
            "no device to call: none of the 2 devices the broker knows matches 'nope-*'"
        );
        assert_eq!(error.exit(), Exit::NoSuchDevice);
        let error = select(&patterns(&["x?"]), &[], &[]).expect_err("none");
        assert_eq!(
            error.to_string(),
            "no device to call: the broker knows no device, so none matches 'x?'"
        );
        let error = select(&[], &[], &[]).expect_err("none");
        assert_eq!(
            error.to_string(),
            "no device to call: the devices file names none"
        );
        let error = select(&patterns(&["a/b"]), &[], &[]).expect_err("bad id");
        assert!(
            error
                .to_string()
                .starts_with("--devices a/b: device id contains '/'"),
            "{error}"
        );
        assert_eq!(error.exit(), Exit::Usage);
    }

    #[test]
    fn a_devices_file_is_one_id_a_line_with_comments() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("devices.txt");
        std::fs::write(&path, "# plant 7\npump-1\n\n  pump-2  \n#pump-3\n").expect("write");
        assert_eq!(
            read_devices_file(&path).expect("reads"),
            ["pump-1", "pump-2"]
        );
        std::fs::write(&path, "pump-1\npump 2\n").expect("write");
        let error = read_devices_file(&path).expect_err("space");
        assert_eq!(
            error.to_string(),
            format!(
                "devices file {}, line 2: device id contains U+0020, which is not allowed \
                 (ASCII letters, digits and - . % _ * ? ! ( ) , : = @ $ ')",
                path.display()
            )
        );
        let missing = dir.path().join("missing.txt");
        let error = read_devices_file(&missing).expect_err("missing");
        assert!(
            error.to_string().starts_with(&format!(
                "could not read the devices file {}: ",
                missing.display()
            )),
            "{error}"
        );
    }

    fn result(device: &str, outcome: Result<MethodResponse, CallError>) -> DeviceResult {
        DeviceResult {
            device: device.to_owned(),
            outcome,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn totals_add_up_and_the_exit_is_success_only_when_all_succeeded() {
        let ok = result("a", Ok(MethodResponse::from_wire(200, b"{}")));
        let failed = result("b", Ok(MethodResponse::from_wire(500, b"{}")));
        let offline = result("c", Err(CallError::NotOnline { device: "c".into() }));
        let late = result(
            "d",
            Err(CallError::Timeout {
                device: "d".into(),
                method: "m".into(),
                after: Duration::from_secs(5),
            }),
        );
        let all = [ok.clone(), failed, offline, late];
        assert_eq!(
            Totals::of(&all),
            Totals {
                succeeded: 1,
                failed: 1,
                not_online: 1,
                timed_out: 1
            }
        );
        assert_eq!(Totals::of(&all).devices(), 4);
        assert_eq!(exit(&all), Exit::DeviceError);
        assert_eq!(exit(std::slice::from_ref(&ok)), Exit::Success);
        let lost = result("e", Err(CallError::Broker("lost".into())));
        assert_eq!(exit(&[ok, lost]), Exit::Failure);
    }
}
