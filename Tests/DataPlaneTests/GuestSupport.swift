import CDataPlane
import CGuestDriver
import CVhostFrontend
import Foundation
import Testing

@testable import DataPlane

/// The guest's side of the rings (the C driver) plus the DataPlane under test.
final class TestGuest: @unchecked Sendable {
    let driver: OpaquePointer
    let memory: GuestMemory
    let queueSize: Int

    init(queues: Int = 1, queueSize: Int = 128, eventIndex: Bool = true, packed: Bool = false,
         memorySize: UInt64 = 64 << 20) throws {
        var config = gd_config(mem_size: memorySize, num_queues: UInt32(queues), queue_size: UInt32(queueSize),
                               event_idx: eventIndex, packed: packed)
        var driver: OpaquePointer?
        let ret = gd_create(&config, &driver)
        guard ret == 0, let driver else { throw TestFailure("gd_create: \(ret)") }
        self.driver = driver
        self.queueSize = queueSize
        var regions = [dp_mem_region](repeating: dp_mem_region(), count: 2)
        let count = gd_mem_regions(driver, &regions)
        memory = try GuestMemory(regions: regions.prefix(Int(count)).map {
            MemoryRegion(guestPhysicalAddress: $0.guest_phys_addr, size: $0.size, userAddress: $0.user_addr,
                         hostAddress: UInt(bitPattern: $0.host_addr))
        })
    }

    deinit { gd_destroy(driver) }

    var boundary: UInt64 { gd_region_boundary(driver) }
    var memorySize: UInt64 { gd_mem_size(driver) }

    func queueConfiguration(_ q: Int) -> VirtqueueConfiguration {
        var c = dp_queue_config()
        gd_queue_config(driver, UInt32(q), &c)
        var config = VirtqueueConfiguration(size: Int(c.size), descriptorTable: c.desc_addr, availRing: c.avail_addr,
                                            usedRing: c.used_addr, addressesAreUser: c.addrs_are_user,
                                            eventIndex: c.event_idx, indirectDescriptors: c.indirect,
                                            lastAvailIndex: c.last_avail_idx, kickFD: c.kick_fd, callFD: c.call_fd,
                                            errorFD: c.err_fd)
        config.packed = c.packed
        config.packedBase = c.packed_base
        return config
    }

    func alloc(_ size: UInt64, align: UInt64 = 4096) -> UInt64 {
        let gpa = gd_alloc(driver, size, align)
        precondition(gpa != 0, "guest memory exhausted")
        return gpa
    }

    func allocAt(_ gpa: UInt64, _ size: UInt64) -> UInt64 {
        let got = gd_alloc_at(driver, gpa, size)
        precondition(got == gpa, "gd_alloc_at failed")
        return got
    }

    func write(_ gpa: UInt64, _ bytes: [UInt8]) {
        guard let p = gd_ptr(driver, gpa) else { preconditionFailure("bad gpa") }
        bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    }

    func read(_ gpa: UInt64, _ count: Int) -> [UInt8] {
        guard let p = gd_ptr(driver, gpa) else { preconditionFailure("bad gpa") }
        return Array(UnsafeRawBufferPointer(start: p, count: count))
    }

    /// Submits one request and kicks. Data segments are (gpa, length).
    @discardableResult
    func submit(_ q: Int = 0, type: UInt32, sector: UInt64 = 0, segments: [(UInt64, UInt32)] = [],
                indirect: Bool = false, kick: Bool = true) throws -> UInt16 {
        let segs = segments.map { gd_seg(gpa: $0.0, len: $0.1) }
        var head: UInt16 = 0
        let ret = segs.withUnsafeBufferPointer { buffer in
            var req = gd_req(type: type, sector: sector, segs: buffer.baseAddress, nsegs: UInt32(buffer.count),
                             indirect: indirect)
            return gd_submit(driver, UInt32(q), &req, &head)
        }
        guard ret == 0 else { throw TestFailure("gd_submit: \(ret)") }
        if kick { gd_kick_if_needed(driver, UInt32(q)) }
        return head
    }

