//! Goroutine dumps: wait reasons, how long, creation sites, tracebacks of
//! parked goroutines; in deadlock reports, from `gokernel::dump()` on any
//! thread, and on SIGQUIT (which prints and lets the program go on).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::{in_crash_child, run_child_ok_with_env};
use gokernel::sync::{Mutex, Once, WaitGroup};
use gokernel::{Deadlock, Runtime, WaitReason, chan, select};

/// `created by tests/dump.rs:LINE:` for a spawn on `line`.
fn site(line: u32) -> String {
    format!("created by tests/dump.rs:{line}:")
}

/// Runs `f` on a thread; fails the test if it takes over 60 s.
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(60))
        .expect("timed out (a missed deadlock, or a dump that never came)")
}

/// Parks the current goroutine for good in every way the runtime knows
/// and returns the spawn lines, by reason; main then waits on a
/// WaitGroup nobody will finish.
fn park_everything() -> Vec<(WaitReason, u32)> {
    let mut sites = Vec::new();
    let (tx, rx) = (chan::<u8>(0), chan::<u8>(0));
    let (tx2, rx2) = (chan::<u8>(0), chan::<u8>(0));
    let m = Arc::new(Mutex::new(()));
    let held = m.lock();
    let once = Arc::new(Once::new());
    let wg = Arc::new(WaitGroup::new());
    wg.add(1);
    let oc = chan::<()>(1);
    let ready = oc.clone();
    let o = once.clone();
    let once_runner = line!() + 1;
    gokernel::go(move || {
        o.call_once(|| {
            oc.send(()).unwrap();
            gokernel::park();
        })
    });
    ready.recv().unwrap();
    sites.push((WaitReason::Park, once_runner));
    sites.push((WaitReason::ChanReceive, line!() + 1));
    gokernel::go(move || {
        let _ = rx.recv();
    });
    sites.push((WaitReason::ChanSend, line!() + 1));
    gokernel::go(move || {
        let _ = tx2.send(1);
    });
    let m2 = m.clone();
    gokernel::go(move || drop(m2.lock()));
    sites.push((WaitReason::SyncMutexLock, line!() - 1));
    gokernel::go(move || once.call_once(|| ()));
    sites.push((WaitReason::SyncOnce, line!() - 1));
    gokernel::go(move || select! { recv(rx2) -> _v => {}, send(tx, 1) -> _r => {} });
    sites.push((WaitReason::Select, line!() - 1));
    gokernel::go(|| select! {});
    sites.push((WaitReason::SelectNoCases, line!() - 1));
    let h = gokernel::spawn(gokernel::park);
    sites.push((WaitReason::Park, line!() - 1));
    gokernel::go(move || drop(h.join()));
    sites.push((WaitReason::Join, line!() - 1));
    // Everything above parks before main's wait counts as the last.
    while gokernel::stats().goroutines.waiting < sites.len() {
        gokernel::gosched();
    }
    let w = wg.clone();
    SITES.lock().unwrap().clone_from(&sites);
    w.wait();
    drop(held);
    sites
}

static SITES: std::sync::Mutex<Vec<(WaitReason, u32)>> = std::sync::Mutex::new(Vec::new());

/// The spawn line of `park_everything`'s caller's `block_on`.
fn check_report(d: &Deadlock, main_line: u32) {
    let text = d.to_string();
    assert!(
        text.starts_with("all goroutines are asleep - deadlock!\n\ngoroutine "),
        "{text}"
    );
    let sites = SITES.lock().unwrap().clone();
    assert_eq!(d.goroutines().len(), sites.len() + 1, "{text}");
    // Main: the first, created where block_on was called.
    let main = &d.goroutines()[0];
    assert_eq!(
        main.wait_reason,
        Some(WaitReason::SyncWaitGroupWait),
        "{text}"
    );
    assert!(
        text.contains(&format!("goroutine {} [sync.WaitGroup.Wait, ", main.id)),
        "{text}"
    );
    assert!(main.to_string().contains(&site(main_line)), "{text}");
    // Every other goroutine: its reason and its own spawn line.
    for (reason, line) in sites {
        let g = d
            .goroutines()
            .iter()
            .find(|g| g.to_string().contains(&site(line)))
            .unwrap_or_else(|| panic!("no goroutine created at line {line}:\n{text}"));
        assert_eq!(g.wait_reason, Some(reason), "line {line}:\n{text}");
        let header = format!("goroutine {} [{reason}, ", g.id);
        assert!(text.contains(&header), "no {header:?}:\n{text}");
        assert!(g.waiting_for.is_some(), "{text}");
    }
}

