//! Child processes that cannot outlive their test.

use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Output};

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

    /// Sends the child `signal` (a name such as `TERM` or `KILL`), with the system's
    /// `kill`.
    ///
    /// # Errors
    /// When `kill` cannot run or fails (no such process, an unknown signal).
    pub fn signal(&self, signal: &str) -> std::io::Result<()> {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.id().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "kill -{signal} {} failed: {status}",
                self.id()
            )))
        }
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

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::ChildGuard;

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
    fn signal_delivers_the_named_signal_and_refuses_an_unknown_one() {
        use std::os::unix::process::ExitStatusExt as _;
        let mut child = ChildGuard::spawn(Command::new("sleep").arg("600").stdin(Stdio::null()))
            .expect("sleep starts");
        assert!(child.signal("NOSUCHSIGNAL").is_err());
        child.signal("TERM").expect("SIGTERM is sent");
        assert_eq!(child.wait().expect("sleep ends").signal(), Some(15));
    }
}
