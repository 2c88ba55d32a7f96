//! How `systemctl reload plantgate` learns whether a reload was applied
//! (docs/cli.md, reload). systemd's notify protocol has no way to say a
//! reload failed, and `kill -HUP` returns before the agent has read the
//! file, so the unit's `ExecReload=` runs `plantgate reload` instead: it
//! signals the agent and waits for the outcome the agent writes here,
//! `{agent.data_dir}/reload.json`, after every attempt; it exits non-zero
//! when the reload was refused, which makes `systemctl reload` fail with
//! the agent's reasons in the journal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::status::{ConfigStatus, ReloadOutcome};

pub const FILE_NAME: &str = "reload.json";

/// What the file holds. Never a secret: the outcome's errors are the
/// configuration errors' key paths and messages, as logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The agent process that wrote it.
    pub pid: u32,
    /// The configuration generation in force (1 at start).
    pub generation: u64,
    /// Reload attempts since start, applied or refused.
    pub attempts: u64,
    pub last: Option<LastReload>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastReload {
    pub ts: String,
    pub applied: bool,
    pub summary: String,
    pub errors: Vec<String>,
}

impl Report {
    pub fn new(pid: u32, status: &ConfigStatus) -> Report {
        Report {
            pid,
            generation: status.generation,
            attempts: status.reloads_applied + status.reloads_refused,
            last: status
                .last_reload
                .as_ref()
                .map(|r: &ReloadOutcome| LastReload {
                    ts: crate::record::format_ts(r.ts_ms),
                    applied: r.applied,
                    summary: r.summary.clone(),
                    errors: r.errors.clone(),
                }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a reload report: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Writes the report for `data_dir` (whole or not at all: a reader never
/// sees half a file).
pub fn write(data_dir: &Path, report: &Report) -> Result<(), ReportError> {
    let path = data_dir.join(FILE_NAME);
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
    let io = |source| ReportError::Io {
        path: path.clone(),
        source,
    };
    let body = serde_json::to_vec_pretty(report).map_err(|source| ReportError::Format {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&tmp, body).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

pub fn read(data_dir: &Path) -> Result<Report, ReportError> {
    let path = data_dir.join(FILE_NAME);
    let body = std::fs::read(&path).map_err(|source| ReportError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&body).map_err(|source| ReportError::Format { path, source })
}

/// Why `plantgate reload` could not tell the outcome.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no running agent found for agent.data_dir {dir}: {source}")]
    NoAgent { dir: PathBuf, source: ReportError },
    #[error(
        "agent.data_dir {dir} belongs to process {found}, not {asked}; \
         a change of agent.data_dir takes a restart, not a reload"
    )]
    OtherAgent {
        dir: PathBuf,
        found: u32,
        asked: u32,
    },
    #[error("signalling process {pid}: {source}")]
    Signal { pid: u32, source: std::io::Error },
    #[error("the agent (process {pid}) gave no outcome within {}s", .waited.as_secs())]
    NoAnswer { pid: u32, waited: Duration },
}

/// Sends SIGHUP to `pid`.
pub fn hang_up(pid: u32) -> Result<(), RequestError> {
    let signal_error = |source| RequestError::Signal { pid, source };
    let target = libc::pid_t::try_from(pid)
        .map_err(|_| signal_error(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: kill(2) only sends a signal; it touches no memory of ours.
    let sent = unsafe { libc::kill(target, libc::SIGHUP) };
    if sent != 0 {
        return Err(signal_error(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Asks the agent that uses `data_dir` (process `pid`, if given) to
/// reload, and waits up to `timeout` for its outcome.
pub async fn request(
    data_dir: &Path,
    pid: Option<u32>,
    timeout: Duration,
) -> Result<LastReload, RequestError> {
    let no_agent = |source| RequestError::NoAgent {
        dir: data_dir.to_path_buf(),
        source,
    };
    let before = read(data_dir).map_err(no_agent)?;
    if let Some(asked) = pid {
        if asked != before.pid {
            return Err(RequestError::OtherAgent {
                dir: data_dir.to_path_buf(),
                found: before.pid,
                asked,
            });
        }
    }
    hang_up(before.pid)?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // The agent rewrites the file once per attempt; polling a small
        // file is all a one-shot command needs.
        if let Ok(now) = read(data_dir) {
            if now.pid == before.pid && now.attempts > before.attempts {
                if let Some(last) = now.last {
                    return Ok(last);
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RequestError::NoAnswer {
                pid: before.pid,
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_and_counts_every_attempt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = ConfigStatus {
            generation: 3,
            last_reload: Some(ReloadOutcome {
                ts_ms: 1_796_000_000_000,
                applied: false,
                summary: "refused".into(),
                errors: vec!["agent.id: changed".into()],
            }),
            reloads_applied: 2,
            reloads_refused: 1,
        };
        let report = Report::new(42, &status);
        assert_eq!(report.attempts, 3);
        write(dir.path(), &report).expect("write");
        assert_eq!(read(dir.path()).expect("read"), report);
        assert!(!dir.path().join("reload.json.tmp").exists());
    }

    #[tokio::test]
    async fn a_request_for_another_process_is_refused_without_a_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = Report::new(u32::MAX, &ConfigStatus::default());
        write(dir.path(), &report).expect("write");
        let err = request(dir.path(), Some(7), Duration::from_secs(1))
            .await
            .expect_err("other agent");
        assert!(err.to_string().contains("takes a restart"), "{err}");
        let missing = request(&dir.path().join("nope"), None, Duration::from_secs(1))
            .await
            .expect_err("no agent");
        assert!(
            missing.to_string().starts_with("no running agent"),
            "{missing}"
        );
    }
}
