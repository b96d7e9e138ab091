//! The tokio peers of `examples/http.rs` and `examples/echo.rs`, for
//! `cargo xtask http-bench`: the same protocol handling, a task per
//! connection, tokio's multi-thread runtime with PROCS workers.
//!
//! ```sh
//! http-tokio http|echo ADDR PROCS
//! ```
//!
//! Prints `listening on ADDR` and serves until killed.

use std::io::Write as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, addr, procs] = &args[..] else {
        eprintln!("usage: http-tokio http|echo ADDR PROCS");
        std::process::exit(2);
    };
    raise_nofile();
    let procs: usize = procs.parse().expect("PROCS: a number");
    let http = match mode.as_str() {
        "http" => true,
        "echo" => false,
        m => panic!("unknown mode {m}"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(procs)
        .enable_io()
        .build()
        .expect("build the tokio runtime");
    rt.block_on(async move {
        let l = TcpListener::bind(addr.as_str()).await.expect("bind");
        println!("listening on {}", l.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        loop {
            match l.accept().await {
                Ok((c, _)) => {
                    if http {
                        tokio::spawn(serve(c));
                    } else {
                        tokio::spawn(echo(c));
                    }
                }
                Err(e) => eprintln!("accept: {e}"),
            }
        }
    });
}

async fn echo(mut c: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn serve(mut c: TcpStream) {
    let _ = c.set_nodelay(true);
    let mut buf = vec![0u8; 8192];
    let mut have = 0;
    let mut out = Vec::with_capacity(RESPONSE.len() * 4);
    loop {
        let n = match c.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        have += n;
        let (mut start, mut close) = (0, false);
        while let Some(end) = find(&buf[start..have], b"\r\n\r\n") {
            close |= wants_close(&buf[start..start + end]);
            out.extend_from_slice(RESPONSE);
            start += end + 4;
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if have == buf.len() {
            return;
        }
        if !out.is_empty() {
            if c.write_all(&out).await.is_err() {
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
