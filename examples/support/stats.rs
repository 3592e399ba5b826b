//! Figures shared by the benchmarks: percentiles, milliseconds, CPU time of a process.
#![allow(dead_code)] // each benchmark uses a part

use std::fs;
use std::time::Duration;

/// min / p50 / p99 / max of a sample, in milliseconds.
#[derive(Clone, Copy)]
pub struct Percentiles {
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Nearest-rank percentiles of a non-empty sample.
pub fn percentiles(values: &[f64]) -> Percentiles {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let idx = (p * sorted.len() as f64).ceil() as usize;
        sorted[idx.clamp(1, sorted.len()) - 1]
    };
    Percentiles {
        min: sorted.first().copied().unwrap_or_default(),
        p50: rank(0.50),
        p99: rank(0.99),
        max: sorted.last().copied().unwrap_or_default(),
    }
}

/// A duration in milliseconds.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// utime + stime of a process, in clock ticks (`/proc/PID/stat`).
pub fn cpu_ticks(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    // Fields after the command name (which may contain spaces) start at
    // field 3 (state); utime and stime are fields 14 and 15.
    let after_comm = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| -> u64 {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("field {n} missing in {path}: {stat}"))
    };
    field(14) + field(15)
}
