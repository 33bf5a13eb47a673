import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// A hostile guest gets a defined outcome: a bad chain fails alone (returned
/// with used length 0 when it has no writable status byte, IOERR when it
/// has), ring corruption marks the queue broken, and nothing outside the
/// guest's buffers is touched.
@Suite struct HostileGuestTests {
    static let imageSize = 4 << 20
    static let sectors = UInt64(imageSize / 512)
    static let imageBytes = pattern(imageSize, seed: 42)

    typealias Desc = (addr: UInt64, len: UInt32, flags: UInt16)
    static let R: UInt16 = 0
    static let W = UInt16(GD_DESC_F_WRITE)
    static let NEXT = UInt16(GD_DESC_F_NEXT)
    static let INDIRECT = UInt16(GD_DESC_F_INDIRECT)

    struct Setup {
        let image: TestImage
        let h: Harness
        var g: TestGuest { h.guest }
    }

    func setup(queues: Int = 1, queueSize: Int = 64, errorFD: Int32 = -1) throws -> Setup {
        let image = try TestImage(size: Self.imageSize)
        image.write(offset: 0, Self.imageBytes)
        let h = try Harness(disk: DiskConfiguration(path: image.path), queues: queues, queueSize: queueSize)
        if errorFD >= 0 {
            var config = h.guest.queueConfiguration(0)
            config.errorFD = errorFD
            h.queues[0] = try h.plane.startQueue(disk: h.disk, index: 0, memory: h.guest.memory, configuration: config)
        }
        return Setup(image: image, h: h)
    }

    func header(_ g: TestGuest, type: UInt32, sector: UInt64) -> UInt64 {
        let gpa = g.alloc(16, align: 16)
        var bytes = withUnsafeBytes(of: type.littleEndian) { Array($0) }
        bytes += [0, 0, 0, 0]
        bytes += withUnsafeBytes(of: sector.littleEndian) { Array($0) }
        g.write(gpa, bytes)
        return gpa
    }

    /// Writes descriptors first..first+n-1 chained in order (NEXT added
    /// automatically unless `chain` is false), puts `first` on the avail
    /// ring, publishes and kicks.
    func post(_ g: TestGuest, _ descs: [Desc], first: UInt16 = 0, queue: UInt32 = 0, chain: Bool = true) {
        for (i, d) in descs.enumerated() {
            let idx = first + UInt16(i)
            let last = i == descs.count - 1
            let flags = d.flags | (chain && !last ? Self.NEXT : 0)
            gd_write_desc(g.driver, queue, idx, d.addr, d.len, flags, chain && !last ? idx + 1 : 0)
        }
        gd_avail_add(g.driver, queue, first)
        gd_avail_publish(g.driver, queue)
        gd_kick(g.driver, queue)
    }

    func writeTable(_ g: TestGuest, _ descs: [(addr: UInt64, len: UInt32, flags: UInt16, next: UInt16)]) -> UInt64 {
        let gpa = g.alloc(UInt64(max(descs.count, 1) * 16), align: 16)
        var bytes: [UInt8] = []
        for d in descs {
            bytes += withUnsafeBytes(of: d.addr.littleEndian) { Array($0) }
            bytes += withUnsafeBytes(of: d.len.littleEndian) { Array($0) }
            bytes += withUnsafeBytes(of: d.flags.littleEndian) { Array($0) }
            bytes += withUnsafeBytes(of: d.next.littleEndian) { Array($0) }
        }
        g.write(gpa, bytes)
        return gpa
    }

    /// A well-formed read still works after the hostile request.
    func expectStillServes(_ s: Setup, queue: Int = 0, first: UInt16 = 40) throws {
        let g = s.g
        let buf = g.alloc(4096)
        let status = g.alloc(1)
        post(g, [(header(g, type: 0, sector: 8), 16, Self.R), (buf, 4096, Self.W), (status, 1, Self.W)],
             first: first, queue: UInt32(queue))
        let used = try g.usedElement(queue)
        #expect(used.id == UInt32(first))
        #expect(used.length == 4097)
        #expect(g.read(status, 1) == [0])
        #expect(g.read(buf, 4096) == Array(Self.imageBytes[4096..<8192]))
        #expect(!s.h.stats(queue).broken)
    }

    /// A chain that cannot be answered comes back with used length 0.
    func expectReturnedEmpty(_ s: Setup) throws {
        let used = try s.g.usedElement()
        #expect(used.id == 0)
        #expect(used.length == 0)
        #expect(s.h.stats().badRequests == 1)
        #expect(!s.h.stats().broken)
    }

