//! Channels: Go's `chan_test.go` semantics (TestChan for every capacity
//! 0..20, TestMultiConsumer), plus plain threads, close, and a runtime
//! dropped while a goroutine waits on a channel that outlives it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

mod common;

use gokernel::sync::WaitGroup;
use gokernel::{Chan, CloseError, Runtime, SendError, TryRecvError, TrySendError, chan};

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

/// Lets other goroutines run for a while (there is no preemption, so a
/// goroutine that should be blocked has had every chance to run).
fn let_others_run() {
    for _ in 0..200 {
        gokernel::gosched();
    }
}

#[test]
fn every_capacity_0_to_20_blocks_hands_over_and_closes_like_go() {
    rt(2)
        .block_on(|| {
            for cap in 0..=20usize {
                // A receive from an empty channel blocks.
                let c = chan::<usize>(cap);
                let got = Arc::new(AtomicBool::new(false));
                let h = {
                    let (c, got) = (c.clone(), got.clone());
                    gokernel::spawn(move || {
                        let v = c.recv();
                        got.store(true, Ordering::SeqCst);
                        v
                    })
                };
                let_others_run();
                assert!(
                    !got.load(Ordering::SeqCst),
                    "cap {cap}: received from an empty channel"
                );
                c.send(0).unwrap();
                assert_eq!(h.join().unwrap(), Ok(0), "cap {cap}");

                // Non-blocking receive from an empty channel.
                assert_eq!(c.try_recv(), Err(TryRecvError::Empty), "cap {cap}");

                // Sends fill the buffer; then a send blocks.
                for i in 0..cap {
                    c.try_send(i).unwrap();
                }
                assert!(
                    matches!(c.try_send(99), Err(TrySendError::Full(99))),
                    "cap {cap}"
                );
                let sent = Arc::new(AtomicBool::new(false));
                let h = {
                    let (c, sent) = (c.clone(), sent.clone());
                    gokernel::spawn(move || {
                        c.send(cap).unwrap();
                        sent.store(true, Ordering::SeqCst);
                    })
                };
                let_others_run();
                assert!(
                    !sent.load(Ordering::SeqCst),
                    "cap {cap}: sent to a full channel"
                );
                // FIFO: the buffered values, then the blocked sender's.
                for i in 0..=cap {
                    assert_eq!(c.recv(), Ok(i), "cap {cap}");
                }
                h.join().unwrap();
                assert!(sent.load(Ordering::SeqCst));

                // len and cap.
                for i in 0..cap {
                    c.try_send(i).unwrap();
                    assert_eq!(c.len(), i + 1, "cap {cap}");
                }
                assert_eq!(c.cap(), cap);

                // A closed channel drains its buffer in order, then reports
                // closed, every time.
                c.close().unwrap();
                for i in 0..cap {
                    assert_eq!(c.recv(), Ok(i), "cap {cap}");
                }
                for _ in 0..3 {
                    assert_eq!(c.recv(), Err(gokernel::RecvError));
                    assert_eq!(c.try_recv(), Err(TryRecvError::Closed));
                }
                assert_eq!(c.send(5), Err(SendError(5)));
                assert!(matches!(c.try_send(6), Err(TrySendError::Closed(6))));
                assert_eq!(c.close(), Err(CloseError));

                // Close wakes a blocked receiver.
                let c = chan::<usize>(cap);
                let h = {
                    let c = c.clone();
                    gokernel::spawn(move || c.recv())
                };
                let_others_run();
                c.close().unwrap();
                assert_eq!(h.join().unwrap(), Err(gokernel::RecvError), "cap {cap}");

                // 100 values arrive intact and in order.
                let c = chan::<usize>(cap);
                {
                    let c = c.clone();
                    gokernel::go(move || {
                        for i in 0..100 {
                            c.send(i).unwrap();
                        }
                    });
                }
                for i in 0..100 {
                    assert_eq!(c.recv(), Ok(i), "cap {cap}");
                }

                // 4 producers x 4 consumers x 1,000 values: each value is seen
                // exactly as often as it was sent.
                let c = chan::<usize>(cap);
                let consumers: Vec<_> = (0..4)
                    .map(|_| {
                        let c = c.clone();
                        gokernel::spawn(move || {
                            let mut seen = HashMap::new();
                            for _ in 0..1000 {
                                *seen.entry(c.recv().unwrap()).or_insert(0usize) += 1;
                            }
                            seen
                        })
                    })
                    .collect();
                for _ in 0..4 {
                    let c = c.clone();
                    gokernel::go(move || {
                        for i in 0..1000 {
                            c.send(i).unwrap();
                        }
                    });
                }
                let mut total: HashMap<usize, usize> = HashMap::new();
                for h in consumers {
                    for (v, n) in h.join().unwrap() {
                        *total.entry(v).or_default() += n;
                    }
                }
                assert_eq!(total.len(), 1000, "cap {cap}: values lost or invented");
                assert!(
                    total.values().all(|&n| n == 4),
                    "cap {cap}: a value not seen 4 times"
                );
            }
        })
        .unwrap();
}

