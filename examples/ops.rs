//! One benchmark workload, N times, for timing and for instruction counts:
//! the workloads of `cargo xtask bench`, one process each.
//!
//! ```text
//! cargo run --release --example ops -- OP N [PROCS [MODE]]
//! ```
//!
//! OP is one of:
//! - `switch`: an `mcall` + `gogo` round trip, G → g0 → G, on a bare M;
//! - `gosched`: two goroutines yield to each other; one op = one `gosched`;
//! - `spawn`: spawn + run + exit of an empty goroutine, in batches of 1,000
//!   (stacks reused); one op = one goroutine;
//! - `spawn-alive`: the same with all N goroutines alive at once;
//! - `spawn-parked`: N goroutines spawned, each of which parks (on a
//!   channel receive) until all have; one op = one goroutine, timed from
//!   the first spawn until the last has parked (their release and exit are
//!   not timed). Each needs a stack of its own, under any design;
//! - `handoff`: two goroutines pass a token with park / unpark; one op =
//!   one one-way hand-off;
//! - `handoff-chan`: the same over two unbuffered channels (ping, pong);
//!   one op = one one-way hand-off (a send and the receive it meets);
//! - `handoff-cross` (PROCS ≥ 2): `handoff` with the two goroutines started
//!   on different threads: the first spins, without a scheduling point,
//!   until another M has taken the second and started it. In bound mode
//!   they stay there, so every hand-off wakes the other thread; in migrate
//!   mode they may come together;
//! - `parked`: N goroutines parked at once; the value is RSS bytes per
//!   parked goroutine;
//! - `queued`: N goroutines spawned and not yet run (on 1 P none runs
//!   before the spawner parks); the value is RSS bytes per queued
//!   goroutine;
//! - `work`: a CPU-bound job split over 64 goroutines; the value is the
//!   job's seconds (compare PROCS = 1 and 2 for the speed-up);
//! - `syscall`: the fast path of a blocking call that returns at once
//!   (`gokernel::syscall::call`: `entersyscall` + `exitsyscall`, Go's
//!   `BenchmarkSyscall`), from PROCS goroutines in parallel as Go's
//!   `RunParallel` does; one op = one call.
//!
//! PROCS is the number of Ps (default 1). MODE is where a started
//! goroutine may run:
//! - `bound` (the default, as `Runtime::builder()` builds it): only on the
//!   M (OS thread) it started on;
//! - `migrate`: on any M, as in Go
//!   (`Builder::migrate_started_goroutines`; sound here, since these
//!   workloads keep nothing thread-local across a scheduling point).
//!
//! `switch` runs on a bare M, with no scheduler: PROCS and MODE change
//! nothing there.
//!
//! Without arguments, or with ones it cannot read, it prints the usage on
//! stderr and exits with status 2.
//!
//! With `OPS_TRACE=1` in the environment (and the crate's `trace`
//! feature), the runtime records an execution trace while the workload
//! runs; the trace is kept in memory and never exported (the process exits
//! right after the result line), so the figures are the cost of recording
//! alone.
//!
//! The last line is `result OP PROCS N VALUE UNIT MODE`. Under
//! `valgrind --tool=callgrind`, run N and 2N: the instructions per op are
//! (Ir(2N) - Ir(N)) / N, free of start-up costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use gokernel::Runtime;
use gokernel::asm_amd64::{gogo, mcall};
use gokernel::proc::{execute, gostartcallfn, malg, mstart, newgoid};
use gokernel::runtime2::{G, M};

