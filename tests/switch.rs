//! The switch core: mcall / gogo / systemstack round trips, the ABI
//! across them, the g0 discipline and the TLS slot.

mod common;

use std::cell::Cell;
use std::hint::black_box;

use common::{caller_sp, newg, next_mid, on_g0, run_in_g};
use gokernel::asm_amd64::mcall;
use gokernel::getg;
use gokernel::proc::{execute, mstart};
use gokernel::runtime2::{G, M, status};
use gokernel::systemstack;

const STACK: usize = 64 * 1024;

thread_local! {
    /// The two Gs of this thread's ping-pong.
    static PAIR: Cell<[*mut G; 2]> = const { Cell::new([std::ptr::null_mut(); 2]) };
    /// Switches made by `to_other` on this thread.
    static SWITCHES: Cell<u64> = const { Cell::new(0) };
    /// Iterations each G of the pair completed.
    static COUNTS: Cell<[u64; 2]> = const { Cell::new([0; 2]) };
    /// Lowest and highest g0 stack pointer seen in `to_other`.
    static G0_SP: Cell<(usize, usize)> = const { Cell::new((usize::MAX, 0)) };
}

/// On g0: the G that called mcall yields to the other G of the pair.
unsafe extern "C" fn to_other(gp: *mut G) {
    let sp = caller_sp();
    G0_SP.set((G0_SP.get().0.min(sp), G0_SP.get().1.max(sp)));
    SWITCHES.set(SWITCHES.get() + 1);
    let [a, b] = PAIR.get();
    let other = if gp == a { b } else { a };
    // SAFETY: gp is suspended by mcall; other is suspended or fresh, and
    // this M is the only one that runs either.
    unsafe {
        (*gp).casstatus(status::RUNNING, status::RUNNABLE);
        execute(other, false)
    }
}

/// The body of G `i` of the pair: `n` rounds of "count, then yield".
fn player(i: usize, n: u64) -> impl FnOnce() + Send + 'static {
    move || {
        let me = getg();
        for _ in 0..n {
            let mut c = COUNTS.get();
            c[i] += 1;
            COUNTS.set(c);
            // SAFETY: on a user G of this thread's M.
            unsafe { mcall(to_other) };
            // The TLS slot is this thread's, and holds us again.
            assert_eq!(getg(), me, "getg() after mcall is not the resumed G");
        }
    }
}

/// Runs the ping-pong on this thread: G0 and G1 each yield `n` times.
/// Returns (switches, per-G counts, g0 sp range).
fn pingpong(n: u64) -> (u64, [u64; 2], (usize, usize)) {
    SWITCHES.set(0);
    COUNTS.set([0; 2]);
    G0_SP.set((usize::MAX, 0));
    let mut g0 = newg(STACK, player(0, n));
    let mut g1 = newg(STACK, player(1, n));
    let (p0, p1): (*mut G, *mut G) = (&mut *g0, &mut *g1);
    PAIR.set([p0, p1]);
    let mut m = M::new(next_mid());
    // SAFETY: this thread runs no M. G0 runs first; after its n-th yield
    // comes back it returns, and goexit ends the M. G1 stays suspended
    // after its n-th yield and is dropped with its stack.
    unsafe { mstart(&mut *m, || execute(p0, false)) };
    assert_eq!(g0.readgstatus(), status::DEAD);
    assert_eq!(g1.readgstatus(), status::RUNNABLE);
    (SWITCHES.get(), COUNTS.get(), G0_SP.get())
}

#[test]
fn two_gs_ping_pong_a_million_times_with_an_exact_count() {
    let n = 1_000_000;
    let (switches, counts, _) = pingpong(n);
    assert_eq!(counts, [n, n]);
    assert_eq!(switches, 2 * n);
}

#[test]
fn a_million_mcalls_start_g0_at_the_same_stack_point() {
    let (switches, _, (lo, hi)) = pingpong(500_000);
    assert_eq!(switches, 1_000_000);
    assert_eq!(
        lo, hi,
        "g0's stack moved between mcalls: [{lo:#x}, {hi:#x}]"
    );
}

#[test]
fn eight_threads_ping_pong_at_once_with_isolated_tls() {
    let n = 200_000;
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..8).map(|_| s.spawn(move || pingpong(n))).collect();
        for t in threads {
            let (switches, counts, (lo, hi)) = t.join().unwrap();
            assert_eq!(counts, [n, n]);
            assert_eq!(switches, 2 * n);
            assert_eq!(lo, hi);
        }
    });
    assert!(getg().is_null(), "the test thread is not an M");
}