    func expectImageUntouched(_ s: Setup) {
        #expect(s.image.size == Self.imageSize)
        #expect(s.image.read(offset: 0, count: Self.imageSize) == Self.imageBytes)
    }

    @Test func descriptorLoop() throws {
        let s = try setup()
        let g = s.g
        let hdr = header(g, type: 1, sector: 0)
        gd_write_desc(g.driver, 0, 0, hdr, 16, Self.NEXT, 1)
        gd_write_desc(g.driver, 0, 1, g.alloc(512), 512, Self.NEXT, 0) // back to 0
        gd_avail_add(g.driver, 0, 0)
        gd_avail_publish(g.driver, 0)
        gd_kick(g.driver, 0)
        try expectReturnedEmpty(s)
        expectImageUntouched(s)
        try expectStillServes(s)
    }

    @Test func loopInsideIndirectTable() throws {
        let s = try setup()
        let g = s.g
        let table = writeTable(g, [(header(g, type: 0, sector: 0), 16, Self.NEXT, 1),
                                   (g.alloc(512), 512, Self.W | Self.NEXT, 0)])
        post(g, [(table, 32, Self.INDIRECT)])
        try expectReturnedEmpty(s)
        try expectStillServes(s)
    }

    @Test func chainLongerThanQueueSize() throws {
        let s = try setup()
        let g = s.g
        // An indirect table of 65 descriptors on a 64-entry queue.
        let buf = g.alloc(512)
        var descs: [(addr: UInt64, len: UInt32, flags: UInt16, next: UInt16)] = [(header(g, type: 1, sector: 0), 16, Self.NEXT, 1)]
        for i in 1..<64 { descs.append((buf, 8, Self.NEXT, UInt16(i + 1))) }
        descs.append((g.alloc(1), 1, Self.W, 0))
        let table = writeTable(g, descs)
        post(g, [(table, UInt32(descs.count * 16), Self.INDIRECT)])
        try expectReturnedEmpty(s)
        expectImageUntouched(s)
        try expectStillServes(s)
    }

    @Test func addressOutsideGuestMemory() throws {
        let s = try setup()
        let g = s.g
        post(g, [(header(g, type: 1, sector: 0), 16, Self.R), (g.memorySize + 4096, 4096, Self.R), (g.alloc(1), 1, Self.W)])
        try expectReturnedEmpty(s)
        expectImageUntouched(s)
        try expectStillServes(s)
    }

    @Test func lengthRunsPastTheLastRegion() throws {
        let s = try setup()
        let g = s.g
        post(g, [(header(g, type: 0, sector: 0), 16, Self.R), (g.memorySize - 4096, 8192, Self.W), (g.alloc(1), 1, Self.W)])
        try expectReturnedEmpty(s)
        try expectStillServes(s)
    }

    @Test func lengthWrapsTheAddressSpace() throws {
        let s = try setup()
        let g = s.g
        post(g, [(header(g, type: 0, sector: 0), 16, Self.R), (UInt64.max - 100, 4096, Self.W), (g.alloc(1), 1, Self.W)])
        try expectReturnedEmpty(s)
        try expectStillServes(s)
    }

    @Test func indirectInsideIndirect() throws {
        let s = try setup()
        let g = s.g
        let inner = writeTable(g, [(header(g, type: 0, sector: 0), 16, 0, 0)])
        let outer = writeTable(g, [(inner, 16, Self.INDIRECT, 0)])
        post(g, [(outer, 16, Self.INDIRECT)])
        try expectReturnedEmpty(s)
        try expectStillServes(s)
    }

    @Test func indirectLengthNotMultipleOf16() throws {
        let s = try setup()
        let g = s.g
        let table = writeTable(g, [(header(g, type: 0, sector: 0), 16, Self.NEXT, 1), (g.alloc(1), 1, Self.W, 0)])
        post(g, [(table, 24, Self.INDIRECT)])
        try expectReturnedEmpty(s)
        try expectStillServes(s)
    }

    @Test func readableAfterWritable() throws {
        let s = try setup()
        let g = s.g
        post(g, [(header(g, type: 1, sector: 0), 16, Self.R), (g.alloc(1), 1, Self.W), (g.alloc(512), 512, Self.R)])
        try expectReturnedEmpty(s)
        expectImageUntouched(s)
        try expectStillServes(s)
    }

    /// Found by fuzzing (fuzz/crashes/vring_blk-readable-after-empty-writable):
    /// an empty writable descriptor still counts as writable.
    @Test func readableAfterEmptyWritable() throws {
        let s = try setup()
        let g = s.g
        post(g, [(header(g, type: 1, sector: 0), 16, Self.R), (g.alloc(16), 0, Self.W), (g.alloc(512), 512, Self.R),
                 (g.alloc(1), 1, Self.W)])
        try expectReturnedEmpty(s)
        expectImageUntouched(s)
        try expectStillServes(s)
    }