fn gosched_pair(n: u64) {
    let hs: Vec<_> = (0..2)
        .map(|_| {
            gokernel::spawn(move || {
                for _ in 0..n / 2 {
                    gokernel::gosched();
                }
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
}

fn spawn_batches(n: u64) {
    const BATCH: u64 = 1000;
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH);
        left -= k;
        spawn_and_wait(k);
    }
}

/// Starts `k` empty goroutines, all alive at once, and parks until the
/// last one has run.
fn spawn_and_wait(k: u64) {
    let main = gokernel::current();
    let pending = Arc::new(AtomicU64::new(k));
    for _ in 0..k {
        let (pending, main) = (pending.clone(), main.clone());
        gokernel::go(move || {
            if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                main.unpark();
            }
        });
    }
    while pending.load(Ordering::Acquire) != 0 {
        gokernel::park();
    }
}

fn handoff(n: u64) {
    let main = gokernel::current();
    let peer_slot = Arc::new(OnceLock::new());
    let ps = peer_slot.clone();
    let peer = gokernel::spawn(move || {
        ps.set(gokernel::current()).unwrap();
        for _ in 0..n / 2 {
            gokernel::park();
            main.unpark();
        }
    });
    while peer_slot.get().is_none() {
        gokernel::gosched();
    }
    let p = peer_slot.get().unwrap().clone();
    for _ in 0..n / 2 {
        p.unpark();
        gokernel::park();
    }
    peer.join().unwrap();
}

/// The calling thread's id (a system call: no thread-local, so safe in
/// migrate mode too).
fn gettid() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// Starts `k` goroutines that each park (receive on a channel nobody
/// sends on) until all have; returns the seconds from the first spawn
/// until the last one parked, then closes the channel and waits for all
/// to exit (untimed).
fn spawn_parked(k: u64) -> f64 {
    let main = gokernel::current();
    let parked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let gate = gokernel::chan::<()>(0);
    let t = Instant::now();
    for _ in 0..k {
        let (parked, done, gate, main) = (parked.clone(), done.clone(), gate.clone(), main.clone());
        gokernel::go(move || {
            if parked.fetch_add(1, Ordering::AcqRel) + 1 == k {
                main.unpark();
            }
            let _ = gate.recv();
            if done.fetch_add(1, Ordering::AcqRel) + 1 == k {
                main.unpark();
            }
        });
    }
    while parked.load(Ordering::Acquire) != k {
        gokernel::park();
    }
    let secs = t.elapsed().as_secs_f64();
    gate.close().unwrap();
    while done.load(Ordering::Acquire) != k {
        gokernel::park();
    }
    secs
}

/// `handoff`, with the peer started by another M than the main
/// goroutine's (see the module docs).
fn handoff_cross(n: u64) {
    let main = gokernel::current();
    let main_tid = gettid();
    let peer_slot = Arc::new(OnceLock::new());
    let ps = peer_slot.clone();
    let peer = gokernel::spawn(move || {
        ps.set((gokernel::current(), gettid())).unwrap();
        for _ in 0..n / 2 {
            gokernel::park();
            main.unpark();
        }
    });
    // No scheduling point here: only another M can start the peer.
    let t = Instant::now();
    while peer_slot.get().is_none() {
        if t.elapsed().as_secs() >= 10 {
            eprintln!("ops: handoff-cross: no other M started the peer in 10 s");
            std::process::exit(1);
        }
        std::hint::spin_loop();
    }
    let (p, peer_tid) = peer_slot.get().unwrap().clone();
    assert_ne!(
        peer_tid, main_tid,
        "the peer started on the main goroutine's thread"
    );
    for _ in 0..n / 2 {
        p.unpark();
        gokernel::park();
    }
    peer.join().unwrap();
}

fn handoff_chan(n: u64) {
    let (ping, pong) = (gokernel::chan::<u64>(0), gokernel::chan::<u64>(0));
    let (pi, po) = (ping.clone(), pong.clone());
    let peer = gokernel::spawn(move || {
        for v in &pi {
            po.send(v + 1).unwrap();
        }
    });
    let mut v = 0;
    for _ in 0..n / 2 {
        ping.send(v).unwrap();
        v = pong.recv().unwrap();
    }
    ping.close().unwrap();
    peer.join().unwrap();
    assert_eq!(v, n / 2);
}

/// On g0: resume the caller at once.
unsafe extern "C" fn back(gp: *mut G) {
    // SAFETY: gp was just suspended by mcall on this M.
    unsafe { gogo((*gp).sched()) }
}

/// `n` bare `mcall` + `gogo` round trips on a G of a bare M (no scheduler).
fn switch_round_trips(n: u64) {
    let mut g = malg(64 * 1024).expect("malg");
    g.set_goid(newgoid());
    let gp: *mut G = &mut *g;
    let body = Box::new(move || {
        for _ in 0..n {
            // SAFETY: on a user G; `back` resumes it at once.
            unsafe { mcall(back) };
        }
    });
    // SAFETY: a new G: not running, its stack unused.
    unsafe { gostartcallfn(gp, body) };
    let mut m = M::new(1);
    // SAFETY: this thread runs no M; the G exits and so ends the M.
    unsafe { mstart(&mut *m, || execute(gp, false)) };
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Parks `n` goroutines at once; returns RSS bytes per parked goroutine.
fn parked(n: u64) -> f64 {
    let before = rss_bytes();
    let handles = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n as usize)));
    let done = Arc::new(AtomicU64::new(0));
    let main = gokernel::current();
    for _ in 0..n {
        let (handles, done, main) = (handles.clone(), done.clone(), main.clone());
        gokernel::go(move || {
            handles.lock().unwrap().push(gokernel::current());
            gokernel::park();
            if done.fetch_add(1, Ordering::AcqRel) + 1 == n {
                main.unpark();
            }
        });
    }
    while (handles.lock().unwrap().len() as u64) < n {
        gokernel::gosched();
    }
    let per_g = rss_bytes().saturating_sub(before) as f64 / n as f64;
    for g in handles.lock().unwrap().drain(..) {
        g.unpark();
    }
    while done.load(Ordering::Acquire) < n {
        gokernel::park();
    }
    per_g
}

