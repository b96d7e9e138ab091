//! Interrupts: the IDT, one assembly stub per vector, and the dispatcher.
//!
//! Every vector the kernel uses has a stub that pushes the vector (and a
//! zero where the CPU pushes no error code) and jumps to `isr_common`,
//! which saves the caller-saved registers, calls [`isr_dispatch`] with a
//! pointer to the [`Frame`] and returns with `iretq`. Handlers run on the
//! interrupted stack (ring 0 to ring 0: no stack switch), whatever it is:
//! a goroutine's, an M's g0, the boot stack. The kernel is soft-float, so
//! no vector, SSE or x87 state needs saving.
//!
//! Exceptions print what happened and end the machine with a failure
//! status: gokernel's fatal errors end in `ud2`, so a #UD follows the
//! message gokernel printed through the fatal writer.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::x86;

/// The APIC timer: futex time-outs and the timer scenarios.
pub const TIMER: u8 = 32;
/// An IPI that only wakes a halted CPU (futexwakeup, kicks).
pub const KICK: u8 = 33;
/// The scenarios' "device": an interrupt another CPU raises by IPI.
pub const DEVICE: u8 = 34;
/// The APIC's spurious vector.
pub const SPURIOUS: u8 = 255;

/// The vectors with stubs: exceptions 0..32, the kernel's 32..48, 255.
const VECTORS: [u8; 49] = {
    let mut v = [0u8; 49];
    let mut i = 0;
    while i < 48 {
        v[i] = i as u8;
        i += 1;
    }
    v[48] = 255;
    v
};

/// What `isr_common` leaves on the stack: the saved registers, the
/// vector and error code, and the CPU's interrupt frame.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

unsafe extern "C" {
    /// The stubs' addresses, in [`VECTORS`] order.
    static isr_table: [u64; 49];
}

