//! Boot, step 1: from the PVH entry to Rust, and the AP trampoline.
//!
//! The loader (`qemu-system-x86_64 -kernel`, through the PVH note below)
//! puts each PT_LOAD segment at its physical address and jumps to
//! `_start` in 32-bit protected mode: flat segments, paging off,
//! interrupts off, no stack, `ebx` = the physical address of the
//! `hvm_start_info` block. `_start` then
//!
//! 1. zeroes `.bss` (the page tables and the boot stack live there),
//! 2. identity-maps the first 4 GiB with 2 MiB pages (the last GiB, where
//!    the local APIC's registers are, uncached),
//! 3. turns on PAE, loads CR3, sets EFER.LME and CR0.PG: long mode,
//! 4. loads a GDT with a 64-bit code segment and jumps to it,
//! 5. calls [`crate::kmain`] on the boot stack with the start-info address.
//!
//! An application processor (AP) starts in real mode at the page the
//! start-up IPI names: [`crate::smp`] copies `ap_trampoline_start ..
//! ap_trampoline_end` to [`TRAMPOLINE`]. The trampoline goes from real
//! mode straight to long mode (PAE, the boot page tables, EFER.LME, then
//! PE and PG together and a far jump), takes the next AP index and that
//! index's stack, and calls [`crate::smp::ap_main`].

use core::arch::global_asm;
use core::sync::atomic::{AtomicPtr, AtomicU32};

/// Where the AP trampoline is copied: a free page below 1 MiB (the
/// start-up IPI's vector is its page number).
pub const TRAMPOLINE: usize = 0x8000;

/// Bytes of the boot CPU's stack (also its g0 stack once it joins).
pub const BOOT_STACK: usize = 64 * 1024;

/// The stack tops of the APs, indexed by AP index (1, 2, …), set by the
/// boot CPU before it starts them.
pub static AP_STACKS: AtomicPtr<usize> = AtomicPtr::new(core::ptr::null_mut());

/// The next AP index: each AP takes one in the trampoline.
pub static AP_NEXT: AtomicU32 = AtomicU32::new(1);

unsafe extern "C" {
    /// The first byte of the AP trampoline (16-bit code).
    pub static ap_trampoline_start: u8;
    /// The byte after it.
    pub static ap_trampoline_end: u8;
    /// The end of the image (page aligned): the heap starts here.
    pub static __image_end: u8;
    /// The boot CPU's stack ([`BOOT_STACK`] bytes).
    pub static boot_stack: u8;
}

global_asm!(
    // The PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18) with the entry address.
    // The descriptor is 8 bytes: QEMU reads a word-sized value from it.
    r#"
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .p2align 2
    .quad _start
"#,
    // The 32-bit entry. Register contract:
    // - in: ebx = hvm_start_info's physical address; 32-bit flat protected
    //   mode, paging and interrupts off;
    // - out: never returns (calls kmain(rdi = start_info) on the boot
    //   stack, ud2 if it returns);
    // - clobbered: everything;
    // - stack: none on entry; boot_stack_top after the zeroing of .bss.
    r#"
    .section .text._start, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    movl %ebx, %esi
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl $boot_stack_top, %esp

    movl $boot_pd, %edi
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    cmpl $1536, %ecx
    jb 2f
    orl $0x18, %eax
2:  movl %eax, (%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 1b
    movl $boot_pd + 3, %eax
    movl %eax, boot_pdpt
    addl $4096, %eax
    movl %eax, boot_pdpt + 8
    addl $4096, %eax
    movl %eax, boot_pdpt + 16
    addl $4096, %eax
    movl %eax, boot_pdpt + 24
    movl $boot_pdpt + 3, %eax
    movl %eax, boot_pml4

    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    lgdt boot_gdtr
    ljmp $0x08, $3f

    .code64
3:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    movl %esi, %edi
    xorl %ebp, %ebp
    call {kmain}
    ud2
"#,
    // The AP trampoline, run from TRAMPOLINE in real mode. Register
    // contract:
    // - in: cs = TRAMPOLINE >> 4, ip = 0 (the start-up IPI), real mode;
    // - out: never returns (calls ap_main(rdi = AP index) on that index's
    //   stack, ud2 if it returns);
    // - clobbered: everything;
    // - stack: none until AP_STACKS[index].
    r#"
    .section .text.ap_trampoline, "ax"
    .code16
    .globl ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    movl $0x20, %eax
    movl %eax, %cr4
    movl (ap_trampoline_cr3 - ap_trampoline_start), %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    lgdtl (ap_trampoline_gdtr - ap_trampoline_start)
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_long_start
    .p2align 3
ap_trampoline_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
ap_trampoline_cr3:
    .long boot_pml4
    .globl ap_trampoline_end
ap_trampoline_end:

    .code64
    .section .text.ap_long_start, "ax"
ap_long_start:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl $1, %eax
    lock xaddl %eax, {ap_next}(%rip)
    movq {ap_stacks}(%rip), %rbx
    movq (%rbx,%rax,8), %rsp
    movl %eax, %edi
    xorl %ebp, %ebp
    call {ap_main}
    ud2
"#,
    // The GDT (null, 64-bit code 0x08, data 0x10; accessed bits set, so
    // the CPU never writes it) and the boot page tables and stack.
    r#"
    .section .data.boot_gdt, "aw"
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
boot_gdt_end:
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .bss.boot, "aw", @nobits
    .p2align 12
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd: .skip 4 * 4096
    .globl boot_stack
boot_stack: .skip {stack}
boot_stack_top:
    .text
"#,
    kmain = sym crate::kmain,
    ap_main = sym crate::smp::ap_main,
    ap_next = sym AP_NEXT,
    ap_stacks = sym AP_STACKS,
    stack = const BOOT_STACK,
    options(att_syntax)
);
