//! TCP and UDP sockets for goroutines (Go's `net`, shaped like
//! `std::net`): [`TcpListener`], [`TcpStream`], [`UdpSocket`].
//!
//! # Blocking
//!
//! Every socket is non-blocking underneath. An operation that would block
//! ([`EAGAIN`](libc::EAGAIN)):
//!
//! - **in a goroutine** parks the goroutine, not its thread: the socket is
//!   armed with the runtime's network poller ([`crate::netpoll`]; hosted,
//!   epoll) and the goroutine is readied when the socket is ready. It
//!   continues on its own thread (see [`crate::bound`]); the thread runs
//!   other goroutines meanwhile, or sleeps;
//! - **on a plain thread** (not a goroutine, or an M's own stack) blocks
//!   the thread in `poll(2)`, as `std::net` would;
//! - **after [`set_nonblocking(true)`](TcpStream::set_nonblocking)**
//!   returns [`io::ErrorKind::WouldBlock`] at once, in both cases, as
//!   `std::net` does. The runtime's poller is not involved.
//!
//! # Timeouts and deadlines
//!
//! [`set_read_timeout`](TcpStream::set_read_timeout) and
//! [`set_write_timeout`](TcpStream::set_write_timeout) bound each call, as
//! in `std::net`: a call that has waited that long returns
//! [`io::ErrorKind::TimedOut`] ("i/o timeout", Go's
//! `os.ErrDeadlineExceeded`; `std` returns `WouldBlock` on Unix). In a
//! goroutine the bound is Go's deadline: a timer on the runtime's heap
//! (`SetReadDeadline` of now plus the timeout) ends the wait, with no
//! thread blocked; on a thread it is `poll(2)`'s timeout.
//!
//! # Closing a shared socket
//!
//! A socket is one shared object: [`try_clone`](TcpStream::try_clone)
//! gives another handle to the same socket (not a `dup(2)`), and
//! `&TcpStream` implements `Read` and `Write`, so goroutines can read and
//! write one connection at the same time (a reader and a writer; several
//! readers take turns, as Go's `fdMutex` makes them). `close(&self)`, on
//! any handle, is Go's `Close`: it wakes every goroutine and thread
//! waiting on the socket with an error ([`is_closed`]: "use of closed
//! network connection", [`io::ErrorKind::NotConnected`]), makes every
//! later operation fail the same way, and shuts the connection down
//! (`shutdown(2)`, which is also what wakes a thread in `poll(2)`). The
//! descriptor itself is closed when the last handle is dropped. Dropping
//! a handle without `close` is `std`'s drop: the last one closes.
//!
//! Name lookups (`ToSocketAddrs` with a host name) block the thread, as
//! in `std`; addresses given as `"1.2.3.4:80"` or `SocketAddr` do not.
//!
//! # Errors
//!
//! Every call fails with an [`io::Error`], as in `std::net`; each method's
//! `# Errors` section says which of these apply.
//!
//! - **The OS error** of the system call (`socket(2)`, `bind(2)`,
//!   `connect(2)`, `accept4(2)`, `recv(2)`, `send(2)`, `getsockopt(2)`,
//!   …), as [`io::Error::from_raw_os_error`] makes it. `EINTR` is retried;
//!   `EAGAIN` is a wait (see *Blocking*), not an error.
//! - **A waiting call** (one that may wait for the socket: reading,
//!   peeking, writing, sending, receiving, accepting) also fails with:
//!   - an error for which [`is_closed`] is true (kind
//!     [`NotConnected`](io::ErrorKind::NotConnected)) if the socket was
//!     closed (`close`, on any handle) before the call or while it
//!     waits — checked before each attempt, so even data already queued
//!     is not read;
//!   - [`WouldBlock`](io::ErrorKind::WouldBlock), at once, instead of
//!     waiting, after `set_nonblocking(true)`;
//!   - [`TimedOut`](io::ErrorKind::TimedOut) when its read timeout
//!     (reading, peeking, receiving) or write timeout (writing, sending)
//!     passes (see *Timeouts and deadlines*; a [`TcpListener`] has none);
//!   - the error of the wait itself: in a goroutine, the OS error of
//!     arming the socket with the runtime's poller (making the epoll
//!     instance on first use, `epoll_ctl(2)`); on a thread, that of
//!     `poll(2)`.
//! - **The other calls** (addresses, socket options, `shutdown`,
//!   `take_error`, UDP `connect`) are plain system calls: they do not
//!   check for `close` (the descriptor stays open until the last handle
//!   is dropped) and fail only with the OS error.
//! - **Calls taking [`ToSocketAddrs`]** also fail with the error of
//!   resolving the address, or [`InvalidInput`](io::ErrorKind::InvalidInput)
//!   if it resolves to no address. Those that try each address in turn
//!   (`bind`, `connect`) return the error for the last one.
//! - An address the kernel returns in a family other than IPv4 or IPv6
//!   (not expected of these sockets) is an
//!   [`InvalidInput`](io::ErrorKind::InvalidInput) error.
//!
//! # Example
//!
//! ```
//! use std::io::{Read, Write};
//! use gokernel::net::{TcpListener, TcpStream};
//!
//! let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
//! let echoed = rt.block_on(|| {
//!     let l = TcpListener::bind("127.0.0.1:0").unwrap();
//!     let addr = l.local_addr().unwrap();
//!     gokernel::go(move || {
//!         let (mut c, _) = l.accept().unwrap();     // parks until a client comes
//!         let mut buf = [0; 5];
//!         c.read_exact(&mut buf).unwrap();
//!         c.write_all(&buf).unwrap();
//!     });
//!     let mut c = TcpStream::connect(addr).unwrap();
//!     c.write_all(b"hello").unwrap();
//!     let mut buf = [0; 5];
//!     c.read_exact(&mut buf).unwrap();
//!     buf
//! });
//! assert_eq!(&echoed.unwrap(), b"hello");
//! ```

