#!/usr/bin/env python3
"""Checks a disk image written by ferry-testkernel's blk workload.

usage: check_blk.py IMAGE BLOCKS [SEED]
Every 4 KiB block b < BLOCKS must hold the documented header words and
zeros after them; the rest of the image is not looked at.
"""
import struct, sys

M = (1 << 64) - 1
W0 = 0x4B4C4259_52524546  # "FERRYBLK"
GOLDEN = 0x9E3779B97F4A7C15

def rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M

def header(b, seed):
    w3 = ((W0 ^ rotl(b, 17) ^ rotl(seed, 31)) * GOLDEN) & M
    return struct.pack("<4Q", W0, b, seed, w3)

def main():
    path, n = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3], 0) if len(sys.argv) > 3 else 1
    with open(path, "rb") as f:
        for b in range(n):
            blk = f.read(4096)
            if len(blk) != 4096:
                sys.exit(f"block {b}: image too short")
            if blk[:32] != header(b, seed):
                sys.exit(f"block {b}: bad header {blk[:32].hex()}")
            if blk[32:].count(0) != 4096 - 32:
                sys.exit(f"block {b}: non-zero bytes after the header")
    print(f"ok: {n} blocks, seed {seed}")

if __name__ == "__main__":
    main()
