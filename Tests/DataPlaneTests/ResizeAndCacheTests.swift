import CDataPlane
import CGuestDriver
import CVhostFrontend
import Foundation
import Logging
import Synchronization
import Testing

@testable import DataPlane

/// A vhost-user server over a file image (or any disk configuration) on
/// one or more sockets, logging into `logLines`.
final class ResizeServer: @unchecked Sendable {
    let plane: DataPlane
    let server: VhostUserServer
    let disk: Disk
    let image: TestImage?
    let sockets: [String]
    let directory: String
    let logLines = LogLines()

    init(imageSize: Int = 4 << 20, configuration: DiskConfiguration? = nil, sockets: Int = 1) throws {
        directory = NSTemporaryDirectory() + "/dp-rw-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let dir = directory
        self.sockets = (0..<sockets).map { "\(dir)/vhost\($0).sock" }
        image = configuration == nil ? try TestImage(size: imageSize) : nil
        plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "rw-io", cpuset: CPUSet(parsing: "0-1"))])
        var config = configuration ?? DiskConfiguration(path: image?.path ?? "")
        config.numQueues = 1
        config.queueSize = 128
        disk = try plane.addDisk(config)
        let lines = logLines
        server = try VhostUserServer(plane: plane, logger: Logger(label: "test") { _ in CollectingLogHandler(lines: lines) })
        for socket in self.sockets { try server.addExport(disk: disk, socketPath: socket) }
        try server.start()
    }

    deinit {
        server.stop()
        plane.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    var socket: String { sockets[0] }
    var log: String { logLines.text }
}

/// What the frontend set up asks for: a backend channel and the writeback byte.
func resizeFrontendOptions(backendReq: Bool = true, configWCE: Bool = true) -> vuf_options {
    var o = vuf_options()
    o.backend_req = backendReq
    o.config_wce = configWCE
    return o
}

func frontendConfig(_ conn: OpaquePointer) throws -> vuf_blk_config {
    var config = vuf_blk_config()
    let rc = vuf_get_config(conn, &config)
    guard rc == 0 else { throw TestFailure("GET_CONFIG: \(rc) \(String(cString: vuf_last_error(conn)))") }
    return config
}

/// A loop device's completed flush requests (/sys/block/loopN/stat, field 16).
func flushCount(_ device: String) throws -> UInt64 {
    let name = URL(fileURLWithPath: device).lastPathComponent
    let text = try String(contentsOfFile: "/sys/block/\(name)/stat", encoding: .utf8)
    let fields = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
    guard fields.count > 15, let n = UInt64(fields[15]) else { throw TestFailure("no flush count in \(text)") }
    return n
}

@Suite(.serialized, .timeLimit(.minutes(5)))
struct ResizeAndCacheTests {
    let read = UInt32(GD_BLK_T_IN), write = UInt32(GD_BLK_T_OUT)
    let ok = UInt8(GD_BLK_S_OK), ioError = UInt8(GD_BLK_S_IOERR)

    /// Growing: I/O past the old end is refused before and lands after; the
    /// frontend gets CONFIG_CHANGE_MSG (no reply asked for) and GET_CONFIG
    /// then shows the new capacity; the file was extended.
    @Test func growNotifiesTheFrontendAndOpensTheNewSpace() throws {
        let s = try ResizeServer(imageSize: 1 << 20)
        let g = try TestGuest(queues: 1, queueSize: 64)
        var info = vuf_info()
        let conn = try g.connectFrontend(s.socket, options: resizeFrontendOptions(), info: &info)
        defer { vuf_close(conn) }
        #expect(info.protocol & (1 << UInt64(VUF_PF_BACKEND_REQ)) != 0)
        #expect(info.config.capacity == 2048)
        let buffer = g.alloc(4096), back = g.alloc(4096)
        let data = pattern(4096, seed: 3)
        g.write(buffer, data)
        #expect(try g.run(type: write, sector: 2048, segments: [(buffer, 4096)]).status == ioError)
        #expect(try g.run(type: read, sector: 2040, segments: [(back, 8192 / 2)]).status == ok)

        let outcome = try s.server.resize(disk: s.disk, toBytes: 2 << 20)
        #expect(outcome.oldBytes == 1 << 20 && outcome.newBytes == 2 << 20 && outcome.fileBytes == 2 << 20)
        #expect(outcome.frontends[s.socket] == "notified", "\(outcome)")
        var request: UInt32 = 0, flags: UInt32 = 0
        #expect(vuf_recv_backend(conn, &request, &flags, 5000) == 0, "\(String(cString: vuf_last_error(conn)))")
        #expect(request == UInt32(VUF_BACKEND_CONFIG_CHANGE_MSG))
        #expect(flags & UInt32(VUF_FLAG_NEED_REPLY) == 0, "a NEED_REPLY would wait on the frontend's GET_CONFIG")
        #expect(try frontendConfig(conn).capacity == 4096)
        #expect(s.image?.size == 2 << 20)
        #expect(try g.run(type: write, sector: 2048, segments: [(buffer, 4096)]).status == ok)
        #expect(try g.run(type: read, sector: 2048, segments: [(back, 4096)]).status == ok)
        #expect(g.read(back, 4096) == data)
        #expect(s.image?.read(offset: 1 << 20, count: 4096) == data)
        #expect(try g.run(type: write, sector: 4096, segments: [(buffer, 4096)]).status == ioError)
        #expect(s.log.contains("resized from 1048576 to 2097152 bytes"), "\(s.log)")
    }

