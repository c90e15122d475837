#!/usr/bin/env python3
"""Boots ferry-testkernel through its 64-bit Linux boot protocol entry on
/dev/kvm, as a stand-in VMM until Ferry can: long mode, 4 GiB identity map,
flat GDT (CS 0x10, DS 0x18), boot_params with e820 and cmdline, optionally an
MP table. Serial output goes to stdout; port 0x64 <- 0xfe ends the run.

usage: kvmboot.py [--mem MIB] [--mp-cpus N] [--tsc-leaf] [--count] ELF [CMDLINE]
No devices besides the UART, the in-kernel irqchip and PIT (so no `blk`).
--count single-steps the guest and reports the instructions executed before
the first serial byte and before the end of the first line, then stops.
"""
import argparse, ctypes, fcntl, mmap, os, struct, sys

KVMIO = 0xAE
def _io(nr): return (KVMIO << 8) | nr
def _iow(nr, size): return (1 << 30) | (size << 16) | (KVMIO << 8) | nr
def _ior(nr, size): return (2 << 30) | (size << 16) | (KVMIO << 8) | nr
def _iowr(nr, size): return (3 << 30) | (size << 16) | (KVMIO << 8) | nr

KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_CREATE_PIT2 = _iow(0x77, 64)
KVM_RUN = _io(0x80)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_SET_GUEST_DEBUG = _iow(0x9B, 72)

_libc = ctypes.CDLL(None, use_errno=True)

def ioctl_int(fd, req, arg):
    """An ioctl whose argument is an unsigned long (fcntl only passes a C int)."""
    r = _libc.ioctl(fd, ctypes.c_ulong(req), ctypes.c_ulong(arg))
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r

