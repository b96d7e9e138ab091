//! Boot, step 3: the other CPUs. The boot CPU copies the trampoline
//! (`boot.rs`) below 1 MiB, gives every AP a stack, and sends INIT and
//! two start-up IPIs to all CPUs but itself (the APIC's "all excluding
//! self" shorthand, so no APIC id needs to be known). Each AP reaches
//! [`ap_main`] in long mode on its own stack, sets up its IDT, local APIC
//! and TLS block, and hands itself to the scheduler.
//!
//! How many CPUs there are comes from QEMU's fw_cfg (`-smp N`; see
//! [`crate::x86::fw_cfg_cpus`]); the boot CPU waits up to a second for
//! them all to arrive.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use crate::boot::{AP_STACKS, TRAMPOLINE, ap_trampoline_end, ap_trampoline_start};
use crate::{cpu, idt, say, x86};

/// Bytes of an AP's stack: its g0 stack once it joins the scheduler.
pub const AP_STACK: usize = 64 * 1024;

/// Starts CPUs 1..ncpus; returns how many CPUs are online.
pub fn start_aps(ncpus: usize) -> usize {
    if ncpus > 1 {
        let start = &raw const ap_trampoline_start;
        // SAFETY: both symbols delimit the trampoline in .text.
        let len = unsafe { (&raw const ap_trampoline_end).offset_from(start) } as usize;
        // SAFETY: TRAMPOLINE is a free, identity-mapped page below 1 MiB
        // and the trampoline is shorter than a page.
        unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len) };
        let tops: Vec<usize> = (0..ncpus)
            .map(|_| Vec::<u8>::with_capacity(AP_STACK).leak().as_ptr() as usize + AP_STACK)
            .map(|top| top & !15)
            .collect();
        AP_STACKS.store(tops.leak().as_mut_ptr(), Ordering::Release);
        x86::start_aps((TRAMPOLINE >> 12) as u8);
        let deadline = x86::nanotime() + 1_000_000_000;
        while cpu::ONLINE.load(Ordering::Acquire) < ncpus && x86::nanotime() < deadline {
            core::hint::spin_loop();
        }
    }
    let online = cpu::ONLINE.load(Ordering::Acquire);
    if online < ncpus {
        say!("FAIL smp: {online} of {ncpus} CPUs came up");
    }
    online
}

/// How deep each CPU's boot stack (its g0 stack once it joins) has been
/// used, in bytes: stacks start zeroed, so the lowest non-zero word marks
/// the deepest use (interrupt frames on g0 included).
pub fn g0_stack_use() -> Vec<usize> {
    let depth = |bottom: usize, len: usize| {
        let words = bottom as *const u64;
        // SAFETY: [bottom, bottom + len) is a CPU's stack, readable.
        let untouched = (0..len / 8)
            .take_while(|&i| unsafe { words.add(i).read_volatile() } == 0)
            .count();
        len - untouched * 8
    };
    let tops = AP_STACKS.load(Ordering::Acquire);
    (0..cpu::ONLINE.load(Ordering::Acquire))
        .map(|n| match n {
            0 => depth(
                &raw const crate::boot::boot_stack as usize,
                crate::boot::BOOT_STACK,
            ),
            // SAFETY: AP n's stack top, set before the APs started.
            _ => depth(unsafe { *tops.add(n) } - AP_STACK, AP_STACK),
        })
        .collect()
}

/// Where an AP arrives from the trampoline, with its index (1, 2, …).
pub extern "C" fn ap_main(index: u32) -> ! {
    idt::load();
    x86::apic_enable(idt::SPURIOUS);
    cpu::register(index as usize);
    crate::glue::cpu_init();
    crate::glue::ap_run()
}
