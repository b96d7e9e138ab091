//! The workloads of `examples/ops.rs`, on tokio: what
//! `cargo xtask bench --peers` runs beside gokernel, one process each.
//!
//! ```text
//! peers OP N [PROCS [MODE]]
//! ```
//!
//! The same OPs, N and PROCS as `ops`, and the same last line,
//! `result OP PROCS N VALUE UNIT tokio`. MODE, if given, must be `tokio`
//! (so `cargo xtask bench` can call both binaries alike). Each workload runs
//! as a task spawned from `block_on` (as `ops` runs it in a goroutine);
//! PROCS = 1 is tokio's `current_thread` runtime (its fastest on one
//! thread), PROCS > 1 its `multi_thread` runtime with that many workers.
//! The counterparts:
//!
//! - `gosched`: `tokio::task::yield_now` between two tasks;
//! - `spawn`, `spawn-alive`: `tokio::spawn` of an empty task, in batches
//!   of 1,000 / all N at once, the last one to finish waking the spawner
//!   through a `Notify`;
//! - `spawn-parked`: N tasks, each waiting on a `Semaphore` (0 permits)
//!   until all wait; timed from the first spawn until the last waits, then
//!   the semaphore is closed (as a Go channel is) and all finish, untimed;
//! - `handoff`: two tasks passing a token through two `Notify`s
//!   (`notify_one` stores a permit, as an `unpark` before `park` does);
//! - `handoff-chan`: two `mpsc::channel(1)`s, ping and pong (tokio has no
//!   unbuffered channel; a bound of 1 is its closest);
//! - `parked`: N tasks waiting on a `Notify` at once; RSS bytes per task;
//! - `work`: the same CPU-bound job over 64 tasks.
//!
//! `switch` and `handoff-cross` have no tokio counterpart: exit status 3.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{Notify, mpsc};

async fn gosched_pair(n: u64) {
    let hs: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..n / 2 {
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for h in hs {
        h.await.unwrap();
    }
}

async fn spawn_and_wait(k: u64) {
    let done = Arc::new(Notify::new());
    let pending = Arc::new(AtomicU64::new(k));
    for _ in 0..k {
        let (pending, done) = (pending.clone(), done.clone());
        tokio::spawn(async move {
            if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                done.notify_one();
            }
        });
    }
    while pending.load(Ordering::Acquire) != 0 {
        done.notified().await;
    }
}

/// `spawn-parked` (see the module docs): seconds from the first spawn
/// until the last task waits.
async fn spawn_parked(k: u64) -> f64 {
    let (ready, finished) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (parked, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let t = Instant::now();
    for _ in 0..k {
        let (ready, finished, parked, done, gate) = (
            ready.clone(),
            finished.clone(),
            parked.clone(),
            done.clone(),
            gate.clone(),
        );
        tokio::spawn(async move {
            if parked.fetch_add(1, Ordering::AcqRel) + 1 == k {
                ready.notify_one();
            }
            let _ = gate.acquire().await;
            if done.fetch_add(1, Ordering::AcqRel) + 1 == k {
                finished.notify_one();
            }
        });
    }
    while parked.load(Ordering::Acquire) != k {
        ready.notified().await;
    }
    let secs = t.elapsed().as_secs_f64();
    gate.close();
    while done.load(Ordering::Acquire) != k {
        finished.notified().await;
    }
    secs
}

async fn spawn_batches(n: u64) {
    const BATCH: u64 = 1000;
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH);
        left -= k;
        spawn_and_wait(k).await;
    }
}

async fn handoff(n: u64) {
    let (to_peer, to_main) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (tp, tm) = (to_peer.clone(), to_main.clone());
    let peer = tokio::spawn(async move {
        for _ in 0..n / 2 {
            tp.notified().await;
            tm.notify_one();
        }
    });
    for _ in 0..n / 2 {
        to_peer.notify_one();
        to_main.notified().await;
    }
    peer.await.unwrap();
}

