//! Scheduler introspection: `stats()` (goroutines by status, queues, Ms,
//! Ps, per-P counters) and the schedtrace monitor (`GOKERNEL_SCHEDTRACE`,
//! `Builder::schedtrace`), whose output is checked in child processes.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use gokernel::Runtime;
use gokernel::proc::Stats;

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

/// Polls `f` (yielding in between) until `cond` holds of its value, which
/// it returns; fails naming `what` and the last value after 20 s.
fn wait_for<T: std::fmt::Debug>(what: &str, f: impl Fn() -> T, cond: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = f();
        if cond(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last: {v:?}"
        );
        if gokernel_running() {
            gokernel::gosched();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn gokernel_running() -> bool {
    !gokernel::getg().is_null()
}

#[test]
fn goroutine_counts_by_status_follow_ten_parked_goroutines_until_they_finish() {
    let r = rt(2);
    r.block_on(|| {
        let (tx, rx) = mpsc::channel();
        let hs: Vec<_> = (0..10)
            .map(|_| {
                let tx = tx.clone();
                gokernel::spawn(move || {
                    tx.send(gokernel::current()).unwrap();
                    gokernel::park();
                })
            })
            .collect();
        let parked: Vec<_> = (0..10).map(|_| rx.recv().unwrap()).collect();
        let s = wait_for("ten parked goroutines", gokernel::stats, |s| {
            s.goroutines.waiting >= 10
        });
        assert_eq!(s.goroutines.waiting, 10, "{s:?}");
        assert_eq!(s.goroutines.running, 1, "only main runs: {s:?}");
        assert_eq!(s.goroutines.idle, 0, "{s:?}");
        assert_eq!(s.goroutines.live(), 11, "{s:?}");
        for g in parked {
            g.unpark();
        }
        for h in hs {
            h.join().unwrap();
        }
        // Their results arrive just before they exit: wait for the exits.
        let s = wait_for("the ten goroutines to be dead", gokernel::stats, |s| {
            s.goroutines.live() == 1
        });
        assert_eq!(s.goroutines.waiting, 0, "{s:?}");
        assert!(
            s.goroutines.dead >= 10,
            "finished goroutines are kept dead: {s:?}"
        );
        assert_eq!(s.goroutines.live(), gokernel::num_goroutine(), "{s:?}");
    })
    .unwrap();
}

#[test]
fn steals_are_counted_when_a_goroutine_can_only_run_on_another_p() {
    let r = rt(2);
    r.block_on(|| {
        for _ in 0..10 {
            // The new goroutine takes this P's runnext; this goroutine does
            // not yield until it has run, so another P must steal it.
            let ran = Arc::new(AtomicBool::new(false));
            let r2 = ran.clone();
            gokernel::go(move || r2.store(true, Ordering::SeqCst));
            let deadline = Instant::now() + Duration::from_secs(20);
            while !ran.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "the goroutine was never stolen");
                std::hint::spin_loop();
            }
        }
    })
    .unwrap();
    let stolen: u64 = r.stats().ps.iter().map(|p| p.stolen).sum();
    assert!(stolen >= 10, "10 forced steals, {stolen} counted");
}

#[test]
fn parks_are_counted() {
    let r = rt(2);
    let parked = |r: &Runtime| r.stats().ps.iter().map(|p| p.parked).sum::<u64>();
    let before = parked(&r);
    r.block_on(|| {
        for _ in 0..100 {
            let me = gokernel::current();
            // A token that is already there when main calls park() is taken
            // without parking, and the new goroutine may well run first (on
            // the other P): so it waits until main is parked (the only
            // waiting goroutine) before it unparks it.
            gokernel::go(move || {
                wait_for("main to park", gokernel::stats, |s| {
                    s.goroutines.waiting == 1
                });
                me.unpark();
            });
            gokernel::park();
        }
    })
    .unwrap();
    let after = parked(&r);
    // Each park of main parked it (it was waiting when it was unparked).
    assert!(
        after >= before + 100,
        "100 parks, {} counted",
        after - before
    );
}