    /// Shrinking needs allowShrink; then I/O past the new end is refused and
    /// the file is shortened. Sizes that are not whole blocks are refused.
    @Test func shrinkIsRefusedUnlessAskedThenCutsIOAndFile() throws {
        let s = try ResizeServer(imageSize: 2 << 20)
        let g = try TestGuest(queues: 1, queueSize: 64)
        let conn = try g.connectFrontend(s.socket, options: resizeFrontendOptions())
        defer { vuf_close(conn) }
        let buffer = g.alloc(4096)
        #expect(try g.run(type: write, sector: 3000, segments: [(buffer, 4096)]).status == ok)
        #expect(throws: DataPlaneError.self) { try s.server.resize(disk: s.disk, toBytes: 1 << 20) }
        #expect(throws: DataPlaneError.self) { try s.server.resize(disk: s.disk, toBytes: (1 << 20) + 100, allowShrink: true) }
        #expect(throws: DataPlaneError.self) { try s.server.resize(disk: s.disk, toBytes: 0, allowShrink: true) }
        #expect(s.disk.capacityBytes == 2 << 20)
        #expect(try g.run(type: write, sector: 3000, segments: [(buffer, 4096)]).status == ok)

        let outcome = try s.server.resize(disk: s.disk, toBytes: 1 << 20, allowShrink: true)
        #expect(outcome.newBytes == 1 << 20 && outcome.fileBytes == 1 << 20)
        var request: UInt32 = 0, flags: UInt32 = 0
        #expect(vuf_recv_backend(conn, &request, &flags, 5000) == 0)
        #expect(try frontendConfig(conn).capacity == 2048)
        #expect(try g.run(type: write, sector: 3000, segments: [(buffer, 4096)]).status == ioError)
        #expect(try g.run(type: write, sector: 2047, segments: [(buffer, 1024)]).status == ioError)
        #expect(try g.run(type: write, sector: 2040, segments: [(buffer, 4096)]).status == ok)
        #expect(s.image?.size == 1 << 20)
    }

