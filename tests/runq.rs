//! The run queue (`gokernel::runq`) keeps Go's contract, on the real
//! 256-slot ring:
//!
//! - `runqput` / `runqget` are FIFO for every fill level 0..=256, also
//!   after head and tail have wrapped around the ring;
//! - `runqput(next)` takes `runnext` and kicks the G it displaces to the
//!   ring's tail; `runqget` hands out `runnext` first, flagged to inherit
//!   the time slice;
//! - a full ring overflows half of itself (the oldest) plus the new G;
//! - `runqsteal` takes ceil(n / 2) of a ring of n, and `runnext` only when
//!   asked to and the ring is empty;
//! - with a thief stealing concurrently, every G comes out exactly once;
//! - `runqempty` never says "empty" while a G is in the queue, however the
//!   owner shuffles it between `runnext` and the ring (Go's
//!   `TestSchedLocalQueueEmpty`).
//!
//! The queue never dereferences its pointers, so the Gs here are fake
//! non-null addresses `i + 1` without provenance.
//!
//! The 4-slot model-checked version of these properties is
//! `tests/loom_runq.rs`; this file compiles to nothing under `cfg(loom)`.

#![cfg(not(loom))]

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use gokernel::runq::{RUNQ_BATCH, RUNQ_LEN, Runq, runqempty, runqget, runqput, runqsteal};

type Q = Runq<u64>;

/// The fake G number `i`.
fn g(i: usize) -> *mut u64 {
    ptr::without_provenance_mut(i + 1)
}

/// The number of the fake G `p`.
fn id(p: *mut u64) -> usize {
    assert!(!p.is_null(), "the queue handed out a null G");
    p.addr() - 1
}

/// Puts G `i` on `q`'s ring, asserting it fits.
fn put(q: &Q, i: usize) {
    assert!(
        runqput(q, g(i), false).is_none(),
        "unexpected overflow at {i}"
    );
}

/// Gets everything left in `q`, as (G number, inherit) pairs.
fn drain(q: &Q) -> Vec<(usize, bool)> {
    let mut out = Vec::new();
    while let Some((p, inherit)) = runqget(q) {
        out.push((id(p), inherit));
    }
    out
}

/// Ring items `lo..hi` as `drain` reports them.
fn ring(lo: usize, hi: usize) -> Vec<(usize, bool)> {
    (lo..hi).map(|i| (i, false)).collect()
}

/// Asserts `seen` holds each of `0..n` exactly once.
fn assert_each_once(mut seen: Vec<usize>, n: usize) {
    seen.sort_unstable();
    let dups: Vec<_> = seen.windows(2).filter(|w| w[0] == w[1]).collect();
    assert!(dups.is_empty(), "duplicated Gs: {dups:?}");
    assert_eq!(seen.len(), n, "lost Gs");
    assert!(seen.iter().copied().eq(0..n), "foreign Gs");
}

#[test]
fn put_then_get_is_fifo_for_every_count_0_to_256() {
    // A fresh queue per count, and one long-lived queue whose head and tail
    // wrap around the ring at every offset.
    let wrapped = Q::new();
    for n in 0..=RUNQ_LEN {
        for q in [&Q::new(), &wrapped] {
            assert!(runqempty(q), "n={n}: not empty before");
            for i in 0..n {
                put(q, i);
            }
            assert_eq!(runqempty(q), n == 0, "n={n}");
            assert_eq!(q.len(), n);
            assert_eq!(drain(q), ring(0, n), "n={n}");
            assert!(runqget(q).is_none());
            assert!(runqempty(q), "n={n}: not empty after");
        }
    }
}

#[test]
fn runnext_is_got_first_and_a_new_runnext_displaces_the_old_to_the_ring_tail() {
    let q = Q::new();
    // runnext alone is not empty, and comes back flagged to inherit.
    assert!(runqput(&q, g(9), true).is_none());
    assert!(!runqempty(&q));
    assert_eq!(q.len(), 1);
    assert_eq!(drain(&q), [(9, true)]);
    assert!(runqempty(&q));

    put(&q, 0);
    put(&q, 1);
    assert!(runqput(&q, g(2), true).is_none()); // runnext = 2
    assert!(runqput(&q, g(3), true).is_none()); // runnext = 3, 2 to the tail
    put(&q, 4);
    assert_eq!(q.len(), 5);
    assert_eq!(
        drain(&q),
        [(3, true), (0, false), (1, false), (2, false), (4, false)]
    );
    assert!(runqempty(&q));
}

