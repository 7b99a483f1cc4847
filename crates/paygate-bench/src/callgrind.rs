//! Instruction counts of the hot path: the server runs under
//! `valgrind --tool=callgrind`; after a warm-up the counters are zeroed, a
//! fixed number of requests is sent, and the counters are dumped. Counts, not
//! seconds: repeatable whatever else the machine is doing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::oha::{self, Load, Request, Stop};
use crate::process;

/// What one profiled run found.
pub struct Profile {
    pub name: String,
    pub requests: u64,
    pub instructions: u64,
    pub file: PathBuf,
}

impl Profile {
    pub fn per_request(&self) -> f64 {
        self.instructions as f64 / self.requests.max(1) as f64
    }
}

/// valgrind's command prefix; the dump files go to `dir` as `NAME.<pid>[.<n>]`.
pub fn wrapper(dir: &Path, name: &str) -> Vec<String> {
    vec!["valgrind".into(), "--tool=callgrind".into(), format!("--callgrind-out-file={}/{name}.%p", dir.display())]
}

/// Warm up, zero the counters of `pid`, send `requests`, dump; returns the dump's totals.
pub fn profile(
    name: &str,
    pid: u32,
    dir: &Path,
    oha: &Path,
    request: &Request,
    requests: u64,
) -> anyhow::Result<Profile> {
    let load = Load::Closed { connections: 8 };
    let warm = oha::run(oha, None, request, load, Stop::Requests(requests / 5 + 50))?;
    println!("{name}: warm-up statuses {:?}", warm.statuses);
    control(&["-z", &pid.to_string()])?;
    let outcome = oha::run(oha, None, request, load, Stop::Requests(requests))?;
    println!("{name}: measured statuses {:?}, errors {:?}", outcome.statuses, outcome.errors);
    control(&["-d", &pid.to_string()])?;
    let file = latest_dump(dir, &format!("{name}.{pid}"))?;
    let instructions = total_instructions(&std::fs::read_to_string(&file)?)
        .with_context(|| format!("no totals in {}", file.display()))?;
    Ok(Profile { name: name.into(), requests: outcome.responses(), instructions, file })
}

fn control(args: &[&str]) -> anyhow::Result<()> {
    let mut c = Command::new("callgrind_control");
    c.args(args);
    process::output(c, "callgrind_control").map(|_| ())
}

/// The newest dump whose name starts with `prefix` (callgrind numbers them `.1`, `.2`, …).
fn latest_dump(dir: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let mut dumps: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            let rest = name.strip_prefix(prefix)?;
            let n = rest.strip_prefix('.').map(|n| n.parse().ok()).unwrap_or(Some(0))?;
            Some((n, p))
        })
        .collect();
    dumps.sort();
    match dumps.pop() {
        Some((_, p)) => Ok(p),
        None => bail!("no callgrind dump {prefix}* in {}", dir.display()),
    }
}

/// The `summary:` (or `totals:`) line of a callgrind dump: instructions executed.
pub fn total_instructions(dump: &str) -> Option<u64> {
    dump.lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `callgrind_annotate --inclusive=yes` of a dump, its first `lines` function lines.
pub fn top_inclusive(file: &Path, lines: usize) -> anyhow::Result<String> {
    let mut c = Command::new("callgrind_annotate");
    c.args(["--inclusive=yes", "--threshold=100"]).arg(file);
    let text = process::output(c, "callgrind_annotate")?;
    let body: Vec<&str> = text.lines().skip_while(|l| !l.contains("file:function")).skip(2).take(lines).collect();
    Ok(body.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_from_a_dump() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 123456789\nfn=(1) main\n";
        assert_eq!(total_instructions(dump), Some(123_456_789));
        assert_eq!(total_instructions("events: Ir\ntotals: 42\n"), Some(42));
        assert_eq!(total_instructions("nothing"), None);
    }

    #[test]
    fn newest_dump_wins() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["me.7", "me.7.1", "me.7.2", "hello.7.9"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(latest_dump(dir.path(), "me.7").unwrap(), dir.path().join("me.7.2"));
        assert!(latest_dump(dir.path(), "none").is_err());
    }
}
