//! sysmon: time slices (Go's TestPingPongHog), its cost when the runtime
//! is idle, and the stall detector's report.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{in_crash_child, process_cpu, run_child_ok_with_env, within};
use gokernel::{Chan, Runtime, chan, select};

/// Go's TestPingPongHog `run`: answer every token on `wake` after
/// `limit` units of work, until `done` is closed.
fn pingpong(limit: u64, counter: Arc<AtomicU64>, wake: Chan<bool>, done: Chan<()>) {
    loop {
        select! {
            recv(done) -> _v => return,
            recv(wake) -> _t => {
                let mut c = 0u64;
                for _ in 0..limit {
                    c = black_box(c + 1);
                }
                counter.fetch_add(c, Ordering::Relaxed);
                wake.send(true).unwrap();
            }
        }
    }
}

#[test]
fn ping_pong_hog_shares_stay_within_a_factor_of_20_on_one_p() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    let (hog, light) = within(30, "ping-pong hog", move || {
        rt.block_on(|| {
            let done = chan::<()>(0);
            let (hog_chan, light_chan) = (chan::<bool>(0), chan::<bool>(0));
            let (hog, light) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            // Two co-scheduled hogs (1e6 units a hand-off) and two light
            // goroutines (1e3): each pair is a runnext chain.
            for _ in 0..2 {
                let (h, c, d) = (hog.clone(), hog_chan.clone(), done.clone());
                gokernel::go(move || pingpong(1_000_000, h, c, d));
                let (l, c, d) = (light.clone(), light_chan.clone(), done.clone());
                gokernel::go(move || pingpong(1_000, l, c, d));
            }
            hog_chan.send(true).unwrap();
            light_chan.send(true).unwrap();
            // The measurement window: until the hogs have done 40
            // hand-offs, many 10 ms slices (Go waits 100 ms; counting
            // hand-offs keeps the sample large on a loaded machine).
            while hog.load(Ordering::Relaxed) < 40_000_000 {
                gokernel::sleep(Duration::from_millis(10));
            }
            done.close().unwrap();
            hog_chan.recv().unwrap();
            light_chan.recv().unwrap();
            (hog.load(Ordering::Relaxed), light.load(Ordering::Relaxed))
        })
        .unwrap()
    });
    println!("hog {hog}, light {light}: {:.2}", hog as f64 / light as f64);
    assert!(hog > 0 && light > 0, "hog {hog}, light {light}");
    // Work counted, not wall time: each pair's share of the one CPU.
    assert!(
        hog / light <= 20 && light / hog <= 20,
        "want hog/light in [0.05, 20]; got {hog}/{light} = {}",
        hog as f64 / light as f64
    );
}

#[test]
fn an_idle_runtime_with_sysmon_running_costs_no_cpu() {
    const NAME: &str = "an_idle_runtime_with_sysmon_running_costs_no_cpu";
    if !in_crash_child() {
        // Alone in a process of its own: it measures the process's CPU.
        run_child_ok_with_env(NAME, &[]);
        return;
    }
    let rt = Runtime::builder().procs(2).build().unwrap();
    // A goroutine parked for good, and one that ran: sysmon is started.
    let _parked = rt.spawn(gokernel::park);
    rt.block_on(|| gokernel::sleep(Duration::from_millis(5)))
        .unwrap();
    // Let the Ms and sysmon notice there is nothing to do.
    std::thread::sleep(Duration::from_millis(50));
    let before = process_cpu();
    std::thread::sleep(Duration::from_secs(1));
    let used = process_cpu() - before;
    assert!(
        std::env::var_os("GOKERNEL_VALGRIND").is_some() || used < Duration::from_millis(5),
        "an idle runtime with sysmon used {used:?} of CPU in 1 s"
    );
}

