//! `select!` and `Select`: Go's select tests (TestSelfSelect,
//! TestSelectStress, fairness), default, closed channels, the same channel
//! in two cases, plain threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gokernel::select::{RecvCase, Select, SelectCase, SendCase};
use gokernel::sync::WaitGroup;
use gokernel::{Chan, Runtime, chan, select};

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

#[test]
fn select_picks_uniformly_among_two_always_ready_channels() {
    rt(1)
        .block_on(|| {
            let (a, b) = (chan::<()>(1), chan::<()>(1));
            let (mut na, mut nb) = (0, 0);
            for _ in 0..10_000 {
                a.try_send(()).ok();
                b.try_send(()).ok();
                select! {
                    recv(a) -> _v => na += 1,
                    recv(b) -> _v => nb += 1,
                }
            }
            assert_eq!(na + nb, 10_000);
            assert!((4500..=5500).contains(&na), "a chosen {na} times, b {nb}");
            assert!((4500..=5500).contains(&nb), "a chosen {na} times, b {nb}");
        })
        .unwrap();
}

#[test]
fn a_goroutine_never_receives_its_own_send_on_an_unbuffered_channel() {
    // Go's TestSelfSelect: send and receive on the same channel in one
    // select, from two goroutines; neither deadlocks nor receives itself.
    rt(2).block_on(|| {
        for cap in [0usize, 10] {
            let c = chan::<usize>(cap);
            let hs: Vec<_> = (0..2usize)
                .map(|p| {
                    let c = c.clone();
                    gokernel::spawn(move || {
                        let mut self_receives = 0;
                        for i in 0..1000 {
                            if p == 0 || i % 2 == 0 {
                                select! {
                                    send(c, p) -> r => r.unwrap(),
                                    recv(c) -> v => if cap == 0 && v.unwrap() == p { self_receives += 1 },
                                }
                            } else {
                                select! {
                                    recv(c) -> v => if cap == 0 && v.unwrap() == p { self_receives += 1 },
                                    send(c, p) -> r => r.unwrap(),
                                }
                            }
                        }
                        self_receives
                    })
                })
                .collect();
            for h in hs {
                assert_eq!(h.join().unwrap(), 0, "cap {cap}: a goroutine received its own send");
            }
        }
    })
    .unwrap();
}

#[test]
fn select_stress_over_capacities_0_0_2_3_on_ten_goroutines_finishes() {
    // Go's TestSelectStress: 4 senders and 4 receivers, one per channel,
    // plus one goroutine sending and one receiving on all four in a single
    // select, dropping each channel from its select once it has done N.
    let n: usize = if cfg!(debug_assertions) {
        5_000
    } else {
        50_000
    };
    rt(2)
        .block_on(move || {
            let c: Vec<Chan<usize>> = [0, 0, 2, 3].into_iter().map(chan).collect();
            let wg = Arc::new(WaitGroup::new());
            wg.add(10);
            for ch in &c {
                let (ck, wg1) = (ch.clone(), wg.clone());
                gokernel::go(move || {
                    for _ in 0..n {
                        ck.send(0).unwrap();
                    }
                    wg1.done();
                });
                let (ck, wg2) = (ch.clone(), wg.clone());
                gokernel::go(move || {
                    for _ in 0..n {
                        ck.recv().unwrap();
                    }
                    wg2.done();
                });
            }
            let (cs, wg1) = (c.clone(), wg.clone());
            gokernel::go(move || {
                let mut done = [0usize; 4];
                for _ in 0..4 * n {
                    let open: Vec<usize> = (0..4).filter(|&k| done[k] < n).collect();
                    let mut cases: Vec<SendCase<'_, usize>> =
                        open.iter().map(|&k| SendCase::new(&cs[k], 0)).collect();
                    let mut sel = Select::new();
                    for case in &mut cases {
                        sel = sel.case(case);
                    }
                    let i = sel.wait();
                    cases.swap_remove(i).finish().unwrap();
                    done[open[i]] += 1;
                }
                wg1.done();
            });
            let (cs, wg2) = (c.clone(), wg.clone());
            gokernel::go(move || {
                let mut done = [0usize; 4];
                for _ in 0..4 * n {
                    let open: Vec<usize> = (0..4).filter(|&k| done[k] < n).collect();
                    let mut cases: Vec<RecvCase<'_, usize>> =
                        open.iter().map(|&k| RecvCase::new(&cs[k])).collect();
                    let mut sel = Select::new();
                    for case in &mut cases {
                        sel = sel.case(case);
                    }
                    let i = sel.wait();
                    assert_eq!(cases.swap_remove(i).finish(), Ok(0));
                    done[open[i]] += 1;
                }
                wg2.done();
            });
            wg.wait();
            for ch in &c {
                assert!(ch.is_empty());
            }
        })
        .unwrap();
}

