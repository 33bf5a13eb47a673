import CDataPlaneSys
import Foundation
import Testing
import Logging

@testable import DataPlane

/// A bare vhost-user frontend that sends whatever it is told.
final class RawFrontend {
    private(set) var fd: Int32

    init(path: String) throws {
        let deadline = Date().addingTimeInterval(5)
        var fd = dps_unix_connect(path)
        while fd < 0 && Date() < deadline {
            usleep(10_000)
            fd = dps_unix_connect(path)
        }
        guard fd >= 0 else { throw TestFailure("connect \(path): \(fd)") }
        self.fd = fd
    }

    /// Closes the connection once (a second close could hit a reused number).
    func disconnect() {
        if fd >= 0 { close(fd) }
        fd = -1
    }

    deinit { disconnect() }

    func sendRaw(_ bytes: [UInt8], fds: [Int32] = []) {
        let n = bytes.withUnsafeBytes { raw in
            fds.withUnsafeBufferPointer { dps_send_fds(fd, raw.baseAddress!, raw.count, $0.baseAddress, Int32(fds.count)) }
        }
        #expect(n == bytes.count || n == -EPIPE || n == -ECONNRESET)
    }

    func send(_ request: UInt32, flags: UInt32 = 1, payload: [UInt8] = [], size: UInt32? = nil, fds: [Int32] = []) {
        var bytes: [UInt8] = []
        bytes.appendLE(request)
        bytes.appendLE(flags)
        bytes.appendLE(size ?? UInt32(payload.count))
        sendRaw(bytes + payload, fds: fds)
    }

    /// The next message, or nil when the server closed the connection.
    func receive(timeout: Int32 = 5000) -> (request: UInt32, flags: UInt32, payload: [UInt8], fds: [Int32])? {
        func readExactly(_ count: Int, fds: inout [Int32]) -> [UInt8]? {
            var out = [UInt8](repeating: 0, count: count)
            var filled = 0
            while filled < count {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, timeout) > 0 else { return nil }
                var got = [Int32](repeating: -1, count: 8)
                var n: Int32 = 0
                var truncated = false
                let r = out.withUnsafeMutableBytes { dps_recv_fds(fd, $0.baseAddress! + filled, count - filled, &got, 8, &n, &truncated) }
                fds += got.prefix(Int(n))
                guard r > 0 else { return nil }
                filled += r
            }
            return out
        }
        var fds: [Int32] = []
        guard let header = readExactly(12, fds: &fds) else { return nil }
        let word = { (o: Int) in (0..<4).reduce(UInt32(0)) { $0 | UInt32(header[o + $1]) << (8 * UInt32($1)) } }
        guard let payload = readExactly(Int(word(8)), fds: &fds) else { return nil }
        return (word(0), word(4), payload, fds)
    }

    func u64Reply(_ request: UInt32) -> UInt64? {
        send(request)
        guard let r = receive(), r.payload.count == 8 else { return nil }
        return PayloadReaderForTests.u64(r.payload, 0)
    }

    /// True when the server closed the connection within the timeout.
    func closedByServer(timeout: Int32 = 5000) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, timeout) > 0 else { return false }
        var byte: UInt8 = 0
        let r = recv(fd, &byte, 1, Int32(MSG_DONTWAIT))
        // Unread data on the server's side turns its close into a reset.
        return r == 0 || (r < 0 && errno == ECONNRESET)
    }
}

enum PayloadReaderForTests {
    static func u64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(b[o + $1]) << (8 * UInt64($1)) } }
    static func u32(_ b: [UInt8], _ o: Int) -> UInt32 { UInt32(truncatingIfNeeded: u64(b + [0, 0, 0, 0], o) & 0xffff_ffff) }
}

/// A server with one null disk on a fresh socket.
final class ServerHarness {
    let plane: DataPlane
    let server: VhostUserServer
    let disk: Disk
    let socket: String
    let directory: String
    let logLines = LogLines()

    init(numQueues: Int = 2, readOnly: Bool = false, queueSize: Int = 1024) throws {
        directory = NSTemporaryDirectory() + "/dp-vu-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socket = directory + "/vhost.sock"
        plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "vu-io", cpuset: CPUSet(parsing: "0-1"))])
        disk = try plane.addDisk(DiskConfiguration(path: "", backend: .null, readOnly: readOnly, numQueues: numQueues,
                                                   queueSize: queueSize, nullSizeBytes: 64 << 20))
        let lines = logLines
        server = try VhostUserServer(plane: plane, logger: Logger(label: "test") { _ in CollectingLogHandler(lines: lines) })
        try server.addExport(disk: disk, socketPath: socket)
        try server.start()
    }

    deinit {
        server.stop()
        plane.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    var log: String { logLines.text }

    /// The server still serves a new frontend: GET_FEATURES answers.
    func stillServes() throws -> Bool {
        let f = try RawFrontend(path: socket)
        return f.u64Reply(1).map { $0 & (1 << 32) != 0 } ?? false
    }
}

