//! `cargo xtask bench [--instructions] [--update-baseline] [--peers]`: the
//! benchmark suite, in both thread-binding modes side by side (`--peers`:
//! beside tokio and Go, in [`crate::peers`]).
//!
//! Every workload of `examples/ops.rs` runs in a process of its own, in each
//! of the two [`MODES`]: `bound` (the default runtime: a started goroutine
//! resumes only on the thread it started on) and `migrate`
//! (`Builder::migrate_started_goroutines`, Go's behaviour). Per workload:
//! one warm-up run in each mode, then [`REPS`] repetitions, each running
//! both modes one after the other (which goes first alternates), so that
//! whatever else the machine does hits both modes alike. The table gives,
//! per mode, the median and the min–max of the runs, and the ratio of the
//! medians, bound ÷ migrate; `bench.json` in the target directory gets the same numbers. The
//! statistics are a median and a range over a handful of processes, which
//! needs no harness: each run already averages over N operations. Below
//! the table: the CPU-bound fan-out's speed-up from 1 P to 2 Ps, per mode
//! (target [`SPEEDUP_TARGET`]).
//!
//! With `--instructions` the hot-path workloads run under
//! `valgrind --tool=callgrind` at N and 2N operations instead, in both
//! modes, and the result is instructions per operation,
//! (Ir(2N) − Ir(N)) / N: start-up costs cancel, and the count does not
//! depend on how busy the machine is. They go to
//! `bench-instructions.json` in the target directory; `--update-baseline` also writes them to
//! `bench/baseline.json`, which `cargo xtask test` checks (see
//! [`check_baseline`]). Only the default mode, `bound`, is gated: its
//! counts are the file's plain `"op": count` entries, as before; the
//! `migrate` counts are written beside them as `"migrate/op": count`, for
//! information (a reader that looks for `"op": ` does not see them).
//!
//! Beside instructions, the same callgrind runs count **locked
//! operations** per op: every executed instruction that locks the bus
//! (`lock`-prefixed read-modify-writes, `xchg` with a memory operand, and
//! so `fence(SeqCst)`, which Rust compiles to `lock or` on x86_64), with
//! callgrind's `--collect-bus=yes` (its `Ge`, "global bus events", one per
//! such instruction). Each costs 6–12 ns on the machines measured, far more
//! than its one instruction, so the instruction count alone cannot see
//! them. The method was checked once against the disassembly: with
//! `--dump-instr=yes`, on `handoff`, `gosched`, `handoff-chan` and `spawn`
//! in both modes, the addresses with `Ge` events in the `ops` binary were
//! exactly the executed `lock`/`xchg`-to-memory instructions of
//! `objdump -d`, each with `Ge` equal to its execution count (0
//! mismatches; `docs/performance.md`). They are gated as `"locked/op"`
//! entries, with an absolute slack of [`LOCKED_SLACK`] (see there).
//!
//! The execution trace's recording cost is counted the same way: `ops`
//! built with the `trace` feature and run with `OPS_TRACE=1` (recording
//! into memory; the export is not run), bound mode, the rows of
//! [`TRACED`]. They are the `"trace/op"` entries of the baseline, gated
//! with the same [`TOLERANCE`] (`docs/performance.md`, "Tracing cost").

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::{process, tools};

/// Measured repetitions per workload (after one warm-up run per mode); each
/// repetition runs every mode once.
const REPS: usize = 5;

/// The thread-binding modes, as `examples/ops.rs` names them: the default
/// first (it is the one the baseline gates).
const MODES: [&str; 2] = ["bound", "migrate"];

/// The mode `cargo xtask test` checks against the baseline: the default.
const GATED_MODE: &str = MODES[0];

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
    // Bound: every hand-off wakes the other thread (microseconds each).
    ("handoff-cross", 2, 100_000),
    ("parked", 1, 100_000),
    ("work", 1, 4_000_000_000),
    ("work", 2, 4_000_000_000),
    // entersyscall + exitsyscall's fast path (Go's BenchmarkSyscall:
    // 31 ns on 1 P, 74 ns on 2, in Go's own measurement).
    ("syscall", 1, 10_000_000),
    ("syscall", 2, 10_000_000),
];

/// What the CPU-bound fan-out (`work`: 64 fresh goroutines of pure
/// computation) should gain from 2 Ps over 1.
const SPEEDUP_TARGET: f64 = 1.9;

