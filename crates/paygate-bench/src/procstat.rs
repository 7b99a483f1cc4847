//! Server CPU time from `/proc/<pid>/stat`: user + system time of all the
//! process's threads, in clock ticks. The most stable figure on a noisy
//! machine, because it does not depend on what else ran meanwhile.

use anyhow::{Context, bail};

/// utime + stime in clock ticks, from the text of `/proc/<pid>/stat`.
///
/// The second field (the command name) is in parentheses and may itself hold
/// spaces or parentheses, so fields are counted after the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let close = stat.rfind(')').context("no ')' in /proc stat")?;
    // After ")": field 3 (state) is index 0, so utime (field 14) is index 11.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    if fields.len() < 13 {
        bail!("short /proc stat line ({} fields after the name)", fields.len());
    }
    let utime: u64 = fields[11].parse().context("utime")?;
    let stime: u64 = fields[12].parse().context("stime")?;
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// CPU seconds used so far by each of `pids`, summed.
pub fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    let mut ticks = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        ticks += parse_cpu_ticks(&text)?;
    }
    Ok(ticks as f64 / ticks_per_second() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utime_and_stime() {
        let line = "4242 (paygate) S 1 4242 4242 0 -1 4194560 1234 0 0 0 1500 250 0 0 20 0 3 0 99 0 0";
        assert_eq!(parse_cpu_ticks(line).unwrap(), 1750);
    }

    #[test]
    fn command_names_with_spaces_and_parentheses() {
        let line = "7 (tokio (rt) worker) R 1 7 7 0 -1 0 0 0 0 0 11 22 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_cpu_ticks(line).unwrap(), 33);
    }

    #[test]
    fn rejects_short_lines() {
        assert!(parse_cpu_ticks("1 (x) S 1 2").is_err());
        assert!(parse_cpu_ticks("garbage").is_err());
    }

    #[test]
    fn reads_this_process() {
        let cpu = cpu_seconds(&[std::process::id()]).unwrap();
        assert!(cpu >= 0.0);
        assert!(ticks_per_second() > 0);
    }
}
