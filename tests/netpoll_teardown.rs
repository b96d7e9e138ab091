//! A goroutine parked on the network poller when its runtime is dropped:
//! nothing that wakes sources (a close, another poller) reaches it after
//! the runtime has freed it. Once a test asks it to, this binary's
//! allocator poisons freed memory and keeps it (never reused), so that a
//! read of a freed goroutine faults instead of finding the old values.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{in_crash_child, run_child_ok};
use gokernel::Runtime;
use gokernel::net::{TcpListener, TcpStream};

/// Set by a test: from then on freed blocks are filled with 0xa5 and
/// leaked.
static POISON: AtomicBool = AtomicBool::new(false);

struct PoisoningAlloc;

// SAFETY: System's allocator, with freed blocks written (within their
// size) and then given back or, once POISON is set, leaked.
unsafe impl GlobalAlloc for PoisoningAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract: ptr is a live block of `layout`,
        // ours until System frees it.
        unsafe {
            if POISON.load(Ordering::Relaxed) {
                ptr.write_bytes(0xa5, layout.size());
                return;
            }
            System.dealloc(ptr, layout)
        }
    }
}

#[global_allocator]
static ALLOC: PoisoningAlloc = PoisoningAlloc;

/// Child: a goroutine parked on a socket that its dropped runtime leaves
/// as it is (its thread is unwinding a panic of another goroutine, which
/// waits in a destructor: teardown's step 5), then a close through
/// another handle, which wakes whatever waits on the socket.
#[test]
fn child_close_after_the_runtime_left_a_socket_waiter_parked() {
    if !in_crash_child() {
        return;
    }
    let rt = Runtime::builder().procs(1).build().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    let other = s.try_clone().unwrap();
    // No handles kept: they would keep the scheduler (and its Gs) alive.
    drop(rt.spawn(move || (&s).read(&mut [0; 1]).map(drop)));
    drop(rt.spawn(|| {
        struct ParksWhileUnwinding;
        impl Drop for ParksWhileUnwinding {
            fn drop(&mut self) {
                gokernel::park();
            }
        }
        let _p = ParksWhileUnwinding;
        panic!("a panic whose unwinding parks");
    }));
    let t = Instant::now();
    while rt.stats().goroutines.waiting != 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "they never parked");
        std::thread::sleep(Duration::from_millis(1));
    }
    POISON.store(true, Ordering::Relaxed);
    drop(rt);
    other.close();
    drop(c);
}

#[test]
fn closing_a_socket_whose_waiter_a_dropped_runtime_left_parked_reaches_no_freed_goroutine() {
    run_child_ok("child_close_after_the_runtime_left_a_socket_waiter_parked");
}
