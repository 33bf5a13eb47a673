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
