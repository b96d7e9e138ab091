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
