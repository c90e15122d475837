//! Entry points, the PVH note, and the static GDT and page tables the PVH
//! path needs. Both entries end in `kmain(boot_params, hvm_start_info)` with
//! the unused one zero.

core::arch::global_asm!(
    r#"
    .pushsection .text.boot, "ax"

    /* 64-bit Linux boot protocol (ELF e_entry): long mode, the VMM's
       identity map and GDT, RSI = boot_params. */
    .code64
    .global _start64
_start64:
    cld
    mov $stack_top, %esp        /* zero-extends into RSP; image is below 4 GiB */
    mov %rsi, %rdi
    xor %esi, %esi
    call kmain
0:  hlt
    jmp 0b

    /* PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
       Everything it needs is built at link time, so it is straight-line. */
    .code32
    .global pvh_start
pvh_start:
    cld
    lgdt gdt_ptr
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx       /* EFER */
    rdmsr
    or $0x100, %eax             /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* PG | PE */
    mov %eax, %cr0
    ljmp $0x10, $pvh_start64

    .code64
pvh_start64:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $stack_top, %esp
    xor %edi, %edi
    mov %ebx, %esi              /* zero-extends: hvm_start_info */
    call kmain
1:  hlt
    jmp 1b
    .popsection

    /* XEN_ELFNOTE_PHYS32_ENTRY. The descriptor is 8 bytes holding the 32-bit
       address, like Linux: QEMU reads a pointer-sized value there,
       linux-loader and Xen read 4 or 8 bytes. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4, 8, 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .popsection

    /* Same selectors as the Linux boot protocol: 0x10 code64, 0x18 data. */
    .pushsection .data.boot, "aw"
    .balign 8
gdt:
    .quad 0, 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    /* Identity map of 4 GiB with 2 MiB pages, all filled in at link time
       (a runtime loop over 2048 entries would cost ~10k emulated
       instructions). Present | writable (| PS for the PD entries). */
    .balign 4096
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x3
    .quad pd + 0x1003
    .quad pd + 0x2003
    .quad pd + 0x3003
    .fill 508, 8, 0
pd:
    .set .Lpd_addr, 0
    .rept 2048
    .quad .Lpd_addr + 0x83
    .set .Lpd_addr, .Lpd_addr + 0x200000
    .endr
    .popsection

    .pushsection .bss.stack, "aw", @nobits
    .balign 16
    .skip 16384
stack_top:
    .popsection
"#,
    options(att_syntax)
);
