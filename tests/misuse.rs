//! Misuse of the switch core ends in a named fatal error on stderr and an
//! abort. Each scenario runs in a child process (the test re-runs itself
//! with `GOKERNEL_CRASH_CHILD` set) and the parent checks the message and
//! the signal.

mod common;

use common::{
    assert_aborted_with, in_crash_child, newg, next_mid, on_g0, run_crash_child, run_in_g,
};
use gokernel::asm_amd64::{gogo, mcall};
use gokernel::getg;
use gokernel::proc::{execute, mstart};
use gokernel::runtime2::{G, G_M, M};
use gokernel::systemstack;

const STACK: usize = 64 * 1024;

unsafe extern "C" fn never_called(_gp: *mut G) {
    unreachable!("an mcall function ran where mcall should have failed");
}

unsafe extern "C" fn returns_at_once(_gp: *mut G) {}

#[test]
fn mcall_on_g0_is_fatal() {
    if in_crash_child() {
        // SAFETY: deliberately wrong: on g0, mcall must fail before calling.
        on_g0(|| unsafe { mcall(never_called) });
        unreachable!("mcall on g0 returned");
    }
    let c = run_crash_child("mcall_on_g0_is_fatal");
    assert_aborted_with(&c, &["fatal error: mcall called on g0", "(g0 of m "]);
}

#[test]
fn mcall_function_that_returns_is_fatal() {
    if in_crash_child() {
        // SAFETY: deliberately wrong: the mcall function returns.
        run_in_g(STACK, || unsafe { mcall(returns_at_once) });
        unreachable!("a returning mcall function was not caught");
    }
    let c = run_crash_child("mcall_function_that_returns_is_fatal");
    assert_aborted_with(
        &c,
        &[
            "fatal error: mcall function returned: it must end in gogo or schedule",
            "(goroutine ",
        ],
    );
}

static mut SECOND: *mut G = std::ptr::null_mut();

/// On g0: resumes the G in SECOND without making it m.curg.
unsafe extern "C" fn switch_behind_curgs_back(_gp: *mut G) {
    // SAFETY: SECOND is a fresh G of this M, set before the mcall.
    unsafe {
        let second = SECOND;
        // G.m is private to the runtime; write it the way an embedder's
        // assembly would, through its published offset.
        second.byte_add(G_M).cast::<*mut M>().write((*getg()).m());
        gogo((*second).sched())
    }
}

#[test]
fn systemstack_from_a_g_that_is_not_m_curg_is_fatal() {
    if in_crash_child() {
        let mut second = newg(STACK, || {
            systemstack(|| ());
        });
        // SAFETY: single-threaded child; set before the first G runs.
        unsafe { SECOND = &mut *second };
        let mut first = newg(STACK, || {
            // SAFETY: on a user G; the function switches to SECOND.
            unsafe { mcall(switch_behind_curgs_back) };
        });
        let fp: *mut G = &mut *first;
        let mut m = M::new(next_mid());
        // SAFETY: this thread runs no M.
        unsafe { mstart(&mut *m, || execute(fp, false)) };
        unreachable!("systemstack from a G that is not m.curg was not caught");
    }
    let c = run_crash_child("systemstack_from_a_g_that_is_not_m_curg_is_fatal");
    assert_aborted_with(
        &c,
        &[
            "fatal error: systemstack called from a goroutine that is not its M's current goroutine",
            "(goroutine ",
        ],
    );
}

#[test]
fn mcall_on_a_thread_that_is_not_an_m_is_fatal() {
    if in_crash_child() {
        // SAFETY: deliberately wrong: no M on this thread.
        unsafe { mcall(never_called) };
        unreachable!("mcall without an M returned");
    }
    let c = run_crash_child("mcall_on_a_thread_that_is_not_an_m_is_fatal");
    assert_aborted_with(
        &c,
        &["fatal error: mcall or systemstack called on a thread that is not a gokernel M"],
    );
}

