import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// A hostile guest gets a defined outcome, and is never left reading a
/// status byte nobody wrote (0 is VIRTIO_BLK_S_OK): a chain with a bad
/// buffer but a status byte fails with IOERR written there; a chain that
/// cannot be answered without guessing (no status byte, a loop, a chain
/// longer than seg_max + 2, a malformed indirect table) breaks its queue
/// (DEVICE_NEEDS_RESET); ring corruption breaks the queue; other queues
/// keep running; nothing outside the guest's buffers is touched. Each case
/// runs on split and packed rings, where the layout has it (a packed ring has
/// no `next` to loop through and no avail index to run ahead).
@Suite struct HostileGuestTests {
    enum Layout: CaseIterable, CustomTestStringConvertible {
        case split, packed
        var testDescription: String { self == .split ? "split" : "packed" }
    }

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

    func setup(_ layout: Layout, queues: Int = 2, queueSize: Int = 64, errorFD: Int32 = -1) throws -> Setup {
        let image = try TestImage(size: Self.imageSize)
        image.write(offset: 0, Self.imageBytes)
        let h = try Harness(disk: DiskConfiguration(path: image.path), queues: queues, queueSize: queueSize,
                            packed: layout == .packed)
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

    /// A status byte holding 0xFF, so that whether we wrote it shows.
    func statusByte(_ g: TestGuest) -> UInt64 {
        let gpa = g.alloc(1)
        g.write(gpa, [0xFF])
        return gpa
    }

    /// Makes one chain available and kicks: split, descriptors first..first+n-1
    /// chained in order and `first` on the avail ring; packed, the
    /// descriptors at the driver's next ring slots with buffer id `first`, the
    /// head's flags written last. NEXT is added unless `chain` is false.
    func post(_ g: TestGuest, _ descs: [Desc], first: UInt16 = 0, queue: UInt32 = 0, chain: Bool = true) {
        guard gd_is_packed(g.driver) else {
            for (i, d) in descs.enumerated() {
                let idx = first + UInt16(i)
                let last = i == descs.count - 1
                let flags = d.flags | (chain && !last ? Self.NEXT : 0)
                gd_write_desc(g.driver, queue, idx, d.addr, d.len, flags, chain && !last ? idx + 1 : 0)
            }
            gd_avail_add(g.driver, queue, first)
            gd_avail_publish(g.driver, queue)
            gd_kick(g.driver, queue)
            return
        }
        var bits: UInt16 = 0
        let slot0 = Int(gd_packed_next_slot(g.driver, queue, &bits))
        // A slot past the ring's end is in the next lap: both wrap bits flip.
        let nextLap = bits ^ UInt16(GD_PDESC_F_AVAIL | GD_PDESC_F_USED)
        for (k, d) in descs.enumerated().reversed() {
            let next = chain && k + 1 < descs.count ? Self.NEXT : 0
            let lap = slot0 + k < g.queueSize ? bits : nextLap
            gd_packed_write_desc(g.driver, queue, UInt16((slot0 + k) % g.queueSize), d.addr, d.len, first,
                                 d.flags | next | lap)
        }
        gd_packed_skip(g.driver, queue, UInt16(descs.count))
        gd_kick(g.driver, queue)
    }

    /// An indirect table in guest memory (at `at`, or allocated 16-aligned),
    /// in the ring's descriptor format (packed: `next` is dropped, the id
    /// field left 0).
    func writeTable(_ g: TestGuest, _ descs: [(addr: UInt64, len: UInt32, flags: UInt16, next: UInt16)],
                    at: UInt64? = nil) -> UInt64 {
        let gpa = at ?? g.alloc(UInt64(max(descs.count, 1) * 16), align: 16)
        var bytes: [UInt8] = []
        let packed = gd_is_packed(g.driver)
        for d in descs {
            bytes += withUnsafeBytes(of: d.addr.littleEndian) { Array($0) }
            bytes += withUnsafeBytes(of: d.len.littleEndian) { Array($0) }
            if packed { bytes += [0, 0] }
            bytes += withUnsafeBytes(of: d.flags.littleEndian) { Array($0) }
            if !packed { bytes += withUnsafeBytes(of: d.next.littleEndian) { Array($0) } }
        }
        g.write(gpa, bytes)
        return gpa
    }

    /// An indirect chain: header, `segments` writes of 512 bytes from `data`, status.
    func writeChain(_ g: TestGuest, sector: UInt64, data: UInt64, segments: Int, status: UInt64,
                    at: UInt64? = nil) -> (gpa: UInt64, bytes: UInt32) {
        var descs: [(addr: UInt64, len: UInt32, flags: UInt16, next: UInt16)] = [(header(g, type: 1, sector: sector), 16, Self.NEXT, 1)]
        for i in 0..<segments { descs.append((data + UInt64(i) * 512, 512, Self.NEXT, UInt16(i + 2))) }
        descs.append((status, 1, Self.W, 0))
        return (writeTable(g, descs, at: at), UInt32(descs.count * 16))
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

    /// The request failed alone: IOERR written to its status byte, used length 1.
    func expectFailed(_ s: Setup, status: UInt64) throws {
        let used = try s.g.usedElement()
        #expect(used.id == 0)
        #expect(used.length == 1)
        #expect(s.g.read(status, 1) == [UInt8(GD_BLK_S_IOERR)])
        #expect(s.h.stats().badRequests == 1)
        #expect(!s.h.stats().broken)
    }

    /// The chain cannot be answered: its queue is broken (no used element,
    /// no status written), and the disk's other queue goes on.
    func expectBroken(_ s: Setup, reason: String, status: UInt64? = nil, badRequests: UInt64 = 1) throws {
        let deadline = Date().addingTimeInterval(5)
        while !s.h.stats().broken && Date() < deadline { usleep(1000) }
        let stats = s.h.stats()
        #expect(stats.brokenReason?.contains(reason) == true, "broken: \(stats.brokenReason ?? "no")")
        #expect(stats.badRequests == badRequests)
        #expect(stats.inFlight == 0)
        var id: UInt32 = 0, len: UInt32 = 0
        #expect(gd_used_pop(s.g.driver, 0, &id, &len) == 0, "the chain came back (used length \(len))")
        if let status { #expect(s.g.read(status, 1) == [0xFF]) }
        try expectStillServes(s, queue: 1)
    }

    func expectImageUntouched(_ s: Setup) {
        #expect(s.image.size == Self.imageSize)
        #expect(s.image.read(offset: 0, count: Self.imageSize) == Self.imageBytes)
    }

    // MARK: - Chains the spec and real guests use are served

    /// The write a Linux guest makes with `dd bs=1M oflag=direct` on QEMU's
    /// default ring: 128 segments in a 130-entry indirect table, on a
    /// 128-entry ring. Refused once as "longer than the ring", and answered
    /// with no status written: the guest read 0 (OK) and lost the write.
    @Test(arguments: Layout.allCases)
    func indirectTableLongerThanTheRing(layout: Layout) throws {
        let s = try setup(layout, queueSize: 128)
        let g = s.g
        let data = g.alloc(128 * 512)
        let bytes = pattern(128 * 512, seed: 7)
        g.write(data, bytes)
        let status = statusByte(g)
        let table = writeChain(g, sector: 16, data: data, segments: 128, status: status)
        post(g, [(table.gpa, table.bytes, Self.INDIRECT)])
        let used = try g.usedElement()
        #expect(used.id == 0 && used.length == 1)
        #expect(g.read(status, 1) == [UInt8(GD_BLK_S_OK)])
        #expect(s.image.read(offset: 16 * 512, count: bytes.count) == bytes)
        #expect(s.h.stats().longestChain == 130)
        #expect(!s.h.stats().broken)
    }

    /// A guest allocator promises 8-byte alignment for an indirect table, not 16.
    @Test(arguments: Layout.allCases)
    func indirectTableAlignedTo8Bytes(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let data = g.alloc(4 * 512)
        g.write(data, pattern(4 * 512, seed: 3))
        let status = statusByte(g)
        let at = g.alloc(6 * 16 + 8, align: 16) + 8
        let table = writeChain(g, sector: 0, data: data, segments: 4, status: status, at: at)
        post(g, [(table.gpa, table.bytes, Self.INDIRECT)])
        let used = try g.usedElement()
        #expect(used.length == 1 && g.read(status, 1) == [UInt8(GD_BLK_S_OK)])
        #expect(s.image.read(offset: 0, count: 4 * 512) == pattern(4 * 512, seed: 3))
    }

    /// An indirect table, like any buffer, may run from one region into a
    /// guest-physically adjacent one (mapped apart in our address space).
    @Test(arguments: Layout.allCases)
    func indirectTableSpanningTwoRegions(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let data = g.alloc(8 * 512)
        g.write(data, pattern(8 * 512, seed: 5))
        let status = statusByte(g)
        let at = g.allocAt(g.boundary - 5 * 16, 10 * 16) // 5 entries in each region
        let table = writeChain(g, sector: 64, data: data, segments: 8, status: status, at: at)
        post(g, [(table.gpa, table.bytes, Self.INDIRECT)])
        let used = try g.usedElement()
        #expect(used.length == 1 && g.read(status, 1) == [UInt8(GD_BLK_S_OK)])
        #expect(s.image.read(offset: 64 * 512, count: 8 * 512) == pattern(8 * 512, seed: 5))
    }

    // MARK: - A bad buffer fails its request, with the status written

    @Test(arguments: Layout.allCases)
    func addressOutsideGuestMemory(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let status = statusByte(g)
        post(g, [(header(g, type: 1, sector: 0), 16, Self.R), (g.memorySize + 4096, 4096, Self.R), (status, 1, Self.W)])
        try expectFailed(s, status: status)
        expectImageUntouched(s)
        try expectStillServes(s)
    }

    @Test(arguments: Layout.allCases)
    func lengthRunsPastTheLastRegion(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let status = statusByte(g)
        post(g, [(header(g, type: 0, sector: 0), 16, Self.R), (g.memorySize - 4096, 8192, Self.W), (status, 1, Self.W)])
        try expectFailed(s, status: status)
        try expectStillServes(s)
    }

    @Test(arguments: Layout.allCases)
    func lengthWrapsTheAddressSpace(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let status = statusByte(g)
        post(g, [(header(g, type: 0, sector: 0), 16, Self.R), (UInt64.max - 100, 4096, Self.W), (status, 1, Self.W)])
        try expectFailed(s, status: status)
        try expectStillServes(s)
    }

    /// Found by fuzzing (fuzz/crashes/vring_blk-readable-after-empty-writable):
    /// an empty writable descriptor still counts as writable.
    @Test(arguments: Layout.allCases)
    func readableAfterEmptyWritable(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let status = statusByte(g)
        post(g, [(header(g, type: 1, sector: 0), 16, Self.R), (g.alloc(16), 0, Self.W), (g.alloc(512), 512, Self.R),
                 (status, 1, Self.W)])
        try expectFailed(s, status: status)
        expectImageUntouched(s)
        try expectStillServes(s)
    }

    // MARK: - A chain that cannot be answered breaks its queue

    @Test func descriptorLoop() throws {
        let s = try setup(.split)
        let g = s.g
        let hdr = header(g, type: 1, sector: 0)
        gd_write_desc(g.driver, 0, 0, hdr, 16, Self.NEXT, 1)
        gd_write_desc(g.driver, 0, 1, g.alloc(512), 512, Self.NEXT, 0) // back to 0
        gd_avail_add(g.driver, 0, 0)
        gd_avail_publish(g.driver, 0)
        gd_kick(g.driver, 0)
        try expectBroken(s, reason: "loops")
        expectImageUntouched(s)
    }

    /// A packed ring has no `next` to loop through; its form of an endless
    /// chain is one whose every descriptor says NEXT, round the whole ring.
    @Test func packedChainRoundTheWholeRing() throws {
        let s = try setup(.packed)
        let g = s.g
        var descs: [Desc] = [(header(g, type: 1, sector: 0), 16, Self.R)]
        for _ in 1..<g.queueSize { descs.append((g.alloc(512), 512, Self.R | Self.NEXT)) }
        post(g, descs)
        // Found while looking for the buffer's id (in its last descriptor),
        // before any request exists: the ring breaks, no request is counted.
        try expectBroken(s, reason: "loops", badRequests: 0)
        expectImageUntouched(s)
    }

    @Test func loopInsideIndirectTable() throws {
        let s = try setup(.split)
        let g = s.g
        let table = writeTable(g, [(header(g, type: 0, sector: 0), 16, Self.NEXT, 1),
                                   (g.alloc(512), 512, Self.W | Self.NEXT, 0)])
        post(g, [(table, 32, Self.INDIRECT)])
        try expectBroken(s, reason: "loops")
    }

    /// seg_max + 2 descriptors is what the config space announced (130 by
    /// default); one more is refused, whatever the table's room.
    @Test(arguments: Layout.allCases)
    func chainLongerThanSegMaxPlusTwo(layout: Layout) throws {
        let s = try setup(layout, queueSize: 256)
        let g = s.g
        let data = g.alloc(129 * 512)
        let status = statusByte(g)
        let table = writeChain(g, sector: 0, data: data, segments: 129, status: status)
        post(g, [(table.gpa, table.bytes, Self.INDIRECT)])
        try expectBroken(s, reason: "seg_max", status: status)
        expectImageUntouched(s)
    }

    @Test(arguments: Layout.allCases)
    func indirectInsideIndirect(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let inner = writeTable(g, [(header(g, type: 0, sector: 0), 16, 0, 0)])
        let outer = writeTable(g, [(inner, 16, Self.INDIRECT, 0)])
        post(g, [(outer, 16, Self.INDIRECT)])
        try expectBroken(s, reason: "malformed")
    }

    @Test(arguments: Layout.allCases)
    func indirectLengthNotMultipleOf16(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let table = writeTable(g, [(header(g, type: 0, sector: 0), 16, Self.NEXT, 1), (g.alloc(1), 1, Self.W, 0)])
        post(g, [(table, 24, Self.INDIRECT)])
        try expectBroken(s, reason: "malformed")
    }

    @Test(arguments: Layout.allCases)
    func indirectTableOutsideGuestMemory(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        post(g, [(g.memorySize - 16, 64, Self.INDIRECT)])
        try expectBroken(s, reason: "indirect descriptor table outside guest memory")
    }

    @Test(arguments: Layout.allCases)
    func readableAfterWritable(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        post(g, [(header(g, type: 1, sector: 0), 16, Self.R), (g.alloc(1), 1, Self.W), (g.alloc(512), 512, Self.R)])
        try expectBroken(s, reason: "status byte")
        expectImageUntouched(s)
    }

    @Test(arguments: Layout.allCases)
    func statusDescriptorDeviceReadable(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let data = g.alloc(512)
        g.write(data, [UInt8](repeating: 0x11, count: 512))
        let status = statusByte(g)
        post(g, [(header(g, type: 1, sector: 0), 16, Self.R), (data, 512, Self.R), (status, 1, Self.R)])
        try expectBroken(s, reason: "status byte", status: status)
        expectImageUntouched(s) // the write was not carried out
    }

    @Test(arguments: Layout.allCases)
    func statusDescriptorMissing(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        post(g, [(header(g, type: 4, sector: 0), 16, Self.R)])
        try expectBroken(s, reason: "status byte")
    }

    @Test(arguments: Layout.allCases)
    func statusDescriptorEmpty(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        post(g, [(header(g, type: 0, sector: 0), 16, Self.R), (g.alloc(512), 512, Self.W), (g.alloc(1), 0, Self.W)])
        try expectBroken(s, reason: "status byte")
    }

    @Test func availIndexTooFarAheadBreaksOnlyThatQueue() throws {
        let errorFD = gd_eventfd()
        defer { close(errorFD) }
        let s = try setup(.split, queues: 2, errorFD: errorFD)
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

    /// Corrupts queue 0 past what a device can answer: split, an avail index
    /// more than a ring ahead; packed, a buffer id not below the queue size.
    func corruptRing(_ s: Setup) {
        let g = s.g
        if gd_is_packed(g.driver) {
            post(g, [(header(g, type: 0, sector: 0), 16, Self.R), (statusByte(g), 1, Self.W)],
                 first: UInt16(g.queueSize + 3))
        } else {
            gd_set_avail_idx(g.driver, 0, UInt16(g.queueSize + 5))
            gd_kick(g.driver, 0)
        }
    }

    /// Review finding: the err eventfd was written with a plain write(), but
    /// O_NONBLOCK belongs to the open file, which the frontend shares and may
    /// make blocking. A full counter then corrupt ring stalled the IOThread in
    /// that write, and every queue on it. The signal now cannot wait.
    @Test(arguments: Layout.allCases)
    func errorEventfdMadeBlockingAndFullDoesNotStallTheIOThread(layout: Layout) throws {
        let errorFD = gd_eventfd()
        defer { close(errorFD) }
        let s = try setup(layout, queues: 2, errorFD: errorFD)
        #expect(fcntl(errorFD, F_SETFL, fcntl(errorFD, F_GETFL) & ~O_NONBLOCK) == 0)
        var full: UInt64 = 0xffff_ffff_ffff_fffe
        #expect(write(errorFD, &full, 8) == 8)
        corruptRing(s)
        let deadline = Date().addingTimeInterval(5)
        while !s.h.stats(0).broken && Date() < deadline { usleep(1000) }
        #expect(s.h.stats(0).broken)
        let served = Result { try expectStillServes(s, queue: 1) }
        var value: UInt64 = 0
        _ = read(errorFD, &value, 8) // a stalled IOThread goes on, so the test can end
        try served.get()
    }

    /// Split: a head index past the descriptor table; packed: a buffer id
    /// not below the queue size. The error eventfd is signalled, nothing is
    /// answered, the other queue goes on.
    @Test(arguments: Layout.allCases)
    func headIndexOutsideTheTableBreaksTheQueue(layout: Layout) throws {
        let errorFD = gd_eventfd()
        defer { close(errorFD) }
        let s = try setup(layout, errorFD: errorFD)
        let g = s.g
        if layout == .split {
            gd_avail_add(g.driver, 0, UInt16(g.queueSize + 3))
            gd_avail_publish(g.driver, 0)
            gd_kick(g.driver, 0)
        } else {
            corruptRing(s)
        }
        let deadline = Date().addingTimeInterval(5)
        while !s.h.stats().broken && Date() < deadline { usleep(1000) }
        #expect(s.h.stats().brokenReason?.contains("outside the table") == true)
        var value: UInt64 = 0
        #expect(read(errorFD, &value, 8) == 8 && value == 1)
        #expect(!gd_used_pending(g.driver, 0))
        try expectStillServes(s, queue: 1)
    }

    @Test func headAlreadyInFlightBreaksTheQueue() throws {
        let s = try setup(.split)
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

    /// The packed form: two buffers with one id, both available in the same
    /// pass (the queue is paused while the guest makes them available; file
    /// reads keep the first in flight when the second is popped).
    @Test func bufferIdAlreadyInFlightBreaksThePackedQueue() throws {
        let s = try setup(.packed)
        let g = s.g
        try s.h.queues[0].pause()
        for _ in 0..<2 {
            post(g, [(header(g, type: 0, sector: 0), 16, Self.R), (g.alloc(4096), 4096, Self.W), (statusByte(g), 1, Self.W)],
                 first: 3)
        }
        try s.h.queues[0].resume()
        let deadline = Date().addingTimeInterval(5)
        while !s.h.stats().broken && Date() < deadline { usleep(1000) }
        #expect(s.h.stats().brokenReason?.contains("already in flight") == true, "\(s.h.stats().brokenReason ?? "not broken")")
        while s.h.stats().inFlight != 0 && Date() < deadline { usleep(1000) }
        #expect(s.h.stats().inFlight == 0)
        try expectStillServes(s, queue: 1)
    }

    @Test(arguments: Layout.allCases)
    func headerShorterThan16Bytes(layout: Layout) throws {
        let s = try setup(layout)
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

    @Test(arguments: Layout.allCases, [UInt64.max, UInt64.max / 512 + 1, UInt64(1) << 63, HostileGuestTests.sectors])
    func sectorArithmeticOverflows(layout: Layout, sector: UInt64) throws {
        let s = try setup(layout)
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

    @Test(arguments: Layout.allCases)
    func ioPastCapacityNeverGrowsTheImage(layout: Layout) throws {
        let s = try setup(layout)
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

    @Test(arguments: Layout.allCases)
    func dataLengthNotMultipleOf512(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let buf = g.alloc(1000)
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: 0, segments: [(buf, 1000)])
        #expect(w.status == UInt8(GD_BLK_S_IOERR))
        let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(buf, 1000)])
        #expect(r.status == UInt8(GD_BLK_S_IOERR))
        #expect(s.h.stats().badRequests == 2)
        expectImageUntouched(s)
    }

    @Test(arguments: Layout.allCases)
    func getIDIntoShortBuffer(layout: Layout) throws {
        let s = try setup(layout)
        let g = s.g
        let buf = g.alloc(32)
        g.write(buf, [UInt8](repeating: 0x77, count: 32))
        let r = try g.run(type: UInt32(GD_BLK_T_GET_ID), segments: [(buf, 19)])
        #expect(r.status == UInt8(GD_BLK_S_IOERR))
        #expect(g.read(buf, 32) == [UInt8](repeating: 0x77, count: 32)) // nothing written
        try expectStillServes(s)
    }
}