    /// I/O racing resizes never passes the capacity in effect: writes fly
    /// at [4 MiB, 8 MiB) while the disk shrinks to 4 MiB and grows back,
    /// over and over. Right after each shrink returns the file must be 4 MiB
    /// and stay so: a write checked against the old capacity that landed
    /// after the truncation would have extended it again (that is what the
    /// drain before the truncation prevents).
    @Test func ioRacingResizesNeverPassesTheCapacityInEffect() throws {
        let small = 4 << 20, big = 8 << 20
        let image = try TestImage(size: big)
        let h = try Harness(disk: DiskConfiguration(path: image.path), queueSize: 128)
        final class Race: Sendable {
            let running = Atomic(true)
            let violations = Mutex<[String]>([])
        }
        let race = Race()
        let resizer = Thread {
            for round in 0..<40 {
                do {
                    _ = try h.plane.resize(disk: h.disk, toBytes: UInt64(small), allowShrink: true)
                    for check in 0..<3 {
                        if image.size != small { race.violations.withLock { $0.append("round \(round) check \(check): file is \(image.size) bytes after the shrink") } }
                        usleep(300)
                    }
                    if round < 39 {
                        _ = try h.plane.resize(disk: h.disk, toBytes: UInt64(big))
                        usleep(1000) // writes past 4 MiB land meanwhile
                    }
                } catch {
                    race.violations.withLock { $0.append("round \(round): \(error)") }
                }
            }
            race.running.store(false, ordering: .releasing)
        }
        let buffers = (0..<32).map { _ in h.guest.alloc(65536) }
        var statuses: [UInt8: Int] = [:]
        resizer.start()
        var k = 0
        while race.running.load(ordering: .acquiring) {
            for b in buffers {
                let sector = UInt64(small / 512 + (k % 63) * 128)
                k += 1
                try h.guest.submit(type: write, sector: sector, segments: [(b, 65536)], kick: false)
            }
            gd_kick_if_needed(h.guest.driver, 0)
            for _ in buffers { statuses[try h.guest.complete().status, default: 0] += 1 }
        }
        // The last shrink stays: everything past 4 MiB is refused now.
        for b in buffers.prefix(8) {
            #expect(try h.guest.run(type: write, sector: UInt64(small / 512), segments: [(b, 65536)]).status == ioError)
        }
        usleep(10_000)
        #expect(image.size == small)
        let violations = race.violations.withLock { $0 }
        #expect(violations.isEmpty, "\(violations)")
        #expect(Set(statuses.keys).isSubset(of: [ok, ioError]), "\(statuses)")
        #expect(statuses[ioError, default: 0] > 0 && statuses[ok, default: 0] > 0, "the writes did not race the resizes: \(statuses)")
        withExtendedLifetime(image) {}
    }

    /// Every frontend of the disk is told (a disk on two sockets: a
    /// migration's source and destination); one that did not negotiate
    /// BACKEND_REQ is logged as seeing the size only after a reset.
    @Test func everyFrontendOfTheDiskIsToldOrLogged() throws {
        let s = try ResizeServer(imageSize: 1 << 20, sockets: 3)
        let g0 = try TestGuest(queues: 1, queueSize: 64), g1 = try TestGuest(queues: 1, queueSize: 64)
        let c0 = try g0.connectFrontend(s.sockets[0], options: resizeFrontendOptions())
        defer { vuf_close(c0) }
        let c1 = try g1.connectFrontend(s.sockets[1], options: resizeFrontendOptions(backendReq: false))
        defer { vuf_close(c1) }
        let outcome = try s.server.resize(disk: s.disk, toBytes: 3 << 20)
        #expect(outcome.frontends[s.sockets[0]] == "notified")
        #expect(outcome.frontends[s.sockets[1]]?.contains("did not negotiate BACKEND_REQ") == true, "\(outcome)")
        #expect(outcome.frontends[s.sockets[2]]?.contains("no frontend") == true, "\(outcome)")
        var request: UInt32 = 0, flags: UInt32 = 0
        #expect(vuf_recv_backend(c0, &request, &flags, 5000) == 0 && request == UInt32(VUF_BACKEND_CONFIG_CHANGE_MSG))
        #expect(vuf_recv_backend(c1, &request, &flags, 100) == -ENOENT)
        // Not told, but its next GET_CONFIG (a reset's) sees it; and so does a new frontend's.
        #expect(try frontendConfig(c1).capacity == 6144)
        let g2 = try TestGuest(queues: 1, queueSize: 64)
        var info = vuf_info()
        let c2 = try g2.connectFrontend(s.sockets[2], options: resizeFrontendOptions(), info: &info)
        defer { vuf_close(c2) }
        #expect(info.config.capacity == 6144)
        #expect(s.log.contains("only after the device is reset"), "\(s.log)")
    }

