//! The lower layer (`runtime2`, `proc`, `asm_amd64`, `panic`, `tls`) cannot
//! be misused from safe code (issue 10, part 3).
//!
//! What a privacy or `unsafe` change closes is proved by `compile_fail`
//! doctests on the item concerned (`M`, `G`, `Gobuf`, `proc::schedule`,
//! `panic::throw_g`). The tests here cover what is checked at run time:
//! the safe functions of the lower layer either work or panic with a clear
//! message wherever safe code can call them, and the ownership an `M`
//! hands to safe code keeps its invariants.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::Duration;

use common::{in_crash_child, newg, next_mid, run_crash_child};
use gokernel::platform::hosted::HOSTED;
use gokernel::proc::{execute, mstart};
use gokernel::runtime2::{G, M, Sched, status};

const STACK: usize = 64 * 1024;

/// The panic message of `f`, which must panic.
fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let p = std::panic::catch_unwind(f).expect_err("expected a panic");
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn an_m_from_safe_code_owns_its_g0_and_frees_it_once() {
    // Before: `m.g0` was public, so `a.g0 = b.g0` (then two frees) or
    // `m.g0 = null` (then a free of null) compiled. Now it is read-only.
    let a = M::new(next_mid());
    let b = M::new(next_mid());
    assert!(!a.g0().is_null());
    assert_ne!(a.g0(), b.g0());
    assert!(a.curg().is_null() && a.gsignal().is_null() && a.p().is_null());
    // SAFETY: g0 is a live G owned by `a`; only read.
    let g0 = unsafe { &*a.g0() };
    assert_eq!(g0.goid(), 0);
    assert_eq!(g0.stack().lo(), 0);
    assert_eq!(g0.readgstatus(), status::IDLE);
    drop(a);
    drop(b);
}

#[test]
fn the_getters_see_what_the_switch_code_wrote() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let s = seen.clone();
    let mut g = newg(STACK, move || {
        let me = gokernel::getg();
        // SAFETY: on this G, which runs on a live M.
        let (m, st) = unsafe { ((*me).m(), (*me).stack()) };
        // SAFETY: m runs this G, so it is live.
        let (curg, g0) = unsafe { ((*m).curg(), (*m).g0()) };
        let local = 0u8;
        let sp = &raw const local as usize;
        *s.lock().unwrap() = Some((curg == me, g0 != me, st.lo() < sp && sp < st.hi()));
    });
    let goid = g.goid();
    assert_ne!(goid, 0, "newg gives the G an id with set_goid");
    assert_eq!(g.sched().g(), &raw mut *g, "malg points sched.g at the G");
    assert!(g.sched().sp() >= g.stack().lo() && g.sched().sp() < g.stack().hi());
    let gp: *mut G = &mut *g;
    let mut m = M::new(next_mid());
    // SAFETY: this thread runs no M; gp is runnable and only this M runs it.
    unsafe { mstart(&mut *m, || execute(gp, false)) };
    assert_eq!(g.readgstatus(), status::DEAD);
    assert_eq!(*seen.lock().unwrap(), Some((true, true, true)));
}

#[test]
fn safe_lower_layer_calls_on_a_plain_thread_panic_clearly() {
    let m = panic_message(gokernel::proc::gosched);
    assert!(
        m.contains("gokernel::gosched called outside a goroutine"),
        "{m:?}"
    );
    let m = panic_message(gokernel::proc::lock_os_thread);
    assert!(
        m.contains("gokernel::lock_os_thread called outside a goroutine"),
        "{m:?}"
    );
    let m = panic_message(gokernel::proc::unlock_os_thread);
    assert!(
        m.contains("gokernel::unlock_os_thread called outside a goroutine"),
        "{m:?}"
    );
    let m = panic_message(|| gokernel::systemstack(|| ()));
    assert!(
        m.contains("systemstack called on a thread that is not a gokernel M"),
        "{m:?}"
    );
    assert!(gokernel::getg().is_null());
}