#[test]
fn a_panic_in_a_g_is_fatal_and_names_the_goroutine() {
    if in_crash_child() {
        let mut g = newg(STACK, || panic!("boom in a goroutine"));
        let gp: *mut G = &mut *g;
        let mut m = M::new(next_mid());
        // SAFETY: this thread runs no M.
        unsafe { mstart(&mut *m, || execute(gp, false)) };
        unreachable!("the panicking G was not caught");
    }
    let c = run_crash_child("a_panic_in_a_g_is_fatal_and_names_the_goroutine");
    assert_aborted_with(
        &c,
        &[
            "boom in a goroutine",
            "fatal error: a goroutine panicked",
            "(goroutine ",
        ],
    );
}

#[test]
#[should_panic(expected = "gokernel::systemstack called on a thread that is not a gokernel M")]
fn systemstack_outside_an_m_panics_with_a_clear_message() {
    systemstack(|| ());
}

#[test]
fn mstart_on_a_thread_that_already_runs_an_m_is_fatal() {
    if in_crash_child() {
        on_g0(|| on_g0(|| ()));
        unreachable!("a nested mstart was not caught");
    }
    let c = run_crash_child("mstart_on_a_thread_that_already_runs_an_m_is_fatal");
    assert_aborted_with(
        &c,
        &[
            "fatal error: mstart on a thread that is already running an M",
            "(g0 of m ",
        ],
    );
}

#[test]
fn gogo_on_a_gobuf_with_no_g_is_fatal() {
    if in_crash_child() {
        let empty = gokernel::runtime2::Gobuf::new();
        // SAFETY: deliberately wrong: gogo must refuse a Gobuf with no G.
        on_g0(|| unsafe { gogo(&empty) });
        unreachable!("gogo on an empty Gobuf returned");
    }
    let c = run_crash_child("gogo_on_a_gobuf_with_no_g_is_fatal");
    assert_aborted_with(&c, &["fatal error: gogo on a Gobuf whose g is null"]);
}

/// Where the last panic on this thread was raised (set by the hook that
/// [`misuse_panics_point_at_the_callers_line_not_into_gokernel`] installs).
fn panic_site(f: impl FnOnce()) -> (String, u32, String) {
    thread_local! {
        static SITE: std::cell::RefCell<Option<(String, u32)>> =
            const { std::cell::RefCell::new(None) };
    }
    std::panic::set_hook(Box::new(|info| {
        let l = info.location().unwrap();
        SITE.with(|s| *s.borrow_mut() = Some((l.file().to_string(), l.line())));
    }));
    let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .expect_err("the call should have panicked");
    let _ = std::panic::take_hook();
    let msg = e
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    let (file, line) = SITE.with(|s| s.borrow_mut().take()).expect("no panic site");
    (file, line, msg)
}

