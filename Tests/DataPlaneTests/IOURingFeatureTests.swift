import CDataPlane
import CGuestDriver
import Foundation
import Synchronization
import Testing

@testable import DataPlane

/// io_uring to the full: each feature is used where the kernel has it, the
/// data lands with and without it, and what it registers follows the
/// queues (memory swaps, several disks and guests on one IOThread).
@Suite(.serialized, .timeLimit(.minutes(2))) struct IOURingFeatureTests {
    /// One IOThread, with some io_uring features disabled, serving disks.
    /// It owns the guests and whatever memory their queues use, so that
    /// the plane stops before any of it is unmapped.
    final class Rig: @unchecked Sendable {
        let plane: DataPlane
        private var kept: [AnyObject] = []

        init(disabled: IOURingFeatures = [], pollMicroseconds: UInt32 = 0, cpus: String? = nil) throws {
            let cpus = try CPUSet(parsing: cpus ?? "0-\(ProcessInfo.processInfo.activeProcessorCount - 1)")
            var thread = IOThreadConfiguration(name: "uring-io", cpuset: cpus, pollMaxMicroseconds: pollMicroseconds)
            thread.disabledIOURingFeatures = disabled
            plane = try DataPlane(iothreads: [thread])
        }

        deinit { plane.stop() }

        func guest(queues: Int = 1, queueSize: Int = 128, memorySize: UInt64 = 64 << 20) throws -> TestGuest {
            let g = try TestGuest(queues: queues, queueSize: queueSize, memorySize: memorySize)
            kept.append(g)
            return g
        }

        func keep(_ object: AnyObject) { kept.append(object) }

        var thread: IOThreadStatistics { plane.threads[0].statistics() }

        func disk(_ path: String, queues: Int = 1, fixedBuffers: Bool = true) throws -> Disk {
            var config = DiskConfiguration(path: path, numQueues: queues)
            config.fixedBuffers = fixedBuffers
            return try plane.addDisk(config)
        }

        @discardableResult
        func start(_ disk: Disk, _ index: Int, _ guest: TestGuest, queue: Int = 0) throws -> Virtqueue {
            try plane.startQueue(disk: disk, index: index, memory: guest.memory, configuration: guest.queueConfiguration(queue))
        }
    }

    static var kernelHasEveryFeature: Bool {
        var name = utsname()
        uname(&name)
        let release = withUnsafeBytes(of: name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let parts = release.split(separator: ".").prefix(2).map { Int($0.prefix { $0.isNumber }) ?? 0 }
        return parts.count == 2 && (parts[0], parts[1]) >= (6, 1) // DEFER_TASKRUN, the newest of them
    }

    /// Reads `count` bytes of a file or device at `offset`.
    static func readBack(_ path: String, offset: Int, count: Int) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: count)
        let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        return Array(buffer.prefix(max(n, 0)))
    }

    /// Equal bytes (a failure says so without printing them all).
    static func same(_ a: [UInt8], _ b: [UInt8]) -> Bool { a == b }

    static func waitUntil(_ seconds: Double = 5, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while !condition() {
            if Date() > deadline { return false }
            usleep(1000)
        }
        return true
    }

    @Test(.enabled(if: kernelHasEveryFeature, "the kernel predates DEFER_TASKRUN (6.1)"))
    func everyFeatureIsUsedWhereTheKernelHasIt() throws {
        let rig = try Rig()
        #expect(rig.thread.ioURingFeatures == .all, "\(rig.thread.ioURingFeatures)")
        var disabled = try Rig(disabled: [.deferTaskRun, .multishotKicks])
        #expect(disabled.thread.ioURingFeatures == [.registeredFiles, .fixedBuffers, .singleSegmentReadWrite])
        disabled = try Rig(disabled: .all)
        #expect(disabled.thread.ioURingFeatures == [])
    }

    /// On a loop device with direct I/O (completions come from the block
    /// layer, as task work, which DEFER_TASKRUN holds until the IOThread
    /// asks), with each feature off in turn, all, and none: one-segment,
    /// three-segment and misaligned (bounced) writes and reads land, and the
    /// counters show which way each request went. Polling or sleeping:
    /// with DEFER_TASKRUN the poll window must ask for completions too.
    @Test(.enabled(if: runningAsRoot && kernelHasEveryFeature, "loop devices need root"),
          arguments: ["none", "all", "defer-taskrun", "registered-files", "fixed-buffers", "single-rw", "multishot-kicks"],
          [UInt32(0), 50])
    func dataLandsWithEachFeatureOnOrOff(disabledName: String, pollMicroseconds: UInt32) throws {
        let disabled = try #require(IOURingFeatures(names: [disabledName]))
        let used = IOURingFeatures.all.subtracting(disabled)
        let loop = try LoopDevice(sizeBytes: 8 << 20, sectorSize: 512)
        let rig = try Rig(disabled: disabled, pollMicroseconds: pollMicroseconds)
        let disk = try rig.disk(loop.path)
        rig.keep(loop)
        let g = try rig.guest()
        let queue = try rig.start(disk, 0, g)
        #expect(rig.thread.ioURingFeatures == used)
        #expect(rig.thread.registeredFiles == (used.contains(.registeredFiles) ? 1 : 0))
        #expect(rig.thread.registeredBuffers == (used.contains(.fixedBuffers) ? 2 : 0), "the test guest has two regions")

        // 8 one-segment writes, then one of three segments, then a misaligned one.
        var expected: [(sector: UInt64, bytes: [UInt8])] = []
        for i in 0..<8 {
            let bytes = pattern(8192, seed: UInt8(i + 1)), buf = g.alloc(8192)
            g.write(buf, bytes)
            #expect(try g.run(type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * 16), segments: [(buf, 8192)]).status == 0)
            expected.append((UInt64(i * 16), bytes))
        }
        let three = pattern(3 * 4096, seed: 42), segs = (0..<3).map { _ in g.alloc(4096) }
        for (i, seg) in segs.enumerated() { g.write(seg, Array(three[i * 4096..<(i + 1) * 4096])) }
        #expect(try g.run(type: UInt32(GD_BLK_T_OUT), sector: 200, segments: segs.map { ($0, 4096) }).status == 0)
        expected.append((200, three))
        let odd = pattern(4096, seed: 77), oddBuf = g.alloc(4096 + 64) + 8
        g.write(oddBuf, odd)
        #expect(try g.run(type: UInt32(GD_BLK_T_OUT), sector: 300, segments: [(oddBuf, 4096)]).status == 0)
        expected.append((300, odd))
        #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0)
        for (sector, bytes) in expected {
            #expect(Self.same(Self.readBack(loop.path, offset: Int(sector) * 512, count: bytes.count), bytes), "sector \(sector) on the device")
        }

        // Read back the same ways.
        for (i, (sector, bytes)) in expected.prefix(8).enumerated() {
            let buf = g.alloc(8192)
            #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: sector, segments: [(buf, 8192)]).status == 0)
            #expect(Self.same(g.read(buf, 8192), bytes), "read \(i)")
        }
        let back = (0..<3).map { _ in g.alloc(4096) }
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: 200, segments: back.map { ($0, 4096) }).status == 0)
        #expect(Self.same(back.flatMap { g.read($0, 4096) }, three))
        let oddBack = g.alloc(4096 + 64) + 8
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: 300, segments: [(oddBack, 4096)]).status == 0)
        #expect(Self.same(g.read(oddBack, 4096), odd))

        // 16 aligned one-segment requests: fixed where registered, else READ/WRITE where probed.
        let t = rig.thread, q = queue.statistics()
        #expect(q.errors == 0 && q.bounces == 2 && (q.kicks > 0 || pollMicroseconds > 0), "\(q)")
        #expect(t.fixedBufferRequests == (used.contains(.fixedBuffers) ? 16 : 0))
        #expect(t.singleSegmentRequests == (!used.contains(.fixedBuffers) && used.contains(.singleSegmentReadWrite) ? 16 : 0))
        // 21 requests: 10 writes, a flush, 10 reads.
        #expect(t.fixedFileRequests == (used.contains(.registeredFiles) ? 21 : 0), "\(t.fixedFileRequests) requests named the registered file")
        #expect(t.kickPollRearms == 0 && t.completionQueueOverflows == 0 && t.failure == nil && t.bufferRegistrationFailures == 0)

        // Detached, the queue takes what it registered with it.
        rig.plane.stopQueue(disk: disk, index: 0)
        #expect(rig.thread.registeredFiles == 0 && rig.thread.registeredBuffers == 0)
    }

    /// Fresh anonymous shared memory: pinnable, and not the guest driver's memfd.
    final class Mapping {
        let base: UnsafeMutableRawPointer
        let size: Int
        init(size: Int, file: String? = nil) throws {
            var fd: Int32 = -1
            if let file {
                fd = open(file, O_RDWR | O_CREAT, 0o600)
                guard fd >= 0, ftruncate(fd, off_t(size)) == 0 else { throw TestFailure("cannot make \(file)") }
            }
            defer { if fd >= 0 { close(fd) } }
            let p = mmap(nil, size, PROT_READ | PROT_WRITE, fd >= 0 ? MAP_SHARED : MAP_SHARED | MAP_ANONYMOUS, fd, 0)
            guard let p, p != MAP_FAILED else { throw TestFailure("mmap: \(errno)") }
            base = p
            self.size = size
        }
        deinit { munmap(base, size) }
        func write(_ offset: UInt64, _ bytes: [UInt8]) {
            bytes.withUnsafeBytes { (base + Int(offset)).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        }
        func read(_ offset: UInt64, _ count: Int) -> [UInt8] {
            Array(UnsafeRawBufferPointer(start: base + Int(offset), count: count))
        }
    }

    /// The guest's memory table changes (a frontend's SET_MEM_TABLE): the
    /// upper region now lies in other pages. The new table is registered in
    /// place of the old, and reads and writes of buffers there go to the new
    /// pages, not to the ones the old registration pinned. With `pinnable`
    /// false those pages are a shared mapping of a file on a disk
    /// filesystem, which the kernel refuses to pin: the failure is counted
    /// and the requests go the plain way, to the same pages.
    @Test(arguments: [true, false])
    func aMemoryTableChangeRegistersTheNewMemory(pinnable: Bool) throws {
        let image = try TestImage(size: 4 << 20)
        let rig = try Rig()
        let disk = try rig.disk(image.path)
        let g = try rig.guest()
        let queue = try rig.start(disk, 0, g)
        let half = g.boundary
        #expect(rig.thread.registeredBuffers == 2)

        // Buffers in the upper region (the rings stay in the lower one).
        let wbuf = g.allocAt(half + (1 << 20), 8192), rbuf = g.allocAt(half + (2 << 20), 8192)
        let before = pattern(8192, seed: 1)
        g.write(wbuf, before)
        #expect(try g.run(type: UInt32(GD_BLK_T_OUT), sector: 0, segments: [(wbuf, 8192)]).status == 0)
        #expect(Self.same(image.read(offset: 0, count: 8192), before))
        let fixedBefore = rig.thread.fixedBufferRequests
        #expect(fixedBefore == 1)

        let fresh = try Mapping(size: Int(half), file: pinnable ? nil : image.directory + "/guest-ram")
        rig.keep(fresh)
        let regions = g.memory.regions
        let upper = try #require(regions.first { $0.guestPhysicalAddress == half })
        let lower = try #require(regions.first { $0.guestPhysicalAddress == 0 })
        let swapped = try GuestMemory(regions: [lower, MemoryRegion(guestPhysicalAddress: half, size: upper.size,
                                                                     userAddress: upper.userAddress,
                                                                     hostAddress: UInt(bitPattern: fresh.base))])
        try queue.setMemory(swapped)
        let t = rig.thread
        if pinnable {
            #expect(t.registeredBuffers == 2 && t.bufferRegistrationFailures == 0, "\(t)")
        } else {
            #expect(t.registeredBuffers == 0 && t.bufferRegistrationFailures == 1 && t.bufferRegistrationError != nil, "\(t)")
        }

        // The write takes the new pages' bytes, not the old ones'.
        let after = pattern(8192, seed: 2)
        fresh.write(wbuf - half, after)
        g.write(wbuf, pattern(8192, seed: 3)) // the old pages: must not be what lands
        #expect(try g.run(type: UInt32(GD_BLK_T_OUT), sector: 64, segments: [(wbuf, 8192)]).status == 0)
        #expect(Self.same(image.read(offset: 64 * 512, count: 8192), after), "the write took the old pages' bytes")
        // The read lands in the new pages, and leaves the old ones alone.
        let old = [UInt8](repeating: 0xEE, count: 8192)
        g.write(rbuf, old)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(rbuf, 8192)]).status == 0)
        #expect(Self.same(fresh.read(rbuf - half, 8192), before), "the read did not land in the new pages")
        #expect(Self.same(g.read(rbuf, 8192), old), "the read landed in the old pages")
        #expect(rig.thread.fixedBufferRequests == fixedBefore + (pinnable ? 2 : 0))
        #expect(rig.thread.singleSegmentRequests == (pinnable ? 0 : 2))

        // And back: the first table again, registered again.
        try queue.setMemory(g.memory)
        #expect(rig.thread.registeredBuffers == 2)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: 64, segments: [(rbuf, 8192)]).status == 0)
        #expect(Self.same(g.read(rbuf, 8192), after))
        #expect(rig.thread.fixedBufferRequests == fixedBefore + (pinnable ? 3 : 1))
    }

    /// Two disks and two guests on one IOThread: a disk's fd is registered
    /// once however many of the thread's queues use it, and a guest's
    /// memory table once however many disks do (one slot per region piece,
    /// each table in its own slots); what the last queue lets go of is
    /// unregistered. Data lands in the right guest's memory throughout.
    @Test func disksAndGuestsSharingAnIOThreadShareItsTables() throws {
        let imageA = try TestImage(size: 4 << 20), imageB = try TestImage(size: 4 << 20)
        let rig = try Rig()
        let diskA = try rig.disk(imageA.path, queues: 2), diskB = try rig.disk(imageB.path)
        let one = try rig.guest(queues: 2), two = try rig.guest()
        try rig.start(diskA, 0, one, queue: 0)
        try rig.start(diskA, 1, two)
        try rig.start(diskB, 0, one, queue: 1)
        var t = rig.thread
        #expect(t.registeredFiles == 2 && t.registeredBuffers == 4, "\(t)")

        func roundTrip(_ g: TestGuest, _ q: Int, _ image: TestImage, sector: UInt64, seed: UInt8) throws {
            let bytes = pattern(4096, seed: seed), buf = g.alloc(4096), back = g.alloc(4096)
            g.write(buf, bytes)
            #expect(try g.run(q, type: UInt32(GD_BLK_T_OUT), sector: sector, segments: [(buf, 4096)]).status == 0)
            #expect(Self.same(image.read(offset: Int(sector) * 512, count: 4096), bytes))
            #expect(try g.run(q, type: UInt32(GD_BLK_T_IN), sector: sector, segments: [(back, 4096)]).status == 0)
            #expect(Self.same(g.read(back, 4096), bytes))
        }
        try roundTrip(one, 0, imageA, sector: 0, seed: 1)
        try roundTrip(two, 0, imageA, sector: 8, seed: 2)
        try roundTrip(one, 1, imageB, sector: 0, seed: 3)
        #expect(rig.thread.fixedBufferRequests == 6)

        rig.plane.stopQueue(disk: diskA, index: 0) // guest one's memory is still used by disk B
        t = rig.thread
        #expect(t.registeredFiles == 2 && t.registeredBuffers == 4, "\(t)")
        try roundTrip(two, 0, imageA, sector: 16, seed: 4)
        try roundTrip(one, 1, imageB, sector: 16, seed: 5)
        let twoStoppedAt = try #require(rig.plane.stopQueue(disk: diskA, index: 1)) // disk A and guest two go
        t = rig.thread
        #expect(t.registeredFiles == 1 && t.registeredBuffers == 2, "\(t)")
        try roundTrip(one, 1, imageB, sector: 24, seed: 6)
        rig.plane.stopQueue(disk: diskB, index: 0)
        t = rig.thread
        #expect(t.registeredFiles == 0 && t.registeredBuffers == 0, "\(t)")
        #expect(t.fixedBufferRequests == 12 && t.bufferRegistrationFailures == 0)

        // A queue started again registers again, in the slots let go.
        var again = two.queueConfiguration(0)
        again.lastAvailIndex = twoStoppedAt
        try rig.plane.startQueue(disk: diskA, index: 0, memory: two.memory, configuration: again)
        try roundTrip(two, 0, imageA, sector: 32, seed: 7)
        #expect(rig.thread.registeredFiles == 1 && rig.thread.registeredBuffers == 2)
    }

    /// A disk that leaves fixed buffers off (the default) pins nothing.
    @Test func fixedBuffersAreOffUnlessTheDiskAsks() throws {
        let image = try TestImage(size: 1 << 20)
        let rig = try Rig()
        let disk = try rig.disk(image.path, fixedBuffers: false)
        let g = try rig.guest()
        try rig.start(disk, 0, g)
        #expect(DiskConfiguration(path: "x").fixedBuffers == false)
        let buf = g.alloc(4096)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]).status == 0)
        let t = rig.thread
        #expect(t.registeredBuffers == 0 && t.fixedBufferRequests == 0 && t.singleSegmentRequests == 1, "\(t)")
    }

    /// The kernel ends a multishot poll when it has no room for its CQE (we
    /// end them here as it would): the last CQE comes without
    /// IORING_CQE_F_MORE, and the poll must be armed again, or the queue
    /// would never hear of another kick. With polling off, every request
    /// after that needs its kick.
    @Test(.enabled(if: kernelHasEveryFeature, "the kernel predates multishot poll"))
    func aMultishotKickPollTheKernelEndsIsArmedAgain() throws {
        let image = try TestImage(size: 1 << 20)
        let rig = try Rig()
        let disk = try rig.disk(image.path)
        let g = try rig.guest()
        let queue = try rig.start(disk, 0, g)
        let buf = g.alloc(4096)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]).status == 0)
        for round in 1...3 {
            #expect(dp_iothread_end_kick_polls(rig.plane.threads[0].handle) == 1)
            #expect(Self.waitUntil { rig.thread.kickPollRearms == UInt64(round) }, "re-armed \(rig.thread.kickPollRearms) times")
            for i in 0..<5 {
                // Long enough for the IOThread to sleep: the request needs its kick.
                usleep(5000)
                let kicks = queue.statistics().kicks
                #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: UInt64(i * 8), segments: [(buf, 4096)]).status == 0)
                #expect(queue.statistics().kicks > kicks)
            }
        }
        // Without multishot polls there is nothing to end.
        let plain = try Rig(disabled: .multishotKicks)
        let other = try plain.guest()
        let otherImage = try TestImage(size: 1 << 20)
        try plain.start(try plain.disk(otherImage.path, fixedBuffers: false), 0, other)
        #expect(dp_iothread_end_kick_polls(plain.plane.threads[0].handle) == 0)
        #expect(try other.run(type: UInt32(GD_BLK_T_IN), segments: [(other.alloc(4096), 4096)]).status == 0)
    }

    /// With DEFER_TASKRUN, completions are posted only when the IOThread
    /// asks for them: not even a timer tick does (it did with COOP_TASKRUN).
    /// A thread kept busy by requests that need no SQE (the null backend, a
    /// guest that wants no interrupts) never sleeps, so it must ask as it
    /// goes: else kicks, control messages and I/O completions would wait
    /// for as long as the guest keeps it busy. Seen here through kicks
    /// (written to the kick eventfd by another thread): in every interval
    /// in which the thread never slept, they must still arrive. (Control
    /// messages would do as well, but their answer needs the control side
    /// scheduled, which this machine's other load delays as much.)
    @Test func aThreadThatNeverSleepsStillTakesItsCompletions() throws {
        let rig = try Rig(cpus: "0")
        var config = DiskConfiguration(path: "n", backend: .null)
        config.nullReadZeroes = false
        let disk = try rig.plane.addDisk(config)
        let g = try rig.guest(queueSize: 1024, memorySize: 128 << 20)
        let queue = try rig.start(disk, 0, g)
        // The guest keeps its 1024 heads, each an indirect table of 130
        // descriptors (the longest chain it may send), on the avail ring:
        // every pass of the IOThread walks its share (1024 descriptors) and
        // finds more left, and the guest wants no interrupt for any of it.
        let driver = g.driver
        gd_disable_calls(driver, 0)
        let header = g.alloc(16, align: 16), data = g.alloc(65536), status = g.alloc(1)
        g.write(header, [UInt8](repeating: 0, count: 16))
        var table: [UInt8] = []
        func entry(_ addr: UInt64, _ len: UInt32, _ flags: UInt16, _ next: UInt16) {
            table += withUnsafeBytes(of: addr.littleEndian) { Array($0) } + withUnsafeBytes(of: len.littleEndian) { Array($0) }
            table += withUnsafeBytes(of: flags.littleEndian) { Array($0) } + withUnsafeBytes(of: next.littleEndian) { Array($0) }
        }
        entry(header, 16, UInt16(GD_DESC_F_NEXT), 1)
        for i in 0..<128 { entry(data + UInt64(i) * 512, 512, UInt16(GD_DESC_F_NEXT | GD_DESC_F_WRITE), UInt16(i + 2)) }
        entry(status, 1, UInt16(GD_DESC_F_WRITE), 0)
        for head in 0..<1024 {
            let gpa = g.alloc(UInt64(table.count), align: 16)
            g.write(gpa, table)
            gd_write_desc(driver, 0, UInt16(head), gpa, UInt32(table.count), UInt16(GD_DESC_F_INDIRECT), 0)
        }
        final class Flood: @unchecked Sendable {
            let stop = Atomic<Bool>(false)
            let done = DispatchSemaphore(value: 0) // each thread signals it once
            var completed = 0
        }
        let flood = Flood()
        let kickFD = g.queueConfiguration(0).kickFD
        let client = Thread {
            let driver = g.driver
            gd_pin_thread(1)
            for head in 0..<1024 { gd_avail_add(driver, 0, UInt16(head)) }
            gd_avail_publish(driver, 0)
            gd_kick(driver, 0)
            var id: UInt32 = 0, len: UInt32 = 0
            while !flood.stop.load(ordering: .relaxed) {
                while gd_used_pop(driver, 0, &id, &len) == 1 {
                    flood.completed += 1
                    gd_avail_add(driver, 0, UInt16(id)) // straight back
                    gd_avail_publish(driver, 0)
                }
            }
            flood.done.signal()
        }
        let kicker = Thread {
            var one: UInt64 = 1
            while !flood.stop.load(ordering: .relaxed) {
                _ = write(kickFD, &one, 8)
                usleep(200)
            }
            flood.done.signal()
        }
        client.start()
        kicker.start()
        usleep(100_000)
        // 40 intervals of 25 ms: in each one the thread ran in (100 passes
        // at least: the machine's other load may leave it none) and never
        // slept in, the kicks came all the same.
        var busy = 0, kickedWhileBusy = 0
        func sample() -> (waits: UInt64, passes: UInt64, kicks: UInt64) {
            let t = rig.thread
            return (t.waits, t.iterations, queue.statistics().kicks)
        }
        var before = sample()
        for _ in 0..<40 {
            usleep(25_000)
            let now = sample()
            if now.waits == before.waits && now.passes >= before.passes + 100 {
                busy += 1
                if now.kicks > before.kicks { kickedWhileBusy += 1 }
            }
            before = now
        }
        // A control message gets through too.
        try queue.pause()
        try queue.resume()
        flood.stop.store(true, ordering: .relaxed)
        flood.done.wait()
        flood.done.wait()
        #expect(flood.completed > 10_000, "the flood ran: \(flood.completed) requests")
        #expect(busy > 0, "the thread slept, or did not run, in every interval: nothing was tested (a loaded machine?)")
        #expect(kickedWhileBusy == busy, "kicks came in \(kickedWhileBusy) of the \(busy) intervals the thread never slept in")
        #expect(rig.thread.failure == nil)
    }

    /// A multishot poll posts a CQE per kick, beyond the one counted when it
    /// was armed. Guests kicking in a tight loop (the eventfds written as
    /// fast as a thread can) beside 20 queues of 256 requests (more than
    /// the CQ holds) must not overflow the CQ: requests keep room for the
    /// kicks' CQEs.
    @Test func kicksFloodingBesideAFullCompletionQueueDoNotOverflowIt() throws {
        let image = try TestImage(size: 16 << 20, in: "/dev/shm")
        let h = try Harness(disk: DiskConfiguration(path: image.path), queues: 20, queueSize: 256)
        let kickFDs = (0..<20).map { h.guest.queueConfiguration($0).kickFD }
        final class Flag: Sendable { let stop = Atomic<Bool>(false) }
        let flag = Flag()
        let flooder = Thread {
            var one: UInt64 = 1
            while !flag.stop.load(ordering: .relaxed) {
                for fd in kickFDs { _ = write(fd, &one, 8) }
            }
        }
        flooder.start()
        var p = gd_bench_params()
        p.first_queue = 0
        p.num_queues = 20
        p.depth = 256
        p.type = UInt32(GD_BLK_T_IN)
        p.block_size = 512
        p.random = true
        p.capacity_sectors = (16 << 20) / 512
        p.duration_ns = 500_000_000
        p.busy_poll = true
        p.cpu = -1
        var r = gd_bench_result()
        var rc: Int32 = 0
        // On a loaded machine the flooder may get little CPU in one run:
        // run again (at most 5 s in all) until the flood has really been seen.
        for _ in 0..<10 {
            rc = gd_bench_run(h.guest.driver, &p, &r)
            if rc != 0 || h.plane.statistics().disks[0].kicks > 1000 { break }
        }
        flag.stop.store(true, ordering: .relaxed)
        while !flooder.isFinished { usleep(1000) }
        #expect(rc == 0)
        #expect(r.ops > 20 * 256 && r.errors == 0, "\(r.ops) reads, \(r.errors) errors")
        let thread = h.plane.threads[0].statistics()
        #expect(thread.ioURingFeatures.contains(.multishotKicks) || !Self.kernelHasEveryFeature)
        #expect(thread.completionQueueOverflows == 0 && thread.failure == nil,
                "CQ overflowed in \(thread.completionQueueOverflows) passes; failure: \(thread.failure ?? "none")")
        let kicks = h.plane.statistics().disks[0].kicks
        #expect(kicks > 1000, "only \(kicks) kicks seen")
    }
}
