//! Stack overflow is detected and reported, never silent corruption. Each
//! scenario runs in a child process; the parent checks the message and the
//! abort.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{assert_aborted_with, in_crash_child, run_crash_child};
use gokernel::Runtime;

const STACK: usize = 64 * 1024;
const PAGE: usize = 4096;

/// The first `0x…` hex number after `after` in `s`.
fn hex_after(s: &str, after: &str) -> Option<usize> {
    let rest = &s[s.find(after)? + after.len()..];
    let rest = &rest[rest.find("0x")? + 2..];
    let end = rest
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(rest.len());
    usize::from_str_radix(&rest[..end], 16).ok()
}

/// The fatal line of a crash child's stderr.
fn fatal_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("fatal error:"))
        .unwrap_or_else(|| panic!("no fatal error line; stderr:\n{stderr}"))
}

/// Asserts the report of a hardware guard page: the fault address lies in
/// the page just below the stack the message names.
fn assert_fault_in_guard_page(stderr: &str) -> (usize, usize) {
    let line = fatal_line(stderr);
    let addr = hex_after(line, "faulted at").unwrap_or_else(|| panic!("no address: {line}"));
    let lo = hex_after(line, "below its stack [").unwrap_or_else(|| panic!("no stack: {line}"));
    assert!(
        lo - PAGE <= addr && addr < lo,
        "the fault {addr:#x} is not in the guard page [{:#x}, {lo:#x}): {line}",
        lo - PAGE
    );
    (addr, lo)
}

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
            "fatal error: stack overflow: goroutine ",
            " faulted at 0x",
            " in the guard page below its stack [0x",
            &format!(") of {STACK} bytes (goroutine "),
        ],
    );
    assert_fault_in_guard_page(&c.stderr);
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
        // Unguarded stacks (the unsafe opt-in) come from arenas, guarded by
        // a page that must stay zero: what an overflow does there (and on
        // a freestanding stack) is write below lo. The next switch notices.
        // SAFETY: deliberately broken: the goroutine below writes under
        // its stack; the test checks that the next switch reports it.
        let builder = unsafe { Runtime::builder().unguarded_stacks() };
        let rt = builder.procs(1).stack_size(STACK).build().unwrap();
        let _ = rt.block_on(|| {
            gokernel::spawn(|| {
                let gp = gokernel::getg();
                // SAFETY: the word below lo is this G's own soft guard page.
                unsafe {
                    ((*gp).stack().lo() as *mut u64)
                        .sub(1)
                        .write_volatile(0xbad)
                };
                gokernel::gosched();
            })
            .join()
        });
        unreachable!("the overwritten soft guard was not noticed");
    }
    let c = run_crash_child("an_overwritten_soft_guard_is_reported_at_the_next_switch");
    assert_aborted_with(
        &c,
        &[
            "fatal error: stack overflow: goroutine ",
            "'s soft guard below its stack [0x",
            &format!(") of {STACK} bytes was written (checked at switch) (goroutine "),
        ],
    );
}

/// Stacks the old code gave guard pages before it fell back to arena
/// stacks with soft guards (its default guard-page budget).
const OLD_GUARD_PAGE_BUDGET: usize = 16_384;

/// Goroutines that park with a canary on their stacks; one of them, whose
/// stack lies just above another's (only its guard page between), then
/// recurses without bound.
const CANDIDATES: usize = 8;

/// A goroutine stack seen from inside: its id, bounds and a handle.
struct Seen {
    goid: u64,
    lo: usize,
    hi: usize,
    canary: usize,
    me: gokernel::Goroutine,
}

