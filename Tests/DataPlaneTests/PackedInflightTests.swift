import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// The packed inflight layout (vhost-user.rst QueueRegionPacked /
/// DescStatePacked): regions left as a backend that died at each step would
/// leave them, and hostile ones. The queue is started on them with the base
/// QEMU sends after a backend died (the one from its last GET_VRING_BASE:
/// here a fresh ring's), so the ring's place must come from the region.
@Suite struct PackedInflightTests {
    static let EIO: Int32 = 5
    static let size = 8

    /// QueueRegionPacked, as the queue's part of the region holds it.
    struct Region {
        let base: UnsafeMutableRawPointer

        func u16(_ offset: Int) -> UInt16 { base.load(fromByteOffset: offset, as: UInt16.self) }
        func set16(_ offset: Int, _ v: UInt16) { base.storeBytes(of: v, toByteOffset: offset, as: UInt16.self) }
        func set8(_ offset: Int, _ v: UInt8) { base.storeBytes(of: v, toByteOffset: offset, as: UInt8.self) }

        var version: UInt16 { u16(8) }
        var descNum: UInt16 { u16(10) }
        func header(freeHead: UInt16, oldFreeHead: UInt16, used: UInt16, oldUsed: UInt16, wrap: UInt8 = 1, oldWrap: UInt8 = 1) {
            set16(12, freeHead); set16(14, oldFreeHead); set16(16, used); set16(18, oldUsed); set8(20, wrap); set8(21, oldWrap)
        }
        func entry(_ e: Int) -> UnsafeMutableRawPointer { base + 32 + e * 32 }
        /// A head entry of one ring descriptor: a copy of it, its mark and order.
        func head(_ e: Int, copy: [UInt8], next: UInt16, counter: UInt64, num: UInt16 = 1, last: UInt16? = nil) {
            let p = entry(e)
            p.storeBytes(of: 1, toByteOffset: 0, as: UInt8.self)
            p.storeBytes(of: next, toByteOffset: 2, as: UInt16.self)
            p.storeBytes(of: last ?? UInt16(e), toByteOffset: 4, as: UInt16.self)
            p.storeBytes(of: num, toByteOffset: 6, as: UInt16.self)
            p.storeBytes(of: counter, toByteOffset: 8, as: UInt64.self)
            copy.withUnsafeBytes { d in
                p.storeBytes(of: d.load(fromByteOffset: 12, as: UInt16.self), toByteOffset: 16, as: UInt16.self) // id
                p.storeBytes(of: d.load(fromByteOffset: 14, as: UInt16.self), toByteOffset: 18, as: UInt16.self) // flags
                p.storeBytes(of: d.load(fromByteOffset: 8, as: UInt32.self), toByteOffset: 20, as: UInt32.self)  // len
                p.storeBytes(of: d.load(fromByteOffset: 0, as: UInt64.self), toByteOffset: 24, as: UInt64.self)  // addr
            }
        }
        func setNext(_ e: Int, _ next: UInt16) { entry(e).storeBytes(of: next, toByteOffset: 2, as: UInt16.self) }
        func marked(_ e: Int) -> Bool { entry(e).load(fromByteOffset: 0, as: UInt8.self) != 0 }
    }

    /// Where a dead backend stopped.
    enum Death: CaseIterable, CustomTestStringConvertible {
        case popped                  // both requests in flight, nothing pushed
        case pushedNotPublished      // both pushed; the batch's first flags not written
        case freedNotPublished       // and their entries freed, the used position set: publish next
        case publishedNotCleared     // the batch published; marks not cleared, nothing committed

        var testDescription: String { "\(self)" }
    }

    struct Setup {
        let h: Harness
        let image: TestImage
        let region: Region
        let read: UInt16
        let write: UInt16
        let readBuffer: UInt64
    }

    /// A packed queue of 8 with an inflight region, stopped; the guest then
    /// makes a read (sector 0) and a write (sector 8) available, which a
    /// dead backend popped into region entries 0 and 1 (in that order).
    func deadBackend(_ death: Death) throws -> Setup {
        let image = try TestImage(size: 1 << 20)
        image.write(offset: 0, pattern(4096, seed: 40))
        var config = DiskConfiguration(path: image.path)
        config.writeErrorPolicy = .stop
        let h = try Harness(disk: config, queueSize: Self.size, inflight: true, packed: true)
        let g = h.guest
        h.queues[0].stopBase()
        let region = Region(base: h.inflightRegions[0])
        #expect(region.version == 1 && region.descNum == UInt16(Self.size))
        let rbuf = g.alloc(4096), wbuf = g.alloc(4096)
        g.write(wbuf, pattern(4096, seed: 41))
        let read = try g.submit(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(rbuf, 4096)], indirect: true, kick: false)
        let write = try g.submit(type: UInt32(GD_BLK_T_OUT), sector: 8, segments: [(wbuf, 4096)], indirect: true, kick: false)
        let ring = g.queueConfiguration(0).descriptorTable
        let copies = [g.read(ring, 16), g.read(ring + 16, 16)]