global_asm!(
    // Register contract of every stub and of isr_common:
    // - in: the CPU's interrupt frame (and error code for vectors 8,
    //   10-14, 17, 21, 29, 30) on the interrupted stack, interrupts off;
    // - out: iretq to the interrupted code with every register restored;
    // - clobbered: nothing (rax, rcx, rdx, rsi, rdi, r8-r11 are saved
    //   here; isr_dispatch preserves the rest); DF is cleared for Rust;
    // - stack: the frame plus 11 words; rsp is 16-byte aligned at the
    //   call (the CPU aligns it before pushing its 5- or 6-word frame).
    r#"
    .section .text.isr, "ax"
    .p2align 4
isr_common:
    cld
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    movq %rsp, %rdi
    call {dispatch}
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq
    .p2align 4
isr_stub_0:
    pushq $0
    pushq $0
    jmp isr_common
    .p2align 4
isr_stub_1:
    pushq $0
    pushq $1
    jmp isr_common
    .p2align 4
isr_stub_2:
    pushq $0
    pushq $2
    jmp isr_common
    .p2align 4
isr_stub_3:
    pushq $0
    pushq $3
    jmp isr_common
    .p2align 4
isr_stub_4:
    pushq $0
    pushq $4
    jmp isr_common
    .p2align 4
isr_stub_5:
    pushq $0
    pushq $5
    jmp isr_common
    .p2align 4
isr_stub_6:
    pushq $0
    pushq $6
    jmp isr_common
    .p2align 4
isr_stub_7:
    pushq $0
    pushq $7
    jmp isr_common
    .p2align 4
isr_stub_8:
    pushq $8
    jmp isr_common
    .p2align 4
isr_stub_9:
    pushq $0
    pushq $9
    jmp isr_common
    .p2align 4
isr_stub_10:
    pushq $10
    jmp isr_common
    .p2align 4
isr_stub_11:
    pushq $11
    jmp isr_common
    .p2align 4
isr_stub_12:
    pushq $12
    jmp isr_common
    .p2align 4
isr_stub_13:
    pushq $13
    jmp isr_common
    .p2align 4
isr_stub_14:
    pushq $14
    jmp isr_common
    .p2align 4
isr_stub_15:
    pushq $0
    pushq $15
    jmp isr_common
    .p2align 4
isr_stub_16:
    pushq $0
    pushq $16
    jmp isr_common
    .p2align 4
isr_stub_17:
    pushq $17
    jmp isr_common
    .p2align 4
isr_stub_18:
    pushq $0
    pushq $18
    jmp isr_common
    .p2align 4
isr_stub_19:
    pushq $0
    pushq $19
    jmp isr_common
    .p2align 4
isr_stub_20:
    pushq $0
    pushq $20
    jmp isr_common
    .p2align 4
isr_stub_21:
    pushq $21
    jmp isr_common
    .p2align 4
isr_stub_22:
    pushq $0
    pushq $22
    jmp isr_common
    .p2align 4
isr_stub_23:
    pushq $0
    pushq $23
    jmp isr_common
    .p2align 4
isr_stub_24:
    pushq $0
    pushq $24
    jmp isr_common
    .p2align 4
isr_stub_25:
    pushq $0
    pushq $25
    jmp isr_common
    .p2align 4
isr_stub_26:
    pushq $0
    pushq $26
    jmp isr_common
    .p2align 4
isr_stub_27:
    pushq $0
    pushq $27
    jmp isr_common
    .p2align 4
isr_stub_28:
    pushq $0
    pushq $28
    jmp isr_common
    .p2align 4
isr_stub_29:
    pushq $29
    jmp isr_common
    .p2align 4
isr_stub_30:
    pushq $30
    jmp isr_common
    .p2align 4
isr_stub_31:
    pushq $0
    pushq $31
    jmp isr_common
    .p2align 4
isr_stub_32:
    pushq $0
    pushq $32
    jmp isr_common
    .p2align 4
isr_stub_33:
    pushq $0
    pushq $33
    jmp isr_common
    .p2align 4
isr_stub_34:
    pushq $0
    pushq $34
    jmp isr_common
    .p2align 4
isr_stub_35:
    pushq $0
    pushq $35
    jmp isr_common
    .p2align 4
isr_stub_36:
    pushq $0
    pushq $36
    jmp isr_common
    .p2align 4
isr_stub_37:
    pushq $0
    pushq $37
    jmp isr_common
    .p2align 4
isr_stub_38:
    pushq $0
    pushq $38
    jmp isr_common
    .p2align 4
isr_stub_39:
    pushq $0
    pushq $39
    jmp isr_common
    .p2align 4
isr_stub_40:
    pushq $0
    pushq $40
    jmp isr_common
    .p2align 4
isr_stub_41:
    pushq $0
    pushq $41
    jmp isr_common
    .p2align 4
isr_stub_42:
    pushq $0
    pushq $42
    jmp isr_common
    .p2align 4
isr_stub_43:
    pushq $0
    pushq $43
    jmp isr_common
    .p2align 4
isr_stub_44:
    pushq $0
    pushq $44
    jmp isr_common
    .p2align 4
isr_stub_45:
    pushq $0
    pushq $45
    jmp isr_common
    .p2align 4
isr_stub_46:
    pushq $0
    pushq $46
    jmp isr_common
    .p2align 4
isr_stub_47:
    pushq $0
    pushq $47
    jmp isr_common
    .p2align 4
isr_stub_255:
    pushq $0
    pushq $255
    jmp isr_common

    .section .rodata.isr_table, "a"
    .p2align 3
isr_table:
    .quad isr_stub_0
    .quad isr_stub_1
    .quad isr_stub_2
    .quad isr_stub_3
    .quad isr_stub_4
    .quad isr_stub_5
    .quad isr_stub_6
    .quad isr_stub_7
    .quad isr_stub_8
    .quad isr_stub_9
    .quad isr_stub_10
    .quad isr_stub_11
    .quad isr_stub_12
    .quad isr_stub_13
    .quad isr_stub_14
    .quad isr_stub_15
    .quad isr_stub_16
    .quad isr_stub_17
    .quad isr_stub_18
    .quad isr_stub_19
    .quad isr_stub_20
    .quad isr_stub_21
    .quad isr_stub_22
    .quad isr_stub_23
    .quad isr_stub_24
    .quad isr_stub_25
    .quad isr_stub_26
    .quad isr_stub_27
    .quad isr_stub_28
    .quad isr_stub_29
    .quad isr_stub_30
    .quad isr_stub_31
    .quad isr_stub_32
    .quad isr_stub_33
    .quad isr_stub_34
    .quad isr_stub_35
    .quad isr_stub_36
    .quad isr_stub_37
    .quad isr_stub_38
    .quad isr_stub_39
    .quad isr_stub_40
    .quad isr_stub_41
    .quad isr_stub_42
    .quad isr_stub_43
    .quad isr_stub_44
    .quad isr_stub_45
    .quad isr_stub_46
    .quad isr_stub_47
    .quad isr_stub_255
    .text
"#,
    dispatch = sym isr_dispatch,
    options(att_syntax)
);