final class LogLines: Sendable {
    private let lines = Mutex<[String]>([])
    /// What a test's log handler was given, by level (and metadata).
    private let events = Mutex<[(Logger.Level, String, Logger.Metadata)]>([])
    func append(_ level: Logger.Level, _ message: String, _ metadata: Logger.Metadata) {
        events.withLock { $0.append((level, message, metadata)) }
        if level >= .info { append(message) }
    }
    var all: [(Logger.Level, String, Logger.Metadata)] { events.withLock { $0 } }
    func append(_ line: String) { lines.withLock { $0.append(line) } }
    var text: String { lines.withLock { $0.joined(separator: "\n") } }
}

/// memfds named so a test can see whether the server still holds them.
func namedMemfd(_ name: String, size: UInt64) -> Int32 {
    dps_memfd(name, size)
}

/// How many of this process's fds and mappings name the memfd.
func references(to name: String) -> (fds: Int, maps: Int) {
    let fdDir = "/proc/self/fd"
    let fds = ((try? FileManager.default.contentsOfDirectory(atPath: fdDir)) ?? []).filter {
        ((try? FileManager.default.destinationOfSymbolicLink(atPath: fdDir + "/" + $0)) ?? "").contains(name)
    }.count
    let maps = procSelfMaps().split(separator: "\n").filter { $0.contains(name) }.count
    return (fds, maps)
}

/// All of /proc/self/maps. Read to the end by hand: String(contentsOfFile:)
/// was seen to return only its first 4 KiB (procfs reports size 0).
func procSelfMaps() -> String {
    let fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return "" }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { break }
        bytes += chunk.prefix(n)
    }
    return String(decoding: bytes, as: UTF8.self)
}

@Suite struct VhostUserProtocolTests {
    // Request numbers.
    static let getFeatures: UInt32 = 1, setFeatures: UInt32 = 2, setOwner: UInt32 = 3, setMemTable: UInt32 = 5
    static let setVringNum: UInt32 = 8, setVringAddr: UInt32 = 9, setVringBase: UInt32 = 10, getVringBase: UInt32 = 11
    static let setVringKick: UInt32 = 12, setVringCall: UInt32 = 13, setVringErr: UInt32 = 14, getProtocolFeatures: UInt32 = 15
    static let setProtocolFeatures: UInt32 = 16, getQueueNum: UInt32 = 17, setVringEnable: UInt32 = 18
    static let getConfig: UInt32 = 24, getInflightFD: UInt32 = 31, getMaxMemSlots: UInt32 = 36, addMemReg: UInt32 = 37
    static let needReply: UInt32 = 1 | 8

    func le64(_ v: UInt64) -> [UInt8] { var b: [UInt8] = []; b.appendLE(v); return b }
    func state(_ index: UInt32, _ num: UInt32) -> [UInt8] { var b: [UInt8] = []; b.appendLE(index); b.appendLE(num); return b }

    func region(gpa: UInt64, size: UInt64, uaddr: UInt64, offset: UInt64) -> [UInt8] {
        var b: [UInt8] = []
        b.appendLE(gpa); b.appendLE(size); b.appendLE(uaddr); b.appendLE(offset)
        return b
    }

    func memTable(_ regions: [[UInt8]]) -> [UInt8] {
        var b: [UInt8] = []
        b.appendLE(UInt32(regions.count)); b.appendLE(UInt32(0))
        return b + regions.flatMap { $0 }
    }

    /// Negotiates features (optionally REPLY_ACK) as QEMU does.
    func negotiate(_ f: RawFrontend, replyAck: Bool = true, moreProtocolFeatures: UInt64 = 0, packed: Bool = false) throws {
        let offered = try #require(f.u64Reply(Self.getFeatures))
        #expect(offered & (1 << 34) != 0) // VIRTIO_F_RING_PACKED offered
        f.send(Self.setFeatures, payload: le64(offered & ((1 << 32) | (1 << 30) | (1 << 28) | (1 << 29) | (packed ? 1 << 34 : 0))))
        let protocolFeatures = try #require(f.u64Reply(Self.getProtocolFeatures))
        #expect(protocolFeatures & (1 << 3) != 0) // REPLY_ACK offered
        f.send(Self.setProtocolFeatures, payload: le64((replyAck ? (1 << 3) | (1 << 9) : 0) | moreProtocolFeatures))
        f.send(Self.setOwner)
    }