#[test]
fn a_sender_blocked_when_the_channel_closes_gets_its_value_back() {
    rt(2)
        .block_on(|| {
            for cap in [0, 1] {
                let c = chan::<String>(cap);
                for i in 0..cap {
                    c.send(i.to_string()).unwrap();
                }
                let h = {
                    let c = c.clone();
                    gokernel::spawn(move || c.send("mine".to_string()))
                };
                let_others_run();
                c.close().unwrap();
                assert_eq!(h.join().unwrap(), Err(SendError("mine".to_string())));
            }
        })
        .unwrap();
}

#[test]
fn twenty_three_workers_sum_271828_items_with_count_and_sum_kept() {
    // Go's TestMultiConsumer.
    const NWORK: usize = 23;
    const NITER: usize = 271_828;
    const PN: [u64; 10] = [2, 3, 7, 11, 13, 17, 19, 23, 27, 31];
    rt(2)
        .block_on(|| {
            let q = chan::<u64>(NWORK * 3);
            let r = chan::<u64>(NWORK * 3);
            let wg = Arc::new(WaitGroup::new());
            for w in 0..NWORK {
                wg.add(1);
                let (q, r, wg) = (q.clone(), r.clone(), wg.clone());
                gokernel::go(move || {
                    for v in &q {
                        // Mess with the FIFO-ish order.
                        if PN[w % PN.len()] == v {
                            gokernel::gosched();
                        }
                        r.send(v).unwrap();
                    }
                    wg.done();
                });
            }
            let expect = {
                let (q, r, wg) = (q.clone(), r.clone(), wg.clone());
                gokernel::spawn(move || {
                    let mut expect = 0u64;
                    for i in 0..NITER {
                        let v = PN[i % PN.len()];
                        expect += v;
                        q.send(v).unwrap();
                    }
                    q.close().unwrap();
                    wg.wait();
                    r.close().unwrap();
                    expect
                })
            };
            let (mut n, mut s) = (0usize, 0u64);
            for v in &r {
                n += 1;
                s += v;
            }
            assert_eq!(n, NITER);
            assert_eq!(s, expect.join().unwrap());
        })
        .unwrap();
}

#[test]
fn plain_threads_and_goroutines_talk_over_channels_both_ways() {
    let to_g = chan::<u32>(0);
    let from_g = chan::<u32>(0);
    let r = rt(2);
    let (a, b) = (to_g.clone(), from_g.clone());
    let echo = std::thread::spawn({
        let (a, b) = (to_g.clone(), from_g.clone());
        move || {
            // A plain thread sends to a goroutine and blocks on its reply.
            let mut sum = 0;
            for i in 0..1000 {
                a.send(i).unwrap();
                sum += b.recv().unwrap();
            }
            a.close().unwrap();
            sum
        }
    });
    // `spawn` + `join` waits as long as it takes (`block_on` would too
    // here, since the channels were made on this thread: see
    // docs/failures.md, Deadlock).
    r.spawn(move || {
        for v in &a {
            b.send(v * 2).unwrap();
        }
    })
    .join()
    .unwrap();
    assert_eq!(echo.join().unwrap(), 2 * (0..1000).sum::<u32>());
}

#[test]
fn plain_threads_alone_use_a_channel_without_a_runtime() {
    let c: Chan<usize> = chan(0);
    let producer = {
        let c = c.clone();
        std::thread::spawn(move || {
            for i in 0..10_000 {
                c.send(i).unwrap();
            }
            c.close().unwrap();
        })
    };
    let mut next = 0;
    for v in &c {
        assert_eq!(v, next);
        next += 1;
    }
    producer.join().unwrap();
    assert_eq!(next, 10_000);
}