#[test]
fn putting_into_a_full_ring_overflows_the_oldest_half_plus_the_new_g() {
    assert_eq!(RUNQ_BATCH, RUNQ_LEN / 2 + 1);
    // Start at several ring offsets, so the overflowing half may wrap.
    for offset in [0, 1, RUNQ_LEN / 2, RUNQ_LEN - 1] {
        let q = Q::new();
        for _ in 0..offset {
            put(&q, 0);
            runqget(&q).unwrap();
        }
        for i in 0..RUNQ_LEN {
            put(&q, i);
        }
        let batch = runqput(&q, g(RUNQ_LEN), false).expect("no overflow");
        let batch: Vec<usize> = batch.iter().map(|&p| id(p)).collect();
        let mut want: Vec<usize> = (0..RUNQ_LEN / 2).collect();
        want.push(RUNQ_LEN);
        assert_eq!(batch.len(), RUNQ_BATCH);
        assert_eq!(batch, want, "offset {offset}");
        // The ring keeps the newer half, in order, and has room again.
        assert_eq!(q.len(), RUNQ_LEN / 2);
        assert_eq!(drain(&q), ring(RUNQ_LEN / 2, RUNQ_LEN), "offset {offset}");
        assert!(runqempty(&q));
    }

    // A runnext displaced into a full ring is the one that overflows.
    let q = Q::new();
    for i in 0..RUNQ_LEN {
        put(&q, i);
    }
    assert!(runqput(&q, g(RUNQ_LEN), true).is_none());
    let batch = runqput(&q, g(RUNQ_LEN + 1), true).expect("no overflow");
    let mut seen: Vec<usize> = batch.iter().map(|&p| id(p)).collect();
    assert_eq!(seen.len(), RUNQ_BATCH);
    assert_eq!(seen.last(), Some(&RUNQ_LEN));
    let rest = drain(&q);
    assert_eq!(rest[0], (RUNQ_LEN + 1, true));
    assert_eq!(rest[1..], ring(RUNQ_LEN / 2, RUNQ_LEN));
    seen.extend(rest.iter().map(|&(i, _)| i));
    assert_each_once(seen, RUNQ_LEN + 2);
}

#[test]
fn steal_takes_the_oldest_ceil_half_and_every_g_is_seen_once() {
    for n in 0..=RUNQ_LEN {
        let (victim, thief) = (Q::new(), Q::new());
        for i in 0..n {
            put(&victim, i);
        }
        let got = runqsteal(&thief, &victim, false);
        let stolen = n - n / 2; // Go: n - n/2
        assert!(stolen == n / 2 || stolen == n / 2 + 1);
        let Some(gp) = got else {
            assert_eq!(n, 0, "nothing stolen from {n}");
            assert!(runqempty(&thief) && runqempty(&victim));
            continue;
        };
        // The thief runs the newest stolen G and queues the others.
        assert_eq!(id(gp), stolen - 1, "n={n}");
        assert_eq!(thief.len(), stolen - 1, "n={n}");
        assert_eq!(victim.len(), n - stolen, "n={n}");
        let from_thief = drain(&thief);
        let from_victim = drain(&victim);
        assert_eq!(from_thief, ring(0, stolen - 1), "n={n}");
        assert_eq!(from_victim, ring(stolen, n), "n={n}");
        let mut seen = vec![id(gp)];
        seen.extend(from_thief.iter().chain(&from_victim).map(|&(i, _)| i));
        assert_each_once(seen, n);
    }
}

#[test]
fn runnext_is_stolen_only_when_asked_and_the_ring_is_empty() {
    let (victim, thief) = (Q::new(), Q::new());
    assert!(runqput(&victim, g(0), true).is_none());
    assert!(runqsteal(&thief, &victim, false).is_none());
    assert!(!runqempty(&victim), "runnext went without steal_runnext");

    assert_eq!(runqsteal(&thief, &victim, true).map(id), Some(0));
    assert!(runqempty(&victim));
    assert!(runqempty(&thief), "the stolen runnext was also queued");
    assert!(runqsteal(&thief, &victim, true).is_none());

    // With Gs in the ring, the ring is stolen from and runnext stays.
    assert!(runqput(&victim, g(1), true).is_none());
    put(&victim, 2);
    assert_eq!(runqsteal(&thief, &victim, true).map(id), Some(2));
    assert_eq!(drain(&victim), [(1, true)]);
    assert!(runqempty(&thief));
}

/// Rounds of owner work in the concurrent tests.
const ROUNDS: usize = 100_000;

/// Steals the thief should make before the owner stops (if it can within
/// 50 * ROUNDS rounds).
const MIN_STEALS: usize = 5_000;

/// `runqempty` calls the observer should make before the owner stops (if
/// it can within 50 * ROUNDS rounds).
const MIN_CHECKS: usize = 100_000;