#[test]
fn on_a_quiescent_scheduler_the_runnable_goroutines_are_those_queued() {
    let r = rt(1);
    r.block_on(|| {
        // One P, held by main, which does not yield: nothing else runs.
        // 300 goroutines overflow the 256-slot ring into the global queue.
        for _ in 0..300 {
            gokernel::go(|| {});
        }
        let s = gokernel::stats();
        let local: usize = s.ps.iter().map(|p| p.runq_len).sum();
        assert_eq!(s.goroutines.runnable, 300, "{s:?}");
        assert_eq!(local + s.runqueue, s.goroutines.runnable, "{s:?}");
        assert!(
            s.runqueue > 0,
            "the ring overflowed to the global queue: {s:?}"
        );
        assert_eq!(s.goroutines.running, 1, "{s:?}");
        assert_eq!((s.procs, s.idle_ps, s.threads), (1, 0, 1), "{s:?}");
        let full = gokernel::runq::RUNQ_LEN + 1; // the ring and runnext
        assert_eq!(s.ps[0].runq_hwm as usize, full, "{s:?}");
    })
    .unwrap();
}

#[test]
fn when_the_work_is_done_every_p_and_m_goes_idle() {
    let r = rt(2);
    r.block_on(|| {
        let hs: Vec<_> = (0..1_000)
            .map(|_| gokernel::spawn(gokernel::gosched))
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    })
    .unwrap();
    let s = wait_for(
        "every P and M to be idle, with no goroutine left",
        || r.stats(),
        // With no goroutine left too: a snapshot reads the goroutines'
        // states before the idle lists, so the main goroutine may still
        // read as running in one that finds its M idle (the race that
        // failed a gate run).
        |s: &Stats| {
            s.idle_ps == 2
                && s.spinning_ms == 0
                && s.idle_ms == s.threads
                && s.threads > 0
                && s.goroutines.live() == 0
        },
    );
    assert_eq!(s.goroutines.live(), 0, "{s:?}");
    assert_eq!(s.runqueue, 0, "{s:?}");
    assert_eq!(s.ps.iter().map(|p| p.runq_len).sum::<usize>(), 0, "{s:?}");
    assert_eq!((s.locked_ms, s.idle_locked_ms), (0, 0), "{s:?}");
    assert!(
        s.ps.iter().map(|p| p.spawned).sum::<u64>() >= 1_000,
        "{s:?}"
    );
    assert!(
        s.ps.iter().map(|p| p.scheduled).sum::<u64>() >= 2_000,
        "{s:?}"
    );
}

#[test]
fn a_locked_m_asleep_waiting_for_its_goroutine_is_counted() {
    let r = rt(2);
    let (tx, rx) = mpsc::channel();
    r.spawn(move || {
        gokernel::lock_os_thread();
        tx.send(gokernel::current()).unwrap();
        gokernel::park();
        gokernel::unlock_os_thread();
    });
    let g = rx.recv().unwrap();
    let s = wait_for(
        "the locked M to sleep",
        || r.stats(),
        |s: &Stats| s.idle_locked_ms == 1,
    );
    assert_eq!(s.locked_ms, 1, "{s:?}");
    assert_eq!(s.goroutines.waiting, 1, "{s:?}");
    g.unpark();
    wait_for(
        "the goroutine to unlock and finish",
        || r.stats(),
        |s: &Stats| s.locked_ms == 0 && s.idle_locked_ms == 0 && s.goroutines.live() == 0,
    );
}

// ---------------------------------------------------------------------
// schedtrace, in child processes (stderr is the output).

/// Set in a child process: the value is what the child should do.
const CHILD: &str = "GOKERNEL_STATS_CHILD";