    /// Maps a 1 MiB memfd as guest memory [0, 1 MiB) at user address 0x10000000.
    func sendMemory(_ f: RawFrontend, name: String = "dp-test-mem") -> Int32 {
        let memfd = namedMemfd(name, size: 1 << 20)
        f.send(Self.setMemTable, flags: Self.needReply, payload: memTable([region(gpa: 0, size: 1 << 20, uaddr: 0x1000_0000, offset: 0)]), fds: [memfd])
        return memfd
    }

    func expectClosedAndServing(_ f: RawFrontend, _ h: ServerHarness, _ reason: String) throws {
        #expect(f.closedByServer(), "connection should close: \(reason)")
        #expect(try h.stillServes())
        #expect(h.log.contains(reason), "log should say \(reason.debugDescription): \(h.log)")
    }

    @Test func handshakeAnswersAsQEMUExpects() throws {
        let h = try ServerHarness(numQueues: 2)
        let f = try RawFrontend(path: h.socket)
        let features = try #require(f.u64Reply(Self.getFeatures))
        #expect(features & (1 << 32) != 0 && features & (1 << 30) != 0 && features & (1 << 29) != 0)
        #expect(features & (1 << 13) != 0 && features & (1 << 14) != 0 && features & (1 << 5) == 0)
        try negotiate(f)
        #expect(f.u64Reply(Self.getQueueNum) == 2)
        #expect(f.u64Reply(Self.getMaxMemSlots) == 32)
        // GET_CONFIG: capacity, seg_max, blk_size, num_queues; every byte defined.
        var request: [UInt8] = []
        request.appendLE(UInt32(0)); request.appendLE(UInt32(60)); request.appendLE(UInt32(0))
        f.send(Self.getConfig, payload: request + [UInt8](repeating: 0xAB, count: 60))
        let reply = try #require(f.receive())
        #expect(reply.payload.count == 72)
        let config = Array(reply.payload[12...])
        #expect(PayloadReaderForTests.u64(config, 0) == (64 << 20) / 512)
        #expect(config[20] == 0 && config[21] == 2) // blk_size 512
        #expect(config[34] == 2 && config[35] == 0) // num_queues
        #expect(!config.contains(0xAB))
        // REPLY_ACK: 0 for a message that worked.
        f.send(Self.setVringNum, flags: Self.needReply, payload: state(0, 128))
        let ack = try #require(f.receive())
        #expect(ack.payload == le64(0))
    }

