//! The hardware the kernel touches: port I/O, MSRs, CR4, CPUID, the TSC,
//! the local APIC (xAPIC, memory-mapped at its reset address), the PIT
//! (once, to calibrate the TSC and the APIC timer), QEMU's fw_cfg (CPU
//! count and RAM size) and its isa-debug-exit port.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Writes a byte to an I/O port.
pub(crate) fn outb(port: u16, v: u8) {
    // SAFETY: the kernel owns the machine; the ports used here (serial,
    // PIT, PIC, fw_cfg, debug-exit) have no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a word to an I/O port.
pub(crate) fn outw(port: u16, v: u16) {
    // SAFETY: as outb.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a double word to an I/O port.
pub(crate) fn outl(port: u16, v: u32) {
    // SAFETY: as outb.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub(crate) fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as outb.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads an MSR.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: ring 0; only architectural MSRs that exist are read.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Writes an MSR.
///
/// # Safety
///
/// The MSR and value must not break the kernel (memory types, paging…).
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the contract.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// CPUID leaf `leaf`, subleaf `sub`: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects (CR4.TSD is clear in ring 0).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// True if this CPU has the FSGSBASE instructions
/// (CPUID.(EAX=7,ECX=0):EBX[0]).
pub fn has_fsgsbase() -> bool {
    cpuid(7, 0).1 & 1 != 0
}

/// Sets CR4.FSGSBASE (bit 16) on this CPU, so `wrfsbase` works here.
/// Every CPU must do it for itself: CR4 is per CPU.
///
/// # Safety
///
/// The CPU must have FSGSBASE ([`has_fsgsbase`]).
pub unsafe fn enable_fsgsbase() {
    // SAFETY: the contract; only bit 16 changes.
    unsafe {
        asm!(
            "mov {t}, cr4",
            "or {t}, {bit}",
            "mov cr4, {t}",
            t = out(reg) _,
            bit = const 1u64 << 16,
            options(nomem, nostack, preserves_flags),
        )
    }
}

/// Lets this CPU run SSE instructions: CR0.EM clear, CR0.MP set,
/// CR4.OSFXSR and OSXMMEXCPT set. CR0 and CR4 are per CPU. The kernel's
/// compiled code is soft-float; only inline assembly uses SSE
/// (`preempt_scenarios.rs`).
pub fn enable_sse() {
    // SAFETY: every x86_64 CPU has SSE and FXSR; only these four bits
    // change, and no compiled code depends on them.
    unsafe {
        asm!(
            "mov {t}, cr0",
            "and {t}, {not_em}",
            "or {t}, {mp}",
            "mov cr0, {t}",
            "mov {t}, cr4",
            "or {t}, {fx}",
            "mov cr4, {t}",
            t = out(reg) _,
            not_em = const !(1i64 << 2),
            mp = const 1u64 << 1,
            fx = const 3u64 << 9,
            options(nomem, nostack),
        )
    }
}

/// Turns interrupts off and returns whether they were on.
pub fn irq_save() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS and clears IF, nothing else.
    unsafe { asm!("pushfq", "pop {}", "cli", out(reg) flags, options(nomem, preserves_flags)) }
    flags & (1 << 9) != 0
}

/// Turns interrupts back on if `on` (from [`irq_save`]).
pub fn irq_restore(on: bool) {
    if on {
        // SAFETY: enabling interrupts; the handlers are installed.
        unsafe { asm!("sti", options(nomem, nostack)) }
    }
}

/// Enables interrupts and halts until one arrives, atomically (`sti`
/// takes effect after the next instruction, so an interrupt pending at
/// the `sti` wakes the `hlt`), then disables them again.
pub fn sti_hlt_cli() {
    // SAFETY: waiting for an interrupt; handlers are installed.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

// ---- isa-debug-exit --------------------------------------------------

/// The isa-debug-exit port (`-device isa-debug-exit,iobase=0xf4`).
const DEBUG_EXIT: u16 = 0xf4;
/// Written on success: QEMU exits with (0x10 << 1) | 1 = 33.
pub const EXIT_PASS: u32 = 0x10;
/// Written on failure: QEMU exits with 35.
pub const EXIT_FAIL: u32 = 0x11;

/// Ends the virtual machine with `code` (see [`EXIT_PASS`]); without the
/// device, stops this CPU.
pub fn exit_qemu(code: u32) -> ! {
    outl(DEBUG_EXIT, code);
    loop {
        // SAFETY: stop here for good.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

// ---- fw_cfg ------------------------------------------------------------

const FW_CFG_SELECTOR: u16 = 0x510;
const FW_CFG_DATA: u16 = 0x511;
const FW_CFG_RAM_SIZE: u16 = 0x03;
const FW_CFG_NB_CPUS: u16 = 0x05;

fn fw_cfg_read(key: u16, bytes: usize) -> u64 {
    outw(FW_CFG_SELECTOR, key);
    (0..bytes).fold(0, |v, i| v | u64::from(inb(FW_CFG_DATA)) << (8 * i))
}

/// The number of CPUs QEMU started (`-smp N`), from fw_cfg.
pub fn fw_cfg_cpus() -> usize {
    fw_cfg_read(FW_CFG_NB_CPUS, 2) as usize
}

/// The RAM size (`-m`), from fw_cfg.
pub fn fw_cfg_ram() -> u64 {
    fw_cfg_read(FW_CFG_RAM_SIZE, 8)
}

// ---- the local APIC ----------------------------------------------------

const APIC_BASE: usize = 0xfee0_0000;
const IA32_APIC_BASE: u32 = 0x1b;
const ID: usize = 0x20;
const EOI: usize = 0xb0;
const SVR: usize = 0xf0;
const ICR_LO: usize = 0x300;
const ICR_HI: usize = 0x310;
const LVT_TIMER: usize = 0x320;
const TIMER_INIT: usize = 0x380;
const TIMER_CUR: usize = 0x390;
const TIMER_DIV: usize = 0x3e0;

fn apic_read(reg: usize) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped (uncached) by the boot
    // page tables; reg is one of its registers.
    unsafe { ((APIC_BASE + reg) as *const u32).read_volatile() }
}

fn apic_write(reg: usize, v: u32) {
    // SAFETY: as apic_read.
    unsafe { ((APIC_BASE + reg) as *mut u32).write_volatile(v) }
}

/// Enables this CPU's local APIC (xAPIC mode) with `spurious` as the
/// spurious-interrupt vector.
pub fn apic_enable(spurious: u8) {
    // SAFETY: sets the global-enable bit at the reset base address.
    unsafe {
        wrmsr(
            IA32_APIC_BASE,
            APIC_BASE as u64 | 1 << 11 | rdmsr(IA32_APIC_BASE) & 0x100,
        )
    };
    apic_write(SVR, 0x100 | u32::from(spurious));
    apic_write(TIMER_DIV, 0b0011); // divide by 16
}

/// This CPU's local APIC id.
pub fn apic_id() -> u32 {
    apic_read(ID) >> 24
}

/// Ends the interrupt being handled.
pub fn apic_eoi() {
    apic_write(EOI, 0);
}

/// Sends interrupt `vector` to the CPU with APIC id `dest`.
pub fn send_ipi(dest: u32, vector: u8) {
    icr(dest << 24, 0x4000 | u32::from(vector));
}

/// Sends INIT, then two start-up IPIs naming `page`, to every other CPU.
pub fn start_aps(page: u8) {
    icr(0, 0x000c_4500); // INIT, assert, all excluding self
    delay_us(10_000);
    for _ in 0..2 {
        icr(0, 0x000c_4600 | u32::from(page)); // STARTUP
        delay_us(200);
    }
}

/// Writes the interrupt command register, with interrupts off (the two
/// halves must not be split by a handler sending an IPI of its own), and
/// waits until the APIC has sent it.
fn icr(hi: u32, lo: u32) {
    let on = irq_save();
    apic_write(ICR_HI, hi);
    apic_write(ICR_LO, lo);
    while apic_read(ICR_LO) & 1 << 12 != 0 {
        core::hint::spin_loop();
    }
    irq_restore(on);
}

/// Arms this CPU's APIC timer to raise `vector` once, after about `ns`
/// nanoseconds (longer waits are cut to what the counter holds: the
/// waiter wakes early, which the futex contract allows).
pub fn timer_oneshot(vector: u8, ns: u64) {
    let ticks = (u128::from(ns) * u128::from(APIC_HZ.load(Ordering::Relaxed)) / 1_000_000_000)
        .clamp(1, u128::from(u32::MAX)) as u32;
    apic_write(LVT_TIMER, u32::from(vector));
    apic_write(TIMER_INIT, ticks);
}

/// Stops this CPU's APIC timer.
pub fn timer_stop() {
    apic_write(TIMER_INIT, 0);
}

// ---- clocks --------------------------------------------------------------

/// TSC ticks per second.
static TSC_HZ: AtomicU64 = AtomicU64::new(1);
/// APIC timer ticks per second (after the divide-by-16).
static APIC_HZ: AtomicU64 = AtomicU64::new(1);
/// The TSC at calibration: nanotime's origin.
static TSC0: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick as a 32.32 fixed-point number.
static NS_PER_TICK_32: AtomicU64 = AtomicU64::new(0);

/// One PIT window's measurement: TSC ticks across it, how far either end
/// of it may be off (in TSC ticks), and APIC timer ticks across it.
struct Window {
    tsc: u64,
    slack: u64,
    apic: u64,
}

/// Times `count` ticks of the PIT (channel 2, gated by port 0x61, mode 0)
/// with the TSC and the APIC timer. Each end is bracketed by two TSC
/// readings: the start by the ones around the write that starts the
/// count, the end by the one before the last poll that saw the count
/// running and the one after the poll that saw it done. A vCPU that the
/// host takes away inside either bracket (under TCG on a loaded host that
/// is milliseconds) shows up as slack, not as a wrong rate.
fn pit_window(count: u16) -> Window {
    outb(0x61, (inb(0x61) & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0
    outb(0x42, count as u8);
    apic_write(LVT_TIMER, 1 << 16); // masked
    apic_write(TIMER_INIT, u32::MAX);
    let a = rdtsc();
    outb(0x42, (count >> 8) as u8); // the count starts here
    let b = rdtsc();
    let mut before_poll = b;
    let (c, d) = loop {
        let t = rdtsc();
        let done = inb(0x61) & 0x20 != 0;
        if done {
            break (before_poll, rdtsc());
        }
        before_poll = t;
    };
    let apic = u64::from(u32::MAX - apic_read(TIMER_CUR));
    timer_stop();
    Window {
        tsc: (c + d) / 2 - (a + b) / 2,
        slack: (b - a) + (d - c),
        apic,
    }
}

/// Measures the TSC and APIC timer rates against 25 ms windows of the PIT
/// (counting at 1,193,182 Hz). Each rate is the median over the windows
/// of its midpoint estimate, and a window whose ends are known to 0.1 %
/// ends the measurement early (on an idle host, the first one).
///
/// One window used to be enough on an idle host. Under TCG on a loaded
/// host, though, the vCPU can lose the CPU between starting the PIT and
/// reading the TSC, or each port access can wait milliseconds for QEMU's
/// lock; 2 MHz and 5,264 MHz were seen, and with 2 MHz every timed
/// scenario failed. The median drops such a window. Load still stretches
/// every window alike (with 16 CPU hogs on 2 host CPUs: 2,669 to 5,369 MHz
/// against 2,100 idle, the scenarios all passing), which only makes the
/// kernel's clock run slow (in every run seen), not fast.
/// Call once, on the boot CPU, after [`apic_enable`].
pub fn calibrate() {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 25;
    const WINDOWS: usize = 7;
    let count = (PIT_HZ * MS / 1000) as u16;
    let mut tsc = [0u64; WINDOWS];
    let mut apic = [0u64; WINDOWS];
    let mut n = 0;
    while n < WINDOWS {
        let w = pit_window(count);
        tsc[n] = w.tsc;
        apic[n] = w.apic;
        n += 1;
        if w.slack * 1000 < w.tsc {
            // This one's ends are known to 0.1 %: take it alone.
            tsc[0] = w.tsc;
            apic[0] = w.apic;
            n = 1;
            break;
        }
    }
    let (tsc, apic) = (&mut tsc[..n], &mut apic[..n]);
    tsc.sort_unstable();
    apic.sort_unstable();
    // The window is `count` PIT ticks long, not exactly MS milliseconds.
    let window_ns = u64::from(count) * 1_000_000_000 / PIT_HZ;
    let tsc_hz = (tsc[n / 2] * 1_000_000_000 / window_ns).max(1);
    TSC_HZ.store(tsc_hz, Ordering::Relaxed);
    APIC_HZ.store(
        (apic[n / 2] * 1_000_000_000 / window_ns).max(1),
        Ordering::Relaxed,
    );
    NS_PER_TICK_32.store(
        ((1_000_000_000u128 << 32) / u128::from(tsc_hz)) as u64,
        Ordering::Relaxed,
    );
    TSC0.store(rdtsc(), Ordering::Release);
}

/// The calibrated rates: (TSC Hz, APIC timer Hz).
pub fn rates() -> (u64, u64) {
    (
        TSC_HZ.load(Ordering::Relaxed),
        APIC_HZ.load(Ordering::Relaxed),
    )
}

/// Nanoseconds since [`calibrate`], from the TSC (invariant and shared
/// by all CPUs under QEMU and on current hardware).
pub fn nanotime() -> u64 {
    let d = rdtsc().saturating_sub(TSC0.load(Ordering::Acquire));
    ((u128::from(d) * u128::from(NS_PER_TICK_32.load(Ordering::Relaxed))) >> 32) as u64
}

/// Spins for `us` microseconds of the TSC.
pub fn delay_us(us: u64) {
    let end = rdtsc() + us * TSC_HZ.load(Ordering::Relaxed) / 1_000_000;
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}