/// Runs test `name` of this binary in a child with `env` set; its stderr.
fn child_stderr(name: &str, env: &[(&str, &str)]) -> String {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove("GOKERNEL_SCHEDTRACE");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("spawn the child");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "the child failed; stderr:\n{stderr}");
    stderr
}

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// A parsed `SCHED` line: elapsed ms, then every `key=value` in order, and
/// the per-P run-queue lengths.
#[derive(Debug)]
struct SchedLine {
    ms: u64,
    fields: Vec<(String, u64)>,
    per_p: Vec<u64>,
}

/// Parses one line of schedtrace output, or says what is wrong with it.
fn parse_sched_line(line: &str) -> Result<SchedLine, String> {
    let rest = line.strip_prefix("SCHED ").ok_or("no `SCHED ` prefix")?;
    let (ms, rest) = rest.split_once("ms: ").ok_or("no `<n>ms: `")?;
    let ms = ms.parse().map_err(|_| format!("bad elapsed time {ms:?}"))?;
    let (head, rest) = rest.split_once(" [").ok_or("no `[`")?;
    let (per_p, tail) = rest.split_once("] ").ok_or("no `] `")?;
    let per_p = per_p
        .split(' ')
        .map(|n| n.parse().map_err(|_| format!("bad run-queue length {n:?}")))
        .collect::<Result<Vec<u64>, String>>()?;
    let fields = head
        .split(' ')
        .chain(tail.split(' '))
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or(format!("not key=value: {kv:?}"))?;
            let v = v.parse().map_err(|_| format!("bad number in {kv:?}"))?;
            Ok((k.to_string(), v))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(SchedLine { ms, fields, per_p })
}