use std::io::{self, Read, Write};
use std::mem::{MaybeUninit, size_of};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, ToSocketAddrs};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::netpoll::{MODE_R, MODE_W, PollDesc, WaitError};

/// The error of an operation on a closed socket (Go's `net.ErrClosed`,
/// "use of closed network connection"), inside an [`io::Error`] of kind
/// [`NotConnected`](io::ErrorKind::NotConnected); see [`is_closed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetClosing;

impl std::fmt::Display for NetClosing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("use of closed network connection")
    }
}

impl std::error::Error for NetClosing {}

/// Whether `e` says the socket was closed by `close` (on any handle).
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// rt.block_on(|| {
///     let l = gokernel::net::TcpListener::bind("127.0.0.1:0").unwrap();
///     l.close();
///     let e = l.accept().unwrap_err();
///     assert!(gokernel::net::is_closed(&e));
/// })
/// .unwrap();
/// ```
pub fn is_closed(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<NetClosing>())
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, NetClosing)
}

fn timeout_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "i/o timeout")
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `r`, or the last OS error if it is negative.
fn cvt<T: Default + PartialOrd>(r: T) -> io::Result<T> {
    if r < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A socket (Go's `netFD` with its `pollDesc`).
struct NetFd {
    fd: RawFd,
    pd: &'static PollDesc,
    /// `set_nonblocking(true)`: never wait.
    nonblocking: AtomicBool,
    /// Per-call timeouts in nanoseconds, 0 for none.
    read_timeout: AtomicU64,
    write_timeout: AtomicU64,
}

impl Drop for NetFd {
    fn drop(&mut self) {
        // No handle is left, so nothing waits on it. Closing the
        // descriptor takes it out of every epoll set; an event read just
        // before is stale for the PollDesc once it is freed.
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(self.fd) };
        self.pd.free();
    }
}

impl NetFd {
    /// A socket for a new non-blocking descriptor `fd` (ours from now on).
    fn new(fd: RawFd) -> Arc<NetFd> {
        Arc::new(NetFd {
            fd,
            pd: PollDesc::alloc(),
            nonblocking: AtomicBool::new(false),
            read_timeout: AtomicU64::new(0),
            write_timeout: AtomicU64::new(0),
        })
    }

    /// A new non-blocking socket.
    fn socket(family: i32, ty: i32) -> io::Result<Arc<NetFd>> {
        // SAFETY: a plain system call.
        let fd =
            cvt(unsafe { libc::socket(family, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
        Ok(NetFd::new(fd))
    }

    /// A socket from a descriptor of `std` (made non-blocking).
    fn from_std(fd: RawFd) -> io::Result<Arc<NetFd>> {
        let nfd = NetFd::new(fd);
        set_fd_nonblocking(fd, true)?;
        Ok(nfd)
    }

    /// Go's `Close` (see the module docs).
    fn close(&self) {
        self.pd.evict();
        // Wakes threads in poll(2) (and tells the peer).
        // SAFETY: a plain system call on our descriptor.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
    }

    fn timeout(&self, mode: u8) -> u64 {
        if mode == MODE_R {
            self.read_timeout.load(Ordering::Relaxed)
        } else {
            self.write_timeout.load(Ordering::Relaxed)
        }
    }

    /// Runs `op` (a system call returning a count or -1 with errno) until
    /// it does not fail with `EAGAIN` or `EINTR`, waiting for `mode` in
    /// between (module docs).
    fn io(&self, mode: u8, mut op: impl FnMut() -> isize) -> io::Result<usize> {
        let mut deadline = Deadline::Unset;
        loop {
            if self.pd.closing() {
                return Err(closed_error());
            }
            let r = op();
            if r >= 0 {
                return Ok(r as usize);
            }
            match errno() {
                libc::EINTR => {}
                libc::EAGAIN => self.wait(mode, &mut deadline)?,
                e => return Err(io::Error::from_raw_os_error(e)),
            }
        }
    }

    /// Waits until the socket may be ready for `mode` (a spurious return
    /// is fine: the caller tries again), or fails: closed, timed out, or
    /// non-blocking.
    fn wait(&self, mode: u8, deadline: &mut Deadline) -> io::Result<()> {
        if self.nonblocking.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let gp = crate::proc::current_user_g();
        if gp.is_null() {
            return self.wait_thread(mode, deadline);
        }
        // SAFETY: a user G of a scheduler: its M and scheduler are live.
        let sched = unsafe { &*(*(*gp).m).rt };
        let when = match *deadline {
            Deadline::Unset => {
                let t = self.timeout(mode);
                let w = if t == 0 {
                    0
                } else {
                    sched.platform.nanotime().saturating_add(t)
                };
                *deadline = Deadline::Nano(w);
                w
            }
            Deadline::Nano(w) => w,
            Deadline::Thread(_) => 0,
        };
        match self.pd.wait(self.fd as usize, mode, when) {
            Ok(()) => Ok(()),
            Err(WaitError::Closed) => Err(closed_error()),
            Err(WaitError::Timeout) => Err(timeout_error()),
            Err(WaitError::Poller(e)) => Err(io::Error::from_raw_os_error(e)),
            // Not reached: a goroutine (checked above).
            Err(WaitError::NotGoroutine) => self.wait_thread(mode, deadline),
        }
    }

    /// [`wait`](NetFd::wait) on a plain thread: `poll(2)`.
    fn wait_thread(&self, mode: u8, deadline: &mut Deadline) -> io::Result<()> {
        let until = match *deadline {
            Deadline::Unset => {
                let t = self.timeout(mode);
                let u = (t != 0).then(|| Instant::now() + Duration::from_nanos(t));
                *deadline = Deadline::Thread(u);
                u
            }
            Deadline::Thread(u) => u,
            Deadline::Nano(_) => None,
        };
        let ms = match until {
            None => -1,
            Some(u) => {
                let left = u.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timeout_error());
                }
                // Rounded up, so as not to wake early and spin.
                left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
            }
        };
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: if mode == MODE_R {
                libc::POLLIN
            } else {
                libc::POLLOUT
            },
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 && errno() != libc::EINTR {
            return Err(io::Error::last_os_error());
        }
        if self.pd.closing() {
            return Err(closed_error());
        }
        if n == 0 && until.is_some_and(|u| Instant::now() >= u) {
            return Err(timeout_error());
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.io(MODE_R, || {
            // SAFETY: buf is a live, writable buffer of its length.
            unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) }
        })
    }

    fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.io(MODE_R, || {
            // SAFETY: as in read.
            unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) }
        })
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.io(MODE_W, || {
            // SAFETY: buf is a live buffer of its length. MSG_NOSIGNAL: a
            // closed peer is EPIPE, not SIGPIPE.
            unsafe { libc::send(self.fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) }
        })
    }

    fn recv_from(&self, buf: &mut [u8], flags: i32) -> io::Result<(usize, SocketAddr)> {
        let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let n = self.io(MODE_R, || {
            len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: buf and storage are live buffers of the lengths given.
            unsafe {
                libc::recvfrom(
                    self.fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                    storage.as_mut_ptr().cast(),
                    &mut len,
                )
            }
        })?;
        // SAFETY: zeroed, then filled by the kernel up to len.
        Ok((n, sockaddr_to(unsafe { storage.assume_init_ref() }, len)?))
    }

    fn send_to(&self, buf: &[u8], addr: &SocketAddr) -> io::Result<usize> {
        let (sa, len) = sockaddr_from(addr);
        self.io(MODE_W, || {
            // SAFETY: buf and sa are live buffers of the lengths given.
            unsafe {
                libc::sendto(
                    self.fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                    (&raw const sa).cast(),
                    len,
                )
            }
        })
    }

    /// A non-blocking `connect` and the wait for its end.
    fn connect(&self, addr: &SocketAddr, timeout: Option<Duration>) -> io::Result<()> {
        let (sa, len) = sockaddr_from(addr);
        // SAFETY: sa is a live sockaddr of len bytes.
        let r = unsafe { libc::connect(self.fd, (&raw const sa).cast(), len) };
        if r == 0 {
            return Ok(());
        }
        match errno() {
            libc::EINPROGRESS | libc::EINTR => {}
            e => return Err(io::Error::from_raw_os_error(e)),
        }
        if let Some(t) = timeout {
            self.write_timeout.store(duration_ns(t), Ordering::Relaxed);
        }
        let mut deadline = Deadline::Unset;
        let res = loop {
            if self.pd.closing() {
                break Err(closed_error());
            }
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one live pollfd; a zero timeout does not block.
            if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 {
                break Ok(());
            }
            // A new socket, not shared yet: blocking, and its write
            // timeout is the connect timeout for now.
            if let Err(e) = self.wait(MODE_W, &mut deadline) {
                break Err(e);
            }
        };
        if timeout.is_some() {
            self.write_timeout.store(0, Ordering::Relaxed);
        }
        res?;
        match getsockopt_int(self.fd, libc::SOL_SOCKET, libc::SO_ERROR)? {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    fn accept(&self) -> io::Result<(Arc<NetFd>, SocketAddr)> {
        let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let fd = loop {
            let r = self.io(MODE_R, || {
                len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                // SAFETY: storage is a live buffer of len bytes.
                unsafe {
                    libc::accept4(
                        self.fd,
                        storage.as_mut_ptr().cast(),
                        &mut len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    ) as isize
                }
            });
            match r {
                // A connection reset before we took it: take the next.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                r => break r? as RawFd,
            }
        };
        let nfd = NetFd::new(fd);
        // SAFETY: zeroed, then filled by the kernel up to len.
        let addr = sockaddr_to(unsafe { storage.assume_init_ref() }, len)?;
        Ok((nfd, addr))
    }

    fn set_timeout(&self, mode: u8, d: Option<Duration>) -> io::Result<()> {
        let ns = match d {
            Some(d) if d.is_zero() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "cannot set a 0 duration timeout",
                ));
            }
            Some(d) => duration_ns(d),
            None => 0,
        };
        let slot = if mode == MODE_R {
            &self.read_timeout
        } else {
            &self.write_timeout
        };
        slot.store(ns, Ordering::Relaxed);
        Ok(())
    }

    fn get_timeout(&self, mode: u8) -> Option<Duration> {
        match self.timeout(mode) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.name(libc::getsockname)
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.name(libc::getpeername)
    }

    fn name(
        &self,
        f: unsafe extern "C" fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32,
    ) -> io::Result<SocketAddr> {
        let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: storage is a live buffer of len bytes.
        cvt(unsafe { f(self.fd, storage.as_mut_ptr().cast(), &mut len) })?;
        // SAFETY: zeroed, then filled by the kernel up to len.
        sockaddr_to(unsafe { storage.assume_init_ref() }, len)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: a plain system call on our descriptor.
        cvt(unsafe { libc::shutdown(self.fd, how) }).map(drop)
    }

    fn take_error(&self) -> io::Result<Option<io::Error>> {
        match getsockopt_int(self.fd, libc::SOL_SOCKET, libc::SO_ERROR)? {
            0 => Ok(None),
            e => Ok(Some(io::Error::from_raw_os_error(e))),
        }
    }
}