/// The IDT: 256 gates of 16 bytes.
struct Idt([AtomicU64; 512]);

static IDT: Idt = Idt([const { AtomicU64::new(0) }; 512]);

/// Fills the IDT with an interrupt gate (present, DPL 0, code segment
/// 0x08, interrupts off in the handler) for every stub. Once, on the boot
/// CPU, before any CPU loads it.
pub fn init() {
    for (i, &v) in VECTORS.iter().enumerate() {
        // SAFETY: isr_table is a static array of the stubs' addresses.
        let h = unsafe { isr_table[i] };
        let lo = (h & 0xffff) | 0x08 << 16 | 0x8e00u64 << 32 | (h >> 16 & 0xffff) << 48;
        IDT.0[2 * v as usize].store(lo, Ordering::Relaxed);
        IDT.0[2 * v as usize + 1].store(h >> 32, Ordering::Relaxed);
    }
}

/// Loads the IDT on this CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let r = Idtr {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: IDT.0.as_ptr() as u64,
    };
    // SAFETY: the IDT is static and filled by init; every gate it holds
    // points at a stub above.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &raw const r, options(readonly, nostack, preserves_flags))
    }
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound",
    "#UD invalid opcode",
    "#NM no FPU",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualisation",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV",
    "#VC",
    "#SX",
    "reserved",
];

/// Called by `isr_common` for every interrupt, on the interrupted stack,
/// with interrupts off.
extern "C" fn isr_dispatch(f: &mut Frame) {
    match f.vector as u8 {
        v @ 0..32 => exception(v, f),
        TIMER => {
            x86::apic_eoi();
            crate::cpu::on_timer();
            crate::preempt_scenarios::on_timer(f);
        }
        KICK => x86::apic_eoi(),
        DEVICE => {
            x86::apic_eoi();
            crate::cpu::on_device();
        }
        SPURIOUS => {}
        v => {
            x86::apic_eoi();
            crate::say!("unexpected interrupt {v} on CPU {}", crate::cpu::this());
        }
    }
}

/// An exception: print it and end the machine with a failure status.
fn exception(v: u8, f: &Frame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
    };
    crate::say!(
        "FAIL exception {v} ({}) on CPU {}: rip {:#x}, error {:#x}, cr2 {cr2:#x}, rsp {:#x}, rax {:#x}, rdi {:#x}",
        NAMES[v as usize],
        crate::cpu::this(),
        f.rip,
        f.error,
        f.rsp,
        f.rax,
        f.rdi,
    );
    if v == 6 {
        crate::say!("(gokernel's fatal errors end in ud2: its message, if any, is above)");
    }
    x86::exit_qemu(x86::EXIT_FAIL)
}