        region.head(0, copy: copies[0], next: 1, counter: 1)
        region.head(1, copy: copies[1], next: 2, counter: 2)
        region.header(freeHead: 2, oldFreeHead: 2, used: 0, oldUsed: 0)
        let used = UInt16(GD_PDESC_F_AVAIL | GD_PDESC_F_USED)
        let availFlags = copies[0].withUnsafeBytes { $0.load(fromByteOffset: 14, as: UInt16.self) }
        switch death {
        case .popped:
            break
        case .pushedNotPublished, .freedNotPublished:
            // The read pushed first: id and len at position 0, its flags held
            // back; the write's used descriptor whole at position 1.
            gd_packed_write_desc(g.driver, 0, 0, 0, 4097, read, availFlags)
            gd_packed_write_desc(g.driver, 0, 1, 0, 1, write, used | UInt16(GD_DESC_F_WRITE))
            if death == .freedNotPublished {
                region.setNext(0, 2)
                region.setNext(1, 0)
                region.header(freeHead: 1, oldFreeHead: 2, used: 2, oldUsed: 0)
            }
        case .publishedNotCleared:
            // What the dead backend answered, then published.
            g.write(gd_slot_status_gpa(g.driver, 0, read), [0])
            g.write(gd_slot_status_gpa(g.driver, 0, write), [0])
            gd_packed_write_desc(g.driver, 0, 1, 0, 1, write, used | UInt16(GD_DESC_F_WRITE))
            gd_packed_write_desc(g.driver, 0, 0, 0, 4097, read, used | UInt16(GD_DESC_F_WRITE))
            region.setNext(0, 2)
            region.setNext(1, 0)
            region.header(freeHead: 1, oldFreeHead: 2, used: 2, oldUsed: 0)
        }
        return Setup(h: h, image: image, region: region, read: read, write: write, readBuffer: rbuf)
    }

    /// Each request runs exactly once, wherever the backend died: what the
    /// guest could not have seen completed runs again (in pop order, from the
    /// region's copies: their ring slots may hold used descriptors), what it
    /// could have seen does not, and stale used descriptors past the used
    /// position are not taken for completions.
    @Test(arguments: Death.allCases)
    func eachRequestRunsOnceWhereverTheBackendDied(_ death: Death) throws {
        let s = try deadBackend(death)
        let g = s.h.guest
        // The write fails and is held (stop policy): only the read can complete.
        s.h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write]))
        try s.h.restartQueue(packedBase: 0x8000_8000)
        let first = try g.complete()
        #expect(first.head == s.read && first.status == 0 && first.length == 4097)
        let resubmitted = death != .publishedNotCleared
        if resubmitted {
            #expect(g.read(s.readBuffer, 4096) == pattern(4096, seed: 40))
            // Position 1 still held the dead backend's used descriptor of the write.
            #expect((try? g.complete(timeout: 0.3)) == nil, "the held write completed (a stale used descriptor)")
            #expect(s.h.stats().heldRequests == 1)
            s.h.disk.injectFaults(nil)
            try s.h.plane.resume(disk: s.h.disk)
        }
        let second = try g.complete()
        #expect(second.head == s.write && second.status == 0)
        #expect((try? g.complete(timeout: 0.3)) == nil, "nothing completes twice")
        #expect(s.image.read(offset: 8 * 512, count: 4096) == (resubmitted ? pattern(4096, seed: 41) : [UInt8](repeating: 0, count: 4096)))
        let st = s.h.stats()
        #expect(st.reads == (resubmitted ? 1 : 0) && st.writes == (resubmitted ? 1 : 0), "\(st)")
        #expect(!s.region.marked(0) && !s.region.marked(1))
        // The ring carries on from where the region said, over a wrap.
        let buf = g.alloc(4096)
        for i in 0..<12 {
            #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: UInt64(i), segments: [(buf, 4096)], indirect: i % 2 == 0).status == 0)
        }
        let base = s.h.queues[0].stopBase()
        #expect(base == gd_vring_base(g.driver, 0), "base 0x\(String(base, radix: 16))")
    }

    /// A region the frontend (or a broken one) filled with what no backend
    /// writes is refused when the queue starts, or breaks the ring when a
    /// copy is run; the process goes on.
    enum Hostile: CaseIterable, CustomTestStringConvertible {
        case chainLeavesTheRegion, chainLongerThanAChain, sameIdTwice, usedBeyondTheRing, lastLinkDisagrees
        case copyChainsOnPastItsEnd

        var testDescription: String { "\(self)" }
    }

    @Test(arguments: Hostile.allCases)
    func aHostileRegionIsRefusedOrBreaksTheRing(_ hostile: Hostile) throws {
        let s = try deadBackend(.popped)
        let r = s.region
        let ring = s.h.guest.queueConfiguration(0).descriptorTable
        var copy = s.h.guest.read(ring, 16)
        switch hostile {
        case .chainLeavesTheRegion:
            r.head(0, copy: copy, next: 200, counter: 1, num: 2, last: 200)
        case .chainLongerThanAChain:
            r.head(0, copy: copy, next: 1, counter: 1, num: 1000)
        case .sameIdTwice:
            r.head(1, copy: copy, next: 2, counter: 2)
        case .usedBeyondTheRing:
            r.header(freeHead: 2, oldFreeHead: 2, used: 9, oldUsed: 9)
        case .lastLinkDisagrees:
            r.head(0, copy: copy, next: 1, counter: 1, num: 1, last: 5)
        case .copyChainsOnPastItsEnd:
            copy[14] |= UInt8(GD_DESC_F_NEXT)
            r.head(0, copy: copy, next: 1, counter: 1)
        }
        let refused = hostile != .copyChainsOnPastItsEnd
        if refused {
            #expect {
                try s.h.restartQueue(packedBase: 0x8000_8000)
            } throws: { error in
                "\(error)".contains("inflight region")
            }
        } else {
            try s.h.restartQueue(packedBase: 0x8000_8000)
            let deadline = Date().addingTimeInterval(5)
            while !s.h.stats().broken && Date() < deadline { usleep(1000) }
            #expect(s.h.stats().broken, "\(s.h.stats())")
            #expect((try? s.h.guest.complete(timeout: 0.2)) == nil)
        }
        // The data plane still serves a fresh queue.
        let other = try TestImage(size: 1 << 20)
        let fresh = try Harness(disk: DiskConfiguration(path: other.path), queueSize: Self.size, inflight: true, packed: true)
        let buf = fresh.guest.alloc(4096)
        #expect(try fresh.guest.run(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(buf, 4096)]).status == 0)
    }

    /// Requests held by the stop policy survive a memory swap on a packed
    /// ring with an inflight region (walked again from the region's copies),
    /// and a stop leaves them there for the next start.
    @Test func heldRequestsOfAPackedRingSurviveAMemorySwapAndAStop() throws {
        let image = try TestImage(size: 1 << 20)
        var config = DiskConfiguration(path: image.path)
        config.writeErrorPolicy = .stop
        let h = try Harness(disk: config, queueSize: Self.size, inflight: true, packed: true)
        let g = h.guest
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write]))
        let buf = g.alloc(4096)
        g.write(buf, pattern(4096, seed: 42))
        let held = try g.submit(type: UInt32(GD_BLK_T_OUT), sector: 16, segments: [(buf, 4096)])
        #expect((try? g.complete(timeout: 0.3)) == nil)
        try h.queues[0].setMemory(try GuestMemory(regions: g.memory.regions))
        try h.plane.resume(disk: h.disk)
        #expect((try? g.complete(timeout: 0.3)) == nil, "still failing: held again")
        #expect(h.stats().heldRequests == 1)
        _ = h.queues[0].stopBase()
        #expect(h.inflightMarked(head: held))
        h.disk.injectFaults(nil)
        try h.restartQueue(packedBase: 0x8000_8000)
        let done = try g.complete()
        #expect(done.head == held && done.status == 0)
        #expect(image.read(offset: 16 * 512, count: 4096) == pattern(4096, seed: 42))
        #expect((try? g.complete(timeout: 0.3)) == nil)
        #expect(!h.inflightMarked(head: held))
    }
}