/// Where the deadline of one call stands.
#[derive(Clone, Copy)]
enum Deadline {
    /// Not computed yet (the call has not had to wait).
    Unset,
    /// In a goroutine: a `nanotime` reading, 0 for none.
    Nano(u64),
    /// On a thread.
    Thread(Option<Instant>),
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

fn set_fd_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: plain fcntl calls on a descriptor of ours.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        let new = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        cvt(libc::fcntl(fd, libc::F_SETFL, new)).map(drop)
    }
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: v is a live int of the size given.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const v).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut v: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: v is a live int of the size given.
    cvt(unsafe { libc::getsockopt(fd, level, name, (&raw mut v).cast(), &mut len) })?;
    Ok(v)
}

/// `addr` as a `sockaddr` (in a `sockaddr_storage`) and its length.
fn sockaddr_from(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and
            // suitably aligned.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in>().write(sin) };
            (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in6>().write(sin6) };
            (ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// The address in `ss` (`len` bytes).
fn sockaddr_to(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> io::Result<SocketAddr> {
    let len = len as usize;
    match i32::from(ss.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family and length say it is a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family and length say it is a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unsupported address family",
        )),
    }
}

fn family(addr: &SocketAddr) -> i32 {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// Tries `f` on each address, returning the first success or the last
/// error (as `std::net` does).
fn each_addr<T>(
    addr: impl ToSocketAddrs,
    mut f: impl FnMut(&SocketAddr) -> io::Result<T>,
) -> io::Result<T> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match f(&a) {
            Ok(t) => return Ok(t),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "could not resolve to any addresses",
        )
    }))
}

