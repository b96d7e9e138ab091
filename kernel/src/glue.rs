//! Everything in this kernel that exists because of gokernel — the
//! embedder's cost (`cargo xtask qemu --count` counts the lines between
//! the `glue:` markers here and elsewhere):
//!
//! - [`Cpus`], the `Platform`: a CPU's futex sleep is "waiting on addr" in
//!   its [`crate::cpu::Cpu`] plus `sti; hlt` (with an APIC one-shot for a
//!   time-out); a wake-up is an IPI to the CPUs waiting on that address;
//!   the clock is the TSC.
//! - [`cpu_init`]: CR4.FSGSBASE and a TLS block in FS, on every CPU.
//! - [`start`] and [`ap_run`]: the scheduler, its first goroutine, and
//!   each CPU joining it as an M (`gokernel::cpu::join`); the platform
//!   starts no threads.

// glue: begin
use alloc::boxed::Box;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use gokernel::platform::{NewOsProcError, Platform};
use gokernel::runtime2::{M, Sched};
use gokernel::tls::{TlsBlock, TlsTemplate};

use crate::cpu::{CPUS, ONLINE, rearm, this};
use crate::{idt, x86};

/// The platform: the CPUs.
pub struct Cpus;

pub static PLATFORM: Cpus = Cpus;

// SAFETY: futexsleep checks *addr with interrupts off after publishing
// waiting_on (SeqCst), and futexwakeup stores happen before it reads
// waiting_on (SeqCst): a waker either sees the sleeper and sends an IPI,
// which a `sti; hlt` does not miss, or the sleeper sees the new value.
// Time-outs are an APIC one-shot; nanotime is the shared TSC. Each CPU
// that joins has its own TLS block and a 64 KiB stack; newosproc is never
// called (starts_threads is false).
unsafe impl Platform for Cpus {
    /// CPUs join instead (see [`start`]).
    unsafe fn newosproc(&self, _mp: *mut M) -> Result<(), NewOsProcError> {
        Err(NewOsProcError)
    }

    fn starts_threads(&self) -> bool {
        false
    }

    fn futexsleep(&self, addr: &AtomicU32, val: u32, timeout_ns: Option<u64>) {
        let on = x86::irq_save();
        let me = &CPUS[this()];
        me.waiting_on
            .store(addr.as_ptr() as usize, Ordering::SeqCst);
        if addr.load(Ordering::SeqCst) == val {
            if let Some(ns) = timeout_ns {
                me.sleep_deadline
                    .store(x86::nanotime() + ns.max(1), Ordering::Relaxed);
                rearm();
            }
            x86::sti_hlt_cli();
            me.sleep_deadline.store(0, Ordering::Relaxed);
            rearm();
        }
        me.waiting_on.store(0, Ordering::SeqCst);
        x86::irq_restore(on);
    }

    fn futexwakeup(&self, addr: &AtomicU32, _cnt: u32) {
        let (key, me) = (addr.as_ptr() as usize, this());
        for (n, c) in CPUS.iter().enumerate().take(ONLINE.load(Ordering::Acquire)) {
            if n != me && c.waiting_on.load(Ordering::SeqCst) == key {
                x86::send_ipi(c.apic_id.load(Ordering::Relaxed), idt::KICK);
            }
        }
    }

    fn ncpu(&self) -> usize {
        ONLINE.load(Ordering::Acquire)
    }

    fn nanotime(&self) -> u64 {
        x86::nanotime()
    }
}

unsafe extern "C" {
    // Absolute symbols from linker/x86_64.ld: their addresses are the values.
    static __tls_start: u8;
    static __tls_filesz: u8;
    static __tls_memsz: u8;
    static __tls_align: u8;
}

/// Gives the calling CPU CR4.FSGSBASE and its own TLS block in FS: from
/// here on it may call into gokernel.
pub fn cpu_init() {
    if !x86::has_fsgsbase() {
        crate::say!("FAIL cpu: no FSGSBASE (CPUID 7:EBX[0]); run QEMU with -cpu max");
        x86::exit_qemu(x86::EXIT_FAIL);
    }
    let template = TlsTemplate {
        tdata: &raw const __tls_start,
        filesz: &raw const __tls_filesz as usize,
        memsz: &raw const __tls_memsz as usize,
        align: &raw const __tls_align as usize,
    };
    // SAFETY: the linker script's symbols describe this image's PT_TLS.
    let tls = unsafe { TlsBlock::new(&template) }.expect("a TLS block for a CPU");
    // SAFETY: the CPU has FSGSBASE; then the block, leaked, is this CPU's.
    unsafe {
        x86::enable_fsgsbase();
        gokernel::tls::wrfsbase(tls.thread_pointer());
    }
    core::mem::forget(tls);
}

/// The scheduler, once the boot CPU has made it.
static SCHED: AtomicPtr<Sched> = AtomicPtr::new(core::ptr::null_mut());

/// The scheduler (after [`start`] made it).
pub fn sched() -> &'static Sched {
    // SAFETY: set once to a leaked ('static) scheduler before any
    // goroutine or interrupt scenario runs.
    unsafe { &*SCHED.load(Ordering::Acquire) }
}

/// Boot, step 4, on the boot CPU: the scheduler (a P per CPU), its first
/// goroutine, and this CPU joining it as an M.
pub fn start(ncpus: usize) -> ! {
    let sched = Sched::leak(Sched::new(ncpus, gokernel::stack::STACK_MIN, &PLATFORM));
    sched
        .go(Box::new(move || crate::run::main(sched)))
        .expect("the first goroutine");
    SCHED.store(core::ptr::from_ref(sched).cast_mut(), Ordering::Release);
    join()
}

/// Boot, step 4, on an AP: join the scheduler once the boot CPU made it.
pub fn ap_run() -> ! {
    while SCHED.load(Ordering::Acquire).is_null() {
        core::hint::spin_loop();
    }
    join()
}

/// Makes this CPU an M of the scheduler until it shuts down.
fn join() -> ! {
    // Goroutines run with interrupts on: a device or timer interrupt is
    // taken whatever the CPU runs.
    x86::irq_restore(true);
    // SAFETY: cpu_init gave this CPU its TLS block in FS; it runs on its
    // boot stack (64 KiB), which stays its g0 stack; interrupt handlers
    // call only gokernel::intr.
    unsafe { gokernel::cpu::join(sched()) };
    x86::exit_qemu(x86::EXIT_FAIL)
}
// glue: end