/// A scheduler of one P on which one goroutine parks for good (every P
/// idle, a goroutine alive: its deadlock hooks run), with a hook that
/// calls `first` once, with the scheduler, the hook's own key and a
/// sender; returns the scheduler and what was sent within 10 s.
fn first_deadlock_hook_call(
    first: impl Fn(&Sched, u64, Sender<&'static str>) + Send + Sync + 'static,
) -> (Arc<Sched>, Result<&'static str, RecvTimeoutError>) {
    let s = Sched::new(1, STACK, &HOSTED);
    let weak = Arc::downgrade(&s);
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let once = AtomicBool::new(false);
    let key = Arc::new(AtomicU64::new(u64::MAX));
    let k2 = key.clone();
    let k = s.add_deadlock_hook(Box::new(move || {
        if once.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(s) = weak.upgrade() {
            first(&s, k2.load(Ordering::SeqCst), tx.lock().unwrap().clone());
        }
    }));
    key.store(k, Ordering::SeqCst);
    s.go(Box::new(gokernel::park)).unwrap();
    let got = rx.recv_timeout(Duration::from_secs(10));
    (s, got)
}

/// Runs `Sched::go` from a deadlock hook: on g0 of an M that has just
/// given up its P. Before the fix `newproc` read that M's (null) P and
/// crashed; now the G goes on the global queue and runs.
#[test]
fn go_from_a_deadlock_hook_runs_the_goroutine() {
    if in_crash_child() {
        let (s, got) = first_deadlock_hook_call(|s, _, tx| {
            s.go(Box::new(move || tx.send("ran").unwrap())).unwrap();
        });
        eprintln!("hook goroutine: {got:?}");
        s.shutdown();
        std::process::exit(if got == Ok("ran") { 0 } else { 1 });
    }
    let c = run_crash_child("go_from_a_deadlock_hook_runs_the_goroutine");
    assert_eq!((c.code, c.signal), (Some(0), None), "stderr:\n{}", c.stderr);
    assert!(
        c.stderr.contains("hook goroutine: Ok(\"ran\")"),
        "{}",
        c.stderr
    );
}

/// A deadlock hook that adds a hook and removes hooks (its own among
/// them) runs to its end: hooks are called without the list's lock.
/// Before, they ran under it, and the hook's own `add_deadlock_hook`
/// spun on that lock for good: a silent hang of the M.
#[test]
fn a_deadlock_hook_that_adds_and_removes_hooks_runs_to_its_end() {
    if in_crash_child() {
        let (s, got) = first_deadlock_hook_call(|s, own, tx| {
            let other = s.add_deadlock_hook(Box::new(|| {}));
            s.remove_deadlock_hook(other);
            s.remove_deadlock_hook(own);
            tx.send("done").unwrap();
        });
        eprintln!("hook: {got:?}");
        if got != Ok("done") {
            // The hook's M may be stuck: no shutdown, which would wait for it.
            std::process::exit(1);
        }
        s.shutdown();
        std::process::exit(0);
    }
    let c = run_crash_child("a_deadlock_hook_that_adds_and_removes_hooks_runs_to_its_end");
    assert_eq!((c.code, c.signal), (Some(0), None), "stderr:\n{}", c.stderr);
    assert!(c.stderr.contains("hook: Ok(\"done\")"), "{}", c.stderr);
}

/// `Sched::shutdown` called by one of the scheduler's own goroutines
/// would wait for its own M to exit: a fatal error naming the goroutine,
/// where it hung silently before.
#[test]
fn sched_shutdown_from_its_own_goroutine_is_fatal_and_names_it() {
    if in_crash_child() {
        // A bound on the failure (the hang this test is about), not a
        // wait for the event: the fatal error ends the process first.
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(30));
            eprintln!("still running after 30 s: shutdown hung");
            std::process::exit(3);
        });
        let s = Sched::new(1, STACK, &HOSTED);
        let s2 = s.clone();
        s.go(Box::new(move || s2.shutdown())).unwrap();
        loop {
            std::thread::park();
        }
    }
    let c = run_crash_child("sched_shutdown_from_its_own_goroutine_is_fatal_and_names_it");
    common::assert_aborted_with(
        &c,
        &[
            "fatal error: Sched::shutdown called on one of the scheduler's own threads",
            "goroutine",
        ],
    );
}
