//! Stack overflow is detected and reported, never silent corruption. Each
//! scenario runs in a child process; the parent checks the message and the
//! abort.

mod common;

use std::hint::black_box;

use common::{assert_aborted_with, in_crash_child, run_crash_child};
use gokernel::Runtime;

const STACK: usize = 64 * 1024;

/// Recurses until the stack runs out, on purpose.
#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let pad = black_box([n; 16]);
    recurse(n + 1).wrapping_add(pad[3])
}

#[inline(never)]
fn big_local() -> u8 {
    let big = black_box([7u8; 1 << 20]);
    big[12345]
}

fn overflow_in_a_goroutine(procs: usize, body: fn()) {
    let rt = Runtime::builder()
        .procs(procs)
        .stack_size(STACK)
        .build()
        .unwrap();
    let _ = rt
        .block_on(move || {
            // Another goroutine keeps the other Ps busy-ish.
            gokernel::go(gokernel::gosched);
            gokernel::spawn(body).join()
        })
        .unwrap();
    unreachable!("the overflow was not caught");
}

fn check_overflow_report(name: &str) {
    let c = run_crash_child(name);
    assert_aborted_with(
        &c,
        &[
            "fatal error: goroutine ",
            ": stack overflow (stack [0x",
            &format!("), {STACK} bytes)"),
        ],
    );
}

#[test]
fn unbounded_recursion_in_a_goroutine_is_reported_on_1_proc() {
    if in_crash_child() {
        overflow_in_a_goroutine(1, || {
            black_box(recurse(0));
        });
    }
    check_overflow_report("unbounded_recursion_in_a_goroutine_is_reported_on_1_proc");
}

#[test]
fn unbounded_recursion_in_a_goroutine_is_reported_on_2_procs() {
    if in_crash_child() {
        overflow_in_a_goroutine(2, || {
            black_box(recurse(0));
        });
    }
    check_overflow_report("unbounded_recursion_in_a_goroutine_is_reported_on_2_procs");
}

#[test]
fn a_large_local_array_in_a_goroutine_is_reported_on_1_proc() {
    if in_crash_child() {
        overflow_in_a_goroutine(1, || {
            black_box(big_local());
        });
    }
    check_overflow_report("a_large_local_array_in_a_goroutine_is_reported_on_1_proc");
}

#[test]
fn a_large_local_array_in_a_goroutine_is_reported_on_2_procs() {
    if in_crash_child() {
        overflow_in_a_goroutine(2, || {
            black_box(big_local());
        });
    }
    check_overflow_report("a_large_local_array_in_a_goroutine_is_reported_on_2_procs");
}

#[test]
fn an_overwritten_soft_guard_is_reported_at_the_next_switch() {
    if in_crash_child() {
        // Beyond the guard-page budget stacks come from arenas, guarded by
        // a region that must stay zero: what an overflow does there (and on
        // a freestanding stack) is write below lo. The next switch notices.
        gokernel::stack::set_guard_page_budget(0);
        overflow_in_a_goroutine(1, || {
            let gp = gokernel::getg();
            // SAFETY: the word below lo is this G's own soft guard region.
            unsafe {
                ((*gp).stack().lo() as *mut u64)
                    .sub(1)
                    .write_volatile(0xbad)
            };
            gokernel::gosched();
        });
    }
    let c = run_crash_child("an_overwritten_soft_guard_is_reported_at_the_next_switch");
    assert_aborted_with(
        &c,
        &[
            ": stack overflow (stack [0x",
            "the guard region below its stack was overwritten",
        ],
    );
}

#[test]
fn a_fault_that_is_not_an_overflow_still_crashes_normally() {
    if in_crash_child() {
        let rt = Runtime::builder().procs(1).build().unwrap();
        rt.block_on(|| {
            // SAFETY: deliberately wrong: a write to address 16.
            unsafe { (16 as *mut u64).write_volatile(1) };
        })
        .unwrap();
        unreachable!("the bad write did not fault");
    }
    let c = run_crash_child("a_fault_that_is_not_an_overflow_still_crashes_normally");
    assert_eq!(
        c.signal,
        Some(11),
        "expected SIGSEGV; stderr:\n{}",
        c.stderr
    );
    assert!(!c.stderr.contains("stack overflow"), "{}", c.stderr);
}
