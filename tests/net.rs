//! gokernel::net and the network poller: goroutines park on sockets and the
//! poller readies them; plain threads block; deadlines, close, load.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{in_crash_child, process_cpu, run_child_ok};
use gokernel::net::{TcpListener, TcpStream, UdpSocket, is_closed};
use gokernel::{Runtime, chan};

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

fn tid() -> i32 {
    // SAFETY: a plain system call.
    unsafe { libc::gettid() }
}

/// The bytes client `i` sends: distinct per client and position.
fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7 + j / 251) as u8).collect()
}

/// A listener whose every connection is echoed by a goroutine of its own,
/// until the peer closes.
fn echo_server() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn serve_echo(l: TcpListener) {
    loop {
        let (c, _) = match l.accept() {
            Ok(x) => x,
            Err(e) if is_closed(&e) => return,
            Err(e) => panic!("accept: {e}"),
        };
        gokernel::go(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = (&c).read(&mut buf).unwrap();
                if n == 0 {
                    return;
                }
                (&c).write_all(&buf[..n]).unwrap();
            }
        });
    }
}

fn accept_connect_read_write_across_goroutines(procs: usize) {
    let rt = rt(procs);
    rt.block_on(|| {
        let (l, addr) = echo_server();
        let l2 = l.try_clone().unwrap();
        gokernel::go(move || serve_echo(l2));
        let done = chan::<Vec<u8>>(0);
        for i in 0..8 {
            let done = done.clone();
            gokernel::go(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                assert_eq!(c.peer_addr().unwrap(), addr);
                assert_eq!(c.local_addr().unwrap().ip(), addr.ip());
                let msg = pattern(i, 100_000);
                // A writer goroutine and this reader on one connection.
                let w = c.try_clone().unwrap();
                let m2 = msg.clone();
                gokernel::go(move || {
                    (&w).write_all(&m2).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                assert!(got == msg, "client {i}: the echo differs");
                done.send(got).unwrap();
            });
        }
        for _ in 0..8 {
            done.recv().unwrap();
        }
        l.close();
    })
    .unwrap();
}

#[test]
fn accept_connect_read_write_across_goroutines_on_one_p() {
    accept_connect_read_write_across_goroutines(1);
}

#[test]
fn accept_connect_read_write_across_goroutines_on_two_ps() {
    accept_connect_read_write_across_goroutines(2);
}

#[test]
fn a_read_deadline_fires_in_a_goroutine_and_on_a_thread() {
    let (l, addr) = echo_server();
    let rt = rt(2);
    rt.block_on(move || {
        let c = TcpStream::connect(addr).unwrap();
        let (_peer, _) = l.accept().unwrap(); // connected, never writes
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        assert_eq!(c.read_timeout().unwrap(), Some(Duration::from_millis(50)));
        let t = Instant::now();
        let e = (&c).read(&mut [0; 8]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() >= Duration::from_millis(50));
        // The deadline is per call: the next read waits again, and data
        // that comes before its deadline is read (the writer writes once
        // the reader is parked).
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let peer = _peer;
        let w = gokernel::spawn(move || {
            while gokernel::stats().goroutines.waiting == 0 {
                gokernel::gosched();
            }
            (&peer).write_all(b"x").unwrap();
            peer
        });
        let mut b = [0; 1];
        assert_eq!((&c).read(&mut b).unwrap(), 1);
        drop(w.join().unwrap());
    })
    .unwrap();
    // On a plain thread: poll(2)'s timeout.
    let (l, addr) = echo_server();
    let c = TcpStream::connect(addr).unwrap();
    let _peer = l.accept().unwrap();
    c.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
    let t = Instant::now();
    let e = (&c).read(&mut [0; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(t.elapsed() >= Duration::from_millis(30));
    assert_eq!(
        c.set_read_timeout(Some(Duration::ZERO)).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn nonblocking_sockets_return_would_block_in_goroutines_and_threads() {
    let (l, addr) = echo_server();
    l.set_nonblocking(true).unwrap();
    assert_eq!(l.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
    rt(1)
        .block_on(move || {
            assert_eq!(l.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
            let c = TcpStream::connect(addr).unwrap();
            c.set_nonblocking(true).unwrap();
            assert_eq!(
                (&c).read(&mut [0; 4]).unwrap_err().kind(),
                ErrorKind::WouldBlock
            );
        })
        .unwrap();
}

/// The child of `a_poller_wake_up_while_every_m_is_idle_uses_no_cpu`.
#[test]
fn child_poller_wake_up_while_every_m_is_idle() {
    if !in_crash_child() {
        return;
    }
    let rt = rt(2);
    let (l, addr) = echo_server();
    let client = std::thread::spawn(move || TcpStream::connect(addr).unwrap());
    let (server_side, _) = l.accept().unwrap();
    let mut client = client.join().unwrap();
    let h = rt.spawn(move || {
        let mut b = [0u8; 3];
        (&server_side).read_exact(&mut b).unwrap();
        (&server_side).write_all(&b).unwrap();
    });
    // Wait until the goroutine is parked and every P is idle.
    let t = Instant::now();
    loop {
        let s = rt.stats();
        if s.goroutines.waiting == 1 && s.idle_ps == 2 && s.spinning_ms == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never all idle: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = process_cpu();
    std::thread::sleep(Duration::from_millis(200));
    let used = process_cpu() - before;
    client.write_all(b"abc").unwrap();
    let mut b = [0u8; 3];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"abc");
    h.join().unwrap();
    assert!(
        std::env::var_os("GOKERNEL_VALGRIND").is_some() || used < Duration::from_millis(10),
        "a runtime waiting on the poller used {used:?} of CPU in 200 ms"
    );
    println!("idle-poller-cpu-ok");
}

#[test]
fn a_poller_wake_up_while_every_m_is_idle_uses_no_cpu() {
    let c = run_child_ok("child_poller_wake_up_while_every_m_is_idle");
    assert!(
        c.stdout.contains("idle-poller-cpu-ok"),
        "{}{}",
        c.stdout,
        c.stderr
    );
}

#[test]
fn closing_a_socket_wakes_the_goroutine_parked_on_it() {
    let rt = rt(2);
    rt.block_on(|| {
        let (l, addr) = echo_server();
        let c = TcpStream::connect(addr).unwrap();
        let _peer = l.accept().unwrap();
        // A reader parked on the stream, an acceptor on the listener.
        let (c2, l2) = (c.try_clone().unwrap(), l.try_clone().unwrap());
        let r = gokernel::spawn(move || (&c2).read(&mut [0; 8]));
        let a = gokernel::spawn(move || l2.accept().map(drop));
        // Wait until both are parked (the main goroutine yields meanwhile).
        while gokernel::stats().goroutines.waiting < 2 {
            gokernel::gosched();
        }
        c.close();
        l.close();
        let e = r.join().unwrap().unwrap_err();
        assert!(is_closed(&e), "{e}");
        assert_eq!(e.kind(), ErrorKind::NotConnected);
        let e = a.join().unwrap().unwrap_err();
        assert!(is_closed(&e), "{e}");
        // Every later operation fails the same way.
        assert!(is_closed(&(&c).write(b"x").unwrap_err()));
    })
    .unwrap();
}

#[test]
fn closing_a_socket_wakes_a_thread_blocked_on_it() {
    let (l, addr) = echo_server();
    let c = TcpStream::connect(addr).unwrap();
    let _peer = l.accept().unwrap();
    let c2 = c.try_clone().unwrap();
    let t = std::thread::spawn(move || (&c2).read(&mut [0; 8]));
    // The thread may not be in poll(2) yet: close works either way.
    c.close();
    let e = t.join().unwrap().unwrap_err();
    assert!(is_closed(&e), "{e}");
}

/// 1,000 clients; 100 under Valgrind (`cargo xtask valgrind`), which runs
/// at most 500 threads and runs them one at a time.
fn clients() -> usize {
    if std::env::var_os("GOKERNEL_VALGRIND").is_some() {
        100
    } else {
        1000
    }
}
const BYTES: usize = 3000;

/// Raises the soft descriptor limit to the hard one (for thousands of
/// sockets).
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a live struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        r.rlim_cur
    }
}

#[test]
fn a_thousand_concurrent_echo_clients_from_goroutines_every_byte_checked() {
    assert!(raise_nofile() >= 2 * clients() as u64 + 100);
    let rt = rt(2);
    rt.block_on(|| {
        let (l, addr) = echo_server();
        let l2 = l.try_clone().unwrap();
        gokernel::go(move || serve_echo(l2));
        let wg = Arc::new(gokernel::sync::WaitGroup::new());
        let ok = Arc::new(AtomicUsize::new(0));
        for i in 0..clients() {
            wg.add(1);
            let (wg, ok) = (wg.clone(), ok.clone());
            gokernel::go(move || {
                let c = TcpStream::connect(addr).unwrap();
                let msg = pattern(i, BYTES);
                // In pieces, reading each back before the next.
                let mut got = vec![0u8; BYTES];
                for (k, chunk) in msg.chunks(1000).enumerate() {
                    (&c).write_all(chunk).unwrap();
                    (&c).read_exact(&mut got[k * 1000..k * 1000 + chunk.len()])
                        .unwrap();
                }
                assert!(got == msg, "client {i}: the echo differs");
                ok.fetch_add(1, Ordering::Relaxed);
                wg.done();
            });
        }
        wg.wait();
        assert_eq!(ok.load(Ordering::Relaxed), clients());
        l.close();
    })
    .unwrap();
}

#[test]
fn a_thousand_concurrent_echo_clients_from_threads_every_byte_checked() {
    assert!(raise_nofile() >= 2 * clients() as u64 + 100);
    let rt = rt(2);
    let (l, addr) = echo_server();
    let l2 = l.try_clone().unwrap();
    let server = rt.spawn(move || serve_echo(l2));
    let barrier = Arc::new(std::sync::Barrier::new(clients()));
    let threads: Vec<_> = (0..clients())
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let mut c = TcpStream::connect(addr).unwrap();
                    // All connected before anyone talks: 1,000 at once.
                    barrier.wait();
                    let msg = pattern(i, BYTES);
                    c.write_all(&msg).unwrap();
                    let mut got = vec![0u8; BYTES];
                    c.read_exact(&mut got).unwrap();
                    assert!(got == msg, "client {i}: the echo differs");
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    l.close();
    server.join().unwrap();
}

#[test]
fn a_bound_goroutine_continues_on_its_thread_after_a_poll_wake() {
    const N: usize = 64;
    let rt = rt(2);
    rt.block_on(|| {
        let (l, addr) = echo_server();
        let moved = Arc::new(AtomicUsize::new(0));
        let parks = Arc::new(AtomicUsize::new(0));
        let mut hs = Vec::new();
        for _ in 0..N {
            let (moved, parks) = (moved.clone(), parks.clone());
            let c = TcpStream::connect(addr).unwrap();
            hs.push(gokernel::spawn(move || {
                let mut b = [0u8; 1];
                for _ in 0..20 {
                    let before = tid();
                    (&c).read_exact(&mut b).unwrap(); // parks: the peer writes later
                    if tid() != before {
                        moved.fetch_add(1, Ordering::Relaxed);
                    }
                    parks.fetch_add(1, Ordering::Relaxed);
                    (&c).write_all(&b).unwrap();
                }
            }));
        }
        // The peers, from a plain thread: each byte after the echo of the
        // last, so every read finds nothing and parks.
        let peers: Vec<_> = (0..N).map(|_| l.accept().unwrap().0).collect();
        let t = std::thread::spawn(move || {
            for _ in 0..20 {
                for p in &peers {
                    (&*p).write_all(b"z").unwrap();
                }
                for p in &peers {
                    let mut b = [0u8; 1];
                    (&*p).read_exact(&mut b).unwrap();
                }
            }
        });
        for h in hs {
            h.join().unwrap();
        }
        t.join().unwrap();
        assert_eq!(parks.load(Ordering::Relaxed), N * 20);
        assert_eq!(
            moved.load(Ordering::Relaxed),
            0,
            "goroutines resumed on another thread"
        );
    })
    .unwrap();
}

#[test]
fn udp_datagrams_between_goroutines_and_a_thread() {
    let rt = rt(2);
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let h = rt.spawn(move || {
        // Parks until the thread sends.
        let mut buf = [0u8; 64];
        let (n, from) = a.recv_from(&mut buf).unwrap();
        assert_eq!(from, ba);
        a.send_to(&buf[..n], from).unwrap();
        a.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        assert_eq!(
            a.recv_from(&mut buf).unwrap_err().kind(),
            ErrorKind::TimedOut
        );
    });
    b.connect(aa).unwrap();
    assert_eq!(b.peer_addr().unwrap(), aa);
    b.send(b"ping").unwrap();
    let mut buf = [0u8; 64];
    let n = b.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
    h.join().unwrap();
}

#[test]
fn connect_to_a_closed_port_is_refused() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let e = rt(1)
        .block_on(move || TcpStream::connect(addr).unwrap_err())
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    assert_eq!(
        TcpStream::connect(addr).unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
}

#[test]
fn dropping_the_runtime_unwinds_a_goroutine_parked_on_a_socket() {
    let rt = rt(1);
    let (l, addr) = echo_server();
    let h = rt.spawn(move || {
        let c = TcpStream::connect(addr).unwrap();
        (&c).read(&mut [0; 1]).map(drop)
    });
    let _peer = l.accept().unwrap();
    let t = Instant::now();
    while rt.stats().goroutines.waiting != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the reader never parked"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(rt);
    let e = h.join().unwrap_err();
    assert!(e.downcast_ref::<gokernel::RuntimeDropped>().is_some());
}
