//! Two goroutines on one M hand control back and forth through `mcall`
//! and `gogo`, then one G measures bare `mcall` + `gogo` round trips and a
//! `systemstack` call.
//!
//! ```text
//! cargo run --release --example pingpong -- [ROUNDS] [pingpong|roundtrip|systemstack|all]
//! ```
//!
//! It prints the switch counts and rates. Run one part under
//! `valgrind --tool=callgrind` with ROUNDS and 2 x ROUNDS to get
//! instructions per operation: (Ir(2N) - Ir(N)) / N.

use std::cell::Cell;
use std::time::Instant;

use gokernel::asm_amd64::{gogo, mcall};
use gokernel::getg;
use gokernel::proc::{execute, gostartcallfn, malg, mstart, newgoid};
use gokernel::runtime2::{G, M, status};
use gokernel::systemstack;

thread_local! {
    static PAIR: Cell<[*mut G; 2]> = const { Cell::new([std::ptr::null_mut(); 2]) };
    static SWITCHES: Cell<u64> = const { Cell::new(0) };
}

/// On g0: park the caller as runnable and run the other G of the pair.
unsafe extern "C" fn to_other(gp: *mut G) {
    SWITCHES.set(SWITCHES.get() + 1);
    let [a, b] = PAIR.get();
    let other = if gp == a { b } else { a };
    // SAFETY: gp was just suspended by mcall; other is suspended or fresh;
    // only this M runs either.
    unsafe {
        (*gp).casstatus(status::RUNNING, status::RUNNABLE);
        execute(other, false)
    }
}

/// On g0: resume the caller at once (the bare round trip G -> g0 -> G).
unsafe extern "C" fn back(gp: *mut G) {
    // SAFETY: gp was just suspended by mcall on this M.
    unsafe { gogo((*gp).sched()) }
}

fn new_g(f: impl FnOnce() + Send + 'static) -> Box<G> {
    let mut g = malg(64 * 1024).expect("malg");
    g.set_goid(newgoid());
    // SAFETY: a new G: not running, its stack unused.
    unsafe { gostartcallfn(&mut *g, Box::new(f)) };
    g
}

fn rate(n: u64, secs: f64) -> String {
    format!(
        "{:.1} M/s, {:.1} ns each",
        n as f64 / secs / 1e6,
        secs * 1e9 / n as f64
    )
}

fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS must be a whole number"))
        .unwrap_or(1_000_000);
    let part = std::env::args().nth(2).unwrap_or_else(|| "all".into());
    assert!(
        ["pingpong", "roundtrip", "systemstack", "all"].contains(&part.as_str()),
        "the part must be pingpong, roundtrip, systemstack or all, not {part:?}"
    );
    let all = part == "all";
    if all || part == "pingpong" {
        ping_pong(rounds);
    }
    if all || part == "roundtrip" || part == "systemstack" {
        round_trips(
            rounds,
            all || part == "roundtrip",
            all || part == "systemstack",
        );
    }
}

/// Each of two Gs yields `rounds` times to the other.
fn ping_pong(rounds: u64) {
    let player = move || {
        for _ in 0..rounds {
            // SAFETY: on a user G of this M; to_other resumes the other G.
            unsafe { mcall(to_other) };
        }
    };
    let mut a = new_g(player);
    let mut b = new_g(player);
    let (pa, pb): (*mut G, *mut G) = (&mut *a, &mut *b);
    PAIR.set([pa, pb]);
    let mut m = M::new(1);
    let t = Instant::now();
    // SAFETY: this thread runs no M; when `a` returns, goexit ends the M.
    unsafe { mstart(&mut *m, || execute(pa, false)) };
    let secs = t.elapsed().as_secs_f64();
    let switches = SWITCHES.get();
    assert_eq!(switches, 2 * rounds, "lost or extra switches");
    println!(
        "ping-pong: {switches} switches between 2 Gs: {}",
        rate(switches, secs)
    );
}

/// Bare `mcall` + `gogo` round trips, then `systemstack` calls, on one G.
fn round_trips(rounds: u64, mcalls: bool, systemstacks: bool) {
    let mut c = new_g(move || {
        if mcalls {
            let me = getg();
            let t = Instant::now();
            for _ in 0..rounds {
                // SAFETY: on a user G; `back` resumes it at once.
                unsafe { mcall(back) };
            }
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(getg(), me);
            println!(
                "mcall+gogo: {rounds} round trips G -> g0 -> G: {}",
                rate(rounds, secs)
            );
        }
        if !systemstacks {
            return;
        }
        let t = Instant::now();
        let mut sum = 0u64;
        for i in 0..rounds {
            sum = sum.wrapping_add(systemstack(|| i));
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(sum, rounds * (rounds.saturating_sub(1)) / 2);
        println!(
            "systemstack: {rounds} calls G -> g0 -> G: {}",
            rate(rounds, secs)
        );
    });
    let cp: *mut G = &mut *c;
    let mut m2 = M::new(2);
    // SAFETY: as above; a fresh M for the second run.
    unsafe { mstart(&mut *m2, || execute(cp, false)) };
    assert_eq!(c.readgstatus(), status::DEAD);
}