    /// SET_CONFIG: the writeback byte switches the disk (logged), GET_CONFIG
    /// shows it; any other byte, size, value, or a frontend without
    /// CONFIG_WCE, is refused with a non-zero REPLY_ACK and the connection kept.
    @Test func setConfigTakesOnlyTheWritebackByte() throws {
        let s = try ResizeServer()
        let g = try TestGuest(queues: 1, queueSize: 64)
        var info = vuf_info()
        let conn = try g.connectFrontend(s.socket, options: resizeFrontendOptions(), info: &info)
        var closed = false
        defer { if !closed { vuf_close(conn) } }
        #expect(info.features & (1 << UInt64(VUF_F_BLK_CONFIG_WCE)) != 0)
        #expect(info.config.writeback == 1 && s.disk.writeCache)
        var zero: UInt8 = 0, one: UInt8 = 1, two: UInt8 = 2
        #expect(vuf_set_config(conn, 32, &zero, 1, 0) == 0, "\(String(cString: vuf_last_error(conn)))")
        #expect(!s.disk.writeCache)
        #expect(try frontendConfig(conn).writeback == 0)
        #expect(s.log.contains("write cache write back -> write through (set by the guest)"), "\(s.log)")
        let capacity = [UInt8](repeating: 0xff, count: 8)
        #expect(vuf_set_config(conn, 0, capacity, 8, 0) == -EIO)
        #expect(vuf_set_config(conn, 33, &one, 1, 0) == -EIO)
        #expect(vuf_set_config(conn, 32, &two, 1, 0) == -EIO)
        var two8 = [UInt8](repeating: 1, count: 2)
        #expect(vuf_set_config(conn, 32, &two8, 2, 0) == -EIO)
        #expect(vuf_set_config(conn, 32, &one, 1, 4) == -EIO)
        #expect(vuf_is_closed(conn, 100) == 0)
        #expect(try frontendConfig(conn).capacity == 8192)
        #expect(vuf_set_config(conn, 32, &one, 1, 0) == 0)
        #expect(s.disk.writeCache)
        #expect(try frontendConfig(conn).writeback == 1)
        #expect(s.log.contains("write cache write through -> write back"), "\(s.log)")
        vuf_close(conn)
        closed = true
        // The server takes one frontend at a time: wait until it saw this one go.
        let gone = ContinuousClock.now + .seconds(5)
        while s.server.isConnected(socketPath: s.socket) && ContinuousClock.now < gone { usleep(1000) }

        // Without VIRTIO_BLK_F_CONFIG_WCE negotiated the byte is not the guest's to write.
        let g2 = try TestGuest(queues: 1, queueSize: 64)
        let plain = try g2.connectFrontend(s.socket, options: resizeFrontendOptions(configWCE: false))
        defer { vuf_close(plain) }
        #expect(vuf_set_config(plain, 32, &zero, 1, 0) == -EIO)
        #expect(s.disk.writeCache)
    }

    /// write-cache=off (DiskConfiguration.writeCache false) is where a disk
    /// starts: the config space's writeback byte is 0.
    @Test func writeCacheOffIsTheStartingMode() throws {
        let image = try TestImage(size: 1 << 20)
        var config = DiskConfiguration(path: image.path)
        config.writeCache = false
        let s = try ResizeServer(configuration: config)
        #expect(!s.disk.writeCache)
        let g = try TestGuest(queues: 1, queueSize: 64)
        var info = vuf_info()
        let conn = try g.connectFrontend(s.socket, options: resizeFrontendOptions(), info: &info)
        defer { vuf_close(conn) }
        #expect(info.config.writeback == 0)
        withExtendedLifetime(image) {}
    }

    /// Write-through is real: on a loop device (whose flush requests the
    /// kernel counts in /sys/block/loopN/stat), every write-through write
    /// makes the kernel flush the device (RWF_DSYNC on an O_DIRECT write
    /// becomes FUA, a flush on a device without FUA); write-back writes make
    /// none. Needs root (loop devices).
    /// Write-zeroes made with fallocate are durable in write-through too:
    /// each is followed by a sync (a flush of the loop device), none in
    /// write-back.
    @Test(.enabled(if: runningAsRoot)) func writeThroughWriteZeroesReachStableStorage() throws {
        let loop = try LoopDevice(sizeBytes: 16 << 20, sectorSize: 512)
        let h = try Harness(disk: DiskConfiguration(path: loop.path), queueSize: 64)
        let range = h.guest.alloc(16, align: 16)
        func zeroes(_ n: Int) throws -> UInt64 {
            let before = try flushCount(loop.path)
            for i in 0..<n {
                var r = gd_blk_range(sector: UInt64(64 * i), num_sectors: 64, flags: 0)
                h.guest.write(range, withUnsafeBytes(of: &r) { Array($0) })
                #expect(try h.guest.run(type: UInt32(GD_BLK_T_WRITE_ZEROES), segments: [(range, 16)]).status == ok)
            }
            return try flushCount(loop.path) - before
        }
        let back = try zeroes(10)
        #expect(back < 3, "10 write-back write-zeroes made \(back) flushes")
        try h.disk.setWriteCache(false)
        let through = try zeroes(10)
        #expect(through >= 10, "10 write-through write-zeroes made \(through) flushes")
        withExtendedLifetime(loop) {}
    }