/// The instruction-counted workloads (1 P): (op, N).
pub const COUNTED: &[(&str, u64)] = &[
    ("switch", 100_000),
    ("gosched", 50_000),
    ("spawn", 50_000),
    ("handoff", 50_000),
    ("handoff-chan", 50_000),
    ("syscall", 100_000),
];

/// The rows counted with the execution trace recording (`trace/op` in
/// the baseline): [`COUNTED`] but `switch`, which has no scheduler.
pub const TRACED: &[(&str, u64)] = &[
    ("gosched", 50_000),
    ("spawn", 50_000),
    ("handoff", 50_000),
    ("handoff-chan", 50_000),
    ("syscall", 100_000),
];

/// The baseline `cargo xtask test` compares instruction counts against.
const BASELINE: &str = "bench/baseline.json";

/// How much an instruction count may grow over the baseline before the
/// gate fails.
pub const TOLERANCE: f64 = 0.10;

/// How many locked operations per op a count may grow over the baseline
/// before the gate fails: an absolute slack, not a share. On 1 P the
/// counts are exact and repeatable (the same program path every op); a
/// fraction comes only from work amortised over a batch (a free-list
/// refill, a queue's overflow), which moves by hundredths when a batch
/// size changes. One more locked operation on any path is +1.0 per op,
/// so it fails whatever the path's size, where a share (10 % of 4) would
/// let it through.
pub const LOCKED_SLACK: f64 = 0.25;

/// What callgrind counts per operation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Counts {
    /// Instructions executed (callgrind's `Ir`).
    pub ir: f64,
    /// Locked operations executed (callgrind's `Ge`: `lock`-prefixed
    /// instructions and `xchg` with memory).
    pub locked: f64,
}

/// Where `cargo build --release --example ops` puts the binary.
fn ops_binary() -> std::path::PathBuf {
    crate::target_dir().join("release/examples/ops")
}

fn build_ops(root: &Path) -> bool {
    let mut c = crate::gate::cargo(root, &["build", "--release", "--example", "ops"]);
    matches!(process::run(&mut c, Duration::from_mins(10)), Ok(s) if s.success())
}

/// Builds `ops` with the `trace` feature, as `ops-trace` beside the
/// plain one, and then the plain one again (cargo keeps the library built
/// both ways, so each is a link). Returns the traced binary.
fn build_ops_traced(root: &Path) -> Option<std::path::PathBuf> {
    let mut c = crate::gate::cargo(
        root,
        &[
            "build",
            "--release",
            "--example",
            "ops",
            "--features",
            "trace",
        ],
    );
    if !matches!(process::run(&mut c, Duration::from_mins(10)), Ok(s) if s.success()) {
        return None;
    }
    let traced = crate::target_dir().join("release/examples/ops-trace");
    std::fs::copy(ops_binary(), &traced).ok()?;
    build_ops(root).then_some(traced)
}

/// Runs one workload in one mode; returns the value of its `result` line.
fn run_once(bin: &Path, op: &str, procs: usize, n: u64, mode: &str) -> Option<f64> {
    let mut c = Command::new(bin);
    c.args([op, &n.to_string(), &procs.to_string(), mode]);
    let (status, out) = process::output(&mut c, Duration::from_mins(5)).ok()?;
    if !status.success() {
        return None;
    }
    result_value(&out)
}

/// The value of the last `result OP PROCS N VALUE UNIT MODE` line of `out`.
pub fn result_value(out: &str) -> Option<f64> {
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix("result "))
        .and_then(|r| r.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
}

/// Instructions and locked operations per operation of `op` on 1 P in
/// `mode`, from callgrind at N and 2N.
pub fn instructions(bin: &Path, op: &str, n: u64, mode: &str) -> Option<Counts> {
    instructions_env(bin, op, n, mode, false)
}

