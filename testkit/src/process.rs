//! Child processes that cannot outlive their test, and what `/proc` says of a process.

use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Output};

use rustix::process::Pid;
pub use rustix::process::Signal;

/// A child process that is killed (SIGKILL) and reaped when dropped, so that a test
/// that panics, or returns early, leaks no process (a host, a broker, a hub). It
/// derefs to the [`Child`], for its id, its pipes and waiting on it; a child that has
/// already exited is only reaped.
#[derive(Debug)]
pub struct ChildGuard {
    /// `None` once [`ChildGuard::wait_with_output`] took it.
    child: Option<Child>,
}

impl ChildGuard {
    /// Starts `command` under a guard.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn spawn(command: &mut Command) -> std::io::Result<Self> {
        command.spawn().map(Self::from)
    }

    /// Sends the child `signal` (`Signal::TERM`, `Signal::KILL`, ...).
    ///
    /// # Errors
    /// When the signal cannot be sent (the child was reaped already).
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        rustix::process::kill_process(Pid::from_child(self), signal)?;
        Ok(())
    }

    /// Waits for the child to exit and collects its piped output, as
    /// [`Child::wait_with_output`]; the child is reaped whatever happens.
    ///
    /// # Errors
    /// As [`Child::wait_with_output`].
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        let child = self.child.take().expect("the child is there until taken");
        child.wait_with_output()
    }
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        Self { child: Some(child) }
    }
}

impl Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        self.child.as_ref().expect("the child is there until taken")
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the child is there until taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                child.kill().ok();
            }
            child.wait().ok();
        }
    }
}

/// A memory figure of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...), given in kB there, in
/// bytes; `pid` `None` is this process. Parsed here rather than with the `procfs` crate:
/// these two lines are all the tests and benchmarks read of it.
///
/// # Errors
/// When the file cannot be read (the process is gone) or has no such field.
pub fn status_bytes(pid: Option<u32>, field: &str) -> std::io::Result<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(&path)?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other(format!("no {field} in kB in {path}")))
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::{ChildGuard, Signal, status_bytes};

    #[test]
    fn a_dropped_guard_kills_and_reaps_its_child() {
        let child = ChildGuard::spawn(Command::new("sleep").arg("600").stdin(Stdio::null()))
            .expect("sleep starts");
        let proc = std::path::PathBuf::from(format!("/proc/{}", child.id()));
        assert!(proc.exists());
        drop(child);
        // Reaped, not a zombie: the process is gone from /proc.
        assert!(!proc.exists(), "{} is still there", proc.display());
    }

    #[test]
    fn signal_delivers_the_signal_and_fails_once_the_child_is_reaped() {
        use std::os::unix::process::ExitStatusExt as _;
        let mut child = ChildGuard::spawn(Command::new("sleep").arg("600").stdin(Stdio::null()))
            .expect("sleep starts");
        child.signal(Signal::TERM).expect("SIGTERM is sent");
        assert_eq!(child.wait().expect("sleep ends").signal(), Some(15));
        assert!(child.signal(Signal::TERM).is_err(), "no process to signal");
    }

    #[test]
    fn status_bytes_reads_memory_figures_of_this_process_and_of_a_child() {
        let own = status_bytes(None, "VmRSS").expect("this process's VmRSS");
        assert!(own > 1024 * 1024, "{own} bytes resident");
        let child = ChildGuard::spawn(Command::new("sleep").arg("600").stdin(Stdio::null()))
            .expect("sleep starts");
        let peak = status_bytes(Some(child.id()), "VmHWM").expect("the child's VmHWM");
        assert!(peak > 0);
        assert!(status_bytes(None, "NoSuchField").is_err());
    }
}