    @Test(.enabled(if: runningAsRoot)) func writeThroughWritesReachStableStorage() throws {
        let loop = try LoopDevice(sizeBytes: 16 << 20, sectorSize: 512)
        let h = try Harness(disk: DiskConfiguration(path: loop.path), queueSize: 64)
        let buffer = h.guest.alloc(4096)
        func writes(_ n: Int) throws -> UInt64 {
            let before = try flushCount(loop.path)
            for i in 0..<n { #expect(try h.guest.run(type: write, sector: UInt64(8 * i), segments: [(buffer, 4096)]).status == ok) }
            return try flushCount(loop.path) - before
        }
        let backFlushes = try writes(20)
        #expect(backFlushes < 5, "20 write-back writes made \(backFlushes) flushes")
        // Turning write-through on makes the write-back writes durable first.
        let before = try flushCount(loop.path)
        try h.disk.setWriteCache(false)
        #expect(try flushCount(loop.path) > before, "switching to write-through flushed nothing")
        let throughFlushes = try writes(20)
        #expect(throughFlushes >= 20, "20 write-through writes made \(throughFlushes) flushes")
        try h.disk.setWriteCache(true)
        #expect(try writes(20) < 5)
        withExtendedLifetime(loop) {}
    }

    /// A block device's size is its own: resize without a size takes it
    /// after `losetup -c`; growing past it is refused. Needs root.
    @Test(.enabled(if: runningAsRoot)) func blockDeviceResizeReadsTheDeviceSize() throws {
        let loop = try LoopDevice(sizeBytes: 4 << 20, sectorSize: 512)
        let h = try Harness(disk: DiskConfiguration(path: loop.path), queueSize: 64)
        #expect(throws: DataPlaneError.self) { try h.plane.resize(disk: h.disk, toBytes: 8 << 20) }
        let backing = try #require(try runToolChecked("losetup", ["-n", "-O", "BACK-FILE", loop.path])
            .trimmingCharacters(in: .whitespacesAndNewlines).nonEmpty)
        #expect(truncate(backing, 8 << 20) == 0)
        try runToolChecked("losetup", ["-c", loop.path])
        let outcome = try h.plane.resize(disk: h.disk, toBytes: nil)
        #expect(outcome.oldBytes == 4 << 20 && outcome.newBytes == 8 << 20 && outcome.fileBytes == nil)
        let buffer = h.guest.alloc(4096)
        #expect(try h.guest.run(type: write, sector: 12288, segments: [(buffer, 4096)]).status == ok)
        withExtendedLifetime(loop) {}
    }

    /// A read-only disk's file is never written: growing it is refused
    /// with what to do instead; a file grown by someone else is taken
    /// with no size. The null backend just changes its capacity.
    @Test func readOnlyAndNullDisks() throws {
        let image = try TestImage(size: 1 << 20)
        let plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "ro-io", cpuset: CPUSet(parsing: "0-1"))])
        defer { plane.stop() }
        let ro = try plane.addDisk(DiskConfiguration(path: image.path, readOnly: true))
        do {
            _ = try plane.resize(disk: ro, toBytes: 2 << 20)
            Issue.record("a read-only disk's file was grown")
        } catch {
            #expect(error.description.contains("truncate -s"), "\(error)")
        }
        #expect(image.size == 1 << 20)
        #expect(truncate(image.path, 3 << 20) == 0)
        #expect(try plane.resize(disk: ro, toBytes: nil).newBytes == 3 << 20)
        let null = try plane.addDisk(DiskConfiguration(path: "", backend: .null, nullSizeBytes: 1 << 20))
        #expect(try plane.resize(disk: null, toBytes: 64 << 20).newBytes == 64 << 20)
        #expect(null.capacityBytes == 64 << 20)
        try null.setWriteCache(false)
        #expect(!null.writeCache)
    }
}

extension String {
    var nonEmpty: String? { isEmpty ? nil : self }
}