#[test]
// Closures, not fn items: a fn item passed on would be called from core.
#[allow(clippy::redundant_closure)]
fn misuse_panics_point_at_the_callers_line_not_into_gokernel() {
    if !in_crash_child() {
        // In a child: the panic hook is process-wide.
        common::run_child_ok("misuse_panics_point_at_the_callers_line_not_into_gokernel");
        return;
    }
    use std::time::Duration;
    // The calls, each named as its message names it.
    let first = line!();
    type Call = (&'static str, Box<dyn FnOnce()>);
    let calls: Vec<Call> = vec![
        ("go", Box::new(|| gokernel::go(|| ()))),
        ("spawn", Box::new(|| drop(gokernel::spawn(|| ())))),
        ("try_spawn", Box::new(|| drop(gokernel::try_spawn(|| ())))),
        (
            "spawn_locked",
            Box::new(|| drop(gokernel::spawn_locked(|| ()))),
        ),
        ("current", Box::new(|| drop(gokernel::current()))),
        ("park", Box::new(|| gokernel::park())),
        ("gosched", Box::new(|| gokernel::gosched())),
        (
            "num_goroutine",
            Box::new(|| {
                let _ = gokernel::num_goroutine();
            }),
        ),
        ("stats", Box::new(|| drop(gokernel::stats()))),
        ("lock_os_thread", Box::new(|| gokernel::lock_os_thread())),
        (
            "unlock_os_thread",
            Box::new(|| gokernel::unlock_os_thread()),
        ),
        (
            "after",
            Box::new(|| drop(gokernel::after(Duration::from_millis(1)))),
        ),
        (
            "after_func",
            Box::new(|| gokernel::time::after_func(Duration::from_millis(1), || ())),
        ),
        (
            "chan",
            Box::new(|| drop(gokernel::chan::<[u8; 4096]>(usize::MAX / 2))),
        ),
        ("systemstack", Box::new(|| systemstack(|| ()))),
    ];
    let last = line!();
    for (name, f) in calls {
        let (file, at, msg) = panic_site(f);
        assert!(
            (msg.contains(&format!("gokernel::{name} "))
                || msg.contains(&format!("gokernel::{name}: "))),
            "{name}: the message does not name it: {msg:?}"
        );
        assert_eq!(file, file!(), "{name} (line {at}): {msg:?}");
        assert!(
            first < at && at < last,
            "{name}: line {at} is not a call above: {msg:?}"
        );
    }
    // block_on from a goroutine.
    let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
    let (file, at, msg) = rt
        .block_on(|| {
            let inner = gokernel::Runtime::builder().procs(1).build().unwrap();
            let line = line!() + 2; // the block_on call below
            let (f, at, msg) = panic_site(|| {
                let _ = inner.block_on(|| ());
            });
            (f, at - line, msg)
        })
        .unwrap();
    assert!(msg.contains("block_on"), "{msg:?}");
    assert_eq!((file.as_str(), at), (file!(), 0), "block_on: {msg:?}");
}

#[test]
fn a_timer_callback_that_blocks_on_a_channel_is_fatal_naming_the_m() {
    if in_crash_child() {
        let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
        let _ = rt.block_on(|| {
            let c = gokernel::chan::<u32>(0);
            gokernel::time::after_func(std::time::Duration::from_millis(1), move || {
                let _ = c.recv(); // nobody sends: this would sleep the M
            });
            gokernel::sleep(std::time::Duration::from_secs(20));
        });
        unreachable!("the runtime went on after blocking on the system stack");
    }
    let c = run_crash_child("a_timer_callback_that_blocks_on_a_channel_is_fatal_naming_the_m");
    assert_aborted_with(
        &c,
        &["fatal error: blocking on the system stack", "(g0 of m "],
    );
}

#[test]
fn a_systemstack_closure_that_waits_for_a_mutex_is_fatal_naming_the_goroutine() {
    if in_crash_child() {
        let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
        let _ = rt.block_on(|| {
            let m = std::sync::Arc::new(gokernel::sync::Mutex::new(0));
            let held = m.lock();
            let m2 = m.clone();
            gokernel::spawn(move || systemstack(|| *m2.lock() += 1))
                .join()
                .ok();
            drop(held);
        });
        unreachable!("the runtime went on after blocking on the system stack");
    }
    let c = run_crash_child(
        "a_systemstack_closure_that_waits_for_a_mutex_is_fatal_naming_the_goroutine",
    );
    assert_aborted_with(
        &c,
        &["fatal error: blocking on the system stack", "(goroutine "],
    );
}

#[test]
fn a_systemstack_closure_that_joins_a_goroutine_is_fatal() {
    if in_crash_child() {
        let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
        let _ = rt.block_on(|| {
            let h = gokernel::spawn(|| gokernel::sleep(std::time::Duration::from_secs(20)));
            systemstack(move || h.join().ok());
        });
        unreachable!("the runtime went on after blocking on the system stack");
    }
    let c = run_crash_child("a_systemstack_closure_that_joins_a_goroutine_is_fatal");
    assert_aborted_with(
        &c,
        &["fatal error: blocking on the system stack", "(goroutine "],
    );
}

#[test]
fn a_panic_in_a_systemstack_closure_is_fatal_with_its_message() {
    if in_crash_child() {
        let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
        let _ = rt.block_on(|| systemstack(|| panic!("boom on g0")));
        unreachable!("the runtime went on after a panic on the system stack");
    }
    let c = run_crash_child("a_panic_in_a_systemstack_closure_is_fatal_with_its_message");
    assert_aborted_with(
        &c,
        &[
            "fatal error: panic on the system stack: boom on g0",
            "(goroutine ",
        ],
    );
}