#[test]
fn default_runs_when_no_case_is_ready_and_only_then() {
    rt(1)
        .block_on(|| {
            let (a, full) = (chan::<u8>(0), chan::<u8>(1));
            full.send(1).unwrap();
            let r = select! {
                recv(a) -> _v => "recv",
                send(full, 2) -> _r => "send",
                default => "default",
            };
            assert_eq!(r, "default");
            // Nothing was sent or taken.
            assert_eq!(full.try_recv(), Ok(1));
            let r = select! {
                send(full, 3) -> res => { res.unwrap(); "send" }
                default => { "default" }
            };
            assert_eq!(r, "send");
            assert_eq!(full.try_recv(), Ok(3));
        })
        .unwrap();
}

#[test]
fn a_select_waits_until_a_case_can_proceed() {
    rt(2)
        .block_on(|| {
            let (a, b) = (chan::<u32>(0), chan::<u32>(0));
            let fired = Arc::new(AtomicBool::new(false));
            let h = {
                let (a, b, fired) = (a.clone(), b.clone(), fired.clone());
                gokernel::spawn(move || {
                    let r = select! {
                        recv(a) -> v => ("a", v.unwrap()),
                        recv(b) -> v => ("b", v.unwrap()),
                    };
                    fired.store(true, Ordering::SeqCst);
                    r
                })
            };
            for _ in 0..200 {
                gokernel::gosched();
            }
            assert!(
                !fired.load(Ordering::SeqCst),
                "select fired with nothing ready"
            );
            b.send(7).unwrap();
            assert_eq!(h.join().unwrap(), ("b", 7));
            // Its sudog on `a` is gone: a later receiver on `a` gets the value.
            let h = {
                let a = a.clone();
                gokernel::spawn(move || a.recv())
            };
            a.send(8).unwrap();
            assert_eq!(h.join().unwrap(), Ok(8));
        })
        .unwrap();
}

#[test]
fn a_waiting_select_send_case_hands_its_value_to_a_later_receiver() {
    rt(2)
        .block_on(|| {
            let (a, b) = (chan::<String>(0), chan::<String>(0));
            let h = {
                let (a, b) = (a.clone(), b.clone());
                gokernel::spawn(move || {
                    select! {
                        send(a, "to a".to_string()) -> r => { r.unwrap(); "a" }
                        send(b, "to b".to_string()) -> r => { r.unwrap(); "b" }
                    }
                })
            };
            for _ in 0..100 {
                gokernel::gosched();
            }
            assert_eq!(b.recv().unwrap(), "to b");
            assert_eq!(h.join().unwrap(), "b");
            assert_eq!(a.try_recv(), Err(gokernel::TryRecvError::Empty));
        })
        .unwrap();
}

#[test]
fn a_closed_channel_makes_its_cases_ready() {
    rt(2)
        .block_on(|| {
            let (a, b) = (chan::<u8>(0), chan::<u8>(0));
            let h = {
                let (a, b) = (a.clone(), b.clone());
                gokernel::spawn(move || {
                    select! {
                        recv(a) -> v => v.is_err(),
                        send(b, 1) -> r => r.is_err(),
                    }
                })
            };
            for _ in 0..100 {
                gokernel::gosched();
            }
            a.close().unwrap();
            assert!(h.join().unwrap(), "the select did not see the close");
            b.close().unwrap();
            let r = select! {
                send(b, 9) -> r => r.map_err(|e| e.0),
            };
            assert_eq!(r, Err(9));
        })
        .unwrap();
}

#[test]
fn the_same_channel_in_two_receive_cases_fires_once_and_leaves_no_sudog() {
    rt(2)
        .block_on(|| {
            let c = chan::<u32>(0);
            for round in 0..100 {
                let h = {
                    let c = c.clone();
                    gokernel::spawn(move || {
                        select! {
                            recv(c) -> v => v.unwrap(),
                            recv(c) -> v => v.unwrap() + 1000,
                        }
                    })
                };
                c.send(round).unwrap();
                let got = h.join().unwrap();
                assert!(got == round || got == round + 1000);
            }
            // No stale sudog remains: nobody is waiting now.
            assert!(matches!(
                c.try_send(1),
                Err(gokernel::TrySendError::Full(1))
            ));
        })
        .unwrap();
}

/// Go's TestPseudoRandomSend: a select with two send cases on the same
/// channel (`c <- 1`, `c <- 0`); a receiver that arrives after the select
/// has queued (it yields first) must find either case with fair odds, not
/// always the first one queued.
#[test]
fn a_waiting_select_with_two_sends_on_one_channel_fires_either_at_random() {
    let n = 100;
    for procs in [1, 2] {
        for cap in [0, n] {
            let counts = rt(procs)
                .block_on(move || {
                    let c = chan::<usize>(cap);
                    let rx = c.clone();
                    let h = gokernel::spawn(move || {
                        (0..n)
                            .map(|_| {
                                gokernel::gosched();
                                rx.recv().unwrap()
                            })
                            .collect::<Vec<_>>()
                    });
                    for _ in 0..n {
                        select! {
                            send(c, 1) -> r => r.unwrap(),
                            send(c, 0) -> r => r.unwrap(),
                        }
                    }
                    let l = h.join().unwrap();
                    let ones = l.iter().sum::<usize>();
                    (n - ones, ones)
                })
                .unwrap();
            let (zeros, ones) = counts;
            assert!(
                zeros > n / 10 && ones > n / 10,
                "want pseudorandom, got {zeros} zeros and {ones} ones \
                 (chan cap {cap}, {procs} procs)"
            );
        }
    }
}