/// dpctl's side: `dpctl resize` and `write-cache=` on a running instance.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct DpctlResizeAndCacheTests {
    @Test func dpctlResizeAndWriteCacheKey() throws {
        let w = try QEMUEndToEndTests.Workspace(imageSize: 1 << 20)
        defer { w.remove() }
        let dp = try QEMUEndToEndTests.Instance(["--disk", "path=\(w.image),socket=\(w.socket),num-queues=1,write-cache=off"],
                                                log: w.dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        let status = try waitForStatus(w.socket)
        #expect(status.contains("disk \(w.image): 1 MiB, read-write, O_DIRECT, up to 1 queues, write through (1048576 bytes)"), "\(status)\n\(dp.log)")

        let stats = try runTool(QEMUEndToEndTests.dpctl, ["stats", "--socket", w.socket, "--interval", "0.1"], timeout: 20)
        #expect(stats.result.stdout.contains("disk \(w.image): 1 MiB (1048576 bytes), write through"), "\(stats.result.output)")
        let grow = try runTool(QEMUEndToEndTests.dpctl, ["resize", "--socket", w.socket, "2M"], timeout: 20)
        #expect(grow.result.status == 0, "\(grow.result.output)\n\(dp.log)")
        #expect(grow.result.stdout.contains("resized from 1 MiB to 2 MiB"), "\(grow.result.output)")
        #expect(grow.result.stdout.contains("no frontend connected"), "\(grow.result.output)")
        #expect(grow.result.stdout.contains("write through (2097152 bytes)"), "\(grow.result.output)")
        #expect(try FileManager.default.attributesOfItem(atPath: w.image)[.size] as? Int == 2 << 20)

        let shrink = try runTool(QEMUEndToEndTests.dpctl, ["resize", "--socket", w.socket, "1M"], timeout: 20)
        #expect(shrink.result.status == 1 && shrink.result.stderr.contains("--shrink"), "\(shrink.result.output)")
        let odd = try runTool(QEMUEndToEndTests.dpctl, ["resize", "--socket", w.socket, "1000000", "--shrink"], timeout: 20)
        #expect(odd.result.status == 1 && odd.result.stderr.contains("logical block size"), "\(odd.result.output)")
        let shrunk = try runTool(QEMUEndToEndTests.dpctl, ["resize", "--socket", w.socket, "1M", "--shrink"], timeout: 20)
        #expect(shrunk.result.status == 0 && shrunk.result.stdout.contains("resized from 2 MiB to 1 MiB"), "\(shrunk.result.output)")
        #expect(dp.log.contains("resized from 1048576 to 2097152 bytes"), "\(dp.log)")
        #expect(dp.log.contains("write through"), "\(dp.log)")

        let check = try runTool(QEMUEndToEndTests.dpctl, ["start", "--disk", "path=\(w.image),socket=\(w.dir)/x.sock,write-cache=off", "--check"], timeout: 20)
        #expect(check.result.stdout.contains("\"write-cache\" : false"), "\(check.result.output)")
        let grouped = try runTool(QEMUEndToEndTests.dpctl, ["start", "--disk", w.image, "--socket", "\(w.dir)/x.sock", "--write-cache", "off", "--check"], timeout: 20)
        #expect(grouped.result.stdout.contains("\"write-cache\" : false"), "\(grouped.result.output)")
        let file = w.dir + "/dp.json"
        try Data(#"{"disks": [{"path": "\#(w.image)", "socket": "\#(w.dir)/x.sock", "write-cache": false}]}"#.utf8).write(to: URL(fileURLWithPath: file))
        let fromFile = try runTool(QEMUEndToEndTests.dpctl, ["start", "--config", file, "--check"], timeout: 20)
        #expect(fromFile.result.stdout.contains("\"write-cache\" : false"), "\(fromFile.result.output)")
        let bad = try runTool(QEMUEndToEndTests.dpctl, ["start", "--disk", "path=\(w.image),socket=\(w.dir)/x.sock,write-cache=maybe"], timeout: 20)
        #expect(bad.result.status == 2, "\(bad.result.output)")
    }
}

/// `dpctl status` of a running instance, once it answers.
func waitForStatus(_ socket: String, timeout: Double = 10) throws -> String {
    let deadline = Date().addingTimeInterval(timeout)
    while true {
        let r = try runTool(QEMUEndToEndTests.dpctl, ["status", "--socket", socket], timeout: 10)
        if r.result.status == 0 || Date() > deadline { return r.result.output }
        usleep(100_000)
    }
}

/// Real guests (QEMU under TCG): online resize and the write cache, seen
/// from inside the guest. In QEMUEndToEndTests' serialized suite: one TCG
/// guest at a time.
extension QEMUEndToEndTests {
    /// boot.sh in the background: the test acts on the host while the guest runs.
    final class Boot {
        let process = Process()
        let output = Pipe()
        let log: String

        init(_ arguments: [String], log: String) throws {
            self.log = log
            process.executableURL = URL(fileURLWithPath: "/bin/bash")
            process.arguments = [QEMUEndToEndTests.root.appendingPathComponent("Tests/e2e/boot.sh").path] + arguments + ["--log", log]
            process.standardOutput = output
            process.standardError = output
            try process.run()
        }

        var guest: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

        /// Waits for a line of the guest's; false at the deadline or when the boot ended.
        func waitFor(_ text: String, seconds: Double = 240) -> Bool {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline && process.isRunning {
                if guest.contains(text) { return true }
                usleep(200_000)
            }
            return guest.contains(text)
        }

        func finish() -> (status: Int32, output: String) {
            let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            return (process.terminationStatus, text)
        }
    }

    /// The guest waits for its disk to grow (dpctl resize once it says it
    /// is ready), sees the new size without a reboot, writes and reads back
    /// past the old end; the host checks the image there (boot.sh
    /// --verify-image).
    @Test func guestSeesOnlineGrowAndWritesPastTheOldEnd() throws {
        let w = try Workspace(imageSize: 64 << 20)
        defer { w.remove() }
        let dp = try Instance(["--disk", w.image, "--socket", w.socket, "--num-queues", "1"], log: w.dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        let boot = try Boot(["--socket", w.socket, "--workload", "grow", "--verify-image", w.image, "--timeout", "300"],
                            log: w.dir + "/guest.log")
        #expect(boot.waitFor("E2E-READY: grow"), "guest: \(boot.guest.suffix(3000))")
        let resize = try runTool(Self.dpctl, ["resize", "--socket", w.socket, "68M"], timeout: 30)
        let result = boot.finish()
        #expect(resize.result.status == 0 && resize.result.stdout.contains("notified"), "\(resize.result.output)\n\(dp.log)")
        #expect(result.status == 0, "boot.sh: \(result.output)\nguest: \(boot.guest.suffix(3000))\ndpctl: \(dp.log)")
        #expect(boot.guest.contains("grow: 67108864 -> 71303168 bytes"), "guest: \(boot.guest.suffix(3000))")
        #expect(boot.guest.contains("regions=67108864:4194304"), "guest: \(boot.guest.suffix(3000))")
        #expect(try FileManager.default.attributesOfItem(atPath: w.image)[.size] as? Int == 68 << 20)
        #expect(dp.log.contains("config change sent to the frontend"), "\(dp.log)")
    }

    /// The guest turns write-through on (virtio_blk's cache_type, which
    /// writes the writeback byte: QEMU sends SET_CONFIG), dpctl status and
    /// log show it, the guest writes and reads back, then turns write back
    /// on again (after the host's go-ahead: a resize).
    @Test func guestTogglesTheWriteCache() throws {
        let w = try Workspace(imageSize: 64 << 20)
        defer { w.remove() }
        let dp = try Instance(["--disk", w.image, "--socket", w.socket, "--num-queues", "1"], log: w.dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        let boot = try Boot(["--socket", w.socket, "--workload", "write-cache", "--verify-image", w.image, "--timeout", "300"],
                            log: w.dir + "/guest.log")
        #expect(boot.waitFor("E2E-READY: write-through"), "guest: \(boot.guest.suffix(3000))")
        let during = try runTool(Self.dpctl, ["status", "--socket", w.socket], timeout: 30)
        let resize = try runTool(Self.dpctl, ["resize", "--socket", w.socket, "65M"], timeout: 30)
        let result = boot.finish()
        #expect(result.status == 0, "boot.sh: \(result.output)\nguest: \(boot.guest.suffix(3000))\ndpctl: \(dp.log)")
        #expect(during.result.stdout.contains("write through"), "\(during.result.output)")
        #expect(resize.result.status == 0, "\(resize.result.output)")
        let after = try runTool(Self.dpctl, ["status", "--socket", w.socket], timeout: 30)
        #expect(after.result.stdout.contains("write back"), "\(after.result.output)")
        #expect(dp.log.contains("write cache write back -> write through (set by the guest)"), "\(dp.log)")
        #expect(dp.log.contains("write cache write through -> write back (set by the guest)"), "\(dp.log)")
    }
}
