//! Running `weft` client commands (`put`, `get`, `status`, ...) as separate processes,
//! the way a user does.

use std::ffi::OsStr;
use std::fmt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use crate::binary::weft_binary;

/// How long one client command may take before the test fails: far above what a
/// request to a local node needs, low enough that a hung node fails the test quickly.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished command returned.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code; `None` when the command was killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout without its trailing newline.
    pub fn stdout_trimmed(&self) -> &str {
        self.stdout.trim_end_matches(['\n', '\r'])
    }

    /// The lines of stdout.
    pub fn stdout_lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// The lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "`{}` exited with {}", self.command, self.status)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// Runs `weft <args>` (inside network namespace `netns` when given) and returns its
/// output. Panics when the command cannot be started or runs longer than
/// [`CLI_TIMEOUT`] (it is killed then).
pub async fn run_cli<I, S>(netns: Option<&str>, args: I) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut command = match netns {
        Some(ns) => {
            let mut command = tokio::process::Command::new("ip");
            command.args(["netns", "exec", ns]).arg(weft_binary());
            command
        }
        None => tokio::process::Command::new(weft_binary()),
    };
    command.args(&args);
    let shown = format!(
        "{}weft {}",
        netns
            .map(|ns| format!("ip netns exec {ns} "))
            .unwrap_or_default(),
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    run_with_timeout(command, shown, CLI_TIMEOUT).await
}

/// Runs `command` to completion, collecting its output; panics when it cannot be
/// started or does not finish within `timeout` (it is killed then). `shown` names the
/// command in messages.
pub async fn run_with_timeout(
    mut command: tokio::process::Command,
    shown: String,
    timeout: Duration,
) -> CliOutput {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(timeout, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => panic!("cannot run `{shown}`: {err}"),
        Err(_) => panic!("`{shown}` did not finish within {timeout:?}"),
    };
    CliOutput {
        command: shown,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