fn g0_of_current_m() -> *mut G {
    // SAFETY: the current G is a live G of a live M.
    unsafe { (*(*getg()).m()).g0() }
}

fn stack_contains(gp: *mut G, sp: usize) -> bool {
    // SAFETY: gp is a live G.
    let st = unsafe { (*gp).stack() };
    st.lo() <= sp && sp < st.hi()
}

#[test]
fn systemstack_runs_on_g0_and_nested_systemstack_calls_directly() {
    run_in_g(STACK, || {
        let me = getg();
        let g0 = g0_of_current_m();
        let outer_sp = systemstack(move || {
            assert_eq!(getg(), g0, "systemstack did not switch to g0");
            let sp = caller_sp();
            assert!(!stack_contains(me, sp), "systemstack ran on the G's stack");
            let inner_sp = systemstack(move || {
                assert_eq!(getg(), g0, "nested systemstack left g0");
                caller_sp()
            });
            assert!(
                inner_sp < sp,
                "nested systemstack did not run below its caller"
            );
            assert!(sp - inner_sp < 4096, "nested systemstack switched stacks");
            sp
        });
        assert_eq!(getg(), me, "systemstack did not switch back to the G");
        assert!(!stack_contains(me, outer_sp));
        // Each systemstack starts afresh at g0.sched.sp.
        let again = systemstack(|| caller_sp());
        let first = systemstack(|| caller_sp());
        assert_eq!(again, first);
    });
}

#[test]
fn systemstack_on_g0_calls_directly() {
    on_g0(|| {
        let g0 = getg();
        let sp = caller_sp();
        let inner = systemstack(|| caller_sp());
        assert_eq!(getg(), g0);
        assert!(inner < sp && sp - inner < 4096);
    });
}

#[test]
fn systemstack_returns_the_closure_result_and_drops_captures_once() {
    use std::sync::Arc;
    let captured = Arc::new(5);
    let c2 = captured.clone();
    let r = run_in_g(STACK, move || systemstack(move || *c2 * 2));
    assert_eq!(r, 10);
    assert_eq!(Arc::strong_count(&captured), 1);
}

// ---------------------------------------------------------------------
// The Rust ABI across switches.

/// Loads known values into rbx, rbp, r12–r15, calls `f`, and returns a
/// bit mask of the registers that no longer hold them (0 = all survived).
/// Restores the caller's registers before returning.
#[unsafe(naked)]
extern "C" fn callee_saved_survive(f: extern "C" fn()) -> u64 {
    core::arch::naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "sub rsp, 8",
        "movabs rbx, 0x1111111111111111",
        "movabs rbp, 0x2222222222222222",
        "movabs r12, 0x3333333333333333",
        "movabs r13, 0x4444444444444444",
        "movabs r14, 0x5555555555555555",
        "movabs r15, 0x6666666666666666",
        "call rdi",
        "xor eax, eax",
        "movabs rcx, 0x1111111111111111",
        "cmp rbx, rcx",
        "setne dl",
        "or al, dl",
        "movabs rcx, 0x2222222222222222",
        "cmp rbp, rcx",
        "setne dl",
        "shl dl, 1",
        "or al, dl",
        "movabs rcx, 0x3333333333333333",
        "cmp r12, rcx",
        "setne dl",
        "shl dl, 2",
        "or al, dl",
        "movabs rcx, 0x4444444444444444",
        "cmp r13, rcx",
        "setne dl",
        "shl dl, 3",
        "or al, dl",
        "movabs rcx, 0x5555555555555555",
        "cmp r14, rcx",
        "setne dl",
        "shl dl, 4",
        "or al, dl",
        "movabs rcx, 0x6666666666666666",
        "cmp r15, rcx",
        "setne dl",
        "shl dl, 5",
        "or al, dl",
        "add rsp, 8",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
    )
}

/// Loads junk into rbx, rbp, r12–r15 and calls `mcall(f)` with it, then
/// restores the caller's registers: the other side of a switch that uses
/// every callee-saved register differently.
#[unsafe(naked)]
unsafe extern "C" fn mcall_with_junk_registers(f: unsafe extern "C" fn(*mut G)) {
    core::arch::naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "sub rsp, 8",
        "movabs rbx, 0x0badbadbadbadbad",
        "mov rbp, rbx",
        "mov r12, rbx",
        "mov r13, rbx",
        "mov r14, rbx",
        "mov r15, rbx",
        "call {mcall}",
        "add rsp, 8",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        mcall = sym mcall,
    )
}