/// Spins for `d` without a scheduling point, mostly in this program's own
/// code (the clock is read rarely).
#[inline(never)]
fn spin_without_a_scheduling_point(d: Duration) -> u64 {
    let t = Instant::now();
    let mut x = 0u64;
    while t.elapsed() < d {
        for _ in 0..10_000 {
            x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    x
}

/// Blocks its thread in a system call the scheduler is not told about
/// (no `gokernel::blocking`): the commonest stall.
#[inline(never)]
fn sleep_without_blocking() {
    std::thread::sleep(Duration::from_millis(400));
    // Not a tail call: this frame stays on the stack in release builds.
    black_box(());
}

/// The child's part of the stall tests: a goroutine spins 400 ms, then
/// prints its id and the line it was started on.
fn stall_child() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    rt.block_on(|| {
        let task = || {
            if std::env::var_os("STALL_IN_SLEEP").is_some() {
                sleep_without_blocking();
            } else if std::env::var_os("STALL_ON_G0").is_some() {
                gokernel::systemstack(|| {
                    spin_without_a_scheduling_point(Duration::from_millis(400))
                });
            } else {
                spin_without_a_scheduling_point(Duration::from_millis(400));
            }
            gokernel::current().id()
        };
        let (h, line) = (gokernel::spawn(task), line!());
        let id = h.join().unwrap();
        println!("stalled goroutine {id} started on line {line}");
    })
    .unwrap();
}

/// `(goroutine id, line)` from the child's stdout.
fn stalled(stdout: &str) -> (u64, u32) {
    // The test harness prints its own "test … ..." first on that line.
    let l = stdout
        .lines()
        .find_map(|l| l.split_once("stalled goroutine ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no id line in:\n{stdout}"));
    let (id, line) = l.split_once(" started on line ").unwrap();
    (id.parse().unwrap(), line.trim().parse().unwrap())
}

#[test]
fn a_stalled_goroutine_is_reported_once_with_its_id_start_and_backtrace() {
    const NAME: &str = "a_stalled_goroutine_is_reported_once_with_its_id_start_and_backtrace";
    if in_crash_child() {
        stall_child();
        return;
    }
    let c = run_child_ok_with_env(NAME, &[("GOKERNEL_STALL", "100")]);
    let (id, line) = stalled(&c.stdout);
    let head = format!("gokernel: goroutine {id} has run for ");
    assert_eq!(c.stderr.matches(&head).count(), 1, "stderr:\n{}", c.stderr);
    for want in [
        " ms without a scheduling point, holding P 0 on thread gokernel-m".to_string(),
        format!("; started at tests/sysmon.rs:{line}:"),
        format!("goroutine {id} [running]:"),
        // Where it is: named from the executable's symbol table, down to
        // every goroutine's bottom frame.
        "   0: 0x".to_string(),
        "spin_without_a_scheduling_point+0x".to_string(),
        "gokernel::asm_amd64::goexit+0x".to_string(),
        "reported once; the goroutine goes on".to_string(),
    ] {
        assert!(
            c.stderr.contains(&want),
            "stderr lacks {want:?}:\n{}",
            c.stderr
        );
    }
    // The duration: at least the limit.
    let ms: u64 = c.stderr[c.stderr.find(&head).unwrap() + head.len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (100..400).contains(&ms),
        "reported after {ms} ms:\n{}",
        c.stderr
    );
}

#[test]
fn the_stall_detector_is_off_with_gokernel_stall_off_and_a_bad_value_is_named() {
    const NAME: &str = "the_stall_detector_is_off_with_gokernel_stall_off_and_a_bad_value_is_named";
    if in_crash_child() {
        stall_child();
        return;
    }
    let c = run_child_ok_with_env(NAME, &[("GOKERNEL_STALL", "off")]);
    stalled(&c.stdout);
    assert!(
        !c.stderr.contains("without a scheduling point"),
        "stderr:\n{}",
        c.stderr
    );
    // A bad value: named once, and the default limit (1 s) is used, which
    // a 400 ms stall does not reach.
    let c = run_child_ok_with_env(NAME, &[("GOKERNEL_STALL", "soon")]);
    assert!(
        c.stderr.contains("gokernel: ignoring GOKERNEL_STALL=\"soon\": expected a whole number of milliseconds, or off"),
        "stderr:\n{}",
        c.stderr
    );
    assert!(
        !c.stderr.contains("without a scheduling point"),
        "stderr:\n{}",
        c.stderr
    );
}

#[test]
fn a_goroutine_stalled_in_a_system_call_is_reported_with_its_callers() {
    const NAME: &str = "a_goroutine_stalled_in_a_system_call_is_reported_with_its_callers";
    if in_crash_child() {
        stall_child();
        return;
    }
    let c = run_child_ok_with_env(NAME, &[("GOKERNEL_STALL", "100"), ("STALL_IN_SLEEP", "1")]);
    let (id, _) = stalled(&c.stdout);
    // Interrupted inside the C library's sleep, unwound through it to the
    // goroutine's own frames; the sleep itself went on to its end.
    for want in [
        format!("gokernel: goroutine {id} has run for "),
        "std::thread::".to_string(),
        "sleep_without_blocking+0x".to_string(),
        "gokernel::asm_amd64::goexit+0x".to_string(),
    ] {
        assert!(
            c.stderr.contains(&want),
            "stderr lacks {want:?}:\n{}",
            c.stderr
        );
    }
    // Every Rust frame is demangled, std's (v0 mangling) included.
    for frame in c.stderr.lines().filter(|l| l.contains(": 0x")) {
        assert!(
            !frame.contains(" _R") && !frame.contains(" _ZN"),
            "a mangled name in {frame:?}:\n{}",
            c.stderr
        );
    }
}

#[test]
fn a_goroutine_stalled_on_the_system_stack_is_reported_as_itself() {
    const NAME: &str = "a_goroutine_stalled_on_the_system_stack_is_reported_as_itself";
    if in_crash_child() {
        stall_child();
        return;
    }
    // It spins inside `systemstack`: its thread is on g0, but the time
    // is the goroutine's, not the scheduler's.
    let c = run_child_ok_with_env(NAME, &[("GOKERNEL_STALL", "100"), ("STALL_ON_G0", "1")]);
    let (id, line) = stalled(&c.stdout);
    for want in [
        format!("gokernel: goroutine {id} has run for "),
        format!("; started at tests/sysmon.rs:{line}:"),
        "spin_without_a_scheduling_point+0x".to_string(),
    ] {
        assert!(
            c.stderr.contains(&want),
            "stderr lacks {want:?}:\n{}",
            c.stderr
        );
    }
    assert!(
        !c.stderr.contains("in the scheduler"),
        "blamed on the scheduler:\n{}",
        c.stderr
    );
}
