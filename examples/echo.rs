//! A TCP echo server: one goroutine per connection, parked in `read`
//! while its client is quiet (the network poller wakes it).
//!
//! ```sh
//! cargo run --release --example echo [ADDR] [PROCS]   # default 127.0.0.1:7007, one P per CPU
//! ```
//!
//! It prints `listening on ADDR` (the port chosen, for `:0`) and serves
//! until killed. `cargo xtask http-bench` uses it for the idle-connection
//! memory figure: 10,000 clients, each with its goroutine parked here.

use std::io::{Read, Write};

use gokernel::net::{TcpListener, TcpStream};

fn main() {
    raise_nofile();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7007".into());
    let mut b = gokernel::Runtime::builder();
    if let Some(p) = args.next() {
        b = b.procs(p.parse().expect("PROCS: a number of Ps"));
    }
    let rt = b.build().expect("build the runtime");
    rt.block_on(move || {
        let l = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        println!("listening on {}", l.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        loop {
            match l.accept() {
                Ok((c, _)) => gokernel::go(move || echo(c)),
                // Out of descriptors, or a connection reset before we took
                // it: say so and go on.
                Err(e) => eprintln!("accept: {e}"),
            }
        }
    })
    .expect("the server never returns");
}

/// Echoes until the peer closes its half or an error.
fn echo(c: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match (&c).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if (&c).write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
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