macro_rules! common_methods {
    () => {
        /// The local address.
        ///
        /// # Errors
        ///
        /// The OS error of `getsockname(2)` ([module docs](crate::net#errors)).
        pub fn local_addr(&self) -> io::Result<SocketAddr> {
            self.fd.local_addr()
        }

        /// Whether a wait returns [`WouldBlock`](io::ErrorKind::WouldBlock)
        /// instead of parking the goroutine or blocking the thread (see
        /// the module docs).
        ///
        /// # Errors
        ///
        /// None: it always returns `Ok` (a `Result` as in `std`).
        pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
            self.fd.nonblocking.store(nonblocking, Ordering::Relaxed);
            Ok(())
        }

        /// Go's `Close`: wakes every goroutine and thread waiting on this
        /// socket (through any handle) with an error for which
        /// [`is_closed`] is true, makes every later operation fail the
        /// same way, and shuts the socket down. The descriptor is closed
        /// when the last handle is dropped.
        pub fn close(&self) {
            self.fd.close()
        }

        /// Another handle to the same socket (not a `dup(2)`: closing
        /// one closes both; see the module docs). Never fails; a `Result`
        /// as in `std`.
        ///
        /// # Errors
        ///
        /// None (see above).
        pub fn try_clone(&self) -> io::Result<Self> {
            Ok(Self {
                fd: self.fd.clone(),
            })
        }

        /// Takes the socket's pending error (`SO_ERROR`).
        ///
        /// # Errors
        ///
        /// The OS error of `getsockopt(2)` itself; the pending error is the
        /// `Ok` value.
        pub fn take_error(&self) -> io::Result<Option<io::Error>> {
            self.fd.take_error()
        }

        /// The socket's IP time-to-live.
        ///
        /// # Errors
        ///
        /// The OS error of `getsockopt(2)`.
        pub fn ttl(&self) -> io::Result<u32> {
            getsockopt_int(self.fd.fd, libc::IPPROTO_IP, libc::IP_TTL).map(|v| v as u32)
        }

        /// Sets the socket's IP time-to-live.
        ///
        /// # Errors
        ///
        /// [`InvalidInput`](io::ErrorKind::InvalidInput) if `ttl` is over
        /// `i32::MAX`; otherwise the OS error of `setsockopt(2)`.
        pub fn set_ttl(&self, ttl: u32) -> io::Result<()> {
            let v = i32::try_from(ttl).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            setsockopt_int(self.fd.fd, libc::IPPROTO_IP, libc::IP_TTL, v)
        }
    };
}

