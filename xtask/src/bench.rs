//! `cargo xtask bench [--instructions] [--update-baseline]`: the benchmark
//! suite.
//!
//! Every workload of `examples/ops.rs` runs in a process of its own: one
//! warm-up run, then [`REPS`] measured runs. The table gives the median and
//! the min–max of the runs; `target/bench.json` gets the same numbers. The
//! statistics are a median and a range over a handful of processes, which
//! needs no harness: each run already averages over N operations.
//!
//! With `--instructions` the hot-path workloads run under
//! `valgrind --tool=callgrind` at N and 2N operations instead, and the
//! result is instructions per operation, (Ir(2N) − Ir(N)) / N: start-up
//! costs cancel, and the count does not depend on how busy the machine is.
//! They go to `target/bench-instructions.json`; `--update-baseline` also
//! writes them to `bench/baseline.json`, which `cargo xtask test` checks
//! (see [`check_baseline`]).

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::process;

/// Measured runs per workload (after one warm-up run).
const REPS: usize = 5;

/// The timed workloads: (op, procs, N).
const TIMED: &[(&str, usize, u64)] = &[
    ("switch", 1, 2_000_000),
    ("gosched", 1, 2_000_000),
    ("spawn", 1, 1_000_000),
    ("spawn", 2, 1_000_000),
    ("spawn-alive", 1, 100_000),
    ("spawn-alive", 2, 100_000),
    ("handoff", 1, 1_000_000),
    ("handoff", 2, 1_000_000),
    ("handoff-chan", 1, 1_000_000),
    ("handoff-chan", 2, 1_000_000),
    ("parked", 1, 100_000),
    ("work", 1, 4_000_000_000),
    ("work", 2, 4_000_000_000),
];

/// The instruction-counted workloads (1 P): (op, N).
pub const COUNTED: &[(&str, u64)] = &[
    ("switch", 100_000),
    ("gosched", 50_000),
    ("spawn", 50_000),
    ("handoff", 50_000),
    ("handoff-chan", 50_000),
];

/// The baseline `cargo xtask test` compares instruction counts against.
const BASELINE: &str = "bench/baseline.json";

/// How much a count may grow over the baseline before the gate fails.
pub const TOLERANCE: f64 = 0.10;

fn ops_binary(root: &Path) -> std::path::PathBuf {
    root.join("target/release/examples/ops")
}

fn build_ops(root: &Path) -> bool {
    let mut c = crate::gate::cargo(root, &["build", "--release", "--example", "ops"]);
    matches!(process::run(&mut c, Duration::from_mins(10)), Ok(s) if s.success())
}

/// Runs one workload; returns the value of its `result` line.
fn run_once(bin: &Path, op: &str, procs: usize, n: u64) -> Option<f64> {
    let mut c = Command::new(bin);
    c.args([op, &n.to_string(), &procs.to_string()]);
    let (status, out) = process::output(&mut c, Duration::from_mins(5)).ok()?;
    if !status.success() {
        return None;
    }
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix("result "))
        .and_then(|r| r.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
}

/// Instructions per operation of `op` on 1 P, from callgrind at N and 2N.
pub fn instructions(bin: &Path, op: &str, n: u64) -> Option<f64> {
    let ir = |n: u64| -> Option<u64> {
        let out_file = std::env::temp_dir().join(format!("gokernel-callgrind-{op}-{n}"));
        let mut c = Command::new("valgrind");
        c.args(["--tool=callgrind", "-q"])
            .arg(format!("--callgrind-out-file={}", out_file.display()))
            .arg(bin)
            .args([op, &n.to_string(), "1"]);
        let (status, _) = process::output(&mut c, Duration::from_mins(10)).ok()?;
        let text = std::fs::read_to_string(&out_file).ok();
        let _ = std::fs::remove_file(&out_file);
        if !status.success() {
            return None;
        }
        // The profile's `summary:` (or `totals:`) line holds the total Ir.
        text?.lines().find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
    };
    let (a, b) = (ir(n)?, ir(2 * n)?);
    Some((b.saturating_sub(a)) as f64 / n as f64)
}