/// [`instructions`], with the execution trace recording if `traced`
/// (`OPS_TRACE=1`; `bin` built with the `trace` feature).
fn instructions_env(bin: &Path, op: &str, n: u64, mode: &str, traced: bool) -> Option<Counts> {
    let totals = |n: u64| -> Option<[u64; 2]> {
        // In the target directory, not a shared /tmp: two checkouts'
        // gates may count the same op at once.
        let out_file = crate::target_dir().join(format!("callgrind.out.{op}-{mode}-{n}-{traced}"));
        let mut c = Command::new("valgrind");
        // No stall detector: under Valgrind's one big lock a goroutine's
        // thread can wait past the 1 s limit for its turn, and the SIGURG
        // sysmon then sends once crashed callgrind (an assertion in
        // valgrind itself, beside two CPU hogs). It is not what is counted.
        c.env("GOKERNEL_STALL", "off");
        if traced {
            c.env("OPS_TRACE", "1");
        }
        c.args(["--tool=callgrind", "-q", "--collect-bus=yes"])
            .arg(format!("--callgrind-out-file={}", out_file.display()))
            .arg(bin)
            .args([op, &n.to_string(), "1", mode]);
        let status = match process::output(&mut c, Duration::from_mins(10)) {
            Ok((status, _)) => status,
            Err(failure) => {
                println!("valgrind {failure}");
                return None;
            }
        };
        let text = std::fs::read_to_string(&out_file).ok();
        let _ = std::fs::remove_file(&out_file);
        if !status.success() {
            println!("valgrind failed: {status}");
            return None;
        }
        profile_totals(&text?)
    };
    let (a, b) = (totals(n)?, totals(2 * n)?);
    let per_op = |i: usize| b[i].saturating_sub(a[i]) as f64 / n as f64;
    Some(Counts {
        ir: per_op(0),
        locked: per_op(1),
    })
}

/// The total `Ir` and `Ge` of a callgrind profile: its `summary:` (or
/// `totals:`) line, in the order of its `events:` line.
fn profile_totals(text: &str) -> Option<[u64; 2]> {
    let events: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("events: "))?
        .split_whitespace()
        .collect();
    let values: Vec<u64> = text.lines().find_map(|l| {
        let v = l
            .strip_prefix("summary: ")
            .or_else(|| l.strip_prefix("totals: "))?;
        v.split_whitespace().map(|x| x.parse().ok()).collect()
    })?;
    let get = |name: &str| Some(*values.get(events.iter().position(|&e| e == name)?)?);
    Some([get("Ir")?, get("Ge")?])
}

/// The unit of `op`'s value.
fn unit(op: &str) -> &'static str {
    match op {
        "parked" => "B/G",
        "work" => "s",
        _ => "ns/op",
    }
}

/// The sorted runs of one workload in one mode.
struct Runs(Vec<f64>);

impl Runs {
    fn median(&self) -> f64 {
        self.0[self.0.len() / 2]
    }
    fn min(&self) -> f64 {
        self.0[0]
    }
    fn max(&self) -> f64 {
        self.0[self.0.len() - 1]
    }
}

/// `cargo xtask bench`.
pub fn run(args: &[String]) -> ExitCode {
    let mut counted = false;
    let mut update = false;
    let mut peers = false;
    for a in args {
        match a.as_str() {
            "--instructions" => counted = true,
            "--update-baseline" => {
                counted = true;
                update = true;
            }
            "--peers" => peers = true,
            other => return crate::usage_error("bench", &format!("unexpected argument `{other}`")),
        }
    }
    let root = crate::workspace_root();
    if !build_ops(root) {
        return ExitCode::FAILURE;
    }
    let bin = ops_binary();
    if peers {
        if counted {
            return crate::usage_error(
                "bench",
                "--peers counts instructions itself: drop --instructions",
            );
        }
        return crate::peers::run(root, &bin);
    }
    if counted {
        if let Err(missing) = tools::ensure(&tools::VALGRIND) {
            println!("bench: {missing}");
            return ExitCode::FAILURE;
        }
        return run_counted(root, &bin, update);
    }
    run_timed(&bin)
}

