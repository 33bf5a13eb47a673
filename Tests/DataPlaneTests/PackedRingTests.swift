import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// Packed virtqueues (VIRTIO_F_RING_PACKED) through the whole data plane:
/// the in-process driver's packed side against the queue, data checked in
/// the image. The hostile buffers are HostileGuestTests' packed cases.
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
}