macro_rules! timeout_methods {
    () => {
        /// Bounds each read (as `std`; in a goroutine, Go's read
        /// deadline of now plus `dur`): a read that waited that long
        /// fails with [`TimedOut`](io::ErrorKind::TimedOut). `None`: no
        /// bound. `Some(Duration::ZERO)` is an
        /// [`InvalidInput`](io::ErrorKind::InvalidInput) error, as in `std`.
        ///
        /// # Errors
        ///
        /// [`InvalidInput`](io::ErrorKind::InvalidInput) for
        /// `Some(Duration::ZERO)`; nothing else.
        pub fn set_read_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
            self.fd.set_timeout(MODE_R, dur)
        }

        /// Bounds each write, as [`set_read_timeout`](Self::set_read_timeout)
        /// does each read.
        ///
        /// # Errors
        ///
        /// As [`set_read_timeout`](Self::set_read_timeout).
        pub fn set_write_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
            self.fd.set_timeout(MODE_W, dur)
        }

        /// The read timeout.
        ///
        /// # Errors
        ///
        /// None: it always returns `Ok` (a `Result` as in `std`).
        pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
            Ok(self.fd.get_timeout(MODE_R))
        }

        /// The write timeout.
        ///
        /// # Errors
        ///
        /// None: it always returns `Ok` (a `Result` as in `std`).
        pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
            Ok(self.fd.get_timeout(MODE_W))
        }
    };
}