extern "C" fn yield_to_junk_g() {
    // SAFETY: called on the first G of this thread's pair.
    unsafe { mcall(to_other) }
}

extern "C" fn systemstack_with_work() {
    let s = systemstack(|| format!("{:.2}", black_box(2.5f64) * 3.0));
    assert_eq!(s, "7.50");
}

#[test]
fn callee_saved_registers_survive_mcall_gogo_round_trips() {
    SWITCHES.set(0);
    let mut a = newg(STACK, || {
        for _ in 0..3 {
            assert_eq!(callee_saved_survive(yield_to_junk_g), 0, "register mask");
        }
    });
    let mut b = newg(STACK, || {
        loop {
            // SAFETY: on the second G of this thread's pair.
            unsafe { mcall_with_junk_registers(to_other) };
        }
    });
    let (pa, pb): (*mut G, *mut G) = (&mut *a, &mut *b);
    PAIR.set([pa, pb]);
    let mut m = M::new(next_mid());
    // SAFETY: this thread runs no M; a exits after three round trips.
    unsafe { mstart(&mut *m, || execute(pa, false)) };
    assert_eq!(a.readgstatus(), status::DEAD);
    assert_eq!(SWITCHES.get(), 6);
}

#[test]
fn callee_saved_registers_survive_systemstack() {
    run_in_g(STACK, || {
        assert_eq!(callee_saved_survive(systemstack_with_work), 0)
    });
    on_g0(|| assert_eq!(callee_saved_survive(systemstack_with_work), 0));
}

#[repr(C, align(16))]
struct Aligned([f32; 4]);

/// Checks the ABI's stack alignment where it runs: the caller's rsp is
/// 16-byte aligned at a call, an over-aligned local is aligned, aligned SSE
/// loads and stores work, and f64 formatting (SSE) is right.
#[inline(never)]
fn check_alignment_and_sse(place: &str) {
    assert_eq!(
        caller_sp() % 16,
        0,
        "{place}: rsp not 16-byte aligned at a call"
    );
    let a = black_box(Aligned([1.5, 2.5, 3.5, 4.5]));
    let addr = &a as *const Aligned as usize;
    assert_eq!(
        addr % 16,
        0,
        "{place}: a 16-byte aligned local is misaligned"
    );
    let mut out = Aligned([0.0; 4]);
    // SAFETY: both pointers are 16-byte aligned arrays of four f32 (checked
    // above for `a`; `out` has the same type); SSE is baseline on x86_64.
    unsafe {
        use core::arch::x86_64::{_mm_add_ps, _mm_load_ps, _mm_store_ps};
        let v = _mm_load_ps(a.0.as_ptr());
        _mm_store_ps(out.0.as_mut_ptr(), _mm_add_ps(v, v));
    }
    assert_eq!(out.0, [3.0, 5.0, 7.0, 9.0], "{place}");
    let s = format!("{:.3} {:e}", black_box(1.0f64) / 3.0, black_box(6.02e23f64));
    assert_eq!(s, "0.333 6.02e23", "{place}");
}

/// On g0: checks alignment inside an mcall function, then resumes `gp`.
unsafe extern "C" fn check_then_resume(gp: *mut G) {
    check_alignment_and_sse("g0 in an mcall function");
    // SAFETY: gp was just suspended by mcall on this M.
    unsafe {
        (*gp).casstatus(status::RUNNING, status::RUNNABLE);
        execute(gp, false)
    }
}

#[test]
fn rust_code_runs_16_byte_aligned_with_sse_on_a_g_stack_and_on_g0() {
    run_in_g(STACK, || {
        check_alignment_and_sse("G stack");
        systemstack(|| check_alignment_and_sse("g0 via systemstack"));
        // SAFETY: on a user G; check_then_resume resumes it.
        unsafe { mcall(check_then_resume) };
        check_alignment_and_sse("G stack after mcall");
    });
    on_g0(|| check_alignment_and_sse("g0"));
}

#[test]
fn a_fresh_g_starts_on_its_own_stack_and_exits_through_goexit() {
    let got = run_in_g(STACK, || {
        let me = getg();
        let sp = caller_sp();
        // SAFETY: me is the running G.
        let (st, m, goid) = unsafe { ((*me).stack(), (*me).m(), (*me).goid()) };
        // SAFETY: m is this G's live M.
        let curg = unsafe { (*m).curg() };
        (st.lo() <= sp && sp < st.hi(), curg == me, goid)
    });
    assert!(got.0, "the G ran off its own stack");
    assert!(got.1, "m.curg is not the running G");
    assert!(got.2 > 0, "a user G has goid 0");
}
