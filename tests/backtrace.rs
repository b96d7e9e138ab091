//! DWARF CFI across the switches: a backtrace taken on g0 inside
//! `systemstack` reaches the G's own frames, and a G's bottom frame,
//! `goexit`, ends the chain cleanly.

mod common;

use std::backtrace::Backtrace;
use std::hint::black_box;

use common::run_in_g;
use gokernel::systemstack;

/// Stack for Gs that capture backtraces (unwinding needs some room).
const STACK: usize = 1 << 20;

/// The bottom frame of every G.
const GOEXIT: &str = "gokernel::asm_amd64::goexit";

/// The function names of a rendered backtrace, innermost first.
fn frame_names(bt: &str) -> Vec<String> {
    bt.lines()
        .filter_map(|l| {
            let (num, rest) = l.trim_start().split_once(": ")?;
            num.parse::<usize>().ok()?;
            Some(rest.trim().to_string())
        })
        .collect()
}

#[inline(never)]
fn named_caller_in_goroutine() -> String {
    let s = systemstack(|| Backtrace::force_capture().to_string());
    black_box(s)
}

#[test]
fn a_backtrace_inside_systemstack_reaches_the_goroutines_frames() {
    let bt = run_in_g(STACK, named_caller_in_goroutine);
    let names = frame_names(&bt);
    // Optimised builds name inlined frames without their module path.
    let pos = |name: &str| {
        names
            .iter()
            .position(|n| n == name || n.ends_with(&format!("::{name}")))
    };
    let ss = pos("gokernel::asm_amd64::systemstack")
        .unwrap_or_else(|| panic!("no systemstack frame:\n{bt}"));
    let caller = pos("named_caller_in_goroutine")
        .unwrap_or_else(|| panic!("the G's caller is missing:\n{bt}"));
    assert!(
        ss < caller,
        "systemstack should be inside its caller:\n{bt}"
    );
    let last = names.last().expect("an empty backtrace");
    assert_eq!(last, GOEXIT, "the chain should end at goexit:\n{bt}");
}

#[test]
fn a_goroutines_bottom_frame_ends_the_chain_at_goexit() {
    let bt = run_in_g(STACK, || Backtrace::force_capture().to_string());
    let names = frame_names(&bt);
    let last = names.last().expect("an empty backtrace");
    assert_eq!(last, GOEXIT, "the chain should end at goexit:\n{bt}");
    assert_eq!(
        names.iter().filter(|n| *n == GOEXIT).count(),
        1,
        "goexit should appear once, as the last frame:\n{bt}"
    );
    assert!(
        !names.iter().any(|n| n.contains("<unknown>")),
        "no unknown frames past the G's bottom:\n{bt}"
    );
}
