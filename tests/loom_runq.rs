//! Model checks of the run queue (`gokernel::runq`) with loom: under
//! `cfg(loom)` the ring has 4 slots and its atomics are loom's, so loom
//! runs each scenario below under every interleaving of its threads (up to
//! the preemption bound) and every value a load may read under the C++
//! memory model, and each one proves, in every execution:
//!
//! - every G put is seen exactly once (got by the owner, returned in an
//!   overflow batch, stolen, or left in a queue), none lost, none
//!   duplicated, none foreign;
//! - `runqempty` never says "empty" while a G is queued.
//!
//! Scenarios: the owner alone with overflow; a thief's `runqsteal` racing
//! the owner's puts and gets; a thief stealing from a thief that is
//! stealing from the owner; two thieves racing each other and the owner;
//! a thief stealing `runnext` while the owner gets and replaces it; an
//! observer calling `runqempty` while the owner moves its one G between
//! `runnext` and the ring (Go's `TestSchedLocalQueueEmpty`).
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test loom_runq`
//! (`cargo xtask test` does). The preemption bound is
//! `LOOM_MAX_PREEMPTIONS` if set, else [`PREEMPTIONS`]. Without
//! `cfg(loom)` this file compiles to nothing; the 256-slot ring is tested
//! with real threads in `tests/runq.rs`.

#![cfg(loom)]

use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

use gokernel::runq::{RUNQ_BATCH, RUNQ_LEN, Runq, runqempty, runqget, runqput, runqsteal};
use loom::model::Builder;
use loom::sync::Arc;
use loom::thread;

type Q = Runq<u64>;

/// The default preemption bound: with it the whole file explores about
/// 575,000 executions in about 35 s in release (8: over 10 minutes).
const PREEMPTIONS: usize = 5;

/// Runs `f` under loom with the preemption bound from `LOOM_MAX_PREEMPTIONS`
/// or [`PREEMPTIONS`], and reports how many executions it explored.
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(PREEMPTIONS);
    }
    // A plain std counter: loom does not track it.
    let executions = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&executions);
    let start = std::time::Instant::now();
    builder.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    eprintln!(
        "{name}: {} executions in {:.1?} (preemption bound {:?})",
        executions.load(Ordering::Relaxed),
        start.elapsed(),
        builder.preemption_bound,
    );
}

/// The fake G number `i` (never dereferenced).
fn g(i: usize) -> *mut u64 {
    ptr::without_provenance_mut(i + 1)
}

/// The number of the fake G `p`.
fn id(p: *mut u64) -> usize {
    assert!(!p.is_null(), "the queue handed out a null G");
    p.addr() - 1
}

/// Gets everything left in `q`, as (G number, inherit) pairs.
fn drain(q: &Q) -> Vec<(usize, bool)> {
    let mut out = Vec::new();
    while let Some((p, inherit)) = runqget(q) {
        out.push((id(p), inherit));
    }
    out
}

/// What the owner of a queue has seen of its Gs.
#[derive(Default)]
struct Owner {
    seen: Vec<usize>,
}

impl Owner {
    /// Puts G `i`, keeping what overflows.
    fn put(&mut self, q: &Q, i: usize, next: bool) {
        if let Some(batch) = runqput(q, g(i), next) {
            assert!(!batch.is_empty() && batch.len() <= RUNQ_BATCH);
            self.seen.extend(batch.iter().map(|&p| id(p)));
        }
    }

    /// Gets a G, if any; `runnext`'s comes flagged to inherit.
    fn get(&mut self, q: &Q) {
        if let Some((p, _)) = runqget(q) {
            self.seen.push(id(p));
        }
    }

    /// Gets all that is left.
    fn drain(&mut self, q: &Q) {
        self.seen.extend(drain(q).into_iter().map(|(i, _)| i));
    }
}

/// A thief with its own queue: steals from `victim` once per entry of
/// `steal_runnext` (its flag for that attempt) and returns every G it got
/// (run at once or queued on its own ring).
fn thief(victim: Arc<Q>, steal_runnext: &'static [bool]) -> thread::JoinHandle<Vec<usize>> {
    thread::spawn(move || {
        let own = Q::new();
        let mut seen = Vec::new();
        for &steal_runnext in steal_runnext {
            if let Some(gp) = runqsteal(&own, &victim, steal_runnext) {
                seen.push(id(gp));
                seen.extend(drain(&own).into_iter().map(|(i, _)| i));
            }
            assert!(runqempty(&own));
        }
        seen
    })
}

/// Asserts `seen` holds each of `0..n` exactly once.
fn assert_each_once(mut seen: Vec<usize>, n: usize) {
    seen.sort_unstable();
    assert!(
        seen.iter().copied().eq(0..n),
        "Gs lost, duplicated or foreign: saw {seen:?}, want 0..{n}"
    );
}

#[test]
fn owner_alone_puts_gets_and_overflows_in_order() {
    assert_eq!(RUNQ_LEN, 4);
    model("owner alone", || {
        let q = Q::new();
        for i in 0..RUNQ_LEN {
            assert!(runqput(&q, g(i), false).is_none());
        }
        // Full: the oldest half and the new G overflow, oldest first.
        let batch = runqput(&q, g(4), false).expect("no overflow");
        let batch: Vec<usize> = batch.iter().map(|&p| id(p)).collect();
        assert_eq!(batch, [0, 1, 4]);
        // runnext 5, then 6 displaces 5 to the tail: ring 2 3 5, full again
        // after 7, and the next displaced runnext (6) overflows.
        assert!(runqput(&q, g(5), true).is_none());
        assert!(runqput(&q, g(6), true).is_none());
        assert!(runqput(&q, g(7), false).is_none());
        let batch = runqput(&q, g(8), true).expect("no overflow");
        let batch: Vec<usize> = batch.iter().map(|&p| id(p)).collect();
        assert_eq!(batch, [2, 3, 6]);
        assert!(!runqempty(&q));
        assert_eq!(drain(&q), [(8, true), (5, false), (7, false)]);
        assert!(runqempty(&q));
    });
}

#[test]
fn a_thief_racing_the_owners_puts_and_gets_loses_nothing() {
    model("thief vs owner", || {
        let q = Arc::new(Q::new());
        let mut owner = Owner::default();
        owner.put(&q, 0, false);
        owner.put(&q, 1, false);
        let thief = thief(Arc::clone(&q), &[false, true, false]);
        // Fills the ring (overflowing if the thief has not stolen yet),
        // takes one, puts one more.
        owner.put(&q, 2, false);
        owner.put(&q, 3, false);
        owner.put(&q, 4, false);
        owner.get(&q);
        owner.put(&q, 5, true);
        owner.put(&q, 6, false);
        owner.get(&q);
        let stolen = thief.join().unwrap();
        owner.drain(&q);
        assert!(runqempty(&q));
        owner.seen.extend(stolen);
        assert_each_once(owner.seen, 7);
    });
}

#[test]
fn a_thief_of_a_thief_sees_the_gs_it_stole_published() {
    // The middle thread steals from the owner into its own ring (slots
    // written before the middle's tail is published) and gets from it,
    // while a second thief steals from the middle.
    model("thief of a thief", || {
        let q = Arc::new(Q::new());
        let mut owner = Owner::default();
        for i in 0..RUNQ_LEN {
            owner.put(&q, i, false);
        }
        let middle = Arc::new(Q::new());
        let last = thief(Arc::clone(&middle), &[true, true]);
        let mid = thread::spawn({
            let (q, middle) = (Arc::clone(&q), Arc::clone(&middle));
            move || {
                let mut seen = Vec::new();
                if let Some(gp) = runqsteal(&middle, &q, false) {
                    seen.push(id(gp));
                }
                if let Some((p, _)) = runqget(&middle) {
                    seen.push(id(p));
                }
                seen
            }
        });
        owner.get(&q);
        owner.put(&q, RUNQ_LEN, true);
        owner.seen.extend(mid.join().unwrap());
        owner.seen.extend(last.join().unwrap());
        owner.drain(&q);
        owner.drain(&middle);
        assert!(runqempty(&q) && runqempty(&middle));
        assert_each_once(owner.seen, RUNQ_LEN + 1);
    });
}

#[test]
fn two_thieves_racing_each_other_and_the_owner_lose_nothing() {
    model("two thieves vs owner", || {
        let q = Arc::new(Q::new());
        let mut owner = Owner::default();
        owner.put(&q, 0, false);
        owner.put(&q, 1, false);
        owner.put(&q, 2, false);
        let a = thief(Arc::clone(&q), &[false, true]);
        let b = thief(Arc::clone(&q), &[true]);
        owner.get(&q);
        owner.put(&q, 3, true);
        owner.put(&q, 4, false);
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        owner.drain(&q);
        assert!(runqempty(&q));
        owner.seen.extend(a);
        owner.seen.extend(b);
        assert_each_once(owner.seen, 5);
    });
}

#[test]
fn a_thief_stealing_runnext_while_the_owner_gets_and_replaces_it_loses_nothing() {
    model("runnext thief vs owner", || {
        let q = Arc::new(Q::new());
        let mut owner = Owner::default();
        owner.put(&q, 0, true);
        let thief = thief(Arc::clone(&q), &[true, true, true]);
        // 1 displaces 0 to the ring (unless stolen), gets 1 (or 0), then 2
        // into runnext and get again.
        owner.put(&q, 1, true);
        owner.get(&q);
        owner.put(&q, 2, true);
        owner.get(&q);
        let stolen = thief.join().unwrap();
        owner.drain(&q);
        assert!(runqempty(&q));
        owner.seen.extend(stolen);
        assert_each_once(owner.seen, 3);
    });
}

/// Go's `TestSchedLocalQueueEmpty`: G0 is queued (in `runnext` if
/// `next0`); while an observer calls `runqempty`, the owner puts G1 (in
/// `runnext` if `next1`) and gets one G. One G is queued throughout.
fn runqempty_scenario(next0: bool, next1: bool) {
    model(
        &format!("runqempty next0={next0} next1={next1}"),
        move || {
            let q = Arc::new(Q::new());
            assert!(runqput(&q, g(0), next0).is_none());
            let observer = thread::spawn({
                let q = Arc::clone(&q);
                move || assert!(!runqempty(&q), "runqempty said empty with a G queued")
            });
            assert!(runqput(&q, g(1), next1).is_none());
            let first = runqget(&q).expect("owner found its queue empty");
            observer.join().unwrap();
            let second = runqget(&q).expect("owner lost a G");
            assert!(runqempty(&q));
            assert_each_once(vec![id(first.0), id(second.0)], 2);
        },
    );
}

#[test]
fn runqempty_is_not_fooled_by_a_g_kicked_from_runnext_to_the_ring() {
    runqempty_scenario(true, true);
}

#[test]
fn runqempty_is_not_fooled_when_runnext_is_got_after_a_ring_put() {
    runqempty_scenario(true, false);
}

#[test]
fn runqempty_is_not_fooled_when_runnext_is_set_and_got_over_a_ring_g() {
    runqempty_scenario(false, true);
}

#[test]
fn runqempty_is_not_fooled_when_the_ring_is_put_and_got() {
    runqempty_scenario(false, false);
}
