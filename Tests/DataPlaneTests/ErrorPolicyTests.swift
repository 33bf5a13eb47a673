import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// rerror/werror-style policies, driven by fault injection and by a real full filesystem.
@Suite struct ErrorPolicyTests {
    static let EIO: Int32 = 5, ENOSPC: Int32 = 28

    func harness(_ image: TestImage, read: ErrorPolicy = .report, write: ErrorPolicy, directIO: Bool = true,
                 inflight: Bool = false) throws -> Harness {
        var config = DiskConfiguration(path: image.path, directIO: directIO)
        config.readErrorPolicy = read
        config.writeErrorPolicy = write
        return try Harness(disk: config, inflight: inflight)
    }

    func write(_ g: TestGuest, sector: UInt64, seed: UInt8, size: Int = 4096, kick: Bool = true) throws -> UInt16 {
        let buf = g.alloc(UInt64(size))
        g.write(buf, pattern(size, seed: seed))
        return try g.submit(type: UInt32(GD_BLK_T_OUT), sector: sector, segments: [(buf, UInt32(size))], kick: kick)
    }

    /// No completion arrives within the time.
    func expectNothingCompletes(_ g: TestGuest, within seconds: Double = 0.3) {
        #expect((try? g.complete(timeout: seconds)) == nil)
    }