    /// The server logs to the Logger it is given: every message and reply
    /// at trace level under QEMU's names, with the disk's, socket's and
    /// frontend's metadata; the connection at info.
    @Test func theLoggerGetsAMessageTraceWithMetadata() throws {
        let h = try ServerHarness(numQueues: 2)
        let f = try RawFrontend(path: h.socket)
        #expect(f.u64Reply(Self.getFeatures) != nil)
        #expect(f.u64Reply(Self.getQueueNum) == 2)
        let events = h.logLines.all
        let connected = try #require(events.first { $0.1.hasSuffix("frontend connected") }, "\(events)")
        #expect(connected.0 == .info && connected.2["frontend"] == "1" && connected.2["frontend-pid"] == "\(getpid())")
        let trace = events.filter { $0.0 == .trace }
        #expect(trace.map(\.1) == ["vhost-user VHOST_USER_GET_FEATURES", "vhost-user VHOST_USER_GET_FEATURES reply",
                                   "vhost-user VHOST_USER_GET_QUEUE_NUM", "vhost-user VHOST_USER_GET_QUEUE_NUM reply"], "\(trace)")
        for (_, _, metadata) in trace {
            #expect(metadata["disk"] == "null" && metadata["socket"] == "\(h.socket)" && metadata["frontend"] == "1", "\(metadata)")
        }
        #expect(trace[1].2["size"] == "8" && trace[3].2["payload"] == "0200000000000000", "\(trace)")
        #expect(!h.log.contains("VHOST_USER_"), "trace stays out of the info lines")
    }

    /// What the config space announces is what the data plane takes:
    /// seg_max segments (seg_max + 2 descriptors per chain, 128 by default,
    /// fewer for a smaller --queue-size so that a guest without indirect
    /// descriptors fits a request in its ring) of size_max bytes.
    @Test(arguments: [(1024, 128), (64, 62)])
    func configSpaceAnnouncesWhatTheDataPlaneTakes(queueSize: Int, segMax: UInt32) throws {
        let h = try ServerHarness(queueSize: queueSize)
        let f = try RawFrontend(path: h.socket)
        let features = try #require(f.u64Reply(Self.getFeatures))
        #expect(features & (1 << 1) != 0 && features & (1 << 2) != 0) // SIZE_MAX, SEG_MAX
        try negotiate(f)
        var request: [UInt8] = []
        request.appendLE(UInt32(0)); request.appendLE(UInt32(16)); request.appendLE(UInt32(0))
        f.send(Self.getConfig, payload: request + [UInt8](repeating: 0, count: 16))
        let config = Array(try #require(f.receive()).payload[12...])
        #expect(PayloadReaderForTests.u32(config, 8) == UInt32(DP_SIZE_MAX))
        #expect(PayloadReaderForTests.u32(config, 12) == segMax)
        #expect(h.disk.configuration.segmentsPerRequest == Int(segMax))
        // A ring larger than the queue size those were worked out for is refused.
        f.send(Self.setVringNum, flags: Self.needReply, payload: state(0, UInt32(queueSize * 2)))
        #expect(try #require(f.receive()).payload != le64(0))
        try expectClosedAndServing(f, h, "larger than the disk's queue size")
    }

    /// A GET_CONFIG beyond the config space gets an empty reply (as
    /// libvhost-user answers a failed one); the connection stays.
    @Test(arguments: [(UInt32(250), UInt32(10)), (UInt32(0), UInt32(257)), (UInt32.max, UInt32(4))])
    func getConfigBeyondTheConfigSpaceGetsAnEmptyReply(offset: UInt32, size: UInt32) throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        var request: [UInt8] = []
        request.appendLE(offset); request.appendLE(size); request.appendLE(UInt32(0))
        f.send(Self.getConfig, payload: request + [UInt8](repeating: 0, count: Int(min(size, 300))))
        let reply = try #require(f.receive())
        #expect(reply.payload.isEmpty)
        #expect(f.u64Reply(Self.getQueueNum) == 2, "the connection still answers")
    }

    /// A frontend that hangs up with replies owed gets none: the server's
    /// sends are MSG_NOSIGNAL, so the process sees EPIPE, not SIGPIPE (which
    /// would kill this test process as it would kill dpctl).
    @Test func frontendThatHangsUpBeforeItsRepliesCostsNothing() throws {
        let h = try ServerHarness()
        for _ in 0..<3 {
            let f = try RawFrontend(path: h.socket)
            var burst: [UInt8] = []
            for _ in 0..<50 { burst.appendLE(Self.getFeatures); burst.appendLE(UInt32(1)); burst.appendLE(UInt32(0)) }
            f.sendRaw(burst)
            f.disconnect()
        }
        let deadline = Date().addingTimeInterval(5)
        while !h.log.contains("reply failed") && Date() < deadline { usleep(10_000) }
        #expect(h.log.contains("reply failed"), "no reply went to a closed socket, so this proves nothing: \(h.log)")
        #expect(try h.stillServes())
    }

    @Test func replyAckIsNonZeroForAFailedMessage() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        f.send(Self.setVringNum, flags: Self.needReply, payload: state(0, 100)) // not a power of two
        let ack = try #require(f.receive())
        #expect(ack.payload != le64(0))
        try expectClosedAndServing(f, h, "not a power of two")
    }

    @Test func truncatedHeader() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        f.sendRaw([1, 0, 0, 0, 1, 0])
        shutdown(f.fd, Int32(SHUT_WR))
        try expectClosedAndServing(f, h, "closed in the middle of a message")
    }

    @Test func sizeLargerThanSent() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        f.send(Self.setFeatures, payload: le64(0), size: 100)
        shutdown(f.fd, Int32(SHUT_WR))
        try expectClosedAndServing(f, h, "closed in the middle of a message")
    }

    @Test func sizeBeyondTheLimit() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        f.send(Self.setFeatures, payload: le64(0), size: 1 << 30)
        try expectClosedAndServing(f, h, "exceeds 4096")
    }

    @Test func wrongProtocolVersion() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        f.send(Self.getFeatures, flags: 2)
        try expectClosedAndServing(f, h, "protocol version 2")
    }

    @Test func unknownRequest() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        f.send(99)
        try expectClosedAndServing(f, h, "unknown request 99")
    }

    @Test func payloadOfTheWrongSize() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        f.send(Self.setFeatures, payload: [1, 2, 3])
        try expectClosedAndServing(f, h, "payload of 3 bytes where 8 are expected")
    }

    @Test func missingFileDescriptor() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        f.send(Self.setVringKick, payload: le64(0)) // no fd, no NOFD flag
        try expectClosedAndServing(f, h, "carries 0 file descriptors")
    }

    @Test func extraFileDescriptorsAreClosed() throws {
        let h = try ServerHarness()
        let name = "dp-extra-" + UUID().uuidString.prefix(8)
        let f = try RawFrontend(path: h.socket)
        let a = namedMemfd(name, size: 4096), b = namedMemfd(name, size: 4096)
        f.send(Self.getFeatures, fds: [a, b])
        close(a); close(b)
        try expectClosedAndServing(f, h, "carries 2 file descriptors")
        #expect(references(to: name) == (0, 0))
    }

    @Test func queueIndexOutOfRange() throws {
        let h = try ServerHarness(numQueues: 2)
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        f.send(Self.setVringNum, payload: state(2, 128))
        try expectClosedAndServing(f, h, "queue index 2 out of range")
    }

    @Test(arguments: [0, 100, 65536])
    func badRingSize(size: UInt32) throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        f.send(Self.setVringNum, payload: state(0, size))
        try expectClosedAndServing(f, h, "ring size \(size) is not a power of two")
    }

    @Test func overlappingMemoryRegions() throws {
        let h = try ServerHarness()
        let name = "dp-overlap-" + UUID().uuidString.prefix(8)
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        let a = namedMemfd(name, size: 1 << 20), b = namedMemfd(name, size: 1 << 20)
        f.send(Self.setMemTable, payload: memTable([region(gpa: 0, size: 1 << 20, uaddr: 0x1000_0000, offset: 0),
                                                    region(gpa: 1 << 19, size: 1 << 20, uaddr: 0x2000_0000, offset: 0)]), fds: [a, b])
        close(a); close(b)
        try expectClosedAndServing(f, h, "overlapping")
        #expect(references(to: name) == (0, 0))
    }

    @Test func regionBeyondItsFile() throws {
        let h = try ServerHarness()
        let name = "dp-beyond-" + UUID().uuidString.prefix(8)
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        let a = namedMemfd(name, size: 1 << 20)
        f.send(Self.setMemTable, payload: memTable([region(gpa: 0, size: 1 << 20, uaddr: 0x1000_0000, offset: 4096)]), fds: [a])
        close(a)
        try expectClosedAndServing(f, h, "runs past its file")
        #expect(references(to: name) == (0, 0))
    }

    /// Review finding: a region was mapped from its file's start, so a 4 KiB
    /// region 8 TiB into a sparse memfd cost 8 TiB of address space (a few
    /// such exhausted the process). Only the region's pages are mapped now.
    @Test func regionDeepInASparseFileMapsOnlyItsPages() throws {
        let h = try ServerHarness()
        let name = "dp-deep-" + UUID().uuidString.prefix(8)
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        let offset: UInt64 = 8 << 40
        let a = namedMemfd(name, size: offset + (1 << 20))
        try #require(a >= 0)
        f.send(Self.setMemTable, flags: Self.needReply,
               payload: memTable([region(gpa: 0, size: 1 << 20, uaddr: 0x1000_0000, offset: offset)]), fds: [a])
        close(a)
        #expect(try #require(f.receive()).payload == le64(0))
        let spans = procSelfMaps().split(separator: "\n").filter { $0.contains(name) }.map { line -> UInt64 in
                let bounds = line.split(separator: " ")[0].split(separator: "-").compactMap { UInt64($0, radix: 16) }
                return bounds.count == 2 ? bounds[1] - bounds[0] : 0
            }
        // The region, rounded to whole mapping units (pages; 2 MiB where
        // the kernel backs memfds with huge pages).
        #expect(spans.count == 1 && spans.allSatisfy { $0 >= 1 << 20 && $0 <= 4 << 20 }, "\(spans)")
        f.disconnect()
    }

    /// And all regions together may not exceed 16 TiB.
    @Test func guestMemoryBeyondTheCapIsRefused() throws {
        let h = try ServerHarness()
        let name = "dp-huge-" + UUID().uuidString.prefix(8)
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        let size: UInt64 = 9 << 40
        let a = namedMemfd(name, size: size), b = namedMemfd(name, size: size)
        try #require(a >= 0 && b >= 0)
        f.send(Self.setMemTable, payload: memTable([region(gpa: 0, size: size, uaddr: 0x1000_0000, offset: 0),
                                                    region(gpa: 16 << 40, size: size, uaddr: 32 << 40, offset: 0)]), fds: [a, b])
        close(a); close(b)
        try expectClosedAndServing(f, h, "TiB in all")
        #expect(references(to: name) == (0, 0))
    }

    @Test func regionOffsetOverflows() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        let a = namedMemfd("dp-ovf", size: 4096)
        f.send(Self.setMemTable, payload: memTable([region(gpa: 0, size: 4096, uaddr: 0, offset: UInt64.max - 100)]), fds: [a])
        close(a)
        try expectClosedAndServing(f, h, "overflows")
    }

    /// Sets up ring 0 with the given addresses (user addresses in the 1 MiB table) and enables it.
    func startRing(_ f: RawFrontend, desc: UInt64, avail: UInt64, used: UInt64, num: UInt32 = 8, base: UInt32 = 0) {
        f.send(Self.setVringNum, payload: state(0, num))
        f.send(Self.setVringBase, payload: state(0, base))
        var addr: [UInt8] = []
        addr.appendLE(UInt32(0)); addr.appendLE(UInt32(0))
        addr.appendLE(desc); addr.appendLE(used); addr.appendLE(avail); addr.appendLE(UInt64(0))
        f.send(Self.setVringAddr, payload: addr)
        let kick = dps_eventfd(0, false), call = dps_eventfd(0, false)
        f.send(Self.setVringKick, payload: le64(0), fds: [kick])
        f.send(Self.setVringCall, payload: le64(0), fds: [call])
        close(kick); close(call)
        f.send(Self.setVringEnable, flags: Self.needReply, payload: state(0, 1))
    }

    @Test func ringAddressOutsideMemory() throws {
        let h = try ServerHarness()
        let name = "dp-ring-" + UUID().uuidString.prefix(8)
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        close(sendMemory(f, name: name))
        #expect(f.receive()?.payload == le64(0))
        startRing(f, desc: 0x5000_0000, avail: 0x1000_1000, used: 0x1000_2000)
        #expect(f.receive().map { $0.payload != le64(0) } ?? true)
        try expectClosedAndServing(f, h, "outside guest memory")
        #expect(references(to: name) == (0, 0)) // unmapped on reset
    }

    @Test func usedRingRunningPastItsRegion() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        close(sendMemory(f))
        #expect(f.receive()?.payload == le64(0))
        startRing(f, desc: 0x1000_0000, avail: 0x1000_1000, used: 0x1000_0000 + (1 << 20) - 16)
        #expect(f.receive().map { $0.payload != le64(0) } ?? true)
        try expectClosedAndServing(f, h, "outside guest memory")
    }

    @Test func ringStartsAndStopsAndReportsItsIndex() throws {
        let h = try ServerHarness()
        let name = "dp-run-" + UUID().uuidString.prefix(8)
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        close(sendMemory(f, name: name))
        #expect(f.receive()?.payload == le64(0))
        startRing(f, desc: 0x1000_0000, avail: 0x1000_1000, used: 0x1000_2000)
        #expect(f.receive()?.payload == le64(0))
        #expect(h.plane.queues(of: h.disk).count == 1)
        f.send(Self.getVringBase, payload: state(0, 0))
        let base = try #require(f.receive())
        #expect(base.payload == state(0, 0))
        #expect(h.plane.queues(of: h.disk).isEmpty)
        // Disconnect: the device resets and unmaps; the next frontend is served.
        f.disconnect()
        let deadline = Date().addingTimeInterval(5)
        while references(to: name).maps > 0 && Date() < deadline { usleep(10_000) }
        #expect(references(to: name) == (0, 0))
        #expect(try h.stillServes())
    }

    /// Packed rings (VIRTIO_F_RING_PACKED): SET_VRING_BASE and GET_VRING_BASE
    /// carry the 32-bit value (both positions and wrap counters: here a ring
    /// in its second lap, two descriptors in flight), and the ring runs
    /// there; its addresses are the descriptor ring and the driver and device
    /// event suppression areas.
    @Test func packedBaseRoundTrips() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f, packed: true)
        close(sendMemory(f))
        #expect(f.receive()?.payload == le64(0))
        startRing(f, desc: 0x1000_0000, avail: 0x1000_1004, used: 0x1000_2008, base: 0x0003_0005)
        #expect(f.receive()?.payload == le64(0))
        #expect(h.plane.queues(of: h.disk).count == 1)
        f.send(Self.getVringBase, payload: state(0, 0))
        #expect(try #require(f.receive()).payload == state(0, 0x0003_0005))
        #expect(h.plane.queues(of: h.disk).isEmpty)
        #expect(h.log.contains("packed ring, base 0x30005"), "\(h.log)")
    }

    /// A base the negotiated layout cannot have closes the connection with
    /// the reason, and nothing else: a packed position not below the ring
    /// size, more than a ring's worth between the positions, a 32-bit value
    /// for a split ring.
    @Test(arguments: [(true, UInt32(0x0000_8009), "not both below the ring size"),
                      (true, UInt32(0x8000_0005), "more than the ring's 8 descriptors"),
                      (false, UInt32(0x8000_8000), "not a split-ring avail index")])
    func aRingBaseTheLayoutCannotHaveIsRefused(packed: Bool, base: UInt32, reason: String) throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f, packed: packed)
        f.send(Self.setVringNum, payload: state(0, 8))
        f.send(Self.setVringBase, flags: Self.needReply, payload: state(0, base))
        #expect(f.receive().map { $0.payload != le64(0) } ?? true)
        try expectClosedAndServing(f, h, reason)
    }

    /// Review finding: SET_VRING_CALL on a running ring closed the old call fd
    /// before stopping the ring, so completions of the drain went to a closed
    /// (or reused) fd number, and the restart failed requests the error policy
    /// held. The call fd is now swapped in place: same queue, no drain, and the
    /// new fd is signalled once so nothing signalled to the old one is missed.
    @Test func callFDIsSwappedOnARunningRingWithoutRestartingIt() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        close(sendMemory(f))
        #expect(f.receive()?.payload == le64(0))
        startRing(f, desc: 0x1000_0000, avail: 0x1000_1000, used: 0x1000_2000)
        #expect(f.receive()?.payload == le64(0))
        let before = try #require(h.plane.queues(of: h.disk).first)
        let call = dps_eventfd(0, true)
        defer { close(call) }
        f.send(Self.setVringCall, flags: Self.needReply, payload: le64(0), fds: [call])
        #expect(f.receive()?.payload == le64(0))
        let after = try #require(h.plane.queues(of: h.disk).first)
        #expect(before === after, "the ring was restarted")
        var count: UInt64 = 0
        #expect(read(call, &count, 8) == 8 && count == 1, "the new call fd was not signalled")
        #expect(fcntl(call, F_GETFL) & O_NONBLOCK != 0, "the IOThread could block writing it")
    }

    /// Review finding: any fd was taken as a notifier; a regular file as a kick
    /// fd reads as an endless stream of kicks, and a blocking call fd whose
    /// counter the frontend filled would block the IOThread.
    @Test(arguments: [Self.setVringKick, Self.setVringCall, Self.setVringErr])
    func notifierThatIsNotAnEventfdIsRefused(request: UInt32) throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f)
        let name = "dp-notifier-" + UUID().uuidString.prefix(8) // the cases run side by side
        let file = namedMemfd(name, size: 4096)
        f.send(request, flags: Self.needReply, payload: le64(0), fds: [file])
        close(file)
        #expect(f.receive().map { $0.payload != le64(0) } ?? true)
        try expectClosedAndServing(f, h, "not a usable eventfd")
        #expect(references(to: name).fds == 0)
    }

    /// Review finding: one control thread served every disk, so a frontend
    /// that sent requests and read no replies held it in a blocked send (1 s
    /// a time), and a drain for its guest's slow requests held it as long:
    /// every other disk's frontend waited. Each disk has its own thread now.
    /// (The second disk is added after start: it is served at once.)
    @Test func aFrontendThatReadsNoRepliesHoldsUpOnlyItsOwnDisk() throws {
        let h = try ServerHarness()
        let other = try h.plane.addDisk(DiskConfiguration(path: "", backend: .null, numQueues: 1, nullSizeBytes: 1 << 20))
        let otherSocket = h.directory + "/other.sock"
        try h.server.addExport(disk: other, socketPath: otherSocket)
        let flooder = try RawFrontend(path: h.socket)
        #expect(fcntl(flooder.fd, F_SETFL, fcntl(flooder.fd, F_GETFL) | O_NONBLOCK) == 0)
        var request: [UInt8] = []
        request.appendLE(Self.getFeatures)
        request.appendLE(UInt32(1))
        request.appendLE(UInt32(0))
        // Until the server has taken nothing for 0.3 s: it is stuck sending
        // replies nobody reads (and gives up 1 s after it got stuck).
        let deadline = Date().addingTimeInterval(10)
        var progress = Date()
        while Date().timeIntervalSince(progress) < 0.3 && Date() < deadline {
            let n = request.withUnsafeBytes { Glibc.send(flooder.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n > 0 {
                progress = Date()
            } else {
                var p = pollfd(fd: flooder.fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, 20)
            }
        }
        #expect(Date() < deadline)
        let f = try RawFrontend(path: otherSocket)
        for _ in 0..<3 {
            let start = Date()
            #expect(f.u64Reply(Self.getFeatures) != nil)
            #expect(Date().timeIntervalSince(start) < 0.25)
        }
        // Its own thread gives up on it after a second with no reply taken
        // (seen without reading, which would let the send go on).
        // POLLHUP is reported unasked once the server has closed its end.
        var p = pollfd(fd: flooder.fd, events: 0, revents: 0)
        #expect(poll(&p, 1, 10_000) == 1 && p.revents & Int16(POLLHUP) != 0, "log: \(h.log)")
    }

    @Test func secondFrontendIsRefusedWhileOneIsConnected() throws {
        let h = try ServerHarness()
        let first = try RawFrontend(path: h.socket)
        #expect(first.u64Reply(Self.getFeatures) != nil)
        let second = try RawFrontend(path: h.socket)
        #expect(second.closedByServer())
        #expect(first.u64Reply(Self.getFeatures) != nil)
    }

    /// GET_INFLIGHT_FD's payload as a front-end sends it: no region yet, its shape.
    func inflightRequest(queues: UInt16, queueSize: UInt16) -> [UInt8] {
        var request: [UInt8] = []
        request.appendLE(UInt64(0)); request.appendLE(UInt64(0)); request.appendLE(queues); request.appendLE(queueSize)
        return request + [0, 0, 0, 0]
    }

    /// Fuzzer finding (fuzz/crashes/vhost_user-get-inflight-while-running):
    /// GET_INFLIGHT_FD while a ring ran replaced the region the IOThread marks
    /// requests in, unmapping it under the IOThread (SEGV in inflight_mark).
    @Test func inflightRegionIsNotReplacedWhileRingsRun() throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        try negotiate(f, moreProtocolFeatures: 1 << 12)
        let request = inflightRequest(queues: 1, queueSize: 8)
        f.send(Self.getInflightFD, payload: request)
        let region = try #require(f.receive())
        #expect(region.fds.count == 1)
        region.fds.forEach { close($0) }
        close(sendMemory(f))
        #expect(f.receive()?.payload == le64(0))
        startRing(f, desc: 0x1000_0000, avail: 0x1000_1000, used: 0x1000_2000)
        #expect(f.receive()?.payload == le64(0))
        #expect(h.plane.queues(of: h.disk).count == 1)
        f.send(Self.getInflightFD, payload: request)
        try expectClosedAndServing(f, h, "GET_INFLIGHT_FD while rings run")
    }

    /// Sized by the backend for the layout the features negotiated (QEMU
    /// sends SET_FEATURES first), the same for every queue: DescStatePacked
    /// is twice DescStateSplit.
    @Test(arguments: [false, true])
    func inflightRegionIsHandedOut(packed: Bool) throws {
        let h = try ServerHarness()
        let f = try RawFrontend(path: h.socket)
        let offered = try #require(f.u64Reply(Self.getFeatures))
        f.send(Self.setFeatures, payload: le64(offered & ((1 << 32) | (1 << 30) | (packed ? 1 << 34 : 0))))
        f.send(Self.setProtocolFeatures, payload: le64(1 << 12))
        f.send(Self.getInflightFD, payload: inflightRequest(queues: 2, queueSize: 128))
        let reply = try #require(f.receive())
        #expect(reply.fds.count == 1)
        let perQueue = dpInflightQueueSize(128, packed: packed)
        #expect(perQueue == (packed ? 4160 : 2112)) // headers of 32 and 16 bytes, 64-aligned
        #expect(PayloadReaderForTests.u64(reply.payload, 0) == 2 * perQueue)
        var size: UInt64 = 0
        #expect(dps_fd_size(reply.fds[0], &size) == 0 && size == 2 * perQueue)
        // Sealed: the frontend cannot shrink it under our mapping (SIGBUS).
        // F_GET_SEALS = 1034, F_SEAL_SHRINK = 2, F_SEAL_GROW = 4 (linux/fcntl.h).
        #expect(fcntl(reply.fds[0], 1034) & 6 == 6)
        #expect(ftruncate(reply.fds[0], 0) != 0)
        reply.fds.forEach { close($0) }
    }
}

import CDataPlane
import Synchronization

func dpInflightQueueSize(_ n: UInt32, packed: Bool = false) -> UInt64 { dp_inflight_queue_size(n, packed) }

/// Collects the server's log: messages at info and above as `log` lines,
/// every event (trace included) with its metadata.
struct CollectingLogHandler: LogHandler {
    let lines: LogLines
    var logLevel: Logger.Level = .trace
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        lines.append(event.level, "\(event.message)", metadata.merging(event.metadata ?? [:]) { $1 })
    }
}