/// `cargo xtask bench`.
pub fn run(args: &[String]) -> ExitCode {
    let mut counted = false;
    let mut update = false;
    for a in args {
        match a.as_str() {
            "--instructions" => counted = true,
            "--update-baseline" => {
                counted = true;
                update = true;
            }
            other => return crate::usage_error("bench", &format!("unexpected argument `{other}`")),
        }
    }
    let root = crate::workspace_root();
    if !build_ops(root) {
        return ExitCode::FAILURE;
    }
    let bin = ops_binary(root);
    if counted {
        return run_counted(root, &bin, update);
    }
    let mut table = String::new();
    let mut json = String::from("[\n");
    let _ = writeln!(
        table,
        "{:<12} {:>5} {:>12} {:>12} {:>12}  unit",
        "workload", "procs", "median", "min", "max"
    );
    for (i, &(op, procs, n)) in TIMED.iter().enumerate() {
        let _ = run_once(&bin, op, procs, n); // warm-up
        let mut vals: Vec<f64> = (0..REPS)
            .filter_map(|_| run_once(&bin, op, procs, n))
            .collect();
        if vals.len() != REPS {
            println!("bench: {op} (procs {procs}) failed");
            return ExitCode::FAILURE;
        }
        vals.sort_by(f64::total_cmp);
        let unit = match op {
            "parked" => "B/G",
            "work" => "s",
            _ => "ns/op",
        };
        let (med, min, max) = (vals[REPS / 2], vals[0], vals[REPS - 1]);
        let _ = writeln!(
            table,
            "{op:<12} {procs:>5} {med:>12.2} {min:>12.2} {max:>12.2}  {unit}"
        );
        let _ = writeln!(
            json,
            "  {{\"workload\": \"{op}\", \"procs\": {procs}, \"n\": {n}, \"unit\": \"{unit}\", \
             \"median\": {med}, \"min\": {min}, \"max\": {max}, \"runs\": {vals:?}}}{}",
            if i + 1 < TIMED.len() { "," } else { "" }
        );
    }
    json.push_str("]\n");
    println!("\n{table}");
    let work = |p: usize| {
        json.lines()
            .find(|l| {
                l.contains("\"workload\": \"work\"") && l.contains(&format!("\"procs\": {p},"))
            })
            .and_then(|l| l.split("\"median\": ").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    if let (Some(w1), Some(w2)) = (work(1), work(2)) {
        println!(
            "scaling: work on 2 procs is {:.2}x faster than on 1",
            w1 / w2
        );
    }
    let path = root.join("target/bench.json");
    if std::fs::write(&path, json).is_err() {
        return ExitCode::FAILURE;
    }
    println!("wrote {}", path.display());
    ExitCode::SUCCESS
}

fn run_counted(root: &Path, bin: &Path, update: bool) -> ExitCode {
    let mut json = String::from("{\n");
    println!("\n{:<12} {:>10}", "workload", "Ir/op");
    for (i, &(op, n)) in COUNTED.iter().enumerate() {
        let Some(ir) = instructions(bin, op, n) else {
            println!("bench: callgrind on {op} failed (is valgrind installed?)");
            return ExitCode::FAILURE;
        };
        println!("{op:<12} {ir:>10.1}");
        let _ = writeln!(
            json,
            "  \"{op}\": {ir:.1}{}",
            if i + 1 < COUNTED.len() { "," } else { "" }
        );
    }
    json.push_str("}\n");
    let out = root.join("target/bench-instructions.json");
    let _ = std::fs::write(&out, &json);
    println!("wrote {}", out.display());
    if update {
        if std::fs::write(root.join(BASELINE), &json).is_err() {
            return ExitCode::FAILURE;
        }
        println!("wrote {BASELINE}: commit it with the reason for the change");
    }
    ExitCode::SUCCESS
}

/// The gate's regression guard: counts the hot paths again and fails if
/// any grew more than [`TOLERANCE`] over `bench/baseline.json`.
pub fn check_baseline(root: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(root.join(BASELINE)) else {
        println!("{BASELINE} is missing: run `cargo xtask bench --update-baseline`");
        return false;
    };
    if !build_ops(root) {
        return false;
    }
    let bin = ops_binary(root);
    let mut ok = true;
    for &(op, n) in COUNTED {
        let base = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("\"{op}\": ")))
            .and_then(|v| v.trim_end_matches(',').parse::<f64>().ok());
        let Some(base) = base else {
            println!("{BASELINE} has no count for {op}: run `cargo xtask bench --update-baseline`");
            ok = false;
            continue;
        };
        let Some(now) = instructions(&bin, op, n) else {
            println!("callgrind on {op} failed");
            ok = false;
            continue;
        };
        let limit = base * (1.0 + TOLERANCE);
        let verdict = if now <= limit { "ok" } else { "REGRESSION" };
        println!(
            "{op:<10} {now:>8.1} Ir/op   baseline {base:>8.1}   limit {limit:>8.1}   {verdict}"
        );
        ok &= now <= limit;
    }
    if !ok {
        println!(
            "instruction counts grew over {BASELINE} (+{:.0} % allowed); if intended, \
             run `cargo xtask bench --update-baseline` and say why in the commit",
            TOLERANCE * 100.0
        );
    }
    ok
}
