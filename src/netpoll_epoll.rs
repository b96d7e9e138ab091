//! The hosted network poller: Linux epoll (Go's `netpoll_epoll.go`).
//!
//! One epoll instance per scheduler, sources armed edge-triggered for
//! reading and writing (`EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET`) with
//! the [`PollTag`] as the event's data, and an eventfd, armed
//! level-triggered, that `netpollbreak` writes to. `netpollWakeSig` keeps
//! breaks from writing more than once until the poller has read the
//! eventfd. `netpoll(delay)` waits with `epoll_pwait2` (a nanosecond
//! timeout, Linux 5.11) and falls back to `epoll_wait`, rounding the delay
//! up to the millisecond, where that is missing.
//!
//! The system calls go through `libc`, already a dependency: six calls
//! (`epoll_create1`, `epoll_ctl`, `epoll_pwait2` / `epoll_wait`,
//! `eventfd`, `read`, `write`) do not justify a wrapper crate.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::netpoll::{MODE_R, MODE_W, Netpoll, PollTag, ReadyList, netpollready};

/// The eventfd's event data (no PollTag is 0: tags hold a pointer).
const BREAK_TAG: u64 = 0;

/// Events read per `netpoll` (Go reads 128).
const NEVENTS: usize = 128;

/// A scheduler's epoll poller.
pub(crate) struct Epoll {
    /// The epoll instance.
    epfd: i32,
    /// The eventfd `netpollbreak` writes.
    evfd: i32,
    /// 1 while a break is written and not yet read (Go's
    /// `netpollWakeSig`).
    wakesig: AtomicU32,
    /// `epoll_pwait2` returned `ENOSYS`: use `epoll_wait`.
    no_pwait2: AtomicBool,
}

/// The last OS error number.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Epoll {
    /// Makes the epoll instance and the break eventfd (Go's `netpollinit`).
    pub(crate) fn new() -> Result<Epoll, i32> {
        // SAFETY: plain system calls on new descriptors.
        unsafe {
            let epfd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if epfd < 0 {
                return Err(errno());
            }
            let evfd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
            if evfd < 0 {
                let e = errno();
                libc::close(epfd);
                return Err(e);
            }
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: BREAK_TAG,
            };
            if libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, evfd, &mut ev) < 0 {
                let e = errno();
                libc::close(evfd);
                libc::close(epfd);
                return Err(e);
            }
            Ok(Epoll {
                epfd,
                evfd,
                wakesig: AtomicU32::new(0),
                no_pwait2: AtomicBool::new(false),
            })
        }
    }

    /// Waits for events: `epoll_pwait2`, or `epoll_wait` without it.
    fn wait(&self, events: &mut [libc::epoll_event], delay: i64) -> i32 {
        let max = events.len() as i32;
        if !self.no_pwait2.load(Ordering::Relaxed) {
            let ts = libc::timespec {
                tv_sec: (delay.max(0) / 1_000_000_000) as libc::time_t,
                tv_nsec: (delay.max(0) % 1_000_000_000) as libc::c_long,
            };
            let tsp = if delay < 0 {
                core::ptr::null()
            } else {
                &ts as *const libc::timespec
            };
            // SAFETY: events is a live buffer of `max` entries; tsp is
            // null or points at ts.
            let n = unsafe {
                libc::epoll_pwait2(self.epfd, events.as_mut_ptr(), max, tsp, core::ptr::null())
            };
            if n >= 0 || errno() != libc::ENOSYS {
                return n;
            }
            self.no_pwait2.store(true, Ordering::Relaxed);
        }
        let ms = if delay < 0 {
            -1
        } else {
            // Rounded up: a timer sleeper must not wake before its deadline
            // and spin.
            (delay as u64).div_ceil(1_000_000).min(i32::MAX as u64) as i32
        };
        // SAFETY: events is a live buffer of `max` entries.
        unsafe { libc::epoll_wait(self.epfd, events.as_mut_ptr(), max, ms) }
    }
}

impl Netpoll for Epoll {
    fn netpollopen(&self, fd: usize, tag: PollTag) -> Result<(), i32> {
        let fd = i32::try_from(fd).map_err(|_| libc::EBADF)?;
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: tag.into_raw(),
        };
        // SAFETY: ev is a live epoll_event; a bad fd is an error return.
        if unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            let e = errno();
            if e != libc::EEXIST {
                return Err(e);
            }
            // Armed before under another tag (a reused descriptor number
            // whose earlier file is still open elsewhere): re-tag it.
            // SAFETY: as above.
            if unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_MOD, fd, &mut ev) } < 0 {
                return Err(errno());
            }
        }
        Ok(())
    }

    fn netpoll(&self, delay: i64, list: &mut ReadyList) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; NEVENTS];
        let n = self.wait(&mut events, delay);
        if n <= 0 {
            // Nothing, a signal (EINTR), or an error: the caller looks
            // again (Go returns on EINTR with a delay too).
            return;
        }
        for ev in &events[..n as usize] {
            let (bits, data) = (ev.events, ev.u64);
            if data == BREAK_TAG {
                let mut buf = 0u64;
                // SAFETY: reads 8 bytes into buf from our eventfd.
                unsafe { libc::read(self.evfd, (&raw mut buf).cast(), 8) };
                self.wakesig.store(0, Ordering::SeqCst);
                continue;
            }
            let mut mode = 0;
            if bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                != 0
            {
                mode |= MODE_R;
            }
            if bits & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                mode |= MODE_W;
            }
            if mode != 0 {
                // SAFETY: the data of every event but the break's is a
                // tag given to netpollopen.
                netpollready(list, unsafe { PollTag::from_raw(data) }, mode);
            }
        }
    }

    fn netpollbreak(&self) {
        // One write until the poller reads it.
        if self
            .wakesig
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one` to our eventfd; EAGAIN (the
        // counter full) means a wake-up is pending anyway.
        unsafe { libc::write(self.evfd, (&raw const one).cast(), 8) };
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: our descriptors, closed once.
        unsafe {
            libc::close(self.evfd);
            libc::close(self.epfd);
        }
    }
}
