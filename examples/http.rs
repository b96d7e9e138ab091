//! A minimal HTTP/1.1 "hello" server with keep-alive: one goroutine per
//! connection, each parked in `read` between requests.
//!
//! ```sh
//! cargo run --release --example http [ADDR] [PROCS] [bound|migrate]   # default 127.0.0.1:8080, one P per CPU, bound
//! curl http://127.0.0.1:8080/                          # Hello, World!
//! ```
//!
//! It answers every request (pipelined ones too) with `200 OK` and a
//! 13-byte body, keeps the connection open unless the client sends
//! `Connection: close`, and ignores request bodies (it is for `GET`).
//! It prints `listening on ADDR` and serves until killed;
//! `cargo xtask http-bench` loads it with `wrk`, in both thread-binding
//! modes: `bound` (the default: a goroutine resumes on its own thread, so
//! the poller's M wakes that thread for it) and `migrate` (Go's behaviour,
//! the `unsafe` opt-in: whichever M finds it runs it).

use std::io::{Read, Write};

use gokernel::net::{TcpListener, TcpStream};

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!";

fn main() {
    raise_nofile();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let mut b = gokernel::Runtime::builder();
    if let Some(p) = args.next() {
        b = b.procs(p.parse().expect("PROCS: a number of Ps"));
    }
    match args.next().as_deref() {
        None | Some("bound") => {}
        // SAFETY: no goroutine of this program keeps anything that depends
        // on its thread (a thread-local, a lock guard of std) across a
        // read or a write, where it may move.
        Some("migrate") => b = unsafe { b.migrate_started_goroutines() },
        Some(m) => panic!("MODE: bound or migrate, not {m}"),
    }
    let rt = b.build().expect("build the runtime");
    rt.block_on(move || {
        let l = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        println!("listening on {}", l.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        loop {
            match l.accept() {
                Ok((c, _)) => gokernel::go(move || serve(c)),
                Err(e) => eprintln!("accept: {e}"),
            }
        }
    })
    .expect("the server never returns");
}

/// Serves one connection until the client closes it, asks to, or errs.
fn serve(c: TcpStream) {
    let _ = c.set_nodelay(true);
    let mut buf = vec![0u8; 8192];
    let mut have = 0;
    let mut out = Vec::with_capacity(RESPONSE.len() * 4);
    loop {
        let n = match (&c).read(&mut buf[have..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        have += n;
        // Every complete request head in the buffer gets its response.
        let (mut start, mut close) = (0, false);
        while let Some(end) = find(&buf[start..have], b"\r\n\r\n") {
            let head = &buf[start..start + end];
            close |= wants_close(head);
            out.extend_from_slice(RESPONSE);
            start += end + 4;
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if have == buf.len() {
            // A request head larger than the buffer.
            let _ = (&c).write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        }
        if !out.is_empty() {
            if (&c).write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
        if close {
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether the head has `Connection: close`.
fn wants_close(head: &[u8]) -> bool {
    head.split(|&b| b == b'\n').any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with(b"connection:") && find(&line, b"close").is_some()
    })
}

/// Raises the soft descriptor limit to the hard one (for thousands of
/// connections).
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on a live struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}
