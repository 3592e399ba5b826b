//! Facts about this machine for the node record: OS, architecture, CPUs, memory, GPUs.

use std::process::Command;
use std::time::Duration;

use crate::proto::records::Gpu;

/// What a node reports about its machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineInfo {
    /// Operating system description.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory in bytes (0 when unknown).
    pub memory_bytes: u64,
    /// GPUs found with `nvidia-smi` (empty without it).
    pub gpus: Vec<Gpu>,
}

/// Probe the machine. Never fails: unknown facts are left empty.
pub fn probe() -> MachineInfo {
    MachineInfo {
        os: os_name(),
        arch: std::env::consts::ARCH.to_string(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes: std::fs::read_to_string("/proc/meminfo")
            .map(|text| parse_meminfo(&text))
            .unwrap_or(0),
        gpus: nvidia_gpus(),
    }
}

fn os_name() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        });
    match pretty {
        Some(name) => format!("{} ({name})", std::env::consts::OS),
        None => std::env::consts::OS.to_string(),
    }
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub fn parse_meminfo(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Parse `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` output.
pub fn parse_nvidia_smi(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|line| {
            let (name, mem) = line.rsplit_once(',')?;
            Some(Gpu {
                name: name.trim().chars().take(128).collect(),
                memory_mib: mem.trim().parse().ok()?,
            })
        })
        .take(64)
        .collect()
}

fn nvidia_gpus() -> Vec<Gpu> {
    let child = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Vec::new();
    };
    // A wedged driver must not hold up start-up.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Vec::new();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read;
        let _ = stdout.read_to_string(&mut out);
    }
    parse_nvidia_smi(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo_and_nvidia_smi() {
        assert_eq!(
            parse_meminfo("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            16384 * 1024
        );
        let gpus = parse_nvidia_smi("NVIDIA A100-SXM4-40GB, 40960\nbroken line\n");
        assert_eq!(
            gpus,
            vec![Gpu {
                name: "NVIDIA A100-SXM4-40GB".into(),
                memory_mib: 40960
            }]
        );
    }
}