macro_rules! fd_impls {
    ($t:ident) => {
        impl AsRawFd for $t {
            fn as_raw_fd(&self) -> RawFd {
                self.fd.fd
            }
        }

        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut d = f.debug_struct(stringify!($t));
                if let Ok(a) = self.fd.local_addr() {
                    d.field("addr", &a);
                }
                d.field("fd", &self.fd.fd).finish()
            }
        }
    };
}

/// A TCP socket server, listening for connections (`std::net::TcpListener`
/// for goroutines: see the [module docs](self)).
pub struct TcpListener {
    fd: Arc<NetFd>,
}

impl TcpListener {
    /// Binds to `addr` and listens (`SO_REUSEADDR`, as `std` does on Unix;
    /// a backlog of 4,096, capped by `net.core.somaxconn`).
    ///
    /// # Errors
    ///
    /// The error of resolving `addr` (or [`InvalidInput`](io::ErrorKind::InvalidInput)
    /// if it resolves to nothing), or, for the last address tried, the OS
    /// error of `socket(2)`, `setsockopt(2)`, `bind(2)` or `listen(2)` (for
    /// example [`AddrInUse`](io::ErrorKind::AddrInUse)); see the
    /// [module docs](crate::net#errors).
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
        each_addr(addr, |a| {
            let fd = NetFd::socket(family(a), libc::SOCK_STREAM)?;
            setsockopt_int(fd.fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
            let (sa, len) = sockaddr_from(a);
            // SAFETY: sa is a live sockaddr of len bytes.
            cvt(unsafe { libc::bind(fd.fd, (&raw const sa).cast(), len) })?;
            // SAFETY: a plain system call.
            cvt(unsafe { libc::listen(fd.fd, 4096) })?;
            Ok(TcpListener { fd })
        })
    }

    /// Takes a connection: parks the goroutine (blocks the thread) until
    /// one comes. The new stream is blocking-by-parking, with no
    /// timeouts.
    ///
    /// # Errors
    ///
    /// A waiting call's errors ([module docs](crate::net#errors)): an [`is_closed`] error if
    /// the listener is closed, [`WouldBlock`](io::ErrorKind::WouldBlock) in
    /// non-blocking mode, the poller's or `poll(2)`'s error, or the OS error
    /// of `accept4(2)` (a connection aborted before it was taken,
    /// `ECONNABORTED`, is skipped, not returned). There is no timeout.
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (fd, addr) = self.fd.accept()?;
        Ok((TcpStream { fd }, addr))
    }

    /// An endless iterator over [`accept`](Self::accept)'s streams.
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<TcpStream>> + '_ {
        std::iter::repeat_with(|| self.accept().map(|(s, _)| s))
    }

    common_methods!();
}

impl From<std::net::TcpListener> for TcpListener {
    /// Takes over a `std` listener (made non-blocking underneath).
    ///
    /// # Panics
    ///
    /// If the descriptor cannot be made non-blocking (`fcntl` fails: not
    /// for a valid socket).
    fn from(l: std::net::TcpListener) -> TcpListener {
        let fd = NetFd::from_std(l.into_raw_fd()).expect("fcntl(O_NONBLOCK) on a listening socket");
        TcpListener { fd }
    }
}

fd_impls!(TcpListener);

/// A TCP connection (`std::net::TcpStream` for goroutines: see the
/// [module docs](self)).
pub struct TcpStream {
    fd: Arc<NetFd>,
}