def load_elf(mem, data):
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    for i in range(e_phnum):
        p_type, _, p_off, _, p_paddr, p_filesz, _ = struct.unpack_from(
            "<IIQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:
            mem[p_paddr:p_paddr + p_filesz] = data[p_off:p_off + p_filesz]
    return e_entry

def mp_table(mem, addr, cpus):
    """MP floating pointer at addr, config table right after it."""
    table = addr + 16
    entries = b"".join(struct.pack("<BBBBII8x", 0, i, 0x14, 1 | (2 if i == 0 else 0),
                                   0x600, 0) for i in range(cpus))
    hdr = struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(entries), 4, 0,
                      b"FERRY   ", b"TESTKERNEL  ", 0, 0, cpus, 0xFEE00000, 0, 0, 0)
    body = bytearray(hdr + entries)
    body[7] = (-sum(body)) & 0xFF
    mem[table:table + len(body)] = bytes(body)
    fp = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", table, 1, 4, 0, 0))
    fp[10] = (-sum(fp)) & 0xFF
    mem[addr:addr + 16] = bytes(fp)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("elf")
    ap.add_argument("cmdline", nargs="?", default="")
    ap.add_argument("--mem", type=int, default=128)
    ap.add_argument("--mp-cpus", type=int, default=0)
    ap.add_argument("--tsc-leaf", action="store_true",
                    help="expose the TSC frequency at CPUID 0x40000010")
    ap.add_argument("--count", action="store_true",
                    help="single-step and report instructions up to the first line")
    a = ap.parse_args()

    size = a.mem << 20
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    host = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    ioctl_int(vm, KVM_SET_TSS_ADDR, 0xFFFBD000)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 0, 0, 0, size, host))
    fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
    fcntl.ioctl(vm, KVM_CREATE_PIT2, struct.pack("<I60x", 1))  # KVM_PIT_SPEAKER_DUMMY
    cpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)

    n = 100
    buf = bytearray(struct.pack("<II", n, 0) + bytes(40 * n))
    fcntl.ioctl(kvm, KVM_GET_SUPPORTED_CPUID, buf)
    ents = [list(struct.unpack_from("<IIIIIII", buf, 8 + 40 * i))
            for i in range(struct.unpack_from("<I", buf)[0])]
    if a.tsc_leaf:
        khz = fcntl.ioctl(cpu, KVM_GET_TSC_KHZ, 0)
        for e in ents:
            if e[0] == 0x40000000:
                e[3] = 0x40000010
        ents.append([0x40000010, 0, 0, khz, 0, 0, 0])
    out = struct.pack("<II", len(ents), 0) + b"".join(
        struct.pack("<IIIIIII12x", *e) for e in ents)
    fcntl.ioctl(cpu, KVM_SET_CPUID2, bytearray(out))

    data = open(a.elf, "rb").read()
    entry = load_elf(mem, data)
    # GDT at 0x500; page tables: PML4 0x9000, PDPT 0xa000, PDs 0xb000..0xefff.
    mem[0x500:0x520] = struct.pack("<4Q", 0, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    mem[0x9000:0x9008] = struct.pack("<Q", 0xA003)
    for i in range(4):
        mem[0xA000 + 8 * i:0xA008 + 8 * i] = struct.pack("<Q", (0xB000 + 0x1000 * i) | 3)
    for i in range(2048):
        mem[0xB000 + 8 * i:0xB008 + 8 * i] = struct.pack("<Q", (i << 21) | 0x83)
    # boot_params at 0x7000, cmdline at 0x20000.
    bp = 0x7000
    cmd = a.cmdline.encode() + b"\0"
    mem[0x20000:0x20000 + len(cmd)] = cmd
    struct.pack_into("<I", mem, bp + 0x202, 0x53726448)  # "HdrS"
    struct.pack_into("<I", mem, bp + 0x228, 0x20000)
    struct.pack_into("<I", mem, bp + 0x238, len(cmd) - 1)
    e820 = [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
            (0x100000, size - 0x100000, 1)]
    mem[bp + 0x1E8] = len(e820)
    for i, (addr, sz, typ) in enumerate(e820):
        struct.pack_into("<QQI", mem, bp + 0x2D0 + 20 * i, addr, sz, typ)
    if a.mp_cpus:
        mp_table(mem, 0x9FC00, a.mp_cpus)

    sregs = bytearray(312)
    fcntl.ioctl(cpu, KVM_GET_SREGS, sregs)
    def seg(i, sel, typ, l, db):
        struct.pack_into("<QIHBBBBBBBBBx", sregs, 24 * i, 0, 0xFFFFFFFF, sel, typ, 1, 0, db, 1, l, 1, 0, 0)
    seg(0, 0x10, 11, 1, 0)          # cs
    for i in (1, 2, 3, 4, 5):       # ds es fs gs ss
        seg(i, 0x18, 3, 0, 1)
    struct.pack_into("<QH", sregs, 8 * 24, 0x500, 31)  # gdt
    cr0, cr2, cr3, cr4, cr8, efer = struct.unpack_from("<6Q", sregs, 8 * 24 + 32)
    struct.pack_into("<6Q", sregs, 8 * 24 + 32, cr0 | 0x80000011, cr2, 0x9000,
                     cr4 | 0x20, cr8, efer | 0x500)
    fcntl.ioctl(cpu, KVM_SET_SREGS, sregs)
    regs = [0] * 18
    regs[4] = bp                     # rsi
    regs[16], regs[17] = entry, 2    # rip, rflags
    fcntl.ioctl(cpu, KVM_SET_REGS, struct.pack("<18Q", *regs))

    run = mmap.mmap(cpu, fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0))
    steps, first = 0, None
    if a.count:  # KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
        fcntl.ioctl(cpu, KVM_SET_GUEST_DEBUG, struct.pack("<II64x", 3, 0))
    while True:
        fcntl.ioctl(cpu, KVM_RUN, 0)
        reason = struct.unpack_from("<I", run, 8)[0]
        if reason == 4:  # KVM_EXIT_DEBUG
            steps += 1
            continue
        if reason == 6:  # KVM_EXIT_MMIO: nothing there, reads give 0
            run[40:48] = bytes(8)
            continue
        if reason != 2:  # KVM_EXIT_IO
            sys.exit(f"kvmboot: exit reason {reason}")
        direction, _, port, _, off = struct.unpack_from("<BBHIQ", run, 32)
        if direction == 1:  # out
            v = run[off]
            if port == 0x3F8:
                if a.count and first is None:
                    first = steps
                sys.stdout.buffer.write(bytes([v]))
                sys.stdout.flush()
                if a.count and v == 10:
                    print(f"kvmboot: {first} instructions to the first byte, "
                          f"{steps} to the end of the line")
                    return
            elif port == 0x64 and v == 0xFE:
                print("kvmboot: reset")
                return
        else:
            run[off] = 0x20 if port == 0x3FD else 0xFF

if __name__ == "__main__":
    main()
