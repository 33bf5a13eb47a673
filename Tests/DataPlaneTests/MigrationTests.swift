import CGuestDriver
import CVhostFrontend
@testable import DataPlane
import Foundation
import Testing

/// What a live migration asks of the backend outside the dirty log
/// (DirtyLogTests): one disk served to two frontends at once (the source
/// QEMU and the destination), and a switch-over that leaves no request
/// behind.
@Suite(.serialized) struct MigrationTests {
    /// Several sockets and locking=shared, written every way dpctl takes a
    /// disk: key=value, the grouped flags, a config file; --check prints them
    /// as a config file takes them. A socket given twice is refused.
    @Test func severalSocketsAndSharedLockingInEveryForm() throws {
        let keyValue = try DpctlOptionsTests.check(["--disk", "path=/img/vm.raw,socket=/tmp/a.sock,socket=/tmp/b.sock,locking=shared"])
        let grouped = try DpctlOptionsTests.check(["--disk", "/img/vm.raw", "--socket", "/tmp/a.sock", "--socket", "/tmp/b.sock",
                                                   "--locking", "shared"])
        let dir = NSTemporaryDirectory() + "dp-mig-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = dir + "/config.json"
        _ = FileManager.default.createFile(atPath: config, contents: Data(#"""
            {"control": "/tmp/a.sock.ctl", "disks": [{"path": "/img/vm.raw", "socket": ["/tmp/a.sock", "/tmp/b.sock"], "locking": "shared"}]}
            """#.utf8))
        let file = try DpctlOptionsTests.check(["--config", config])
        for json in [keyValue, grouped, file] {
            let disk = DpctlOptionsTests.firstDisk(json)
            #expect(disk["socket"] as? [String] == ["/tmp/a.sock", "/tmp/b.sock"] && disk["locking"] as? String == "shared", "\(json)")
        }
        #expect(DpctlOptionsTests.firstDisk(try DpctlOptionsTests.check(["--disk", "path=/img/vm.raw,socket=/tmp/a.sock"]))["socket"]
                as? String == "/tmp/a.sock", "one socket stays a string")
        let twice = try DpctlTests.dpctl(["start", "--disk", "path=/img/vm.raw,socket=/tmp/a.sock,socket=/tmp/a.sock", "--check"])
        #expect(twice.status == 2 && twice.stderr.contains("socket /tmp/a.sock is given twice"), "\(twice.stderr)")
    }

    /// One disk on two sockets: a frontend on each, each with its own
    /// queue 0, one image under both (a write through one is read through
    /// the other), and stopping one's ring leaves the other's running.
    @Test func aDiskOnTwoSocketsServesAFrontendOnEach() throws {
        let image = try TestImage(size: 1 << 20)
        let source = image.directory + "/src.sock", destination = image.directory + "/dst.sock"
        let dp = try QEMUEndToEndTests.Instance(
            ["--disk", "path=\(image.path),socket=\(source),socket=\(destination),num-queues=1"],
            log: image.directory + "/dpctl.log")
        defer { _ = dp.terminate() }
        let a = try TestGuest(queues: 1, queueSize: 64), b = try TestGuest(queues: 1, queueSize: 64)
        let connA = try a.connectFrontend(source)
        defer { vuf_close(connA) }
        let connB = try b.connectFrontend(destination)
        defer { vuf_close(connB) }

        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let written = a.alloc(4096), readBack = b.alloc(4096)
        a.write(written, pattern)
        #expect(try a.run(type: UInt32(GD_BLK_T_OUT), sector: 8, segments: [(written, 4096)]).status == 0)
        #expect(try b.run(type: UInt32(GD_BLK_T_IN), sector: 8, segments: [(readBack, 4096)]).status == 0)
        #expect(b.read(readBack, 4096) == pattern, "the second socket's frontend reads what the first wrote")

        let status = try DpctlTests.dpctl(["status", "--socket", source])
        #expect(status.status == 0, "\(status.stderr)")
        for socket in [source, destination] {
            #expect(status.stdout.contains("socket \(socket): frontend connected"), "\(status.stdout)")
            #expect(status.stdout.contains("queue 0 (socket \(socket))"), "\(status.stdout)")
        }

        var base: UInt32 = 0
        #expect(vuf_stop_queue(connA, 0, &base) == 0 && base == 1, "the first frontend's ring stopped after its one request")
        #expect(try b.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0, "the other frontend's queue still runs")
        let after = try DpctlTests.dpctl(["status", "--socket", source]).stdout
        #expect(!after.contains("queue 0 (socket \(source))") && after.contains("queue 0 (socket \(destination))"), "\(after)")
    }

    /// The switch-over: QEMU's vhost_dev_stop on a logging ring
    /// (SET_VRING_ENABLE 0, then GET_VRING_BASE; and GET_VRING_BASE alone,
    /// as the spec allows). A request the
    /// error policy holds (werror=stop) cannot stay in the source's
    /// inflight region, which the destination never sees: it completes
    /// with an I/O error before the answer, and is logged. The destination,
    /// on the other socket with the same guest memory and rings, starts
    /// where the source stopped and runs nothing twice.
    @Test(arguments: [false, true], [false, true])
    func theSwitchOverFailsHeldRequestsInsteadOfLeavingThemBehind(packed: Bool, disableFirst: Bool) throws {
        let image = try TestImage(size: 1 << 20)
        let source = image.directory + "/src.sock", destination = image.directory + "/dst.sock"
        let dp = try QEMUEndToEndTests.Instance(
            ["--disk", "path=\(image.path),socket=\(source),socket=\(destination),num-queues=1,werror=stop,"
                + "fault=errno=EIO,,ops=write,,after=1"],
            log: image.directory + "/dpctl.log")
        defer { _ = dp.terminate() }
        let g = try TestGuest(queues: 1, queueSize: 64, packed: packed)
        var options = vuf_options()
        options.inflight = true
        var info = vuf_info()
        let src = try g.connectFrontend(source, options: options, info: &info)
        var srcOpen = true
        defer { if srcOpen { vuf_close(src) } }
        #expect(info.inflight_size > 0, "an inflight region, as QEMU sets up")
        let buf = g.alloc(4096)
        #expect(try g.run(type: UInt32(GD_BLK_T_OUT), segments: [(buf, 4096)]).status == 0) // the first gets through

        try #require(vuf_start_dirty_log(src, info.features, 4096) == 0, "\(String(cString: vuf_last_error(src)))")
        let held = try g.submit(type: UInt32(GD_BLK_T_OUT), sector: 16, segments: [(buf, 4096)])
        let deadline = Date().addingTimeInterval(10)
        while !dp.log.contains("stopped on error") && Date() < deadline { usleep(20_000) }
        #expect(dp.log.contains("stopped on error"), "\(dp.log)")

        // QEMU's vhost_dev_stop: SET_VRING_ENABLE 0, then GET_VRING_BASE.
        if disableFirst {
            var state: [UInt8] = []
            state.appendLE(UInt32(0))
            state.appendLE(UInt32(0))
            let sent = state.withUnsafeBytes {
                vuf_send(src, UInt32(VUF_SET_VRING_ENABLE), UInt32(VUF_FLAG_VERSION | VUF_FLAG_NEED_REPLY), $0.baseAddress,
                         UInt32($0.count), nil, 0)
            }
            #expect(sent == 0)
            var ack = [UInt8](repeating: 0, count: 8)
            var request: UInt32 = 0, flags: UInt32 = 0, size: UInt32 = 0
            #expect(ack.withUnsafeMutableBytes { vuf_recv(src, &request, &flags, $0.baseAddress, 8, &size, nil, nil, 10_000) } == 0)
            #expect(request == UInt32(VUF_SET_VRING_ENABLE) && ack == [UInt8](repeating: 0, count: 8))
        }
        var base: UInt32 = 0
        #expect(vuf_stop_queue(src, 0, &base) == 0)
        // Answered before GET_VRING_BASE's reply: already in the used ring.
        let done = try g.complete(timeout: 0.5)
        #expect(done.head == held && done.status == UInt8(GD_BLK_S_IOERR))
        // Logged right after the stop, which answered the request first.
        let logged = Date().addingTimeInterval(5)
        while !dp.log.contains("held by the error policy failed") && Date() < logged { usleep(20_000) }
        #expect(dp.log.contains("1 request(s) held by the error policy failed with an I/O error: the guest migrates"), "\(dp.log)")
        vuf_close(src)
        srcOpen = false

        // The destination: the same memory and rings, a region of its own.
        let dst = try g.connectFrontend(destination, options: options)
        defer { vuf_close(dst) }
        let read = try g.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)])
        #expect(read.status == 0)
        #expect((try? g.complete(timeout: 0.3)) == nil, "nothing else completes: the failed write is not run again")
        let stats = try DpctlTests.dpctl(["status", "--socket", source])
        #expect(!stats.stdout.contains("STOPPED"), "\(stats.stdout)")
    }

    /// A backend killed while a migration runs, with requests in flight: QEMU
    /// reconnects and starts the device as it does mid-migration (LOG_ALL in
    /// SET_FEATURES, the inflight region handed back, the new log after the
    /// rings). The requests the new dpctl runs again write guest memory; each
    /// page they write, and the used ring, is marked in the new log, or the
    /// destination would get them stale.
    @Test(arguments: [false, true])
    func requestsRunAgainAfterARestartDuringAMigrationAreLogged(packed: Bool) throws {
        let image = try TestImage(size: 1 << 20)
        let socket = image.directory + "/vu.sock"
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        for i in 0..<4 { image.write(offset: i * 8 * 512, data) }
        var dp = try QEMUEndToEndTests.Instance(
            ["--disk", "path=\(image.path),socket=\(socket),num-queues=1,rerror=stop,fault=errno=EIO,,ops=read"],
            log: image.directory + "/dpctl1.log")
        defer { _ = dp.terminate() }
        let g = try TestGuest(queues: 1, queueSize: 64, packed: packed)
        let logBytes = (g.memorySize / 4096 + 63) / 64 * 8
        var options = vuf_options()
        options.inflight = true
        options.dirty_log_bytes = logBytes
        let conn = try g.connectFrontend(socket, options: options)
        // Reads held by the error policy: in flight when dpctl dies.
        var buffers: [UInt16: UInt64] = [:]
        for i in 0..<4 {
            let buf = g.alloc(4096)
            buffers[try g.submit(type: UInt32(GD_BLK_T_IN), sector: UInt64(i * 8), segments: [(buf, 4096)], kick: i == 3)] = buf
        }
        let deadline = Date().addingTimeInterval(10)
        while !dp.log.contains("stopped on error") && Date() < deadline { usleep(20_000) }
        var inflightSize: UInt64 = 0
        let inflightFD = vuf_inflight_dup(conn, &inflightSize)
        try #require(inflightFD >= 0)
        defer { close(inflightFD) }
        dp.kill9()
        vuf_close(conn)

        dp = try QEMUEndToEndTests.Instance(["--disk", "path=\(image.path),socket=\(socket),num-queues=1"],
                                            log: image.directory + "/dpctl2.log")
        options.reuse_inflight = true
        options.inflight_fd = inflightFD
        options.inflight_size = inflightSize
        let again = try g.connectFrontend(socket, options: options)
        defer { vuf_close(again) }
        var done: Set<UInt16> = []
        while done.count < buffers.count {
            let c = try g.complete(timeout: 10)
            #expect(buffers[c.head] != nil && c.status == 0, "head \(c.head) status \(c.status)")
            done.insert(c.head)
        }
        var size: UInt64 = 0
        let logFD = vuf_dirty_log_dup(again, &size)
        try #require(logFD >= 0 && size == logBytes)
        defer { close(logFD) }
        var bitmap = [UInt8](repeating: 0, count: Int(size))
        #expect(bitmap.withUnsafeMutableBytes { pread(logFD, $0.baseAddress, $0.count, 0) } == Int(size))
        func marked(_ gpa: UInt64) -> Bool { bitmap[Int(gpa / 4096 / 8)] & (1 << (gpa / 4096 % 8)) != 0 }
        for (head, buf) in buffers {
            #expect(g.read(buf, 4096) == data, "read \(head) brought the image's data")
            #expect(marked(buf), "the page read \(head) wrote (GPA 0x\(String(buf, radix: 16))) is marked")
            #expect(marked(g.memoryStatusGPA(head: head)), "read \(head)'s status byte is marked")
        }
        #expect(dp.log.contains("request") && dp.log.contains("from the inflight region run again"), "\(dp.log)")
        #expect(dp.log.contains("dirty log of"), "\(dp.log)")
    }
}

/// Live migration with real QEMUs (Tests/e2e/migrate.sh): a source QEMU on
/// one socket of a disk, a destination QEMU (-incoming) on another socket of
/// the same disk in the same dpctl, migrated over TCP while the guest does
/// I/O; the destination guest then verifies what it wrote and read, and the
/// host checks the image. In QEMUEndToEndTests' serialized suite: TCG guests
/// side by side would only slow each other down.
extension QEMUEndToEndTests {
    /// cache-reads: pages only the device writes, summed after the
    /// switch-over, so a page the backend did not mark in the dirty log
    /// fails it. long-io: writes verified before, during and after, with
    /// O_DIRECT readers keeping requests in flight at the switch-over.
    @Test(arguments: [("cache-reads", false), ("long-io", true)])
    func aGuestMigratesBetweenTwoQEMUsOnOneDisk(workload: String, packed: Bool) throws {
        let w = try Workspace(imageSize: 64 << 20)
        let source = w.dir + "/src.sock", destination = w.dir + "/dst.sock"
        let dp = try Instance(["--disk", "path=\(w.image),socket=\(source),socket=\(destination),num-queues=1"],
                              log: w.dir + "/dpctl.log")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [Self.root.appendingPathComponent("Tests/e2e/migrate.sh").path, "--source", source,
                       "--destination", destination, "--image", w.image, "--log-dir", w.dir, "--workload", workload,
                       "--seconds", "20"] + (packed ? ["--packed"] : [])
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        let status = dp.terminate()
        let guest = ((try? String(contentsOfFile: w.dir + "/dst.log", encoding: .utf8)) ?? "").suffix(3000)
        #expect(p.terminationStatus == 0, "migrate.sh: \(output)\ndestination guest: \(guest)\ndpctl: \(dp.log.suffix(4000))\nkept in \(w.dir)")
        #expect(status == 0, "dpctl: \(dp.log.suffix(3000))")
        // Both frontends were the disk's: the source logged, the destination took over.
        #expect(dp.log.contains("dirty log of") && dp.log.contains("\(destination): frontend connected"), "\(dp.log.suffix(3000))")
        let migration = (try? String(contentsOfFile: w.dir + "/migrate.txt", encoding: .utf8)) ?? ""
        print("migration (\(workload), \(packed ? "packed" : "split")): \(migration.split(separator: "\n").joined(separator: "; "))")
        if p.terminationStatus == 0 && status == 0 { w.remove() }
    }
}
