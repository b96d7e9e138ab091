//! The execution trace: a program's scheduler events, written as Chrome
//! trace-event JSON and parsed back, in order (with the `trace` feature:
//! `cargo test --features trace --test trace`; the gate runs it).
#![cfg(feature = "trace")]

mod common;

use common::{in_crash_child, run_child_ok_with_env};
use gokernel::{Runtime, chan};

/// The raw events of a trace (its instant events), in order:
/// (name, g, arg).
fn events(json: &str) -> Vec<(String, u64, u64)> {
    json.lines()
        .filter(|l| l.contains("\"ph\":\"i\""))
        .map(|l| {
            let field = |k: &str| {
                let pat = format!("\"{k}\":");
                let at = l.find(&pat).unwrap() + pat.len();
                let rest = &l[at..];
                let end = rest.find([',', '}']).unwrap();
                rest[..end].trim_matches('"').to_string()
            };
            (
                field("name"),
                field("g").parse().unwrap(),
                field("arg").parse().unwrap(),
            )
        })
        .collect()
}

/// Where `(name, g)` first occurs at or after `from`.
fn find(ev: &[(String, u64, u64)], from: usize, name: &str, g: u64) -> Option<usize> {
    ev[from..]
        .iter()
        .position(|(n, eg, _)| n == name && *eg == g)
        .map(|i| i + from)
}

/// A goroutine that blocks on a channel and is woken by main: its events,
/// in order, and main's id.
fn traced_program(rt: &Runtime) -> (u64, u64) {
    rt.block_on(|| {
        let main = gokernel::current().id();
        let c = chan::<u32>(0);
        let rx = c.clone();
        let h = gokernel::spawn(move || {
            gokernel::syscall::call(|| ());
            rx.recv().unwrap()
        });
        let id = h.id();
        while gokernel::stats().goroutines.waiting == 0 {
            gokernel::gosched();
        }
        gokernel::sleep(std::time::Duration::from_millis(1));
        c.send(5).unwrap();
        assert_eq!(h.join().unwrap(), 5);
        (main, id)
    })
    .unwrap()
}

fn check(json: &str, main: u64, g: u64) {
    assert!(json.starts_with("{\"displayTimeUnit\":\"ns\",\"traceEvents\":["));
    assert!(json.trim_end().ends_with("]}"));
    let ev = events(json);
    let create = find(&ev, 0, "GoCreate", g).unwrap_or_else(|| panic!("no GoCreate {g}:\n{json}"));
    assert_eq!(ev[create].2, main, "created by main");
    let start = find(&ev, create, "GoStart", g).expect("GoStart after GoCreate");
    let enter = find(&ev, start, "SyscallEnter", g).expect("SyscallEnter after GoStart");
    let exit = find(&ev, enter, "SyscallExit", g).expect("SyscallExit after SyscallEnter");
    let block = find(&ev, exit, "GoBlock", g).expect("GoBlock after SyscallExit");
    assert_eq!(
        ev[block].2,
        gokernel::WaitReason::ChanReceive as u64,
        "blocked in chan receive"
    );
    let unblock = find(&ev, block, "GoUnblock", g).expect("GoUnblock after GoBlock");
    assert_eq!(ev[unblock].2, main, "woken by main's send");
    // Main's sleep: blocked, its timer fired, woken (by the timer), run.
    let sleep = find(&ev, 0, "GoBlock", main).expect("main's sleep");
    let fire = find(&ev, sleep, "TimerFire", main).expect("TimerFire after main's sleep");
    let woken = find(&ev, fire, "GoUnblock", main).expect("GoUnblock after TimerFire");
    find(&ev, woken, "GoStart", main).expect("main runs again");
    assert!(unblock > woken, "main sent after its sleep");
    let again = find(&ev, unblock, "GoStart", g).expect("GoStart after GoUnblock");
    find(&ev, again, "GoEnd", g).expect("GoEnd last");
    assert!(ev.iter().any(|(n, _, _)| n == "ProcStart"));
    // The drawn parts: the goroutine's runs and the wake-up arrow.
    assert!(json.contains(&format!(
        "\"name\":\"G{g}\",\"cat\":\"goroutine\",\"ph\":\"X\""
    )));
    assert!(json.contains("\"until\":\"chan receive\""));
    assert!(json.contains("\"ph\":\"s\"") && json.contains("\"ph\":\"f\""));
}