async fn handoff_chan(n: u64) {
    let (ping, mut ping_rx) = mpsc::channel::<u64>(1);
    let (pong, mut pong_rx) = mpsc::channel::<u64>(1);
    let peer = tokio::spawn(async move {
        while let Some(v) = ping_rx.recv().await {
            pong.send(v + 1).await.unwrap();
        }
    });
    let mut v = 0;
    for _ in 0..n / 2 {
        ping.send(v).await.unwrap();
        v = pong_rx.recv().await.unwrap();
    }
    drop(ping);
    peer.await.unwrap();
    assert_eq!(v, n / 2);
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

async fn parked(n: u64) -> f64 {
    let before = rss_bytes();
    let go = Arc::new(Notify::new());
    let waiting = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..n)
        .map(|_| {
            let (go, waiting) = (go.clone(), waiting.clone());
            tokio::spawn(async move {
                let wait = go.notified();
                tokio::pin!(wait);
                // Registered as a waiter before it counts itself.
                wait.as_mut().enable();
                waiting.fetch_add(1, Ordering::AcqRel);
                wait.await;
            })
        })
        .collect();
    while waiting.load(Ordering::Acquire) < n {
        tokio::task::yield_now().await;
    }
    let per_task = rss_bytes().saturating_sub(before) as f64 / n as f64;
    go.notify_waiters();
    for h in hs {
        h.await.unwrap();
    }
    per_task
}

async fn work(n: u64) -> u64 {
    let hs: Vec<_> = (0..64u64)
        .map(|i| {
            tokio::spawn(async move {
                let mut x = i;
                for _ in 0..n / 64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                }
                x
            })
        })
        .collect();
    let mut a = 0;
    for h in hs {
        a ^= h.await.unwrap();
    }
    a
}

const USAGE: &str = "usage: peers OP N [PROCS [tokio]]
  OP:    gosched|spawn|spawn-alive|spawn-parked|handoff|handoff-chan|parked|work
  N:     operations (work: computation steps), a whole number > 0
  PROCS: worker threads, default 1 (1: the current_thread runtime)";

fn usage_error(problem: &str, status: i32) -> ! {
    eprintln!("peers: {problem}\n{USAGE}");
    std::process::exit(status)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 4 {
        usage_error("expected OP N [PROCS [tokio]]", 2);
    }
    let op = args[0].as_str();
    if matches!(op, "switch" | "handoff-cross") {
        usage_error(&format!("`{op}` has no tokio counterpart"), 3);
    }
    let Ok(n) = args[1].parse::<u64>() else {
        usage_error(&format!("N must be a whole number, not `{}`", args[1]), 2)
    };
    let procs: usize = match args.get(2).map(|a| a.parse()) {
        None => 1,
        Some(Ok(p)) if p > 0 => p,
        Some(_) => usage_error(
            &format!("PROCS must be a whole number > 0, not `{}`", args[2]),
            2,
        ),
    };
    if let Some(m) = args.get(3).filter(|m| *m != "tokio") {
        usage_error(&format!("MODE must be `tokio`, not `{m}`"), 2);
    }
    let rt = if procs == 1 {
        tokio::runtime::Builder::new_current_thread().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(procs)
            .build()
    }
    .unwrap();
    // Timed inside the main task, as gokernel's `ops` times its main
    // goroutine and Go's its main goroutine: neither the runtime's start-up
    // nor the hand-over of the task to a worker is the workload's.
    let timed = |run: Pin<Box<dyn Future<Output = ()> + Send>>| -> f64 {
        rt.block_on(async move {
            tokio::spawn(async move {
                let t = Instant::now();
                run.await;
                t.elapsed().as_secs_f64()
            })
            .await
            .unwrap()
        })
    };
    let (value, unit) = match op {
        "gosched" | "spawn" | "spawn-alive" | "handoff" | "handoff-chan" => {
            let run: Pin<Box<dyn Future<Output = ()> + Send>> = match op {
                "gosched" => Box::pin(gosched_pair(n)),
                "spawn" => Box::pin(spawn_batches(n)),
                "spawn-alive" => Box::pin(spawn_and_wait(n)),
                "handoff" => Box::pin(handoff(n)),
                _ => Box::pin(handoff_chan(n)),
            };
            (timed(run) * 1e9 / n as f64, "ns/op")
        }
        "spawn-parked" => (
            rt.block_on(async move { tokio::spawn(spawn_parked(n)).await.unwrap() }) * 1e9
                / n as f64,
            "ns/op",
        ),
        "parked" => (
            rt.block_on(async move { tokio::spawn(parked(n)).await.unwrap() }),
            "B/G",
        ),
        "work" => (
            timed(Box::pin(async move {
                std::hint::black_box(work(n).await);
            })),
            "s",
        ),
        other => usage_error(&format!("unknown OP `{other}`"), 2),
    };
    println!("result {op} {procs} {n} {value:.2} {unit} tokio");
}
