#!/usr/bin/env python3
"""Writes the handshake seeds of the vhost_user fuzz target (fuzz/corpus/vhost_user/seed-*).

Each seed is a whole frontend session in the input format of
fuzz/vhost_user/VhostUserFuzz.swift: features, memory table (a memfd whose
first bytes hold a descriptor table, an avail ring with one request, the
request header and status byte), ring number, addresses, base, kick and call
eventfds, enable; the IOThread then pops and completes the request. Variants
cover each request type, EVENT_IDX, two queues, inflight tracking and the
teardown messages, so mutation starts from a running queue instead of having
to find the whole sequence. Other files in the directory (found by fuzzing)
are left alone. Usage: fuzz/make_vhost_user_seeds.py [OUTDIR]
"""
import os
import struct
import sys

# The harness's request table: the first byte of a message indexes it.
REQUESTS = [1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 31, 32, 34, 36, 37, 38, 39, 40, 0, 6, 7, 99]
(GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE, SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE,
 GET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
 SET_VRING_ENABLE, GET_CONFIG, GET_INFLIGHT_FD, SET_INFLIGHT_FD, RESET_DEVICE, SET_STATUS) = (
    1, 2, 3, 5, 8, 9, 10, 11, 12, 13, 15, 16, 18, 24, 31, 32, 34, 39)
# Virtio feature bits (SET_FEATURES's u64; the harness adds VERSION_1 and PROTOCOL_FEATURES).
F_INDIRECT, F_EVENT_IDX = 1 << 28, 1 << 29
# Protocol feature bits.
P_MQ, P_REPLY_ACK, P_CONFIG, P_INFLIGHT = 1 << 0, 1 << 3, 1 << 9, 1 << 12
# Descriptor flags; virtio-blk request types.
NEXT, WRITE = 1, 2
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8

u8 = lambda v: struct.pack("<B", v & 0xFF)
u16 = lambda v: struct.pack("<H", v & 0xFFFF)
u32 = lambda v: struct.pack("<I", v & 0xFFFFFFFF)
u64 = lambda v: struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)

MEMORY_PAGES = 8          # first input byte: (1 + b % 16) pages of 4 KiB
# Guest-physical layout of one queue inside the first memfd chunk (<= 255 bytes):
DESC, AVAIL, HDR, STATUS, USED = 0, 64, 96, 112, 128   # queue 0, ring size 4
DATA = 4096                                             # the data buffer, page 1


def message(request, payload=b"", fds=(), raw=False):
    """One message: request index, mode byte (bit 0 NEED_REPLY, bit 1 raw payload), payload, fds.
    A structured payload starts with the ring-index byte the harness reads for every request."""
    out = u8(REQUESTS.index(request)) + u8((2 if raw else 0) | 1)
    out += (u8(len(payload)) if raw else b"") + payload
    out += u8(len(fds))
    for fd in fds:
        out += fd
    return out


def memfd(content=b"", offset64=0):
    return u8(0) + u8(len(content)) + content + u8(offset64)


EVENTFD = u8(1)


def ring(rtype, sector=0, base=0):
    """Descriptor table (a 3-descriptor chain; 2 for FLUSH), avail ring with one head, header, status."""
    writable = WRITE if rtype in (T_IN, T_GET_ID) else 0
    data_len = 20 if rtype == T_GET_ID else 512
    mem = bytearray(USED)
    chain = [(HDR, 16, NEXT, 1), (DATA, data_len, NEXT | writable, 2), (STATUS, 1, WRITE, 0)]
    if rtype == T_FLUSH:
        chain = [(HDR, 16, NEXT, 1), (STATUS, 1, WRITE, 0)]
    for i, (addr, length, flags, nxt) in enumerate(chain):
        mem[DESC + 16 * i:DESC + 16 * (i + 1)] = u64(addr) + u32(length) + u16(flags) + u16(nxt)
    mem[AVAIL:AVAIL + 6] = u16(0) + u16(base + 1) + u16(0)
    mem[HDR:HDR + 16] = u32(rtype) + u32(0) + u64(sector)
    return bytes(mem[:STATUS + 1])


def start_queue(index, num_exp=2, desc=DESC, avail=AVAIL, used=USED, base=0):
    """NUM, ADDR, BASE, KICK, CALL, ENABLE for one ring (structured payloads)."""
    return (message(SET_VRING_NUM, u8(index) + u8(num_exp))
            + message(SET_VRING_ADDR, u8(index) + u16(desc // 64) + u16(used // 64) + u16(avail // 64))
            + message(SET_VRING_BASE, u8(index) + u16(base))
            + message(SET_VRING_KICK, u8(index) + u8(0), [EVENTFD])
            + message(SET_VRING_CALL, u8(index) + u8(0), [EVENTFD])
            + message(SET_VRING_ENABLE, u8(index) + u16(1)))


def session(rtype=T_IN, features=0, protocol=P_MQ | P_REPLY_ACK | P_CONFIG, inflight=False, queues=1,
            teardown=b"", sector=0):
    s = u8(MEMORY_PAGES - 1)
    s += message(GET_FEATURES, raw=True)
    s += message(SET_FEATURES, u8(0) + u64(features))
    s += message(GET_PROTOCOL_FEATURES, raw=True)
    s += message(SET_PROTOCOL_FEATURES, u8(0) + u64(protocol | (P_INFLIGHT if inflight else 0)))
    s += message(SET_OWNER, raw=True)  # structured payloads of unlisted requests are 8 bytes
    if inflight:
        # Inflight payloads: u16 (mmap size / 64), u8 % 3 queues, u8 queue-size exponent (4 entries).
        s += message(GET_INFLIGHT_FD, u8(0) + u16(0) + u8(queues) + u8(2))
        s += message(SET_INFLIGHT_FD, u8(0) + u16(4096 // 64) + u8(queues) + u8(2), [memfd()])
    s += message(SET_MEM_TABLE, u8(0) + u8(0), [memfd(ring(rtype, sector))])
    s += start_queue(0)
    if queues > 1:
        # Queue 1 shares the data page; its rings sit in the second half of page 0.
        s += start_queue(1, desc=2048, avail=2048 + 64, used=2048 + 128)
    s += message(GET_CONFIG, u8(0) + u8(0) + u8(60))
    return s + teardown


def cases():
    return {
        "seed-read": session(T_IN),
        "seed-write": session(T_OUT, sector=8),
        "seed-flush": session(T_FLUSH),
        "seed-get-id": session(T_GET_ID),
        "seed-bad-sector": session(T_IN, sector=1 << 60),
        "seed-event-idx": session(T_IN, features=F_EVENT_IDX | F_INDIRECT),
        "seed-two-queues": session(T_OUT, queues=2),
        "seed-inflight": session(T_IN, inflight=True),
        "seed-get-base": session(T_IN, teardown=message(GET_VRING_BASE, u8(0))),
        "seed-reset-device": session(T_OUT, teardown=message(RESET_DEVICE, raw=True)),
        "seed-status": session(T_IN, teardown=message(SET_STATUS, u8(0) + u64(0x0F)) + message(SET_STATUS, u8(0) + u64(0))),
        "seed-restart-queue": session(T_IN, teardown=message(GET_VRING_BASE, u8(0)) + start_queue(0, base=1)),
    }


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus", "vhost_user")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith("seed-"):
            os.unlink(os.path.join(out, name))
    seeds = cases()
    for name, data in sorted(seeds.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(seeds)} seeds to {out}")


if __name__ == "__main__":
    main()