#[test]
fn a_deadlock_report_names_every_goroutine_with_its_wait_reason_and_creation_site() {
    for procs in [1, 2] {
        let (r, line) = within_a_minute(move || {
            let rt = Runtime::builder().procs(procs).build().unwrap();
            (rt.block_on(park_everything), line!())
        });
        check_report(&r.unwrap_err(), line);
    }
}

#[inline(never)]
fn a_named_function_that_parks(rx: gokernel::Chan<u8>) {
    let _ = std::hint::black_box(rx.recv());
}

fn assert_traceback_names_the_parked_function(d: &Deadlock) {
    let text = d.to_string();
    let g = d
        .goroutines()
        .iter()
        .find(|g| g.wait_reason == Some(WaitReason::ChanReceive))
        .unwrap_or_else(|| panic!("no goroutine in chan receive:\n{text}"));
    let frames = g
        .traceback
        .as_ref()
        .unwrap_or_else(|| panic!("no traceback:\n{text}"));
    // Optimised builds name inlined frames without their module path.
    let is_gopark = |f: &str| {
        let name = f.split('\n').next().unwrap();
        name == "gopark" || name.ends_with("::gopark")
    };
    assert!(is_gopark(&frames[0]), "{text}");
    assert!(
        frames
            .iter()
            .any(|f| f.contains("a_named_function_that_parks")),
        "{text}"
    );
    // Go's shape: the header, then function lines, each followed by a
    // tab-indented location.
    let header = format!("goroutine {} [chan receive, ", g.id);
    let at = text.find(&header).unwrap();
    let mut lines = text[at..].lines().skip(1);
    assert!(is_gopark(lines.next().unwrap()), "{text}");
    assert!(lines.next().unwrap().starts_with('\t'), "{text}");
}

fn deadlock_in_a_named_function(rt: &Runtime) -> Deadlock {
    rt.block_on(|| {
        a_named_function_that_parks(chan::<u8>(0));
    })
    .unwrap_err()
}

#[test]
fn with_tracebacks_on_a_deadlock_report_shows_the_parked_goroutines_stack() {
    let rt = Runtime::builder().procs(1).traceback(true).build().unwrap();
    let d = within_a_minute(move || deadlock_in_a_named_function(&rt));
    assert_traceback_names_the_parked_function(&d);
}

#[test]
fn gokernel_traceback_all_in_the_environment_turns_tracebacks_on() {
    if in_crash_child() {
        let rt = Runtime::builder().procs(1).build().unwrap();
        let d = deadlock_in_a_named_function(&rt);
        assert_traceback_names_the_parked_function(&d);
        return;
    }
    run_child_ok_with_env(
        "gokernel_traceback_all_in_the_environment_turns_tracebacks_on",
        &[("GOKERNEL_TRACEBACK", "all")],
    );
}

#[test]
fn without_tracebacks_a_report_has_headers_and_creation_sites_only() {
    if in_crash_child() {
        let rt = Runtime::builder().procs(1).build().unwrap();
        let d = deadlock_in_a_named_function(&rt);
        assert!(d.goroutines()[0].traceback.is_none(), "{d}");
        assert!(!d.to_string().contains("gopark"), "{d}");
        return;
    }
    run_child_ok_with_env(
        "without_tracebacks_a_report_has_headers_and_creation_sites_only",
        &[("GOKERNEL_TRACEBACK", "")],
    );
}