    struct Completion: Equatable { var head: UInt16; var length: UInt32; var status: UInt8 }

    /// Waits for the next completed request on a queue.
    func complete(_ q: Int = 0, timeout: Double = 5) throws -> Completion {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            var head: UInt16 = 0, len: UInt32 = 0, status: UInt8 = 0
            let ret = gd_complete(driver, UInt32(q), &head, &len, &status)
            if ret == 1 { return Completion(head: head, length: len, status: status) }
            guard ret == 0 else { throw TestFailure("gd_complete: \(ret)") }
            if Date() > deadline { throw TestFailure("no completion on queue \(q) within \(timeout) s") }
            _ = gd_wait_call(driver, UInt32(q), 20)
        }
    }

    /// Waits for a raw used element (for hand-built chains).
    func usedElement(_ q: Int = 0, timeout: Double = 5) throws -> (id: UInt32, length: UInt32) {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            var id: UInt32 = 0, len: UInt32 = 0
            if gd_used_pop(driver, UInt32(q), &id, &len) == 1 { return (id, len) }
            if Date() > deadline { throw TestFailure("no used element on queue \(q) within \(timeout) s") }
            _ = gd_wait_call(driver, UInt32(q), 20)
        }
    }

    /// Runs one request to completion and returns its completion.
    func run(_ q: Int = 0, type: UInt32, sector: UInt64 = 0, segments: [(UInt64, UInt32)] = [],
             indirect: Bool = false) throws -> Completion {
        let head = try submit(q, type: type, sector: sector, segments: segments, indirect: indirect)
        let done = try complete(q)
        #expect(done.head == head)
        return done
    }

    func status(_ q: Int, head: UInt16) -> UInt8 {
        read(gd_slot_status_gpa(driver, UInt32(q), head), 1)[0]
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A raw image file in a fresh temporary directory, removed on deinit.
final class TestImage: @unchecked Sendable {
    let path: String
    let directory: String

    init(size: Int, in base: String = NSTemporaryDirectory()) throws {
        directory = base + "/dataplane-test-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        path = directory + "/disk.raw"
        guard FileManager.default.createFile(atPath: path, contents: nil) else { throw TestFailure("create \(path)") }
        let fd = open(path, O_RDWR)
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw TestFailure("ftruncate") }
    }

    deinit { try? FileManager.default.removeItem(atPath: directory) }

    func read(offset: Int, count: Int) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: count)
        let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        return Array(buffer.prefix(max(n, 0)))
    }

    func write(offset: Int, _ bytes: [UInt8]) {
        let fd = open(path, O_RDWR)
        defer { close(fd) }
        _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, bytes.count, off_t(offset)) }
    }

    var size: Int {
        (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? -1
    }
}

/// A data plane with `threads` IOThreads, one disk, and `queues` started queues
/// (with `inflight`, each tracked in its own zeroed vhost-user inflight region).
final class Harness: @unchecked Sendable {
    let plane: DataPlane
    let disk: Disk
    let guest: TestGuest
    var queues: [Virtqueue] = []
    private(set) var inflightRegions: [UnsafeMutableRawPointer] = []
    let packed: Bool