impl TcpStream {
    /// Connects to `addr` (each address in turn, as `std`): parks the
    /// goroutine (blocks the thread) until the connection is made or
    /// refused.
    ///
    /// # Errors
    ///
    /// The error of resolving `addr` (or [`InvalidInput`](io::ErrorKind::InvalidInput)
    /// if it resolves to nothing), or, for the last address tried: the OS
    /// error of `socket(2)` or `connect(2)`, the error the attempt ended
    /// with (`SO_ERROR`, for example
    /// [`ConnectionRefused`](io::ErrorKind::ConnectionRefused)), or the
    /// poller's or `poll(2)`'s error while waiting ([module docs](crate::net#errors)). No
    /// timeout: see [`connect_timeout`](Self::connect_timeout).
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
        each_addr(addr, |a| Self::connect_inner(a, None))
    }

    /// [`connect`](Self::connect) to one address, failing with
    /// [`TimedOut`](io::ErrorKind::TimedOut) after `timeout`.
    /// A zero timeout is an [`InvalidInput`](io::ErrorKind::InvalidInput)
    /// error, as in `std`.
    ///
    /// # Errors
    ///
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) for a zero `timeout`;
    /// [`TimedOut`](io::ErrorKind::TimedOut) when it passes; otherwise as
    /// [`connect`](Self::connect) for one address.
    pub fn connect_timeout(addr: &SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        if timeout.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot set a 0 duration timeout",
            ));
        }
        Self::connect_inner(addr, Some(timeout))
    }

    fn connect_inner(a: &SocketAddr, timeout: Option<Duration>) -> io::Result<TcpStream> {
        let fd = NetFd::socket(family(a), libc::SOCK_STREAM)?;
        fd.connect(a, timeout)?;
        Ok(TcpStream { fd })
    }

    /// The peer's address.
    ///
    /// # Errors
    ///
    /// The OS error of `getpeername(2)` ([module docs](crate::net#errors)).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.fd.peer_addr()
    }

    /// Shuts down the read half, the write half or both (`shutdown(2)`);
    /// unlike [`close`](Self::close), the handle stays usable for the
    /// other half.
    ///
    /// # Errors
    ///
    /// The OS error of `shutdown(2)` (for example
    /// [`NotConnected`](io::ErrorKind::NotConnected) on a socket that is not
    /// connected); see the [module docs](crate::net#errors).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.fd.shutdown(how)
    }

    /// Reads without taking the bytes off the socket's queue.
    ///
    /// # Errors
    ///
    /// A waiting call's errors, with the read timeout ([module docs](crate::net#errors)):
    /// [`is_closed`], [`WouldBlock`](io::ErrorKind::WouldBlock),
    /// [`TimedOut`](io::ErrorKind::TimedOut), the wait's error, or the OS
    /// error of `recv(2)`.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd.peek(buf)
    }

    /// Sets `TCP_NODELAY`.
    ///
    /// # Errors
    ///
    /// The OS error of `setsockopt(2)`.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        setsockopt_int(
            self.fd.fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            i32::from(nodelay),
        )
    }

    /// Whether `TCP_NODELAY` is set.
    ///
    /// # Errors
    ///
    /// The OS error of `getsockopt(2)`.
    pub fn nodelay(&self) -> io::Result<bool> {
        getsockopt_int(self.fd.fd, libc::IPPROTO_TCP, libc::TCP_NODELAY).map(|v| v != 0)
    }

    common_methods!();
    timeout_methods!();
}

impl Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd.read(buf)
    }
}

impl Read for &TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd.read(buf)
    }
}

impl Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.fd.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.fd.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl From<std::net::TcpStream> for TcpStream {
    /// Takes over a `std` stream (made non-blocking underneath).
    ///
    /// # Panics
    ///
    /// If the descriptor cannot be made non-blocking (`fcntl` fails: not
    /// for a valid socket).
    fn from(s: std::net::TcpStream) -> TcpStream {
        let fd = NetFd::from_std(s.into_raw_fd()).expect("fcntl(O_NONBLOCK) on a socket");
        TcpStream { fd }
    }
}

fd_impls!(TcpStream);

/// A UDP socket (`std::net::UdpSocket` for goroutines: see the
/// [module docs](self)).
pub struct UdpSocket {
    fd: Arc<NetFd>,
}

impl UdpSocket {
    /// Binds to `addr`.
    ///
    /// # Errors
    ///
    /// The error of resolving `addr` (or [`InvalidInput`](io::ErrorKind::InvalidInput)
    /// if it resolves to nothing), or, for the last address tried, the OS
    /// error of `socket(2)` or `bind(2)` (for example
    /// [`AddrInUse`](io::ErrorKind::AddrInUse)); see the [module docs](crate::net#errors).
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<UdpSocket> {
        each_addr(addr, |a| {
            let fd = NetFd::socket(family(a), libc::SOCK_DGRAM)?;
            let (sa, len) = sockaddr_from(a);
            // SAFETY: sa is a live sockaddr of len bytes.
            cvt(unsafe { libc::bind(fd.fd, (&raw const sa).cast(), len) })?;
            Ok(UdpSocket { fd })
        })
    }

