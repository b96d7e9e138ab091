//! The reference kernel: gokernel on bare x86_64 CPUs, booted by
//! `qemu-system-x86_64 -kernel` (PVH). `cargo xtask qemu` builds and runs
//! it; it prints one line per scenario on the serial port and ends the
//! machine through QEMU's isa-debug-exit device.
//!
//! From power-on to the first goroutine, in the order the code runs:
//!
//! 1. `boot.rs`: the PVH entry, 32-bit → page tables → long mode → [`kmain`].
//! 2. [`kmain`] (here): serial console, heap, IDT, local APIC, clock
//!    calibration, this CPU's TLS block (`glue.rs`).
//! 3. `smp.rs`: the other CPUs, through the trampoline to `ap_main`.
//! 4. `glue.rs`: the scheduler, the first goroutine ([`run::main`]), and
//!    every CPU joining the scheduler as an M.
//!
//! The files: `boot.rs` (assembly), `x86.rs` (ports, MSRs, APIC, PIT,
//! fw_cfg), `serial.rs`, `heap.rs`, `idt.rs` (interrupt stubs and
//! dispatch), `cpu.rs` (the CPU table and its timers), `smp.rs`, `glue.rs`
//! (all the gokernel-specific code: the `Platform`, TLS and FS set-up,
//! joining), `run.rs` (the scenarios), `preempt_scenarios.rs` (timer
//! preemption, turned on there) and the scenarios shared with the
//! image (`../../image/src/scenarios.rs`).
#![no_std]
#![no_main]

extern crate alloc;

mod boot;
mod cpu;
mod glue;
mod heap;
mod idt;
mod irq;
mod poll_scenarios;
mod preempt_scenarios;
mod run;
#[path = "../../image/src/scenarios.rs"]
mod scenarios;
mod serial;
mod smp;
mod x86;

use core::fmt::Write;

#[global_allocator]
static ALLOC: heap::Alloc = heap::Alloc::new();

/// The RAM the heap may use ends here at most (below the PCI hole).
const LOW_RAM_TOP: u64 = 3 << 30;

/// A line of output, formatted without allocating.
pub struct Out(pub heapless::String<512>);

/// Prints a line on the serial console.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {{
        let mut o = $crate::Out(heapless::String::new());
        let _ = core::fmt::Write::write_fmt(&mut o.0, format_args!($($t)*));
        let _ = o.0.push('\n');
        $crate::serial::write(o.0.as_bytes());
    }};
}

/// The `hvm_start_info` magic ("xEn3" with the top bit cleared).
const HVM_START_MAGIC: u32 = 0x336e_c578;

/// Boot, step 2: the boot CPU in long mode, on the boot stack, with
/// interrupts off. `start_info` is the PVH `hvm_start_info` address.
extern "C" fn kmain(start_info: usize) -> ! {
    serial::init();
    // glue: begin
    gokernel::panic::set_fatal_writer(serial::write);
    // glue: end
    // SAFETY: the loader passed the start-info block's address in ebx;
    // its first word is the magic, in identity-mapped low memory.
    let magic = unsafe { (start_info as *const u32).read_volatile() };
    if magic != HVM_START_MAGIC {
        say!("FAIL boot: no PVH start info at {start_info:#x} (magic {magic:#x})");
        x86::exit_qemu(x86::EXIT_FAIL);
    }
    let ncpus = x86::fw_cfg_cpus().clamp(1, cpu::MAX_CPUS);
    let ram = x86::fw_cfg_ram().min(LOW_RAM_TOP) as usize;
    let heap = &raw const boot::__image_end as usize;
    ALLOC.init(heap, ram);
    idt::init();
    idt::load();
    x86::outb(0x21, 0xff); // mask both legacy PICs: the APIC does it all
    x86::outb(0xa1, 0xff);
    x86::apic_enable(idt::SPURIOUS);
    x86::calibrate();
    let (tsc, apic) = x86::rates();
    say!(
        "gokernel reference kernel: {ncpus} CPUs, heap {} MiB at {heap:#x}, TSC {} MHz, APIC timer {} MHz",
        (ram - heap) >> 20,
        tsc / 1_000_000,
        apic / 1_000_000
    );
    cpu::register(0);
    glue::cpu_init();
    let online = smp::start_aps(ncpus);
    glue::start(online)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut o = Out(heapless::String::new());
    let _ = writeln!(o.0, "FAIL panic on CPU {}: {info}", cpu::this());
    serial::write(o.0.as_bytes());
    x86::exit_qemu(x86::EXIT_FAIL)
}