    @Test func availIndexTooFarAheadBreaksOnlyThatQueue() throws {
        let errorFD = gd_eventfd()
        defer { close(errorFD) }
        let s = try setup(queues: 2, errorFD: errorFD)
        let g = s.g
        gd_set_avail_idx(g.driver, 0, UInt16(g.queueSize + 5))
        gd_kick(g.driver, 0)
        let deadline = Date().addingTimeInterval(5)
        while !s.h.stats(0).broken && Date() < deadline { usleep(1000) }
        let stats = s.h.stats(0)
        #expect(stats.broken)
        #expect(stats.brokenReason?.contains("more than the queue size") == true)
        #expect(stats.requests == 0)
        var value: UInt64 = 0
        #expect(read(errorFD, &value, 8) == 8 && value == 1)
        try expectStillServes(s, queue: 1)
    }

    /// Review finding: the err eventfd was written with a plain write(), but
    /// O_NONBLOCK belongs to the open file, which the frontend shares and may
    /// make blocking. A full counter then corrupt ring stalled the IOThread in
    /// that write, and every queue on it. The signal now cannot wait.
    @Test func errorEventfdMadeBlockingAndFullDoesNotStallTheIOThread() throws {
        let errorFD = gd_eventfd()
        defer { close(errorFD) }
        let s = try setup(queues: 2, errorFD: errorFD)
        #expect(fcntl(errorFD, F_SETFL, fcntl(errorFD, F_GETFL) & ~O_NONBLOCK) == 0)
        var full: UInt64 = 0xffff_ffff_ffff_fffe
        #expect(write(errorFD, &full, 8) == 8)
        gd_set_avail_idx(s.g.driver, 0, UInt16(s.g.queueSize + 5))
        gd_kick(s.g.driver, 0)
        let deadline = Date().addingTimeInterval(5)
        while !s.h.stats(0).broken && Date() < deadline { usleep(1000) }
        #expect(s.h.stats(0).broken)
        let served = Result { try expectStillServes(s, queue: 1) }
        var value: UInt64 = 0
        _ = read(errorFD, &value, 8) // a stalled IOThread goes on, so the test can end
        try served.get()
    }

    @Test func headIndexOutsideTheTableBreaksTheQueue() throws {
        let s = try setup()
        let g = s.g
        gd_avail_add(g.driver, 0, UInt16(g.queueSize + 3))
        gd_avail_publish(g.driver, 0)
        gd_kick(g.driver, 0)
        let deadline = Date().addingTimeInterval(5)
        while !s.h.stats().broken && Date() < deadline { usleep(1000) }
        #expect(s.h.stats().brokenReason?.contains("outside the table") == true)
    }

    @Test func headAlreadyInFlightBreaksTheQueue() throws {
        let s = try setup()
        let g = s.g
        let buf = g.alloc(4096)
        let status = g.alloc(1)
        gd_write_desc(g.driver, 0, 0, header(g, type: 0, sector: 0), 16, Self.NEXT, 1)
        gd_write_desc(g.driver, 0, 1, buf, 4096, Self.W | Self.NEXT, 2)
        gd_write_desc(g.driver, 0, 2, status, 1, Self.W, 0)
        // The same head twice in one batch: the first is still in flight when
        // the second is popped.
        gd_avail_add(g.driver, 0, 0)
        gd_avail_add(g.driver, 0, 0)
        gd_avail_publish(g.driver, 0)
        gd_kick(g.driver, 0)
        let used = try g.usedElement()
        #expect(used.id == 0 && used.length == 4097) // the first one still completes
        let deadline = Date().addingTimeInterval(5)
        while !s.h.stats().broken && Date() < deadline { usleep(1000) }
        #expect(s.h.stats().brokenReason?.contains("already in flight") == true)
        #expect(s.h.stats().inFlight == 0)
    }

    @Test func statusDescriptorDeviceReadable() throws {
        let s = try setup()
        let g = s.g
        let data = g.alloc(512)
        g.write(data, [UInt8](repeating: 0x11, count: 512))
        post(g, [(header(g, type: 1, sector: 0), 16, Self.R), (data, 512, Self.R), (g.alloc(1), 1, Self.R)])
        try expectReturnedEmpty(s)
        expectImageUntouched(s) // the write was not carried out
        try expectStillServes(s)
    }