/// The timed suite: every workload in both modes, interleaved.
fn run_timed(bin: &Path) -> ExitCode {
    // rows[i][m]: TIMED[i] in MODES[m].
    let mut rows: Vec<[Runs; 2]> = Vec::new();
    for (i, &(op, procs, n)) in TIMED.iter().enumerate() {
        println!(
            "bench: [{}/{}] {op} on {procs} P, N = {n}: a warm-up and {REPS} runs per mode",
            i + 1,
            TIMED.len()
        );
        for mode in MODES {
            let _ = run_once(bin, op, procs, n, mode); // warm-up
        }
        let mut vals: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..REPS {
            // Alternate which mode goes first, so neither always runs
            // right after the other.
            for k in 0..MODES.len() {
                let m = (k + rep) % MODES.len();
                match run_once(bin, op, procs, n, MODES[m]) {
                    Some(v) => vals[m].push(v),
                    None => {
                        println!("bench: {op} (procs {procs}, {}) failed", MODES[m]);
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
        let [b, m] = vals.map(|mut v| {
            v.sort_by(f64::total_cmp);
            Runs(v)
        });
        println!(
            "bench: [{}/{}] {op} on {procs} P: bound {:.2}, migrate {:.2} {} (medians)",
            i + 1,
            TIMED.len(),
            b.median(),
            m.median(),
            unit(op)
        );
        rows.push([b, m]);
    }
    let speedup = |m: usize| {
        let med = |p: usize| {
            TIMED
                .iter()
                .position(|&(op, procs, _)| op == "work" && procs == p)
                .map(|i| rows[i][m].median())
        };
        Some(med(1)? / med(2)?)
    };
    let speedups = [speedup(0), speedup(1)];
    println!("\n{}", timed_table(&rows, speedups));
    let mut json = String::from("[\n");
    for (i, (&(op, procs, n), runs)) in TIMED.iter().zip(&rows).enumerate() {
        for (m, (mode, r)) in MODES.iter().zip(runs).enumerate() {
            let last = i + 1 == TIMED.len() && m + 1 == MODES.len();
            let _ = writeln!(
                json,
                "  {{\"workload\": \"{op}\", \"procs\": {procs}, \"mode\": \"{mode}\", \"n\": {n}, \
                 \"unit\": \"{}\", \"median\": {}, \"min\": {}, \"max\": {}, \"runs\": {:?}}}{}",
                unit(op),
                r.median(),
                r.min(),
                r.max(),
                r.0,
                if last { "" } else { "," }
            );
        }
    }
    json.push_str("]\n");
    let path = crate::target_dir().join("bench.json");
    if std::fs::write(&path, json).is_err() {
        println!("bench: could not write {}", path.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {}", path.display());
    let short: Vec<&str> = MODES
        .iter()
        .zip(speedups)
        .filter(|&(_, s)| s.is_some_and(|s| s < SPEEDUP_TARGET))
        .map(|(&mode, _)| mode)
        .collect();
    if !short.is_empty() {
        println!(
            "note: the work speed-up is under the {SPEEDUP_TARGET}x target in: {}",
            short.join(", ")
        );
    }
    ExitCode::SUCCESS
}

/// The timed table: per workload, each mode's median and min–max, and the
/// ratio of the medians; then the 2-P speed-up of `work` per mode.
fn timed_table(rows: &[[Runs; 2]], speedups: [Option<f64>; 2]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<13} {:>5} | {:>10} {:>21} | {:>10} {:>21} | {:>7}  unit",
        "workload", "procs", "bound", "min – max", "migrate", "min – max", "b ÷ m"
    );
    for (&(op, procs, _), [b, m]) in TIMED.iter().zip(rows) {
        let range = |r: &Runs| format!("{:.2} – {:.2}", r.min(), r.max());
        let _ = writeln!(
            t,
            "{op:<13} {procs:>5} | {:>10.2} {:>21} | {:>10.2} {:>21} | {:>7.2}  {}",
            b.median(),
            range(b),
            m.median(),
            range(m),
            b.median() / m.median(),
            unit(op)
        );
    }
    let fmt = |s: Option<f64>| s.map_or("—".to_string(), |s| format!("{s:.2}x"));
    let _ = writeln!(
        t,
        "{:<19} | {:>10} {:>21} | {:>10} {:>21} |          (target >= {SPEEDUP_TARGET}x)",
        "work 1 P / 2 Ps",
        fmt(speedups[0]),
        "",
        fmt(speedups[1]),
        ""
    );
    t
}

/// The baseline count of `op` in `text` (the contents of
/// [`BASELINE`]): its plain `"op": count` line, the gated mode's.
fn baseline_count(text: &str, op: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("\"{op}\": ")))
        .and_then(|v| v.trim_end_matches(',').parse::<f64>().ok())
}

/// The baseline key of `op`'s instruction count (`locked`: of its locked
/// operations) in `mode`: `op` or `locked/op` for the gated mode,
/// `mode/op` or `mode/locked/op` for the others.
fn key(mode: &str, op: &str, locked: bool) -> String {
    let what = if locked {
        format!("locked/{op}")
    } else {
        op.to_string()
    };
    if mode == GATED_MODE {
        what
    } else {
        format!("{mode}/{what}")
    }
}

/// The baseline key of `op`'s count with the trace recording:
/// `trace/op` or `trace/locked/op`.
fn trace_key(op: &str, locked: bool) -> String {
    format!("trace/{}", key(GATED_MODE, op, locked))
}

/// Counts the [`TRACED`] rows with the trace recording; `None` (said on
/// stdout) if the build or a count fails.
fn count_traced(root: &Path) -> Option<Vec<(&'static str, Counts)>> {
    let Some(bin) = build_ops_traced(root) else {
        println!("bench: building ops with the trace feature failed");
        return None;
    };
    let mut out = Vec::new();
    for &(op, n) in TRACED {
        let Some(c) = instructions_env(&bin, op, n, GATED_MODE, true) else {
            println!("bench: callgrind on {op} (traced) failed: see its output above");
            return None;
        };
        println!(
            "bench: {op}, trace recording: {:.1} Ir, {:.2} locked (per op)",
            c.ir, c.locked
        );
        out.push((op, c));
    }
    Some(out)
}

/// The JSON of the counts: per mode, the instruction counts, then the
/// locked-operation counts (keys from [`key`]).
fn counts_json(counts: &[(&str, [Counts; 2])], traced: &[(&str, Counts)]) -> String {
    let mut entries = Vec::new();
    for (m, mode) in MODES.iter().enumerate() {
        for locked in [false, true] {
            for &(op, c) in counts {
                let v = if locked { c[m].locked } else { c[m].ir };
                entries.push(format!("  \"{}\": {v:.1}", key(mode, op, locked)));
            }
        }
    }
    for locked in [false, true] {
        for &(op, c) in traced {
            let v = if locked { c.locked } else { c.ir };
            entries.push(format!("  \"{}\": {v:.1}", trace_key(op, locked)));
        }
    }
    format!("{{\n{}\n}}\n", entries.join(",\n"))
}

/// One gated count against its baseline: the limit it may reach, and
/// whether it stays under it. Instructions may grow by [`TOLERANCE`],
/// locked operations by [`LOCKED_SLACK`].
fn limit(base: f64, locked: bool) -> f64 {
    if locked {
        base + LOCKED_SLACK
    } else {
        base * (1.0 + TOLERANCE)
    }
}

fn run_counted(root: &Path, bin: &Path, update: bool) -> ExitCode {
    let baseline = std::fs::read_to_string(root.join(BASELINE)).unwrap_or_default();
    let mut counts: Vec<(&str, [Counts; 2])> = Vec::new();
    for (i, &(op, n)) in COUNTED.iter().enumerate() {
        let mut c = [Counts {
            ir: 0.0,
            locked: 0.0,
        }; 2];
        for (m, mode) in MODES.iter().enumerate() {
            println!(
                "bench: [{}/{}] callgrind: {op} on 1 P, {mode}, N = {n} and {}",
                i + 1,
                COUNTED.len(),
                2 * n
            );
            let Some(v) = instructions(bin, op, n, mode) else {
                println!("bench: callgrind on {op} ({mode}) failed: see its output above");
                return ExitCode::FAILURE;
            };
            c[m] = v;
        }
        println!(
            "bench: [{}/{}] {op}: bound {:.1} Ir, {:.2} locked; migrate {:.1} Ir, {:.2} locked (per op)",
            i + 1,
            COUNTED.len(),
            c[0].ir,
            c[0].locked,
            c[1].ir,
            c[1].locked
        );
        counts.push((op, c));
    }
    let Some(traced) = count_traced(root) else {
        return ExitCode::FAILURE;
    };
    println!("\n{}", counted_table(&counts, &baseline));
    for &(op, c) in &traced {
        let plain = counts.iter().find(|&&(o, _)| o == op).map(|(_, c)| c[0].ir);
        let base = baseline_count(&baseline, &trace_key(op, false));
        println!(
            "{op:<12} | trace recording {:>8.1} Ir ({}), baseline {}",
            c.ir,
            plain.map_or("—".into(), |p| format!(
                "{:+.1} % over the build without the trace feature",
                (c.ir / p - 1.0) * 100.0
            )),
            base.map_or("—".into(), |b| format!("{b:.1}"))
        );
    }
    let mut over = Vec::new();
    for &(op, [b, _]) in &counts {
        for (locked, now) in [(false, b.ir), (true, b.locked)] {
            if let Some(base) = baseline_count(&baseline, &key(GATED_MODE, op, locked))
                && now > limit(base, locked)
            {
                over.push(format!(
                    "{} ({base:.1} -> {now:.1})",
                    key(GATED_MODE, op, locked)
                ));
            }
        }
    }
    if !over.is_empty() {
        println!(
            "bound-mode counts over {BASELINE} (+{:.0} % instructions, +{LOCKED_SLACK} locked allowed): {}",
            TOLERANCE * 100.0,
            over.join(", ")
        );
    }
    let json = counts_json(&counts, &traced);
    let out = crate::target_dir().join("bench-instructions.json");
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

/// The table of `--instructions`: per op, instructions and locked
/// operations in both modes, the bound ones beside their baseline.
fn counted_table(counts: &[(&str, [Counts; 2])], baseline: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<12} | {:>8} {:>8} {:>8} | {:>6} {:>6} | {:>8} {:>6}",
        "workload", "bound Ir", "baseline", "vs base", "locked", "base", "migr. Ir", "locked"
    );
    for &(op, [b, m]) in counts {
        let base = |locked| baseline_count(baseline, &key(GATED_MODE, op, locked));
        let fmt = |v: Option<f64>, p: usize| v.map_or("—".to_string(), |v| format!("{v:.p$}"));
        let vs = base(false).map_or("—".to_string(), |x| {
            format!("{:+.1} %", (b.ir / x - 1.0) * 100.0)
        });
        let _ = writeln!(
            t,
            "{op:<12} | {:>8.1} {:>8} {vs:>8} | {:>6.2} {:>6} | {:>8.1} {:>6.2}",
            b.ir,
            fmt(base(false), 1),
            b.locked,
            fmt(base(true), 2),
            m.ir,
            m.locked
        );
    }
    let _ = write!(
        t,
        "(per op on 1 P; the gate holds bound, the default, to the baseline: \
         +{:.0} % instructions, +{LOCKED_SLACK} locked operations)",
        TOLERANCE * 100.0
    );
    t
}

/// The gate's regression guard: counts the hot paths again in the default
/// (bound) mode and fails if any instruction count grew more than
/// [`TOLERANCE`] over `bench/baseline.json`, or any locked-operation count
/// more than [`LOCKED_SLACK`]. The file's `migrate/…` entries are not
/// checked.
pub fn check_baseline(root: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(root.join(BASELINE)) else {
        println!("{BASELINE} is missing: run `cargo xtask bench --update-baseline`");
        return false;
    };
    // A missing tool is a set-up failure, not a grown count: say which.
    if let Err(missing) = tools::ensure(&tools::VALGRIND) {
        println!("{missing}");
        return false;
    }
    if !build_ops(root) {
        return false;
    }
    let bin = ops_binary();
    let mut grew = false;
    let mut unmeasured = Vec::new();
    for &(op, n) in COUNTED {
        let bases = [false, true].map(|locked| baseline_count(&text, &key(GATED_MODE, op, locked)));
        let [Some(base_ir), Some(base_locked)] = bases else {
            println!(
                "{BASELINE} has no instruction or locked count for {op}: \
                 run `cargo xtask bench --update-baseline`"
            );
            unmeasured.push(op);
            continue;
        };
        let Some(now) = instructions(&bin, op, n, GATED_MODE) else {
            println!("callgrind on {op} failed: see its output above");
            unmeasured.push(op);
            continue;
        };
        for (locked, now, base, unit) in [
            (false, now.ir, base_ir, "Ir/op"),
            (true, now.locked, base_locked, "locked/op"),
        ] {
            let limit = limit(base, locked);
            let verdict = if now <= limit { "ok" } else { "REGRESSION" };
            println!(
                "{op:<12} {now:>8.2} {unit:<9} ({GATED_MODE})   baseline {base:>8.2}   limit {limit:>8.2}   {verdict}"
            );
            grew |= now > limit;
        }
    }
    // The trace's recording cost (issue 15): the same tolerance.
    let traced = count_traced(root).unwrap_or_default();
    if traced.len() != TRACED.len() {
        unmeasured.push("trace rows");
    }
    for &(op, now) in &traced {
        for (locked, now, unit) in [(false, now.ir, "Ir/op"), (true, now.locked, "locked/op")] {
            let Some(base) = baseline_count(&text, &trace_key(op, locked)) else {
                println!(
                    "{BASELINE} has no {}: run `cargo xtask bench --update-baseline`",
                    trace_key(op, locked)
                );
                unmeasured.push(op);
                continue;
            };
            let limit = limit(base, locked);
            let verdict = if now <= limit { "ok" } else { "REGRESSION" };
            println!(
                "{op:<12} {now:>8.2} {unit:<9} (traced)  baseline {base:>8.2}   limit {limit:>8.2}   {verdict}"
            );
            grew |= now > limit;
        }
    }
    if !unmeasured.is_empty() {
        println!("not measured: {}", unmeasured.join(", "));
    }
    if grew {
        println!(
            "counts grew over {BASELINE} (+{:.0} % instructions, +{LOCKED_SLACK} locked \
             operations per op allowed); if intended, run `cargo xtask bench --update-baseline` \
             and say why in the commit",
            TOLERANCE * 100.0
        );
    }
    !grew && unmeasured.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_baseline_reads() {
        let old = "{\n  \"switch\": 49.0,\n  \"gosched\": 196.7,\n  \"handoff-chan\": 598.5\n}\n";
        assert_eq!(baseline_count(old, "switch"), Some(49.0));
        assert_eq!(baseline_count(old, "handoff-chan"), Some(598.5));
        assert_eq!(baseline_count(old, "handoff"), None);
    }

    #[test]
    fn migrate_entries_are_not_gated() {
        let c = |ir, locked| Counts { ir, locked };
        let counts = [
            ("switch", [c(49.0, 0.0), c(50.0, 0.0)]),
            ("handoff", [c(367.5, 13.0), c(300.0, 16.0)]),
        ];
        let json = counts_json(&counts, &[("handoff", c(500.0, 13.0))]);
        assert_eq!(
            json,
            "{\n  \"switch\": 49.0,\n  \"handoff\": 367.5,\n  \"locked/switch\": 0.0,\n  \
             \"locked/handoff\": 13.0,\n  \"migrate/switch\": 50.0,\n  \
             \"migrate/handoff\": 300.0,\n  \"migrate/locked/switch\": 0.0,\n  \
             \"migrate/locked/handoff\": 16.0,\n  \"trace/handoff\": 500.0,\n  \
             \"trace/locked/handoff\": 13.0\n}\n"
        );
        // The traced rows are not read as the plain ones.
        assert_eq!(baseline_count(&json, "handoff"), Some(367.5));
        assert_eq!(
            baseline_count(&json, &trace_key("handoff", false)),
            Some(500.0)
        );
        assert_eq!(baseline_count(&json, "switch"), Some(49.0));
        assert_eq!(baseline_count(&json, "handoff"), Some(367.5));
        assert_eq!(
            baseline_count(&json, &key(GATED_MODE, "handoff", true)),
            Some(13.0)
        );
    }

    #[test]
    fn one_more_locked_operation_fails_the_gate() {
        // A share would let +1 through on a path of 12; the slack does not.
        assert!(12.0 + 1.0 > limit(12.0, true));
        assert!(12.0 + 0.1 <= limit(12.0, true));
        assert!(100.0 * 1.1 <= limit(100.0, false));
    }

    #[test]
    fn profile_totals_follow_the_events_line() {
        let p = "positions: instr line\nevents: Ir Ge\nsummary: 29010941 1300282\n";
        assert_eq!(profile_totals(p), Some([29_010_941, 1_300_282]));
        // Without --collect-bus there is no Ge: an error, not a zero.
        assert_eq!(profile_totals("events: Ir\nsummary: 5\n"), None);
    }

    #[test]
    fn result_line() {
        let out = "noise\nresult handoff 2 1000000 140.33 ns/op bound\n";
        assert_eq!(result_value(out), Some(140.33));
        // Before the MODE field existed.
        assert_eq!(result_value("result work 1 4 0.55 s\n"), Some(0.55));
    }
}