#[test]
fn a_traced_program_writes_its_events_in_order_to_the_file_on_drop() {
    let path =
        std::env::temp_dir().join(format!("gokernel-trace-test-{}.json", std::process::id()));
    let rt = Runtime::builder().procs(2).trace(&path).build().unwrap();
    let (main, g) = traced_program(&rt);
    // Readable before the drop, too.
    check(&rt.trace_json().unwrap(), main, g);
    drop(rt);
    let json = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    check(&json, main, g);
}

#[test]
fn gokernel_trace_in_the_environment_traces_each_runtime_into_its_own_file() {
    let path = std::env::temp_dir().join(format!("gokernel-trace-env-{}.json", std::process::id()));
    if in_crash_child() {
        let (a, b) = (
            Runtime::builder().procs(1).build().unwrap(),
            Runtime::builder().procs(1).build().unwrap(),
        );
        let (main, g) = traced_program(&a);
        let (main2, g2) = traced_program(&b);
        drop((a, b));
        let p = std::path::PathBuf::from(std::env::var_os("GOKERNEL_TRACE").unwrap());
        let mut p2 = p.clone().into_os_string();
        p2.push(".2");
        check(&std::fs::read_to_string(&p).unwrap(), main, g);
        check(&std::fs::read_to_string(&p2).unwrap(), main2, g2);
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(p2).unwrap();
        return;
    }
    run_child_ok_with_env(
        "gokernel_trace_in_the_environment_traces_each_runtime_into_its_own_file",
        &[("GOKERNEL_TRACE", path.to_str().unwrap())],
    );
}

#[test]
fn a_long_trace_keeps_every_event_in_order_across_buffer_chunks() {
    use gokernel::platform::hosted::HOSTED;
    use gokernel::runtime2::Sched;
    use gokernel::trace::EventKind;

    // 2 × 140,000 yields: more records than one 262,144-word chunk holds
    // (a yield and the next start are one word). The scheduler's own
    // API: no JSON to format and parse.
    const N: usize = 140_000;
    let sched = Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED);
    sched.start_trace();
    let done = std::sync::Arc::new(std::sync::Barrier::new(3));
    for _ in 0..2 {
        let done = done.clone();
        sched
            .go(Box::new(move || {
                for _ in 0..N {
                    gokernel::gosched();
                }
                // Off the scheduler: tells the test thread this one is done
                // (the barrier blocks this thread only after the last yield).
                std::thread::spawn(move || {
                    done.wait();
                });
            }))
            .unwrap();
    }
    done.wait();
    while sched.ngoroutines() != 0 {
        std::thread::yield_now();
    }
    // The last goroutine's end is stashed in its P until the P next does
    // something (here: looks for work): read the trace once every M has
    // left, as a dropped Runtime writes its file.
    sched.shutdown();
    let ev = sched.trace_events();
    assert_eq!(sched.trace_dropped(), 0);
    let ids: std::collections::BTreeSet<u64> = ev
        .iter()
        .filter(|e| e.kind == EventKind::GoCreate)
        .map(|e| e.g)
        .collect();
    assert_eq!(ids.len(), 2, "two goroutines created");
    for &g in &ids {
        // Each goroutine: start, then N × (stop, start), then end, in order.
        let mine: Vec<EventKind> = ev
            .iter()
            .filter(|e| {
                e.g == g
                    && matches!(
                        e.kind,
                        EventKind::GoStart | EventKind::GoStop | EventKind::GoEnd
                    )
            })
            .map(|e| e.kind)
            .collect();
        let mut want = vec![EventKind::GoStart];
        for _ in 0..N {
            want.extend([EventKind::GoStop, EventKind::GoStart]);
        }
        want.push(EventKind::GoEnd);
        assert!(
            mine == want,
            "goroutine {g}: {} events, not in order",
            mine.len()
        );
    }
    assert!(
        ev.windows(2).all(|w| w[0].ticks <= w[1].ticks),
        "times go back"
    );
    assert!(ev.iter().any(|e| e.exact) && ev.iter().any(|e| !e.exact));
}