#[test]
fn concurrent_steals_lose_and_duplicate_nothing() {
    let victim = Arc::new(Q::new());
    let done = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(2));
    let steals = Arc::new(AtomicUsize::new(0));

    let thief = thread::spawn({
        let (victim, done, started, steals) = (
            Arc::clone(&victim),
            Arc::clone(&done),
            Arc::clone(&started),
            Arc::clone(&steals),
        );
        move || {
            let own = Q::new();
            started.wait();
            let mut seen = Vec::new();
            loop {
                // Read `done` before stealing: once a steal after the
                // owner's last put finds nothing, the thief may stop (the
                // owner drains what is left after the join).
                let last = done.load(Ordering::Acquire);
                let steal_runnext = seen.len() % 2 == 0;
                if let Some(gp) = runqsteal(&own, &victim, steal_runnext) {
                    steals.fetch_add(1, Ordering::Relaxed);
                    seen.push(id(gp));
                    seen.extend(drain(&own).into_iter().map(|(i, _)| i));
                } else if last {
                    return seen;
                } else {
                    thread::yield_now();
                }
            }
        }
    });

    // The owner: puts one or two Gs (some into runnext), then gets one, so
    // the queue stays short (gets and steals race for the same few slots)
    // but grows until the thief catches up or it overflows.
    let mut seen = Vec::new();
    let mut overflows = 0usize;
    let mut next_id = 0;
    started.wait();
    let mut round = 0;
    // At least ROUNDS rounds, and on until the thief has stolen a good many
    // times (an optimised owner can outrun a thief that is slow to start),
    // within a bound.
    while round < ROUNDS || (steals.load(Ordering::Relaxed) < MIN_STEALS && round < 50 * ROUNDS) {
        round += 1;
        for k in 0..1 + round % 2 {
            let next = (round + k) % 3 == 0;
            if let Some(batch) = runqput(&victim, g(next_id), next) {
                overflows += 1;
                seen.extend(batch.iter().map(|&p| id(p)));
            }
            next_id += 1;
        }
        if let Some((p, _)) = runqget(&victim) {
            seen.push(id(p));
        }
    }
    done.store(true, Ordering::Release);
    let stolen = thief.join().unwrap();
    let steals = steals.load(Ordering::Relaxed);
    // Whatever the thief's last steals left behind.
    seen.extend(drain(&victim).into_iter().map(|(i, _)| i));
    assert!(runqempty(&victim));
    eprintln!(
        "{next_id} Gs: {} got or overflowed by the owner ({overflows} overflows), \
         {} stolen in {steals} steals",
        seen.len(),
        stolen.len()
    );
    seen.extend(stolen);
    assert_each_once(seen, next_id);
}

#[test]
fn runqempty_never_says_empty_while_the_owner_keeps_a_g_queued() {
    // The owner keeps exactly one G queued at all times: each round puts a
    // G (into runnext or the ring) before getting one, so the queued G moves
    // between runnext and the ring under the observer's feet, as in Go's
    // TestSchedLocalQueueEmpty.
    let q = Arc::new(Q::new());
    let done = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(2));
    let checks = Arc::new(AtomicUsize::new(0));
    assert!(runqput(&q, g(0), true).is_none());

    let observer = thread::spawn({
        let (q, done, started, checks) = (
            Arc::clone(&q),
            Arc::clone(&done),
            Arc::clone(&started),
            Arc::clone(&checks),
        );
        move || {
            started.wait();
            let mut spurious = 0usize;
            while !done.load(Ordering::Acquire) {
                spurious += usize::from(runqempty(&q));
                checks.fetch_add(1, Ordering::Relaxed);
            }
            spurious
        }
    });

    let mut seen = Vec::new();
    let mut round = 0;
    started.wait();
    // At least ROUNDS rounds, and on until the observer has looked a good
    // many times, within a bound.
    while round < ROUNDS || (checks.load(Ordering::Relaxed) < MIN_CHECKS && round < 50 * ROUNDS) {
        round += 1;
        // A bit of a scrambled round number: consecutive rounds go through
        // all four (runnext, ring) combinations, in no fixed cycle.
        let next = (round.wrapping_mul(0x9E37_79B9) >> 7) & 1 == 1;
        assert!(runqput(&q, g(round), next).is_none());
        let (p, _) = runqget(&q).expect("owner found its own queue empty");
        seen.push(id(p));
    }
    done.store(true, Ordering::Release);
    let spurious = observer.join().unwrap();
    let checks = checks.load(Ordering::Relaxed);
    seen.extend(drain(&q).into_iter().map(|(i, _)| i));
    eprintln!("{round} rounds, {checks} concurrent runqempty checks");
    assert_eq!(
        spurious, 0,
        "runqempty said empty {spurious} times while a G was queued"
    );
    assert_each_once(seen, round + 1);
}