#[test]
fn dump_from_a_plain_thread_shows_a_running_program_without_stopping_it() {
    let rt = Runtime::builder().procs(2).build().unwrap();
    let tx = chan::<u8>(0);
    let rx = tx.clone();
    let h = rt.spawn(move || rx.recv().unwrap());
    let line = line!() - 1;
    let d = loop {
        let d = gokernel::dump();
        if let Some(g) = d.goroutine(h.id())
            && g.wait_reason == Some(WaitReason::ChanReceive)
        {
            break d;
        }
        std::thread::yield_now();
    };
    let text = d.to_string();
    assert!(
        text.contains(&format!("goroutine {} [chan receive, ", h.id())),
        "{text}"
    );
    assert!(text.contains(&site(line)), "{text}");
    let again = rt.dump();
    let (a, b) = (
        again.goroutine(h.id()).unwrap(),
        d.goroutine(h.id()).unwrap(),
    );
    assert_eq!((a.wait_reason, a.created_by), (b.wait_reason, b.created_by));
    // The wait is still measured, and the goroutine still wakes.
    let first = d.goroutine(h.id()).unwrap().waiting_for.unwrap();
    while rt.dump().goroutine(h.id()).unwrap().waiting_for.unwrap() <= first {
        std::thread::yield_now();
    }
    tx.send(9).unwrap();
    let id = h.id();
    assert_eq!(h.join().unwrap(), 9);
    // join returns once the result is handed over; the goroutine's exit
    // (goexit0 on its M) may still be under way. Once it is done, dumps
    // no longer list it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rt.dump().goroutine(id).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "a dump still lists goroutine {id} 30 s after it returned"
        );
        std::thread::yield_now();
    }
}

#[test]
fn stats_count_parked_goroutines_by_wait_reason() {
    let rt = Runtime::builder().procs(2).build().unwrap();
    rt.block_on(|| {
        let tx = chan::<u8>(0);
        let rx = tx.clone();
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let rx = rx.clone();
                gokernel::spawn(move || rx.recv().unwrap())
            })
            .collect();
        let sleeper = gokernel::spawn(|| gokernel::sleep(Duration::from_secs(3600)));
        let s = loop {
            let s = gokernel::stats();
            if s.goroutines.waiting == 4 {
                break s;
            }
            gokernel::gosched();
        };
        assert_eq!(s.waiting_by_reason.get(WaitReason::ChanReceive), 3);
        assert_eq!(s.waiting_by_reason.get(WaitReason::Sleep), 1);
        assert_eq!(
            s.waiting_by_reason.iter().collect::<Vec<_>>(),
            [(WaitReason::ChanReceive, 3), (WaitReason::Sleep, 1)]
        );
        for _ in 0..3 {
            tx.send(1).unwrap();
        }
        for h in hs {
            h.join().unwrap();
        }
        drop(sleeper);
    })
    .unwrap();
}

/// Set in the SIGQUIT child.
const SIGQUIT_CHILD: &str = "GOKERNEL_SIGQUIT_CHILD";

#[test]
fn sigquit_prints_every_goroutine_and_the_program_goes_on() {
    if std::env::var_os(SIGQUIT_CHILD).is_some() {
        let rt = Runtime::builder().procs(2).build().unwrap();
        let tx = chan::<u8>(0);
        let rx = tx.clone();
        let h = rt.spawn(move || rx.recv().unwrap());
        while rt.stats().waiting_by_reason.get(WaitReason::ChanReceive) == 0 {
            std::thread::yield_now();
        }
        println!("ready {}", h.id());
        std::io::stdout().flush().unwrap();
        // The parent sends SIGQUIT, reads the dump, then writes a line.
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        tx.send(5).unwrap();
        assert_eq!(h.join().unwrap(), 5);
        println!("went on");
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "sigquit_prints_every_goroutine_and_the_program_goes_on",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SIGQUIT_CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let id = loop {
        let mut l = String::new();
        assert_ne!(out.read_line(&mut l).unwrap(), 0, "the child ended early");
        // The harness may have printed "test NAME ... " on the same line.
        if let Some((_, id)) = l.trim().split_once("ready ") {
            break id.to_string();
        }
    };
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) }, 0);
    let want = format!("goroutine {id} [chan receive, ");
    let seen = common::wait_for_stderr(child.stderr.take().unwrap(), &want, "dump on SIGQUIT");
    assert!(seen.contains("SIGQUIT: goroutine dump"), "{seen}");
    assert!(seen.contains("created by tests/dump.rs:"), "{seen}");
    child.stdin.as_mut().unwrap().write_all(b"go on\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the child failed after SIGQUIT: {status}\n{rest}"
    );
    assert!(rest.contains("went on"), "{rest}");
}
