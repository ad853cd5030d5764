#!/usr/bin/env python3
"""Writes the seed inputs of the guest_queue fuzz target into corpus/guest_queue.

An input is 8 control bytes (see vhost_blk::fuzzing) and then guest memory from address 0:
the descriptor table at 0x000, the avail ring at 0x100, the used ring at 0x140, request
headers at 0x200, status bytes at 0x300, data from 0x400 and an indirect table at 0x800.
Requests in one input run concurrently, so no seed reads what it writes.
"""
import os
import struct

NEXT, WRITE, INDIRECT = 1, 2, 4
IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13
DESC, AVAIL, USED = 0x000, 0x100, 0x140


class Guest:
    def __init__(self):
        self.mem = bytearray(0x1000)
        self.next_desc = 0
        self.heads = []

    def put(self, addr, data):
        self.mem[addr:addr + len(data)] = data

    def chain(self, bufs, table=DESC, first=None):
        """Writes a chain of (addr, len, flags) at `table`; returns its head index."""
        head = self.next_desc if first is None else first
        for i, (addr, length, flags) in enumerate(bufs):
            last = i + 1 == len(bufs)
            flags |= 0 if last else NEXT
            self.put(table + 16 * (head + i), struct.pack("<QIHH", addr, length, flags, head + i + 1))
        if first is None:
            self.next_desc += len(bufs)
        return head

    def request(self, n, kind, sector, bufs):
        header = 0x200 + 16 * n
        self.put(header, struct.pack("<IIQ", kind, 0, sector))
        self.heads.append(self.chain([(header, 16, 0)] + bufs + [(0x300 + n, 1, WRITE)]))

    def indirect(self, n, kind, sector, bufs):
        header = 0x200 + 16 * n
        self.put(header, struct.pack("<IIQ", kind, 0, sector))
        table = [(header, 16, 0)] + bufs + [(0x300 + n, 1, WRITE)]
        self.chain(table, table=0x800, first=0)
        self.heads.append(self.chain([(0x800, 16 * len(table), INDIRECT)]))

    def input(self, flags, queue_size_code=4):
        for i, head in enumerate(self.heads):
            self.put(AVAIL + 4 + 2 * i, struct.pack("<H", head))
        self.put(AVAIL, struct.pack("<HH", 0, len(self.heads)))
        control = struct.pack("<BHHHB", flags, DESC, AVAIL, USED, queue_size_code)
        return control + bytes(self.mem)


def mixed(with_ranges):
    g = Guest()
    g.put(0x400, bytes(range(256)) * 2)
    g.request(0, OUT, 1, [(0x400, 512, 0)])
    g.put(0xa00, b"\xee" * 512)
    g.request(1, IN, 100, [(0xa00, 512, WRITE)])  # a sector no seed writes: zeros
    g.request(2, FLUSH, 0, [])
    g.request(3, GET_ID, 0, [(0x700, 20, WRITE)])
    if with_ranges:
        g.put(0x780, struct.pack("<QII", 8, 8, 0))
        g.request(4, DISCARD, 0, [(0x780, 16, 0)])
        g.put(0x790, struct.pack("<QII", 64, 16, 1))
        g.request(5, WRITE_ZEROES, 0, [(0x790, 16, 0)])
    return g


def seeds():
    yield "raw-mixed", mixed(False).input(0)
    yield "qcow2-mixed-event-idx", mixed(True).input(3)
    g = Guest()
    g.request(0, IN, 0, [(0x7f00, 512, WRITE)])  # across the two regions' boundary
    g.request(1, OUT, 2047, [(0x400, 512, 0), (0x600, 512, 0)])  # past the end
    yield "split-memory-read-across", g.input(4)
    g = Guest()
    g.put(0x400, b"\xa5" * 1024)
    g.indirect(0, OUT, 16, [(0x400, 1024, 0)])
    g.put(0xc00, b"\xee" * 1024)
    g.request(1, IN, 24, [(0xc00, 1024, WRITE)])  # a sector no seed writes: zeros
    yield "qcow2-indirect", g.input(2)
    g = Guest()
    g.request(0, IN, 0, [(0x400, 512, WRITE)])
    g.put(DESC + 16 * 1 + 14, struct.pack("<H", 0))  # the chain loops back to its head
    yield "raw-loop", g.input(1)


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "guest_queue")
    os.makedirs(out, exist_ok=True)
    for name, data in seeds():
        with open(os.path.join(out, "seed-" + name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