#[test]
fn a_channel_outlives_a_runtime_whose_goroutines_wait_on_it() {
    // Goroutines of a dropped runtime never run again; the channel they
    // waited on must not keep pointers into their freed stacks.
    let c = chan::<Vec<u8>>(0);
    let started = Arc::new(AtomicUsize::new(0));
    {
        let r = rt(2);
        for _ in 0..4 {
            let (c, started) = (c.clone(), started.clone());
            r.spawn(move || {
                started.fetch_add(1, Ordering::SeqCst);
                c.recv()
            });
        }
        let (c2, started2) = (c.clone(), started.clone());
        r.spawn(move || {
            started2.fetch_add(1, Ordering::SeqCst);
            c2.send(vec![1; 100])
        });
        // One receiver gets the value; three are left waiting.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while started.load(Ordering::SeqCst) < 5 || r.num_goroutine() != 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the goroutines did not settle"
            );
            std::thread::yield_now();
        }
    }
    // No receiver is left: the send cannot go through, and nothing
    // crashes (run under `cargo xtask valgrind` to see the memory).
    assert!(matches!(
        c.try_send(vec![2; 100]),
        Err(TrySendError::Full(_))
    ));
    let c2 = c.clone();
    let t = std::thread::spawn(move || c2.recv());
    std::thread::sleep(std::time::Duration::from_millis(20));
    c.send(vec![3]).unwrap();
    assert_eq!(t.join().unwrap(), Ok(vec![3]));
}

#[test]
fn goroutines_that_wait_after_their_runtimes_drop_began_leave_channels_and_mutexes_usable() {
    // A goroutine that was runnable when its runtime's drop began resumes
    // with "unwind at your next park"; its next wait (a receive, a select,
    // a contended lock) holds the object's lock with its sudogs queued
    // when it gets there. It must give both back before unwinding: left
    // behind, the lock spun every later user for ever and the queue kept
    // pointers into the unwound frame.
    for procs in [1, 2] {
        let (c, d) = (chan::<u32>(0), chan::<u32>(0));
        let m: &'static gokernel::sync::Mutex<u32> =
            Box::leak(Box::new(gokernel::sync::Mutex::new(0)));
        let held = m.lock(); // held by this thread through the drop
        let started = Arc::new(AtomicUsize::new(0));
        let r = rt(procs);
        for kind in 0..3 {
            let (c, d, started) = (c.clone(), d.clone(), started.clone());
            drop(r.spawn(move || {
                started.fetch_add(1, Ordering::SeqCst);
                while !gokernel::shutting_down() {
                    gokernel::gosched();
                }
                // Runnable here when the teardown finds it: resumed to
                // unwind at its next park, which is the wait below.
                gokernel::gosched();
                match kind {
                    0 => drop(c.recv()),
                    1 => gokernel::select! {
                        recv(c) -> _v => {},
                        recv(d) -> _v => {},
                    },
                    _ => drop(m.lock()),
                }
                unreachable!("the wait returned");
            }));
        }
        while started.load(Ordering::SeqCst) < 3 {
            std::thread::yield_now();
        }
        common::within(60, "the runtime's drop", move || drop(r));
        common::within(60, "using the objects after the drop", move || {
            assert!(matches!(c.try_send(1), Err(TrySendError::Full(1))));
            assert!(matches!(d.try_send(2), Err(TrySendError::Full(2))));
            drop(held);
            *m.lock() += 1;
        });
        assert_eq!(*m.lock(), 1, "{procs} procs");
    }
}

#[test]
fn a_goroutine_waiting_on_a_channel_nobody_can_send_on_is_a_deadlock() {
    let r = rt(2);
    let res = r.block_on(|| {
        let c = chan::<u8>(0);
        let _ = c.recv();
    });
    let d = res.unwrap_err();
    assert_eq!(
        d.goroutines()[0].wait_reason,
        Some(gokernel::WaitReason::ChanReceive),
        "{d}"
    );
}

#[test]
fn a_huge_capacity_is_a_clear_panic() {
    let err = std::panic::catch_unwind(|| chan::<[u8; 4096]>(usize::MAX / 8192)).unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(msg.contains("does not fit in memory"), "{msg}");
}