#[test]
fn a_call_that_kept_its_p_shows_as_an_instant_and_one_that_lost_it_keeps_its_exit() {
    use gokernel::platform::hosted::HOSTED;
    use gokernel::runtime2::Sched;
    use gokernel::trace::EventKind;

    let sched = Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED);
    sched.start_trace();
    let (tx, rx) = std::sync::mpsc::channel();
    sched
        .go(Box::new(move || {
            // Returns at once, with its P: only its entry is recorded.
            gokernel::syscall::call(|| ());
            // Hands its P off at once (entersyscallblock): both recorded.
            gokernel::syscall::blocking(|| std::thread::sleep(std::time::Duration::from_millis(5)));
            tx.send(gokernel::current().id()).unwrap();
        }))
        .unwrap();
    let g = rx.recv().unwrap();
    while sched.ngoroutines() != 0 {
        std::thread::yield_now();
    }
    let ev = sched.trace_events();
    let calls: Vec<_> = ev
        .iter()
        .filter(|e| e.g == g && matches!(e.kind, EventKind::SyscallEnter | EventKind::SyscallExit))
        .collect();
    let kinds: Vec<_> = calls.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::SyscallEnter,
            EventKind::SyscallExit,
            EventKind::SyscallEnter,
            EventKind::SyscallExit
        ],
        "{ev:#?}"
    );
    // The kept call: its exit is the reader's, at its entry's time.
    assert_eq!(calls[1].ticks, calls[0].ticks);
    assert!(!calls[1].exact);
    // The call that lost its P: an exit of its own, after the sleep's
    // clock readings.
    assert!(calls[3].ticks > calls[2].ticks, "{ev:#?}");
    sched.shutdown();
}

#[test]
fn an_untraced_runtime_has_no_trace() {
    if std::env::var_os("GOKERNEL_TRACE").is_some() {
        return;
    }
    let rt = Runtime::builder().procs(1).build().unwrap();
    rt.block_on(|| ()).unwrap();
    assert!(rt.trace_json().is_none());
}

#[test]
fn a_goroutine_unwound_by_the_runtimes_drop_shows_its_restart_and_end() {
    // A stop on an M without a P (teardown unwinds parked goroutines on
    // Ms that have let their Ps go) is stashed in the M and written when
    // the M next starts a goroutine or ends.
    let path =
        std::env::temp_dir().join(format!("gokernel-trace-unwind-{}.json", std::process::id()));
    let rt = Runtime::builder().procs(1).trace(&path).build().unwrap();
    let g = rt
        .block_on(|| {
            let c = chan::<u32>(0);
            let h = gokernel::spawn(move || {
                let _ = c.recv();
            });
            while gokernel::stats().goroutines.waiting == 0 {
                gokernel::gosched();
            }
            let id = h.id();
            // Never joined: the goroutine is parked when the runtime drops.
            std::mem::forget(h);
            id
        })
        .unwrap();
    drop(rt);
    let json = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let ev = events(&json);
    let block = find(&ev, 0, "GoBlock", g).unwrap_or_else(|| panic!("no GoBlock {g}:\n{json}"));
    let restart = find(&ev, block, "GoStart", g).expect("GoStart of the unwinding after GoBlock");
    find(&ev, restart, "GoEnd", g).expect("GoEnd after the unwinding's GoStart");
}