#[test]
fn an_overflow_is_stopped_by_the_guard_page_before_the_neighbouring_stack() {
    if in_crash_child() {
        // First as many stacks as the old code guarded: the goroutines
        // below are past that budget, where it gave out arena stacks and
        // an overflow ran into the neighbour's canary unreported.
        let fillers: Vec<_> = (0..OLD_GUARD_PAGE_BUDGET)
            .map(|_| gokernel::proc::malg(gokernel::stack::STACK_MIN).unwrap())
            .collect();
        let rt = Runtime::builder()
            .procs(1)
            .stack_size(STACK)
            .build()
            .unwrap();
        let _ = rt.block_on(|| {
            let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
            let chosen = Arc::new(AtomicU64::new(0));
            let main = gokernel::current();
            for _ in 0..CANDIDATES {
                let (seen, chosen, main) = (seen.clone(), chosen.clone(), main.clone());
                gokernel::go(move || {
                    let canary = black_box([0xa5u8; 3000]);
                    let gp = gokernel::getg();
                    // SAFETY: the current G is live; plain fields.
                    let (goid, st) = unsafe { ((*gp).goid(), (*gp).stack()) };
                    seen.lock().unwrap().push(Seen {
                        goid,
                        lo: st.lo(),
                        hi: st.hi(),
                        canary: canary.as_ptr() as usize,
                        me: gokernel::current(),
                    });
                    main.unpark();
                    while chosen.load(Ordering::Acquire) != goid {
                        gokernel::park();
                    }
                    black_box(recurse(0));
                    black_box(&canary);
                });
            }
            while seen.lock().unwrap().len() < CANDIDATES {
                gokernel::park();
            }
            let seen = seen.lock().unwrap();
            let (o, n) = seen
                .iter()
                .find_map(|o| Some((o, seen.iter().find(|n| n.hi == o.lo - PAGE)?)))
                .expect("no candidate stack lies just below another's guard page");
            eprintln!(
                "overflowing goroutine {} stack [{:#x}, {:#x}); neighbour goroutine {} \
                 stack [{:#x}, {:#x}) holds a 3000-byte canary at {:#x}",
                o.goid, o.lo, o.hi, n.goid, n.lo, n.hi, n.canary
            );
            chosen.store(o.goid, Ordering::Release);
            o.me.unpark();
            drop(seen);
            loop {
                gokernel::park();
            }
        });
        drop(fillers);
        unreachable!("the overflow was not caught");
    }
    let c =
        run_crash_child("an_overflow_is_stopped_by_the_guard_page_before_the_neighbouring_stack");
    let intro = c
        .stderr
        .lines()
        .find(|l| l.starts_with("overflowing goroutine "))
        .unwrap_or_else(|| {
            panic!(
                "the child did not get to the overflow; stderr:\n{}",
                c.stderr
            )
        });
    let goid: u64 = intro["overflowing goroutine ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let lo = hex_after(intro, "stack [").unwrap();
    // The fault is in the page just below the overflowing stack: nothing
    // below it (the neighbour's canary) was written.
    let (_, named_lo) = assert_fault_in_guard_page(&c.stderr);
    assert_eq!(named_lo, lo, "the report names another stack: {intro}");
    assert_aborted_with(
        &c,
        &[&format!(
            "fatal error: stack overflow: goroutine {goid} faulted at 0x"
        )],
    );
}

#[test]
fn a_fault_outside_the_guard_page_with_the_stack_pointer_below_is_not_called_a_guard_page_fault() {
    if in_crash_child() {
        overflow_in_a_goroutine(1, || {
            let gp = gokernel::getg();
            // SAFETY: the current G is live.
            let lo = unsafe { (*gp).stack().lo() };
            // SAFETY: deliberately broken: the stack pointer goes two pages
            // below the stack (past the guard page), then a write to
            // address 16 faults. Nothing returns from here.
            unsafe {
                core::arch::asm!(
                    "mov rsp, {sp}",
                    "mov qword ptr [16], 0",
                    "ud2",
                    sp = in(reg) lo - 2 * PAGE,
                    options(noreturn)
                )
            };
        });
    }
    let c = run_crash_child(
        "a_fault_outside_the_guard_page_with_the_stack_pointer_below_is_not_called_a_guard_page_fault",
    );
    assert_aborted_with(
        &c,
        &[
            "fatal error: stack overflow: goroutine ",
            "'s stack pointer 0x",
            " is below its stack [0x",
            "; segmentation fault at 0x10 (not in goroutine ",
            "'s guard page [0x",
        ],
    );
    assert!(!c.stderr.contains("in the guard page"), "{}", c.stderr);
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