/// A value whose `Drop` uses the channel it came from (takes its lock).
struct TouchesItsChannel(Chan<TouchesItsChannel>);

impl Drop for TouchesItsChannel {
    fn drop(&mut self) {
        let _ = self.0.len();
    }
}

#[test]
fn a_reused_receive_case_drops_its_old_value_outside_the_channel_lock() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = rt(1).block_on(|| {
            let c = chan::<TouchesItsChannel>(2);
            c.send(TouchesItsChannel(c.clone())).unwrap();
            c.send(TouchesItsChannel(c.clone())).unwrap();
            let mut case = RecvCase::new(&c);
            assert_eq!(Select::new().case(&mut case).wait(), 0);
            // The case still holds the first value; reusing it drops that
            // value, whose Drop locks the channel.
            assert_eq!(Select::new().case(&mut case).wait(), 0);
            let v = case.finish().unwrap();
            // Break the cycle the value holds.
            drop(v);
            c.len()
        });
        tx.send(r).unwrap();
    });
    assert_eq!(
        rx.recv_timeout(std::time::Duration::from_secs(20)),
        Ok(Ok(0)),
        "the select hung: the old value was dropped under the channel's lock"
    );
}

#[test]
fn an_empty_select_waits_forever_and_is_a_deadlock_alone() {
    let r = rt(1).block_on(|| {
        select! {}
    });
    let d = r.unwrap_err();
    assert_eq!(
        d.goroutines()[0].wait_reason,
        Some(gokernel::WaitReason::SelectNoCases),
        "{d}"
    );
    let r = rt(1).block_on(|| {
        select! {
            default => 5,
        }
    });
    assert_eq!(r, Ok(5));
}

#[test]
fn plain_threads_select_too() {
    let (a, b) = (chan::<u32>(0), chan::<u32>(0));
    let t = {
        let (a, b) = (a.clone(), b.clone());
        std::thread::spawn(move || {
            let mut sum = 0;
            for _ in 0..2000 {
                sum += select! {
                    recv(a) -> v => v.unwrap(),
                    recv(b) -> v => v.unwrap() * 10,
                };
            }
            sum
        })
    };
    let r = rt(2);
    let hs: Vec<_> = [a, b]
        .into_iter()
        .map(|c| {
            r.spawn(move || {
                for _ in 0..1000 {
                    c.send(1).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(t.join().unwrap(), 1000 + 10_000);
}

#[test]
fn a_case_type_erased_by_hand_runs_through_select() {
    // The builder accepts any case through the trait object.
    rt(1)
        .block_on(|| {
            let c = chan::<&'static str>(1);
            c.send("x").unwrap();
            let mut r = RecvCase::new(&c);
            let case: &mut dyn SelectCase = &mut r;
            assert_eq!(Select::new().case(case).try_wait(), Some(0));
            assert_eq!(r.finish(), Ok("x"));
        })
        .unwrap();
}

#[test]
fn after_delivers_one_value_after_its_duration_and_times_out_a_select() {
    use std::time::{Duration, Instant};
    rt(2)
        .block_on(|| {
            // One value, not before the deadline, and only one.
            let t = Instant::now();
            let a = gokernel::after(Duration::from_millis(30));
            assert_eq!(a.try_recv(), Err(gokernel::TryRecvError::Empty));
            a.recv().unwrap();
            assert!(
                t.elapsed() >= Duration::from_millis(30),
                "fired after {:?}",
                t.elapsed()
            );
            assert_eq!(a.try_recv(), Err(gokernel::TryRecvError::Empty));

            // A select with a timeout: the timeout fires when nothing else is
            // ready, and not when something is.
            let never = chan::<u32>(0);
            let t = Instant::now();
            let timed_out = select! {
                recv(never) -> _v => false,
                recv(gokernel::after(Duration::from_millis(20))) -> _t => true,
            };
            assert!(timed_out && t.elapsed() >= Duration::from_millis(20));
            let ready = chan::<u32>(1);
            ready.send(5).unwrap();
            let got = select! {
                recv(ready) -> v => v.unwrap(),
                recv(gokernel::after(Duration::from_secs(60))) -> _t => 0,
            };
            assert_eq!(got, 5);
        })
        .unwrap();
}