    /// Receives one datagram (the excess of a longer one is dropped) and
    /// its sender's address.
    ///
    /// # Errors
    ///
    /// A waiting call's errors, with the read timeout ([module docs](crate::net#errors)):
    /// [`is_closed`], [`WouldBlock`](io::ErrorKind::WouldBlock),
    /// [`TimedOut`](io::ErrorKind::TimedOut), the wait's error, or the OS
    /// error of `recvfrom(2)`.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.fd.recv_from(buf, 0)
    }

    /// [`recv_from`](Self::recv_from), leaving the datagram queued.
    ///
    /// # Errors
    ///
    /// As [`recv_from`](Self::recv_from).
    pub fn peek_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.fd.recv_from(buf, libc::MSG_PEEK)
    }

    /// Sends one datagram to the first address `addr` resolves to.
    ///
    /// # Errors
    ///
    /// The error of resolving `addr`, or [`InvalidInput`](io::ErrorKind::InvalidInput)
    /// if it resolves to nothing; then a waiting call's errors, with the
    /// write timeout ([module docs](crate::net#errors)): [`is_closed`],
    /// [`WouldBlock`](io::ErrorKind::WouldBlock),
    /// [`TimedOut`](io::ErrorKind::TimedOut), the wait's error, or the OS
    /// error of `sendto(2)`.
    pub fn send_to(&self, buf: &[u8], addr: impl ToSocketAddrs) -> io::Result<usize> {
        let a = addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "no addresses to send data to")
        })?;
        self.fd.send_to(buf, &a)
    }

    /// Sets the default peer ([`send`](Self::send), [`recv`](Self::recv))
    /// and filters datagrams from others.
    ///
    /// # Errors
    ///
    /// The error of resolving `addr` (or [`InvalidInput`](io::ErrorKind::InvalidInput)
    /// if it resolves to nothing), or the OS error of `connect(2)` for the
    /// last address tried. It does not wait, and does not check for
    /// `close` ([module docs](crate::net#errors)).
    pub fn connect(&self, addr: impl ToSocketAddrs) -> io::Result<()> {
        each_addr(addr, |a| {
            let (sa, len) = sockaddr_from(a);
            // SAFETY: sa is a live sockaddr of len bytes.
            cvt(unsafe { libc::connect(self.fd.fd, (&raw const sa).cast(), len) }).map(drop)
        })
    }

    /// The connected peer's address.
    ///
    /// # Errors
    ///
    /// The OS error of `getpeername(2)` ([module docs](crate::net#errors)).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.fd.peer_addr()
    }

    /// Sends one datagram to the connected peer.
    ///
    /// # Errors
    ///
    /// A waiting call's errors, with the write timeout ([module docs](crate::net#errors)):
    /// [`is_closed`], [`WouldBlock`](io::ErrorKind::WouldBlock),
    /// [`TimedOut`](io::ErrorKind::TimedOut), the wait's error, or the OS
    /// error of `send(2)` (for example when no peer is connected).
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.fd.write(buf)
    }

    /// Receives one datagram from the connected peer.
    ///
    /// # Errors
    ///
    /// A waiting call's errors, with the read timeout ([module docs](crate::net#errors)):
    /// [`is_closed`], [`WouldBlock`](io::ErrorKind::WouldBlock),
    /// [`TimedOut`](io::ErrorKind::TimedOut), the wait's error, or the OS
    /// error of `recv(2)`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd.read(buf)
    }

    /// [`recv`](Self::recv), leaving the datagram queued.
    ///
    /// # Errors
    ///
    /// A waiting call's errors, with the read timeout ([module docs](crate::net#errors)):
    /// [`is_closed`], [`WouldBlock`](io::ErrorKind::WouldBlock),
    /// [`TimedOut`](io::ErrorKind::TimedOut), the wait's error, or the OS
    /// error of `recv(2)`.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd.peek(buf)
    }

    /// Sets `SO_BROADCAST`.
    ///
    /// # Errors
    ///
    /// The OS error of `setsockopt(2)`.
    pub fn set_broadcast(&self, on: bool) -> io::Result<()> {
        setsockopt_int(
            self.fd.fd,
            libc::SOL_SOCKET,
            libc::SO_BROADCAST,
            i32::from(on),
        )
    }

    common_methods!();
    timeout_methods!();
}

impl From<std::net::UdpSocket> for UdpSocket {
    /// Takes over a `std` socket (made non-blocking underneath).
    ///
    /// # Panics
    ///
    /// If the descriptor cannot be made non-blocking (`fcntl` fails: not
    /// for a valid socket).
    fn from(s: std::net::UdpSocket) -> UdpSocket {
        let fd = NetFd::from_std(s.into_raw_fd()).expect("fcntl(O_NONBLOCK) on a socket");
        UdpSocket { fd }
    }
}

fd_impls!(UdpSocket);