    init(disk diskConfig: DiskConfiguration, threads: Int = 1, queues: Int = 1, queueSize: Int = 128,
         eventIndex: Bool = true, pollMicroseconds: UInt32 = 0, inflight: Bool = false, packed: Bool = false) throws {
        let cpus = try CPUSet(parsing: "0-\(ProcessInfo.processInfo.activeProcessorCount - 1)")
        plane = try DataPlane(iothreads: (0..<threads).map {
            IOThreadConfiguration(name: "test-io\($0)", cpuset: cpus, pollMaxMicroseconds: pollMicroseconds)
        })
        var config = diskConfig
        config.numQueues = queues
        config.queueSize = max(config.queueSize, queueSize) // the largest ring the disk takes
        disk = try plane.addDisk(config)
        self.packed = packed
        guest = try TestGuest(queues: queues, queueSize: queueSize, eventIndex: eventIndex, packed: packed)
        for q in 0..<queues {
            var queueConfig = guest.queueConfiguration(q)
            if inflight {
                let size = Int(dp_inflight_queue_size(UInt32(queueSize), packed))
                let region = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
                region.initializeMemory(as: UInt8.self, repeating: 0, count: size)
                inflightRegions.append(region)
                queueConfig.inflight = UInt(bitPattern: region)
            }
            self.queues.append(try plane.startQueue(disk: disk, index: q, memory: guest.memory,
                                                    configuration: queueConfig))
        }
    }

    deinit {
        plane.stop()
        inflightRegions.forEach { $0.deallocate() }
    }

    /// Whether the inflight region marks a head as in flight (split:
    /// DescStateSplit's first byte, after a 16-byte header; packed: a marked
    /// DescStatePacked head entry whose last entry carries the buffer id).
    func inflightMarked(_ q: Int = 0, head: UInt16) -> Bool {
        guard q < inflightRegions.count else { return false }
        let r = inflightRegions[q]
        guard packed else { return r.load(fromByteOffset: 16 + Int(head) * 16, as: UInt8.self) != 0 }
        return (0..<guest.queueSize).contains { e in
            let entry = 32 + e * 32
            guard r.load(fromByteOffset: entry, as: UInt8.self) == 1 else { return false }
            let last = Int(r.load(fromByteOffset: entry + 4, as: UInt16.self))
            return last < guest.queueSize && r.load(fromByteOffset: 32 + last * 32 + 16, as: UInt16.self) == head
        }
    }

    func stats(_ q: Int = 0) -> QueueStatistics { queues[q].statistics() }

    /// Starts a stopped queue again on the same rings and inflight region,
    /// as a frontend does after GET_VRING_BASE (a VM pause, a reconnect).
    func restartQueue(_ q: Int = 0, lastAvailIndex: UInt16 = 0, packedBase: UInt32? = nil) throws {
        var config = guest.queueConfiguration(q)
        config.lastAvailIndex = lastAvailIndex
        if let packedBase { config.packedBase = packedBase }
        if q < inflightRegions.count { config.inflight = UInt(bitPattern: inflightRegions[q]) }
        queues[q] = try plane.startQueue(disk: disk, index: q, memory: guest.memory, configuration: config)
    }
}

func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
    [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
        var x = UInt32(seed) &* 2654435761 | 1
        for i in 0..<count {
            x ^= x << 13; x ^= x >> 17; x ^= x << 5
            buffer[i] = UInt8(truncatingIfNeeded: x)
        }
        initialized = count
    }
}

extension TestGuest {
    /// Connects a vhost-user frontend to `socket` (retrying while the
    /// backend starts) and sets this guest's memory and queues up on it;
    /// `info`, when given, gets what the handshake learned (features, config space).
    func connectFrontend(_ socket: String, options: vuf_options = vuf_options(),
                         info: UnsafeMutablePointer<vuf_info>? = nil) throws -> OpaquePointer {
        let deadline = Date().addingTimeInterval(10)
        var conn: OpaquePointer?
        var rc = vuf_connect(socket, &conn)
        while rc != 0 && Date() < deadline {
            usleep(20_000)
            rc = vuf_connect(socket, &conn)
        }
        guard rc == 0, let conn else { throw TestFailure("connect \(socket): \(rc)") }
        var o = options
        let setup = vuf_setup(conn, driver, &o, info)
        guard setup == 0 else {
            let message = String(cString: vuf_last_error(conn))
            vuf_close(conn)
            throw TestFailure("vuf_setup: \(setup) \(message)")
        }
        return conn
    }
}