/// The child's work: a runtime (traced by the environment, or by the
/// builder when `by_builder`) running goroutines for about 150 ms.
fn traced_workload(by_builder: bool) {
    let mut b = Runtime::builder().procs(2);
    if by_builder {
        b = b.schedtrace(Duration::from_millis(20));
    }
    let r = b.build().unwrap();
    r.block_on(|| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(150) {
            let hs: Vec<_> = (0..10)
                .map(|_| gokernel::spawn(gokernel::gosched))
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .unwrap();
}

/// Checks a traced child's stderr: at least two SCHED lines in Go's
/// format, times increasing.
fn check_trace(stderr: &str) {
    let lines: Vec<_> = stderr.lines().filter(|l| l.starts_with("SCHED ")).collect();
    assert!(
        lines.len() >= 2,
        "expected at least 2 SCHED lines in ~150 ms at 20 ms; stderr:\n{stderr}"
    );
    let keys = [
        "gomaxprocs",
        "idleprocs",
        "threads",
        "spinningthreads",
        "idlethreads",
        "lockedthreads",
        "nmidlelocked",
        "runqueue",
        "gidle",
        "grunnable",
        "grunning",
        "gwaiting",
        "gdead",
    ];
    let mut last = 0;
    for l in &lines {
        let p = parse_sched_line(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
        let got: Vec<_> = p.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(got, keys, "{l:?}");
        assert_eq!(p.fields[0].1, 2, "gomaxprocs: {l:?}");
        assert_eq!(p.per_p.len(), 2, "one run-queue length per P: {l:?}");
        assert!(p.ms >= 20 && p.ms > last, "times must increase: {l:?}");
        last = p.ms;
    }
}

fn has_sched_lines(stderr: &str) -> bool {
    stderr.lines().any(|l| l.starts_with("SCHED "))
}

#[test]
fn gokernel_schedtrace_prints_sched_lines_in_gos_format() {
    if in_child() {
        traced_workload(false);
        return;
    }
    let stderr = child_stderr(
        "gokernel_schedtrace_prints_sched_lines_in_gos_format",
        &[("GOKERNEL_SCHEDTRACE", "20")],
    );
    check_trace(&stderr);
}

#[test]
fn builder_schedtrace_prints_sched_lines_without_the_environment() {
    if in_child() {
        traced_workload(true);
        return;
    }
    let stderr = child_stderr(
        "builder_schedtrace_prints_sched_lines_without_the_environment",
        &[],
    );
    check_trace(&stderr);
}

#[test]
fn a_bad_gokernel_schedtrace_value_is_reported_once_and_traces_nothing() {
    if in_child() {
        traced_workload(false);
        traced_workload(false); // a second runtime: no second warning
        return;
    }
    let name = "a_bad_gokernel_schedtrace_value_is_reported_once_and_traces_nothing";
    for bad in ["abc", "-5", "1.5", "20ms"] {
        let stderr = child_stderr(name, &[("GOKERNEL_SCHEDTRACE", bad)]);
        let warning = format!("gokernel: ignoring GOKERNEL_SCHEDTRACE={bad:?}: ");
        assert_eq!(
            stderr.matches(&warning).count(),
            1,
            "one warning for {bad:?}; stderr:\n{stderr}"
        );
        assert!(
            !has_sched_lines(&stderr),
            "no trace for {bad:?}; stderr:\n{stderr}"
        );
    }
    // 0 and empty are "off", not errors.
    for off in ["0", ""] {
        let stderr = child_stderr(name, &[("GOKERNEL_SCHEDTRACE", off)]);
        assert!(
            !stderr.contains("gokernel: ignoring") && !has_sched_lines(&stderr),
            "{off:?} is off, silently; stderr:\n{stderr}"
        );
    }
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with(prefix))
        .count()
}

#[test]
fn dropping_a_runtime_stops_its_schedtrace_monitor_at_once() {
    if in_child() {
        return;
    }
    // An hour between lines: the drop must not wait for the next one.
    let r = Runtime::builder()
        .procs(1)
        .schedtrace(Duration::from_secs(3600))
        .build()
        .unwrap();
    assert_eq!(r.block_on(|| 1), Ok(1));
    // comm is cut to 15 bytes: "gokernel-schedt". The thread names itself
    // once it runs, which may be a moment after build returns.
    let deadline = Instant::now() + Duration::from_secs(20);
    while threads_named("gokernel-schedt") != 1 {
        assert!(Instant::now() < deadline, "no monitor thread is running");
        std::thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now();
    drop(r);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "drop took {took:?}");
    assert_eq!(
        threads_named("gokernel-schedt"),
        0,
        "the monitor thread leaked"
    );
}

#[test]
fn dropping_a_runtime_right_after_build_stops_its_schedtrace_monitor() {
    if in_child() {
        return;
    }
    // The drop may come before the monitor thread has first taken its
    // lock: the stop it signals then must still be seen.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..100 {
            let r = Runtime::builder()
                .procs(1)
                .schedtrace(Duration::from_secs(3600))
                .build()
                .unwrap();
            drop(r);
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("100 runtimes with a monitor, dropped at once, took over 60 s: a drop waited for a monitor that missed its stop");
}

#[test]
fn a_schedtrace_period_beyond_the_clock_never_ticks_and_stops_with_its_runtime() {
    // Duration::MAX (or GOKERNEL_SCHEDTRACE=u64::MAX ms) cannot be added
    // to an Instant: the monitor thread used to panic at its start.
    if in_child() {
        for by_builder in [false, true] {
            let mut b = Runtime::builder().procs(1);
            if by_builder {
                b = b.schedtrace(Duration::MAX);
            }
            let r = b.build().unwrap();
            assert_eq!(r.block_on(|| 1), Ok(1));
            drop(r); // joins the monitor thread
        }
        return;
    }
    let stderr = child_stderr(
        "a_schedtrace_period_beyond_the_clock_never_ticks_and_stops_with_its_runtime",
        &[("GOKERNEL_SCHEDTRACE", &u64::MAX.to_string())],
    );
    assert!(
        !stderr.contains("panicked") && !has_sched_lines(&stderr),
        "no panic, no line; stderr:\n{stderr}"
    );
}
