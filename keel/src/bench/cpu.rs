//! The CPU time of the platform's processes, read from `/proc` (Linux): every `keel` role, the
//! broker (`nisshi`), PostgreSQL (the server of Keel's read models and, on PostgreSQL storage, of
//! the broker's log) and Redis. Other processes on the machine (the bench itself, a load
//! generator) are left out, so a figure is what the platform spent, whatever else ran.

use std::{collections::BTreeMap, time::Duration};

/// Clock ticks per second of `/proc/*/stat` (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU ticks per process, with the group it belongs to.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    processes: BTreeMap<u32, (String, u64)>,
}

impl Sample {
    /// Reads every process of the platform now.
    pub fn take() -> Self {
        let mut processes = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else { return Self::default() };
        let own = std::process::id();
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
            if pid == own {
                continue;
            }
            if let Some(sampled) = read_process(pid) {
                processes.insert(pid, sampled);
            }
        }
        Self { processes }
    }

    /// CPU seconds per group between `earlier` and this sample. A process that started meanwhile
    /// counts whole; one that ended meanwhile is lost (PostgreSQL backends of pools live long).
    pub fn since(&self, earlier: &Sample) -> BTreeMap<String, f64> {
        let mut groups: BTreeMap<String, f64> = BTreeMap::new();
        for (pid, (group, ticks)) in &self.processes {
            let before = earlier.processes.get(pid).map_or(0, |(_, ticks)| *ticks);
            *groups.entry(group.clone()).or_default() += ticks.saturating_sub(before) as f64 / TICKS_PER_SECOND;
        }
        groups
    }
}

/// The group of a platform process and its CPU ticks (user + system), or `None` for a process
/// that is not the platform's.
fn read_process(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let command = &stat[open + 1..close];
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let group = match command {
        "keel" => {
            let arguments = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let role = arguments.split(|byte| *byte == 0).nth(1).map(String::from_utf8_lossy)?;
            format!("keel {role}")
        }
        "nisshi" => "nisshi".into(),
        "postgres" => "postgres".into(),
        "redis-server" => "redis".into(),
        _ => return None,
    };
    Some((group, ticks))
}

/// Measures the platform's CPU over `window`.
pub async fn measure(window: Duration) -> BTreeMap<String, f64> {
    let before = Sample::take();
    tokio::time::sleep(window).await;
    Sample::take().since(&before)
}

/// Prints CPU seconds per group as shares of one core over `window`.
pub fn print(groups: &BTreeMap<String, f64>, window: Duration) {
    let seconds = window.as_secs_f64();
    for (group, used) in groups {
        println!("  {group:<24} {used:>8.2} CPU-s  {:>6.2}% of a core", used / seconds * 100.0);
    }
    let total: f64 = groups.values().sum();
    println!("  {:<24} {total:>8.2} CPU-s  {:>6.2}% of a core", "total", total / seconds * 100.0);
}

/// The resident memory of every `keel` role and of the broker now, in bytes, by group.
pub fn resident_memory() -> BTreeMap<String, u64> {
    let mut memory = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return memory };
    let own = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        if pid == own {
            continue;
        }
        let Some((group, _)) = read_process(pid) else { continue };
        if group == "postgres" || group == "redis" {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let resident = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok());
        if let Some(kib) = resident {
            // Two instances of one role show as one group, summed.
            *memory.entry(group).or_default() += kib * 1024;
        }
    }
    memory
}
