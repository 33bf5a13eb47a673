import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// Packed virtqueues (VIRTIO_F_RING_PACKED) through the whole data plane:
/// the in-process driver's packed side against the queue, data checked in
/// the image, and the hostile buffers the packed walker must refuse.
@Suite struct PackedRingTests {
    static let imageSize = 16 << 20

    func harness(_ image: TestImage, queueSize: Int = 16, eventIndex: Bool = true, queues: Int = 1) throws -> Harness {
        try Harness(disk: DiskConfiguration(path: image.path, serial: "dp-packed-0001"), queues: queues,
                    queueSize: queueSize, eventIndex: eventIndex, packed: true)
    }

    /// Many times round a small ring, direct and indirect chains of one to
    /// three segments, written then read back and checked in the image.
    @Test(arguments: [true, false])
    func dataRoundTripsOverManyWraps(eventIndex: Bool) throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try harness(image, eventIndex: eventIndex)
        let g = h.guest
        let sizes: [UInt32] = [512, 4096, 1536]
        let bufs = sizes.map { g.alloc(UInt64($0), align: 512) }
        let rbufs = sizes.map { g.alloc(UInt64($0), align: 512) }
        for i in 0..<60 {
            let n = 1 + i % 3, indirect = i % 2 == 1
            let segs = Array(zip(bufs, sizes).prefix(n)), rsegs = Array(zip(rbufs, sizes).prefix(n))
            let bytes = Int(sizes.prefix(n).reduce(0, +))
            let data = pattern(bytes, seed: UInt8(truncatingIfNeeded: i))
            var offset = 0
            for (b, s) in segs {
                g.write(b, Array(data[offset..<offset + Int(s)]))
                offset += Int(s)
            }
            let sector = UInt64(i * 16)
            let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: sector, segments: segs, indirect: indirect)
            #expect(w.status == UInt8(GD_BLK_S_OK))
            #expect(image.read(offset: Int(sector) * 512, count: bytes) == data)
            let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: sector, segments: rsegs, indirect: indirect)
            #expect(r.status == UInt8(GD_BLK_S_OK) && r.length == UInt32(bytes) + 1)
            #expect(rsegs.flatMap { g.read($0.0, Int($0.1)) } == data)
        }
        let s = h.stats()
        #expect(s.writes == 60 && s.reads == 60 && s.errors == 0 && s.inFlight == 0 && !s.broken)
    }

    /// A full ring in flight at once, reaped as it completes (the file
    /// backend finishes them in its own order), several times over.
    @Test func aFullRingInFlightCompletesWhole() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try harness(image, queueSize: 32)
        let g = h.guest
        let buf = g.alloc(32 * 4096)
        for round in 0..<4 {
            var heads = Set<UInt16>()
            for i in 0..<32 {
                let head = try g.submit(type: UInt32(GD_BLK_T_IN), sector: UInt64(i * 8),
                                        segments: [(buf + UInt64(i) * 4096, 4096)], indirect: true)
                heads.insert(head)
            }
            #expect(heads.count == 32, "round \(round): ids reused while in flight")
            _ = gd_kick(g.driver, 0)
            var done = Set<UInt16>()
            for _ in 0..<32 {
                let c = try g.complete()
                #expect(c.status == UInt8(GD_BLK_S_OK) && c.length == 4097)
                done.insert(c.head)
            }
            #expect(done == heads)
        }
        #expect(h.stats().reads == 128)
    }

    /// GET_VRING_BASE of a packed ring: both positions and wrap counters, as
    /// the driver sees them; a queue restarted there carries on.
    @Test func stopAnswersThePackedBaseAndARestartCarriesOn() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try harness(image, queueSize: 8)
        let g = h.guest
        let buf = g.alloc(4096)
        for i in 0..<13 { // 13 three-descriptor chains on an 8-slot ring: past a wrap
            #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: UInt64(i), segments: [(buf, 4096)]).status == 0)
        }
        let base = h.queues[0].stopBase()
        #expect(base == gd_vring_base(g.driver, 0))
        #expect(base != 0x8000_8000)
        var config = g.queueConfiguration(0)
        config.packedBase = base
        h.queues[0] = try h.plane.startQueue(disk: h.disk, index: 0, memory: g.memory, configuration: config)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: 1, segments: [(buf, 4096)]).status == 0)
    }

    // MARK: - Hostile buffers

    /// Writes a raw buffer (header, an optional 4 KiB data buffer, status)
    /// at the driver's cursor, the head's flags last, and kicks.
    func rawBuffer(_ g: TestGuest, id: UInt16, headFlags: UInt16 = 0, statusFlags: UInt16 = UInt16(GD_DESC_F_WRITE),
                   data: Bool = false) -> (header: UInt64, status: UInt64) {
        let header = g.alloc(16, align: 16), status = g.alloc(1, align: 1)
        g.write(header, [UInt8](repeating: 0, count: 16)) // GD_BLK_T_IN, sector 0
        g.write(status, [0xFF])
        var descs: [(addr: UInt64, len: UInt32, flags: UInt16)] = [(header, 16, headFlags)]
        if data { descs.append((g.alloc(4096), 4096, UInt16(GD_DESC_F_WRITE))) }
        descs.append((status, 1, statusFlags))
        var bits: UInt16 = 0
        let first = Int(gd_packed_next_slot(g.driver, 0, &bits))
        let other = bits == UInt16(GD_PDESC_F_AVAIL) ? UInt16(GD_PDESC_F_USED) : UInt16(GD_PDESC_F_AVAIL)
        // Last to first, so the head becomes available last; a slot past the
        // ring's end is in the next lap, with the other wrap bits.
        for k in descs.indices.reversed() {
            let slot = (first + k) % g.queueSize
            let next: UInt16 = k + 1 < descs.count ? UInt16(GD_DESC_F_NEXT) : 0
            gd_packed_write_desc(g.driver, 0, UInt16(slot), descs[k].addr, descs[k].len, id,
                                 descs[k].flags | next | (first + k < g.queueSize ? bits : other))
        }
        gd_packed_skip(g.driver, 0, UInt16(descs.count))
        _ = gd_kick(g.driver, 0)
        return (header, status)
    }

    func waitBroken(_ h: Harness) -> QueueStatistics {
        let deadline = Date().addingTimeInterval(5)
        while !h.stats().broken && Date() < deadline { usleep(1000) }
        return h.stats()
    }

    @Test func aBufferIdNotBelowTheQueueSizeBreaksTheRing() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try harness(image)
        let raw = rawBuffer(h.guest, id: 16)
        let s = waitBroken(h)
        #expect(s.brokenReason?.contains("buffer id not below the queue size") == true, "\(s.brokenReason ?? "not broken")")
        #expect(h.guest.read(raw.status, 1) == [0xFF])
        #expect(!gd_used_pending(h.guest.driver, 0))
    }

    @Test func aBufferIdAlreadyInFlightBreaksTheRing() throws {
        let image = try TestImage(size: Self.imageSize)
        // Reads of the file stay in flight until the pass that popped both
        // ends; the queue is paused while the guest makes both available.
        let h = try harness(image)
        try h.queues[0].pause()
        _ = rawBuffer(h.guest, id: 3, data: true)
        _ = rawBuffer(h.guest, id: 3, data: true)
        try h.queues[0].resume()
        let s = waitBroken(h)
        #expect(s.brokenReason?.contains("already in flight") == true, "\(s.brokenReason ?? "not broken")")
    }

    @Test func aBufferWithoutAStatusByteBreaksTheRing() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try harness(image)
        let raw = rawBuffer(h.guest, id: 0, statusFlags: 0) // the last descriptor is not writable
        let s = waitBroken(h)
        #expect(s.brokenReason?.contains("no device-writable status byte") == true, "\(s.brokenReason ?? "not broken")")
        #expect(h.guest.read(raw.status, 1) == [0xFF])
        #expect(s.badRequests == 1)
    }

    @Test func aBufferOutsideGuestMemoryFailsThatRequestOnly() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try harness(image)
        let g = h.guest
        // A read whose data descriptor lies past the end of guest memory.
        let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(g.memorySize + 4096, 4096)])
        #expect(r.status == UInt8(GD_BLK_S_IOERR))
        #expect(h.stats().badRequests == 1 && !h.stats().broken)
        let buf = g.alloc(4096)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(buf, 4096)]).status == 0)
    }
}