    @Test func statusDescriptorMissing() throws {
        let s = try setup()
        let g = s.g
        post(g, [(header(g, type: 4, sector: 0), 16, Self.R)])
        try expectReturnedEmpty(s)
        try expectStillServes(s)
    }

    @Test func statusDescriptorEmpty() throws {
        let s = try setup()
        let g = s.g
        post(g, [(header(g, type: 0, sector: 0), 16, Self.R), (g.alloc(512), 512, Self.W), (g.alloc(1), 0, Self.W)])
        try expectReturnedEmpty(s)
        try expectStillServes(s)
    }

    @Test func headerShorterThan16Bytes() throws {
        let s = try setup()
        let g = s.g
        let status = g.alloc(1)
        g.write(status, [0xFF])
        post(g, [(header(g, type: 0, sector: 0), 8, Self.R), (status, 1, Self.W)])
        let used = try g.usedElement()
        #expect(used.length == 1)
        #expect(g.read(status, 1) == [UInt8(GD_BLK_S_IOERR)])
        #expect(s.h.stats().badRequests == 1)
        try expectStillServes(s)
    }

    @Test(arguments: [UInt64.max, UInt64.max / 512 + 1, UInt64(1) << 63, HostileGuestTests.sectors])
    func sectorArithmeticOverflows(sector: UInt64) throws {
        let s = try setup()
        let g = s.g
        let buf = g.alloc(4096)
        g.write(buf, [UInt8](repeating: 0x22, count: 4096))
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: sector, segments: [(buf, 4096)])
        #expect(w.status == UInt8(GD_BLK_S_IOERR))
        let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: sector, segments: [(buf, 4096)])
        #expect(r.status == UInt8(GD_BLK_S_IOERR))
        #expect(s.h.stats().rangeErrors == 2)
        expectImageUntouched(s)
    }

    @Test func ioPastCapacityNeverGrowsTheImage() throws {
        let s = try setup()
        let g = s.g
        let buf = g.alloc(1024)
        g.write(buf, [UInt8](repeating: 0x33, count: 1024))
        // Starts on the last sector, ends one sector past the end.
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: Self.sectors - 1, segments: [(buf, 1024)])
        #expect(w.status == UInt8(GD_BLK_S_IOERR))
        expectImageUntouched(s)
        // The last sector itself is fine.
        let ok = try g.run(type: UInt32(GD_BLK_T_OUT), sector: Self.sectors - 1, segments: [(buf, 512)])
        #expect(ok.status == UInt8(GD_BLK_S_OK))
        #expect(s.image.size == Self.imageSize)
    }

    @Test func dataLengthNotMultipleOf512() throws {
        let s = try setup()
        let g = s.g
        let buf = g.alloc(1000)
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: 0, segments: [(buf, 1000)])
        #expect(w.status == UInt8(GD_BLK_S_IOERR))
        let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(buf, 1000)])
        #expect(r.status == UInt8(GD_BLK_S_IOERR))
        #expect(s.h.stats().badRequests == 2)
        expectImageUntouched(s)
    }

    @Test func getIDIntoShortBuffer() throws {
        let s = try setup()
        let g = s.g
        let buf = g.alloc(32)
        g.write(buf, [UInt8](repeating: 0x77, count: 32))
        let r = try g.run(type: UInt32(GD_BLK_T_GET_ID), segments: [(buf, 19)])
        #expect(r.status == UInt8(GD_BLK_S_IOERR))
        #expect(g.read(buf, 32) == [UInt8](repeating: 0x77, count: 32)) // nothing written
        try expectStillServes(s)
    }

    @Test func moreSegmentsThanWeCarryFailsTheRequest() throws {
        let s = try setup(queueSize: 512)
        let g = s.g
        // 300 sector-sized segments in one indirect table: a legal chain on a
        // 512-entry queue, but more iovecs than a request carries (256).
        let data = g.alloc(300 * 512)
        var descs: [(addr: UInt64, len: UInt32, flags: UInt16, next: UInt16)] = [(header(g, type: 1, sector: 0), 16, Self.NEXT, 1)]
        for i in 0..<300 { descs.append((data + UInt64(i) * 512, 512, Self.NEXT, UInt16(i + 2))) }
        let status = g.alloc(1)
        descs.append((status, 1, Self.W, 0))
        let table = writeTable(g, descs)
        post(g, [(table, UInt32(descs.count * 16), Self.INDIRECT)])
        let used = try g.usedElement()
        #expect(used.length == 1)
        #expect(g.read(status, 1) == [UInt8(GD_BLK_S_IOERR)])
        #expect(s.h.stats().badRequests == 1)
        expectImageUntouched(s)
        try expectStillServes(s)
    }
}