    @Test func reportFailsTheRequest() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, write: .report)
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write]))
        _ = try write(h.guest, sector: 0, seed: 1)
        #expect(try h.guest.complete().status == UInt8(GD_BLK_S_IOERR))
        #expect(h.stats().ioErrors == 1 && h.stats().stoppedOnError == nil)
        #expect(image.read(offset: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
    }

    @Test func ignoreCompletesAsIfItWorked() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, read: .ignore, write: .ignore)
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write, .read]))
        _ = try write(h.guest, sector: 0, seed: 2)
        #expect(try h.guest.complete().status == UInt8(GD_BLK_S_OK))
        let buf = h.guest.alloc(4096)
        #expect(try h.guest.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]).status == UInt8(GD_BLK_S_OK))
        #expect(h.stats().ignoredErrors == 2)
        #expect(image.read(offset: 0, count: 4096) == [UInt8](repeating: 0, count: 4096)) // nothing was written
    }

    @Test func stopHoldsRequestsAndResumeRetriesThem() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, write: .stop)
        let g = h.guest
        // Fail writes to sectors 8..<16 only, from the second matching one on.
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write], sectors: 8..<16, after: 1))
        _ = try write(g, sector: 8, seed: 3)
        #expect(try g.complete().status == 0) // the first gets through
        let held = try write(g, sector: 8, seed: 4)
        expectNothingCompletes(g)
        var s = h.stats()
        #expect(s.stoppedOnError == "Input/output error" && s.heldRequests == 1 && s.inFlight == 1)
        // Stopped: new requests wait in the ring.
        let later = try write(g, sector: 64, seed: 5)
        expectNothingCompletes(g)
        // The operator fixes the cause and resumes.
        h.disk.injectFaults(nil)
        try h.plane.resume(disk: h.disk)
        gd_kick(g.driver, 0)
        let done = [try g.complete(), try g.complete()]
        #expect(Set(done.map(\.head)) == [held, later] && done.allSatisfy { $0.status == 0 })
        s = h.stats()
        #expect(s.stoppedOnError == nil && s.heldRequests == 0 && s.inFlight == 0)
        #expect(image.read(offset: 8 * 512, count: 4096) == pattern(4096, seed: 4))
        #expect(image.read(offset: 64 * 512, count: 4096) == pattern(4096, seed: 5))
    }

    /// A write held by werror=stop was checked against the old capacity: a
    /// shrink meanwhile (which does not wait for held requests) makes its
    /// retry fail rather than write past the new end and grow the file again.
    @Test func aHeldWriteRetriedPastAShrunkEndFails() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, write: .stop)
        let g = h.guest
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write]))
        let held = try write(g, sector: 1024, seed: 6) // 512 KiB in: past the half the disk keeps
        expectNothingCompletes(g)
        #expect(h.stats().heldRequests == 1)
        _ = try h.plane.resize(disk: h.disk, toBytes: 512 << 10, allowShrink: true)
        h.disk.injectFaults(nil)
        try h.plane.resume(disk: h.disk)
        let done = try g.complete()
        #expect(done.head == held && done.status == UInt8(GD_BLK_S_IOERR))
        #expect(h.stats().heldRequests == 0 && h.stats().stoppedOnError == nil)
        let size = try FileManager.default.attributesOfItem(atPath: image.path)[.size] as? Int
        #expect(size == 512 << 10, "the image is \(size ?? -1) bytes after the retry")
    }

    @Test func enospcStopsOnlyOnENOSPC() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, write: .enospc)
        let g = h.guest
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write]))
        _ = try write(g, sector: 0, seed: 6)
        #expect(try g.complete().status == UInt8(GD_BLK_S_IOERR))
        h.disk.injectFaults(FaultInjection(errno: Self.ENOSPC, operations: [.write]))
        _ = try write(g, sector: 0, seed: 7)
        expectNothingCompletes(g)
        #expect(h.stats().stoppedOnError == "No space left on device")
        h.disk.injectFaults(nil)
        try h.plane.resume(disk: h.disk)
        #expect(try g.complete().status == 0)
        #expect(image.read(offset: 0, count: 4096) == pattern(4096, seed: 7))
    }

    /// Without inflight tracking a stop (GET_VRING_BASE, disconnect, dpctl
    /// stop) reports what the queue holds: nothing is left unanswered.
    @Test func stoppingAQueueFailsWhatItHolds() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, write: .stop)
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write]))
        _ = try write(h.guest, sector: 0, seed: 8)
        expectNothingCompletes(h.guest)
        let last = h.queues[0].stop() // drains: held requests are reported, never lost
        #expect(last == 1)
        #expect(try h.guest.complete().status == UInt8(GD_BLK_S_IOERR))
    }

    /// With the frontend's inflight region (QEMU negotiates it), a stop keeps
    /// what a SIGKILL keeps: the held request stays marked there, unanswered,
    /// and whoever starts the ring next with the region runs it again (QEMU
    /// stops the rings on every VM pause: `virsh suspend` while the operator
    /// frees space must not turn a full disk into guest I/O errors).
    @Test func stoppingAQueueWithAnInflightRegionKeepsWhatItHolds() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, write: .stop, inflight: true)
        let g = h.guest
        h.disk.injectFaults(FaultInjection(errno: Self.ENOSPC, operations: [.write]))
        let held = try write(g, sector: 0, seed: 9)
        expectNothingCompletes(g)
        let last = h.queues[0].stop()
        #expect(last == 1)
        expectNothingCompletes(g)
        #expect(h.inflightMarked(head: held))
        // The space is freed; the VM resumes.
        h.disk.injectFaults(nil)
        try h.restartQueue(lastAvailIndex: last)
        let done = try g.complete()
        #expect(done.head == held && done.status == 0)
        #expect(image.read(offset: 0, count: 4096) == pattern(4096, seed: 9))
        #expect(!h.inflightMarked(head: held))
        #expect((try? g.complete(timeout: 0.3)) == nil, "completed once")
    }

    /// A write held by the stop policy, then a memory-table swap (to a table
    /// with the same regions): the harness, image and held head.
    func heldWriteThroughAMemorySwap(seed: UInt8, inflight: Bool) throws -> (Harness, TestImage, UInt16) {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, write: .stop, inflight: inflight)
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write]))
        let held = try write(h.guest, sector: 16, seed: seed)
        expectNothingCompletes(h.guest)
        try h.queues[0].setMemory(try GuestMemory(regions: h.guest.memory.regions))
        return (h, image, held)
    }

    /// Review finding: a memory-table swap (QEMU sends one for every memory
    /// hot-plug) failed the requests the stop policy held, with IOERR. They
    /// are now walked again in the new table when the queue resumes (a resume
    /// before the cause is gone holds them again).
    @Test(arguments: [false, true])
    func memorySwapKeepsHeldRequestsForResume(inflight: Bool) throws {
        let (h, image, held) = try heldWriteThroughAMemorySwap(seed: 11, inflight: inflight)
        let g = h.guest
        expectNothingCompletes(g)
        #expect(h.stats().stoppedOnError != nil && h.stats().heldRequests == 1)
        try h.plane.resume(disk: h.disk)
        expectNothingCompletes(g)
        #expect(h.stats().stoppedOnError != nil && h.stats().heldRequests == 1)
        h.disk.injectFaults(nil)
        try h.plane.resume(disk: h.disk)
        let done = try g.complete()
        #expect(done.head == held && done.status == 0)
        #expect(image.read(offset: 16 * 512, count: 4096) == pattern(4096, seed: 11))
        #expect(h.stats().inFlight == 0 && h.stats().heldRequests == 0)
        #expect(!h.inflightMarked(head: held))
    }

    /// Two requests held through a memory swap (both failed in one batch). A
    /// resume while the first still fails holds it again; the second, and a
    /// request the guest added since, wait behind it (review finding: new
    /// requests were popped ahead of requeued ones), and both count as held.
    /// The next resume runs all three.
    @Test func requestsHeldThroughAMemorySwapKeepTheirPlace() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, write: .stop)
        let g = h.guest
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write]))
        let first = try write(g, sector: 16, seed: 31, kick: false)
        let second = try write(g, sector: 32, seed: 32)
        expectNothingCompletes(g)
        #expect(h.stats().heldRequests == 2)
        try h.queues[0].setMemory(try GuestMemory(regions: g.memory.regions))
        #expect(h.stats().heldRequests == 2)
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write], sectors: 16..<24))
        let later = try write(g, sector: 64, seed: 33)
        try h.plane.resume(disk: h.disk)
        expectNothingCompletes(g)
        #expect(h.stats().heldRequests == 2 && h.stats().stoppedOnError != nil)
        h.disk.injectFaults(nil)
        try h.plane.resume(disk: h.disk)
        gd_kick(g.driver, 0)
        let done = try (0..<3).map { _ in try g.complete() }
        #expect(Set(done.map(\.head)) == [first, second, later] && done.allSatisfy { $0.status == 0 })
        for (sector, seed) in [(16, 31), (32, 32), (64, 33)] as [(Int, UInt8)] {
            #expect(image.read(offset: sector * 512, count: 4096) == pattern(4096, seed: seed))
        }
        #expect(h.stats().heldRequests == 0 && h.stats().inFlight == 0)
    }

    /// A stop after such a swap, before resume: without an inflight region it
    /// reports them; with one they stay marked there for the next start (as
    /// requests held without a swap do), and run then.
    @Test(arguments: [false, true])
    func stopAfterAMemorySwapKeepsOrReportsTheRequestsItHeld(inflight: Bool) throws {
        let (h, image, held) = try heldWriteThroughAMemorySwap(seed: 12, inflight: inflight)
        #expect(h.inflightMarked(head: held) == inflight)
        let last = h.queues[0].stop()
        #expect(last == 1)
        guard inflight else {
            let done = try h.guest.complete()
            #expect(done.head == held && done.status == UInt8(GD_BLK_S_IOERR))
            return
        }
        expectNothingCompletes(h.guest)
        #expect(h.inflightMarked(head: held))
        h.disk.injectFaults(nil)
        try h.restartQueue(lastAvailIndex: last)
        let done = try h.guest.complete()
        #expect(done.head == held && done.status == 0)
        #expect(image.read(offset: 16 * 512, count: 4096) == pattern(4096, seed: 12))
        #expect(!h.inflightMarked(head: held))
    }

    /// A held misaligned write is retried through a fresh bounce buffer copied
    /// from the guest's memory (held requests give theirs back, so that
    /// requests waiting for bounce budget do not wait until resume). Fault
    /// injection fails before the backend, so only the retry bounces here.
    @Test func heldMisalignedWriteIsRetriedFromTheGuestsBuffer() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try harness(image, write: .stop)
        let g = h.guest
        h.disk.injectFaults(FaultInjection(errno: Self.EIO, operations: [.write]))
        let buf = g.alloc(8192) + 3 // O_DIRECT refuses this address
        g.write(buf, pattern(4096, seed: 13))
        let held = try g.submit(type: UInt32(GD_BLK_T_OUT), sector: 24, segments: [(buf, 4096)])
        expectNothingCompletes(g)
        h.disk.injectFaults(nil)
        try h.plane.resume(disk: h.disk)
        let done = try g.complete()
        #expect(done.head == held && done.status == 0)
        #expect(image.read(offset: 24 * 512, count: 4096) == pattern(4096, seed: 13))
        #expect(h.stats().bounces == 1)
    }

    @Test func fullFilesystemUnderTheEnospcPolicy() throws {
        // A 4 MiB tmpfs: the image (sparse, 3 MiB) plus a filler leave little room.
        let mountPoint = "/tmp/dp-full-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        defer { _ = umount2(mountPoint, 0); try? FileManager.default.removeItem(atPath: mountPoint) }
        let mounted = mount("tmpfs", mountPoint, "tmpfs", 0, "size=4m")
        try #require(mounted == 0, "mounting a tmpfs needs root (errno \(errno))")
        let image = try TestImage(size: 3 << 20, in: mountPoint)
        let filler = image.directory + "/filler"
        #expect(FileManager.default.createFile(atPath: filler, contents: Data(count: (3 << 20) + (512 << 10))))

        let h = try harness(image, write: .enospc, directIO: false)
        let g = h.guest
        // 2 MiB of writes: more than the free space.
        var heads: Set<UInt16> = []
        for i in 0..<32 { heads.insert(try write(g, sector: UInt64(i * 128), seed: UInt8(i), size: 65536)) }
        var completed = 0
        while let c = try? g.complete(timeout: 1) {
            #expect(c.status == 0, "the guest never sees an error")
            completed += 1
        }
        #expect(completed < 32)
        #expect(h.stats().stoppedOnError == "No space left on device")
        // Free space, resume: every write lands.
        try FileManager.default.removeItem(atPath: filler)
        try h.plane.resume(disk: h.disk)
        gd_kick(g.driver, 0)
        while completed < 32 {
            let c = try g.complete()
            #expect(c.status == 0)
            completed += 1
        }
        #expect(h.stats().stoppedOnError == nil)
        for i in 0..<32 {
            #expect(image.read(offset: i * 65536, count: 65536) == pattern(65536, seed: UInt8(i)), "write \(i)")
        }
    }

    /// Without O_DIRECT a failed fdatasync leaves the pages it could not
    /// write marked clean, and the next one succeeds without them (Linux
    /// reports a writeback error once). The failure is sticky: every later
    /// FLUSH fails until the disk is opened again, so the guest is never told
    /// data is durable that is not. A loop device over a file on a small
    /// tmpfs: writes land in the loop device's page cache; writeback runs
    /// out of space. Also under the stop policy: the held FLUSH never turns
    /// into a success on resume.
    @Test(arguments: [ErrorPolicy.report, .stop])
    func failedFlushOfThePageCacheStaysFailed(policy: ErrorPolicy) throws {
        let fs = try TmpfsMount(size: "4m")
        let backing = fs.path + "/backing.raw"
        #expect(FileManager.default.createFile(atPath: backing, contents: nil))
        #expect(truncate(backing, 32 << 20) == 0)
        let loop = try LoopDevice(backing: backing)
        var config = DiskConfiguration(path: loop.path, directIO: false)
        config.writeErrorPolicy = policy
        let h = try Harness(disk: config)
        let g = h.guest
        // 8 MiB of writes into the page cache: twice the room behind it.
        for i in 0..<128 {
            _ = try write(g, sector: UInt64(i * 128), seed: UInt8(truncatingIfNeeded: i), size: 65536)
            #expect(try g.complete().status == 0)
        }
        let flush = try g.submit(type: UInt32(GD_BLK_T_FLUSH))
        if policy == .report {
            let failed = try g.complete(timeout: 30)
            #expect(failed.head == flush && failed.status == UInt8(GD_BLK_S_IOERR))
        } else {
            expectNothingCompletes(g, within: 3)
            #expect(h.stats().heldRequests == 1)
        }
        #expect(h.disk.flushFailure != nil)
        // Room again: Linux would now report the next fdatasync a success.
        try fs.resize("64m")
        if policy == .report {
            #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == UInt8(GD_BLK_S_IOERR))
        } else {
            try h.plane.resume(disk: h.disk)
            expectNothingCompletes(g)
            #expect(h.stats().stoppedOnError != nil && h.stats().heldRequests == 1)
            _ = h.queues[0].stop() // reported, never a success
            let done = try g.complete()
            #expect(done.head == flush && done.status == UInt8(GD_BLK_S_IOERR))
        }
        #expect(h.disk.flushFailure != nil)
    }
}
