import CDataPlaneSys
import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// Dirty page logging for live migration (VHOST_F_LOG_ALL): the pages a
/// queue writes, and only those, get their bits; the vhost-user messages
/// that set it up.
@Suite struct DirtyLogTests {
    /// A frontend's bitmap: one bit per 4 KiB guest page.
    final class Bitmap {
        let bytes: UnsafeMutableRawPointer
        let size: Int

        init(guestBytes: UInt64) {
            size = Int((guestBytes / 4096 + 7) / 8)
            bytes = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
            clear()
        }

        deinit { bytes.deallocate() }

        func clear() { bytes.initializeMemory(as: UInt8.self, repeating: 0, count: size) }

        var marked: Set<UInt64> {
            var pages = Set<UInt64>()
            for i in 0..<size {
                let byte = bytes.load(fromByteOffset: i, as: UInt8.self)
                for bit in 0..<8 where byte & (1 << bit) != 0 { pages.insert(UInt64(i * 8 + bit)) }
            }
            return pages
        }
    }

    static func pages(_ gpa: UInt64, _ length: UInt64) -> Set<UInt64> {
        Set((gpa >> 12)...((gpa + length - 1) >> 12))
    }

    @Test(arguments: [false, true])
    func theQueueMarksEveryPageItWritesAndNoOther(packed: Bool) throws {
        let image = try TestImage(size: 1 << 20)
        image.write(offset: 0, pattern(1 << 20, seed: 7))
        let plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "log-io", cpuset: CPUSet(parsing: "0-1"))])
        let disk = try plane.addDisk(DiskConfiguration(path: image.path, numQueues: 1, queueSize: 64))
        let guest = try TestGuest(queueSize: 64, packed: packed)
        let bitmap = Bitmap(guestBytes: guest.memorySize)
        // The queues use the guest's memory and the bitmap until they stop.
        defer { withExtendedLifetime((guest, bitmap)) { plane.stop() } }
        var config = guest.queueConfiguration(0)
        config.dirtyLog = UInt(bitPattern: bitmap.bytes)
        config.dirtyLogSize = UInt64(bitmap.size)
        var queue = try plane.startQueue(disk: disk, index: 0, memory: guest.memory, configuration: config)

        // What the device writes besides data: the ring area(s) it owns.
        let ringPages = packed
            ? Self.pages(config.descriptorTable, UInt64(config.size) * 16).union(Self.pages(config.usedRing, 4))
            : Self.pages(config.usedRing, 6 + 8 * UInt64(config.size))

        // A read into a buffer that starts mid-page and spans three pages.
        let buffer = guest.alloc(4 * 4096) + 2048
        bitmap.clear()
        let read = try guest.run(type: UInt32(GD_BLK_T_IN), sector: 8, segments: [(buffer, 8192)], indirect: true)
        #expect(read.status == 0)
        let dataPages = Self.pages(buffer, 8192)
        let statusPage = Self.pages(guest.memoryStatusGPA(head: read.head), 1)
        var marked = bitmap.marked
        #expect(dataPages.isSubset(of: marked), "read data: \(dataPages.sorted()) not all in \(marked.sorted())")
        #expect(statusPage.isSubset(of: marked), "status byte")
        #expect(ringPages.isSubset(of: marked), "ring: \(ringPages.sorted()) not all in \(marked.sorted())")
        #expect(marked.isSubset(of: dataPages.union(statusPage).union(ringPages)),
                "pages the device did not write: \(marked.subtracting(dataPages.union(statusPage).union(ringPages)).sorted())")

        // A write: the device reads its data, and writes only the status byte and the ring.
        let source = guest.alloc(4096)
        guest.write(source, pattern(4096, seed: 9))
        bitmap.clear()
        let write = try guest.run(type: UInt32(GD_BLK_T_OUT), sector: 64, segments: [(source, 4096)], indirect: true)
        #expect(write.status == 0)
        marked = bitmap.marked
        let writeStatus = Self.pages(guest.memoryStatusGPA(head: write.head), 1)
        #expect(!marked.contains(source >> 12) || writeStatus.union(ringPages).contains(source >> 12),
                "a write's data page is marked")
        #expect(writeStatus.isSubset(of: marked))

        // GET_ID writes the serial.
        let id = guest.alloc(4096)
        bitmap.clear()
        let getID = try guest.run(type: UInt32(GD_BLK_T_GET_ID), segments: [(id, 20)], indirect: true)
        #expect(getID.status == 0)
        #expect(bitmap.marked.contains(id >> 12))

        // Logging off (the queue restarted without a log): nothing is marked.
        let base = queue.stopBase()
        config.dirtyLog = 0
        config.dirtyLogSize = 0
        if packed { config.packedBase = base } else { config.lastAvailIndex = UInt16(truncatingIfNeeded: base) }
        queue = try plane.startQueue(disk: disk, index: 0, memory: guest.memory, configuration: config)
        bitmap.clear()
        _ = try guest.run(type: UInt32(GD_BLK_T_IN), sector: 8, segments: [(buffer, 8192)], indirect: true)
        #expect(bitmap.marked.isEmpty)
        _ = queue
    }

    /// SplitMix64: the random mix below, reproducible from its seed.
    struct SeededRandom: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    /// One request of the random mix, as the guest laid it out.
    struct MixRequest {
        var type: UInt32
        var sector: UInt64 = 0
        var segments: [(UInt64, UInt32)] = []
        var indirect: Bool
        var head: UInt16 = 0
        var name: String {
            switch Int32(type) {
            case GD_BLK_T_IN: "read"
            case GD_BLK_T_OUT: "write"
            case GD_BLK_T_GET_ID: "GET_ID"
            default: "FLUSH"
            }
        }
        /// Its data segments are the device's to write.
        var deviceWritable: Bool { Int32(type) == GD_BLK_T_IN || Int32(type) == GD_BLK_T_GET_ID }
        var usedLength: UInt32 {
            switch Int32(type) {
            case GD_BLK_T_IN: segments.reduce(0) { $0 + $1.1 } + 1
            case GD_BLK_T_GET_ID: 21
            default: 1
            }
        }
    }

    /// A seeded random mix (reads, writes, GET_ID, FLUSH; several data
    /// segments at random page offsets, some crossing pages or the memory
    /// regions' boundary; up to 48 in flight), round by round: the guest
    /// lays a batch out and publishes it while the queue is stopped, all of
    /// guest memory is copied, the queue starts, runs the batch and stops
    /// (so the device has finished writing), and the copy is compared byte
    /// by byte. Every page whose bytes changed has its bit; every bit is a
    /// page the device had business writing (a read's or GET_ID's buffer, a
    /// status byte, its ring area). The guest writes nothing between the
    /// copy and the comparison but its own ring area (used_event, or the
    /// packed driver event area, as it reaps), which is left out.
    /// DATAPLANE_DIRTYLOG_SEED picks another seed.
    @Test(arguments: [false, true])
    func aRandomMixMarksEveryPageItChanges(packed: Bool) throws {
        let started = Date()
        let seed = ProcessInfo.processInfo.environment["DATAPLANE_DIRTYLOG_SEED"].flatMap { UInt64($0) }
            ?? 0x5EED_D1D7_0000_0001
        print("DirtyLogTests random mix (\(packed ? "packed" : "split")): seed \(seed)")
        var rng = SeededRandom(state: seed)

        let imageSize = 4 << 20
        let image = try TestImage(size: imageSize)
        image.write(offset: 0, pattern(imageSize, seed: 23))
        let plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "log-mix", cpuset: CPUSet(parsing: "0-1"))])
        // 512 entries: the split used index has a page of its own (no status
        // byte beside it), the packed descriptor ring two pages of its own.
        let queueSize = 512
        let disk = try plane.addDisk(DiskConfiguration(path: image.path, numQueues: 1, queueSize: queueSize))
        let guest = try TestGuest(queueSize: queueSize, packed: packed, memorySize: 32 << 20)
        let bitmap = Bitmap(guestBytes: guest.memorySize)
        let memorySize = Int(guest.memorySize)
        let snapshot = UnsafeMutableRawPointer.allocate(byteCount: memorySize, alignment: 4096)
        defer { withExtendedLifetime((guest, bitmap)) { plane.stop() }; snapshot.deallocate() }
        let live = try #require(gd_ptr(guest.driver, 0))
        var config = guest.queueConfiguration(0)
        config.dirtyLog = UInt(bitPattern: bitmap.bytes)
        config.dirtyLogSize = UInt64(bitmap.size)

        // Guest memory the test knows: the driver's rings, slots and tables,
        // then the data buffers of each round from dataStart on.
        let n = UInt64(queueSize)
        let slots = gd_slot_header_gpa(guest.driver, 0, 0), tables = gd_slot_indirect_gpa(guest.driver, 0, 0)
        let dataStart = (gd_alloc_mark(guest.driver) + 4095) & ~4095
        let (driverArea, deviceArea): ((UInt64, UInt64), (UInt64, UInt64)) = packed
            ? ((config.availRing, 4), (config.usedRing, 4))
            : ((config.availRing, 6 + 2 * n), (config.usedRing, 6 + 8 * n))
        let ringPages = packed
            ? Self.pages(config.descriptorTable, 16 * n).union(Self.pages(deviceArea.0, deviceArea.1))
            : Self.pages(deviceArea.0, deviceArea.1)
        let fixedAreas: [(String, UInt64, UInt64)] = [
            (packed ? "packed descriptor ring" : "descriptor table", config.descriptorTable, 16 * n),
            (packed ? "driver event area" : "avail ring", driverArea.0, driverArea.1),
            (packed ? "device event area" : "used ring", deviceArea.0, deviceArea.1),
            ("request headers and status bytes", slots, 64 * n),
            ("indirect tables", tables, 16 * n * n),
        ]

        func fill(_ gpa: UInt64, _ count: Int) {
            let p = live + Int(gpa)
            var i = 0
            while i < count {
                var word = rng.next()
                for _ in 0..<min(8, count - i) {
                    p.storeBytes(of: UInt8(truncatingIfNeeded: word), toByteOffset: i, as: UInt8.self)
                    word >>= 8
                    i += 1
                }
            }
        }
        /// `total` bytes cut into 1...maxSegments pieces at random points.
        func cut(_ total: Int, maxSegments: Int) -> [Int] {
            let count = Int.random(in: 1...min(maxSegments, total), using: &rng)
            var points = Set<Int>()
            while points.count < count - 1 { points.insert(Int.random(in: 1..<total, using: &rng)) }
            let edges = [0] + points.sorted() + [total]
            return zip(edges.dropFirst(), edges).map { $0 - $1 }
        }

        let total = 300
        var submitted = 0, round = 0, base: UInt32 = packed ? config.packedBase : UInt32(config.lastAvailIndex)
        var changedTotal = 0, markedTotal = 0, dataPagesChanged = 0
        var kinds = [String: Int](), crossingPages = 0, crossingRegions = 0
        while submitted < total {
            round += 1
            let count = min(total - submitted, Int.random(in: 1...48, using: &rng))
            // Data buffers: a fresh page at a random offset (a quarter of
            // them close to the page's end, so they cross it), or now and
            // then right behind the previous buffer, sharing its page. In a
            // quarter of the rounds the first buffer straddles the regions'
            // boundary (two iovecs, far apart in the device's view) and the
            // rest lie in region 1.
            var straddle = Int.random(in: 0..<4, using: &rng) == 0
            var cursor = straddle ? guest.boundary : dataStart + UInt64.random(in: 0..<64, using: &rng) * 4096
            func place(_ length: Int) -> UInt64 {
                var gpa = cursor
                if straddle {
                    straddle = false
                    if length > 1 { gpa -= UInt64.random(in: 1...UInt64(length - 1), using: &rng) }
                } else if Int.random(in: 0..<4, using: &rng) != 0 {
                    let page = ((cursor + 4095) & ~4095) + UInt64.random(in: 0...2, using: &rng) * 4096
                    let offset: UInt64 = switch Int.random(in: 0..<4, using: &rng) {
                    case 0: 0
                    case 1: 4096 - UInt64.random(in: 1...UInt64(min(length, 4096)), using: &rng)
                    default: UInt64.random(in: 0..<4096, using: &rng)
                    }
                    gpa = page + offset
                }
                cursor = gpa + UInt64(length)
                precondition(cursor <= guest.memorySize, "the round's buffers ran past guest memory")
                return gpa
            }
            var requests: [MixRequest] = []
            for _ in 0..<count {
                let indirect = Bool.random(using: &rng)
                var r: MixRequest
                switch Int.random(in: 0..<8, using: &rng) {
                case let kind where kind < 6: // reads half the time, writes a quarter
                    let sectors = Int.random(in: 1...64, using: &rng)
                    r = MixRequest(type: UInt32(kind < 4 ? GD_BLK_T_IN : GD_BLK_T_OUT),
                                   sector: UInt64.random(in: 0...UInt64(imageSize / 512 - sectors), using: &rng),
                                   indirect: indirect)
                    r.segments = cut(sectors * 512, maxSegments: 8).map { (place($0), UInt32($0)) }
                case 6:
                    r = MixRequest(type: UInt32(GD_BLK_T_GET_ID), indirect: indirect)
                    r.segments = cut(Int.random(in: 20...64, using: &rng), maxSegments: 3)
                        .map { (place($0), UInt32($0)) }
                default:
                    r = MixRequest(type: UInt32(GD_BLK_T_FLUSH), indirect: indirect)
                }
                // Read buffers get fresh random bytes too, so what the device
                // writes over them differs from what was there.
                for s in r.segments {
                    fill(s.0, Int(s.1))
                    if (s.0 + UInt64(s.1) - 1) >> 12 != s.0 >> 12 { crossingPages += 1 }
                    if s.0 < guest.boundary && guest.boundary < s.0 + UInt64(s.1) { crossingRegions += 1 }
                }
                r.head = try guest.submit(type: r.type, sector: r.sector, segments: r.segments, indirect: indirect,
                                          kick: false)
                kinds[r.name, default: 0] += 1
                requests.append(r)
            }
            submitted += count

            // The guest has laid out and published the batch; the device has
            // not seen it (the queue is stopped). What differs from here on
            // is the device's doing, and the guest's own ring area.
            snapshot.copyMemory(from: live, byteCount: memorySize)
            bitmap.clear()
            if packed { config.packedBase = base } else { config.lastAvailIndex = UInt16(truncatingIfNeeded: base) }
            let queue = try plane.startQueue(disk: disk, index: 0, memory: guest.memory, configuration: config)
            _ = gd_kick(guest.driver, 0)
            var done = [UInt16: TestGuest.Completion]()
            for _ in 0..<count {
                let c = try guest.complete()
                done[c.head] = c
            }
            base = queue.stopBase()

            for r in requests {
                let c = done[r.head]
                #expect(c?.status == 0 && c?.length == r.usedLength,
                        "seed \(seed), round \(round): \(r.name) (head \(r.head)): \(String(describing: c))")
            }
            // The guest's own writes while it reaped: left out.
            (snapshot + Int(driverArea.0)).copyMemory(from: live + Int(driverArea.0), byteCount: Int(driverArea.1))

            var changed = Set<UInt64>()
            for page in 0..<memorySize / 4096 where memcmp(snapshot + page * 4096, live + page * 4096, 4096) != 0 {
                changed.insert(UInt64(page))
            }
            let marked = bitmap.marked
            let statusPages = Set(requests.map { guest.memoryStatusGPA(head: $0.head) >> 12 })
            let dataPages = requests.filter(\.deviceWritable).reduce(into: Set<UInt64>()) { pages, r in
                for s in r.segments { pages.formUnion(Self.pages(s.0, UInt64(s.1))) }
            }
            let allowed = ringPages.union(statusPages).union(dataPages)
            changedTotal += changed.count
            markedTotal += marked.count
            dataPagesChanged += dataPages.intersection(changed).subtracting(ringPages).subtracting(statusPages).count

            func describe(_ page: UInt64) -> String {
                let lo = page << 12, hi = lo + 4096
                var what = fixedAreas.filter { $0.1 < hi && lo < $0.1 + $0.2 }.map(\.0)
                for (i, r) in requests.enumerated() {
                    if statusPages.contains(page) && guest.memoryStatusGPA(head: r.head) >> 12 == page {
                        what.append("status byte of request \(i) (\(r.name), head \(r.head))")
                    }
                    for (j, s) in r.segments.enumerated() where s.0 < hi && lo < s.0 + UInt64(s.1) {
                        what.append("\(r.name) \(i) (head \(r.head)) data segment \(j): GPA 0x"
                            + String(s.0, radix: 16) + " + \(s.1)")
                    }
                }
                if lo < guest.boundary && guest.boundary < hi { what.append("the regions' boundary") }
                if what.count > 5 { what[4...] = ["and \(what.count - 4) more"] }
                return what.isEmpty ? "nothing the guest laid out" : what.joined(separator: "; ")
            }
            func report(_ pages: Set<UInt64>, _ what: String) -> String {
                guard let first = pages.min() else { return "" }
                return "seed \(seed), \(packed ? "packed" : "split"), round \(round) (\(count) requests): "
                    + "\(pages.count) page(s) \(what), the first GPA 0x\(String(first << 12, radix: 16)) "
                    + "(page \(first)): \(describe(first))"
            }

            // The comparison sees the device's writes: every status byte went from 0xFF to the status.
            #expect(statusPages.isSubset(of: changed), "seed \(seed), round \(round): a status byte did not change")
            let unmarked = changed.subtracting(marked), stray = marked.subtracting(allowed)
            if !unmarked.isEmpty { Issue.record("\(report(unmarked, "changed but not marked"))") }
            if !stray.isEmpty { Issue.record("\(report(stray, "marked that the device had no business writing"))") }
            if !unmarked.isEmpty || !stray.isEmpty { break }
        }
        #expect(dataPagesChanged > 0, "no read or GET_ID buffer page changed: the mix tests nothing")
        let mix = kinds.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
        print("DirtyLogTests random mix (\(packed ? "packed" : "split")): seed \(seed), \(round) rounds (\(mix)), "
            + "\(crossingPages) segments crossing a page, \(crossingRegions) the regions' boundary; "
            + "\(changedTotal) pages changed (\(dataPagesChanged) of data buffers alone), \(markedTotal) marked; "
            + String(format: "%.2f s", Date().timeIntervalSince(started)))
    }

    /// The messages QEMU 7.2 sends when a migration starts: LOG_ALL and
    /// LOG_SHMFD are offered, SET_LOG_BASE maps the memfd and answers,
    /// SET_FEATURES with LOG_ALL turns logging on, and status says so.
    @Test func setLogBaseMapsTheLogAndStatusShowsIt() throws {
        let h = try ServerHarness(numQueues: 1)
        let f = try RawFrontend(path: h.socket)
        let features = try #require(f.u64Reply(1))
        #expect(features & (1 << 26) != 0, "VHOST_F_LOG_ALL offered")
        let protocolFeatures = try #require(f.u64Reply(15))
        #expect(protocolFeatures & (1 << 1) != 0, "LOG_SHMFD offered")
        var p: [UInt8] = []
        p.appendLE(UInt64(1 << 1 | 1 << 3)) // LOG_SHMFD, REPLY_ACK
        f.send(16, payload: p)
        f.send(3) // SET_OWNER

        let fd = dps_memfd("test-dirty-log", 8192)
        try #require(fd >= 0)
        defer { close(fd) }
        var log: [UInt8] = []
        log.appendLE(UInt64(8192))
        log.appendLE(UInt64(0))
        f.send(6, payload: log, fds: [fd])
        let reply = try #require(f.receive())
        #expect(reply.request == 6 && reply.flags & 4 != 0, "SET_LOG_BASE is answered (QEMU waits for it)")

        #expect(h.server.exportStatus.first?.dirtyLogBytes == nil, "not logging before LOG_ALL")
        var set: [UInt8] = []
        set.appendLE((features & ~(UInt64(1) << 34)) | 1 << 26)
        f.send(2, flags: 1 | 8, payload: set)
        let ack = try #require(f.receive())
        #expect(ack.request == 2 && PayloadReaderForTests.u64(ack.payload, 0) == 0)
        #expect(h.server.exportStatus.first?.dirtyLogBytes == 8192)

        // A log larger than its memfd is refused, and the connection goes.
        var bad: [UInt8] = []
        bad.appendLE(UInt64(1 << 20))
        bad.appendLE(UInt64(0))
        f.send(6, payload: bad, fds: [fd])
        #expect(f.closedByServer())
    }
}

extension TestGuest {
    /// The guest-physical address of a request's status byte.
    func memoryStatusGPA(head: UInt16) -> UInt64 { gd_slot_status_gpa(driver, 0, head) }
}
