//! Child processes the harness owns: pinned to a CPU, stopped (SIGTERM, then
//! SIGKILL) when dropped, so an error or ^C in the harness leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub struct Owned {
    pub name: &'static str,
    child: Child,
}

impl Owned {
    pub fn spawn(name: &'static str, mut command: Command) -> anyhow::Result<Self> {
        let child = command.stdout(Stdio::null()).spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Self { name, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its children (nginx workers), for CPU accounting.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid()];
        pids.extend(children_of(self.pid()));
        pids
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn terminate(&mut self) {
        if !self.is_running() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop after SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// `program` prefixed with `taskset -c CPU` when a CPU is given, and with
/// `wrapper` (e.g. valgrind and its options) when not empty. taskset and
/// valgrind exec the program, so the child's pid is the program's.
pub fn launch(cpu: Option<u32>, wrapper: &[String], program: &Path) -> Command {
    let mut words: Vec<std::ffi::OsString> = Vec::new();
    if let Some(cpu) = cpu {
        words.extend(["taskset".into(), "-c".into(), cpu.to_string().into()]);
    }
    words.extend(wrapper.iter().map(Into::into));
    words.push(program.into());
    let mut c = Command::new(&words[0]);
    c.args(&words[1..]);
    c
}

/// Spawns `command` and waits for the first stdout line containing `marker`; returns it.
pub fn spawn_reading_stdout(name: &'static str, mut command: Command, marker: &str) -> anyhow::Result<(Owned, String)> {
    let mut child = command.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start {name}"))?;
    let stdout = child.stdout.take().expect("piped");
    let owned = Owned { name, child };
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("{name} exited before printing {marker:?}");
        }
        if line.contains(marker) {
            return Ok((owned, line.trim().to_owned()));
        }
    }
}

/// Spawns `command` (its stderr already redirected to `log`) and waits up to
/// `timeout` for a line of `log` containing `marker`; returns that line.
pub fn spawn_watching_log(
    name: &'static str,
    mut command: Command,
    log: &Path,
    marker: &str,
    timeout: Duration,
) -> anyhow::Result<(Owned, String)> {
    let child = command.stdout(Stdio::null()).spawn().with_context(|| format!("cannot start {name}"))?;
    let mut owned = Owned { name, child };
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(marker)) {
            return Ok((owned, line.to_owned()));
        }
        if !owned.is_running() {
            bail!("{name} exited during start-up; its log {}:\n{}", log.display(), tail(&text, 20));
        }
        if Instant::now() > deadline {
            bail!("{name} did not print {marker:?} within {timeout:?}; log {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Direct children of `pid` (from /proc: the 4th field of each stat line).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| parent_pid(&s))
                .is_some_and(|ppid| ppid == pid)
        })
        .collect()
}

fn parent_pid(stat: &str) -> Option<u32> {
    let close = stat.rfind(')')?;
    stat[close + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Runs `command` to completion; its stdout, or an error with its stderr.
pub fn output(mut command: Command, what: &str) -> anyhow::Result<String> {
    let out = command.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_from_stat() {
        assert_eq!(parent_pid("12 (nginx: worker (x)) S 11 12 12 0"), Some(11));
        assert_eq!(parent_pid("nonsense"), None);
    }
}