/// Spawns `n` empty goroutines and, before any has run, returns RSS bytes
/// per queued goroutine; then lets them run.
fn queued(n: u64) -> f64 {
    let before = rss_bytes();
    let main = gokernel::current();
    let pending = Arc::new(AtomicU64::new(n));
    for _ in 0..n {
        let (pending, main) = (pending.clone(), main.clone());
        gokernel::go(move || {
            if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                main.unpark();
            }
        });
    }
    let per_g = rss_bytes().saturating_sub(before) as f64 / n as f64;
    while pending.load(Ordering::Acquire) != 0 {
        gokernel::park();
    }
    per_g
}

/// A CPU-bound job of `n` steps split over 64 goroutines.
fn work(n: u64) -> u64 {
    let hs: Vec<_> = (0..64u64)
        .map(|i| {
            gokernel::spawn(move || {
                let mut x = i;
                for _ in 0..n / 64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                }
                x
            })
        })
        .collect();
    hs.into_iter().fold(0, |a, h| a ^ h.join().unwrap())
}

/// `n` empty calls through `gokernel::syscall::call` (the fast path:
/// the P is still there when the call returns), split over `procs`
/// goroutines.
fn syscalls(n: u64, procs: usize) {
    let hs: Vec<_> = (0..procs as u64)
        .map(|_| {
            gokernel::spawn(move || {
                for i in 0..n / procs as u64 {
                    gokernel::syscall::call(|| std::hint::black_box(i));
                }
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
}

const USAGE: &str = "usage: ops OP N [PROCS [MODE]]
  OP:    switch|gosched|spawn|spawn-alive|spawn-parked|handoff|handoff-chan|handoff-cross|parked|queued|work|syscall
  N:     operations (work: computation steps), a whole number > 0
  PROCS: Ps, default 1
  MODE:  bound (default: a started goroutine stays on its thread) | migrate (as in Go)";

const OPS: &[&str] = &[
    "switch",
    "gosched",
    "spawn",
    "spawn-alive",
    "spawn-parked",
    "handoff",
    "handoff-chan",
    "handoff-cross",
    "parked",
    "queued",
    "work",
    "syscall",
];

/// Prints `problem` and the usage on stderr and exits with status 2.
fn usage_error(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("ops: {problem}");
    }
    eprintln!("{USAGE}");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        usage_error("");
    }
    if args.len() > 4 {
        usage_error(&format!("unexpected argument `{}`", args[4]));
    }
    let op = args[0].clone();
    if !OPS.contains(&op.as_str()) {
        usage_error(&format!("unknown OP `{op}`"));
    }
    let n: u64 = match args.get(1).map(|a| a.parse()) {
        Some(Ok(n)) if n > 0 => n,
        Some(_) => usage_error(&format!("N must be a whole number > 0, not `{}`", args[1])),
        None => usage_error("N is missing"),
    };
    let procs: usize = match args.get(2).map(|a| a.parse()) {
        None => 1,
        Some(Ok(p)) if p > 0 => p,
        Some(_) => usage_error(&format!(
            "PROCS must be a whole number > 0, not `{}`",
            args[2]
        )),
    };
    let migrate = match args.get(3).map(String::as_str) {
        None | Some("bound") => false,
        Some("migrate") => true,
        Some(other) => usage_error(&format!("MODE must be `bound` or `migrate`, not `{other}`")),
    };
    let mode = if migrate { "migrate" } else { "bound" };
    if op == "handoff-cross" && procs < 2 {
        usage_error("handoff-cross needs PROCS >= 2");
    }
    if op == "switch" {
        let t = Instant::now();
        switch_round_trips(n);
        let ns = t.elapsed().as_secs_f64() * 1e9 / n as f64;
        println!("result switch 1 {n} {ns:.2} ns/op {mode}");
        return;
    }
    let builder = Runtime::builder()
        .procs(procs)
        .stack_size(gokernel::stack::STACK_MIN);
    let builder = if migrate {
        // SAFETY: no workload here keeps thread-local state, a thread-keyed
        // lock or an unwinding panic across a scheduling point.
        unsafe { builder.migrate_started_goroutines() }
    } else {
        builder
    };
    // All N alive at once may be more guarded stacks than vm.max_map_count
    // allows (28,669 by default): then unguarded ones, said on stderr.
    let alive = matches!(
        op.as_str(),
        "spawn-alive" | "spawn-parked" | "parked" | "queued"
    );
    let builder = if alive && n as usize + 16 > gokernel::stack::guard_page_budget() {
        eprintln!(
            "ops: {n} goroutines alive need more guarded stacks than vm.max_map_count = {} allows; \
             using unguarded stacks",
            gokernel::stack::max_map_count()
        );
        // SAFETY: these goroutines do nothing or park: a few hundred bytes
        // of their 32 KiB stacks.
        unsafe { builder.unguarded_stacks() }
    } else {
        builder
    };
    // OPS_TRACE=1: record (see the module docs); the file is never written.
    let traced = std::env::var_os("OPS_TRACE").is_some_and(|v| v == "1");
    let builder = if traced {
        builder.trace("/dev/null")
    } else {
        builder
    };
    let rt = builder.build().unwrap();
    // Timed inside the main goroutine, as Go's `ops` times its main
    // goroutine and the tokio peer its main task: neither the runtime's
    // start-up nor block_on's hand-over to an M (a thread wake-up, which
    // on a loaded machine can take milliseconds) is the workload's.
    let timed = |f: fn(u64)| {
        rt.block_on(move || {
            let t = Instant::now();
            f(n);
            t.elapsed().as_secs_f64()
        })
        .unwrap()
    };
    let (value, unit) = match op.as_str() {
        "gosched" | "spawn" | "spawn-alive" | "handoff" | "handoff-chan" | "handoff-cross" => {
            let f: fn(u64) = match op.as_str() {
                "gosched" => gosched_pair,
                "spawn" => spawn_batches,
                "spawn-alive" => spawn_and_wait,
                "handoff" => handoff,
                "handoff-cross" => handoff_cross,
                _ => handoff_chan,
            };
            (timed(f) * 1e9 / n as f64, "ns/op")
        }
        "spawn-parked" => (
            rt.block_on(move || spawn_parked(n)).unwrap() * 1e9 / n as f64,
            "ns/op",
        ),
        "parked" => (rt.block_on(move || parked(n)).unwrap(), "B/G"),
        "queued" => (rt.block_on(move || queued(n)).unwrap(), "B/G"),
        "syscall" => {
            let secs = rt
                .block_on(move || {
                    let t = Instant::now();
                    syscalls(n, procs);
                    t.elapsed().as_secs_f64()
                })
                .unwrap();
            (secs * 1e9 / n as f64, "ns/op")
        }
        "work" => (
            timed(|n| {
                std::hint::black_box(work(n));
            }),
            "s",
        ),
        _ => unreachable!("OP was checked against OPS"),
    };
    println!("result {op} {procs} {n} {value:.2} {unit} {mode}");
    if traced {
        // Not the export: it is not what is measured.
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::process::exit(0);
    }
}
