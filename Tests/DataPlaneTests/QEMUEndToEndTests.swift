import CDataPlaneSys
import Foundation
import Testing

/// Boots a real guest (QEMU under TCG) against `dpctl start`: the guest
/// writes, reads back and verifies through virtio-blk; the host then checks
/// the image bytes itself. Uses Tests/e2e/ (kernel from Debian's package,
/// busybox initramfs). Serialized: two TCG guests on two cores would only
/// slow each other down.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct QEMUEndToEndTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The dpctl built next to this test bundle.
    static var dpctl: String {
        if let path = ProcessInfo.processInfo.environment["DPCTL"] { return path }
        let beside = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for dir in [beside, beside.deletingLastPathComponent(), root.appendingPathComponent(".build/debug")] {
            let candidate = dir.appendingPathComponent("dpctl").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return root.appendingPathComponent(".build/debug/dpctl").path
    }

    final class Instance {
        let process = Process()
        let logPath: String

        init(_ arguments: [String], log: String) throws {
            logPath = log
            _ = FileManager.default.createFile(atPath: log, contents: nil)
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
            handle.seekToEndOfFile()
            process.executableURL = URL(fileURLWithPath: QEMUEndToEndTests.dpctl)
            process.arguments = ["start"] + arguments
            process.standardError = handle
            process.standardOutput = handle
            try process.run()
        }

        func kill9() {
            _ = kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }

        /// SIGTERM and wait; returns the exit status.
        func terminate() -> Int32 {
            if process.isRunning {
                process.terminate()
                process.waitUntilExit()
            }
            return process.terminationStatus
        }

        var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    }

    struct Workspace {
        let dir: String
        var image: String { dir + "/disk.raw" }
        var socket: String { dir + "/vhost.sock" }

        init(imageSize: Int) throws {
            dir = "/tmp/dp-e2e-" + UUID().uuidString.prefix(8)
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            _ = FileManager.default.createFile(atPath: image, contents: nil)
            let h = try FileHandle(forWritingTo: URL(fileURLWithPath: image))
            try h.truncate(atOffset: UInt64(imageSize))
            try h.close()
        }

        func remove() { try? FileManager.default.removeItem(atPath: dir) }
    }

    /// Runs Tests/e2e/boot.sh; returns its exit status and its output.
    static func boot(_ arguments: [String]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [root.appendingPathComponent("Tests/e2e/boot.sh").path] + arguments
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    @Test func writeReadVerifyAndHostCheck() throws {
        let w = try Workspace(imageSize: 128 << 20)
        defer { w.remove() }
        let dp = try Instance(["--disk", w.image, "--socket", w.socket, "--num-queues", "2"], log: w.dir + "/dpctl.log")
        let result = try Self.boot(["--socket", w.socket, "--workload", "write-verify", "--log", w.dir + "/guest.log",
                                    "--verify-image", w.image, "--timeout", "300"])
        let status = dp.terminate()
        #expect(result.status == 0, "boot.sh: \(result.output)\nguest: \(guestTail(w))\ndpctl: \(dp.log)")
        #expect(status == 0, "dpctl exit: \(dp.log)")
        #expect(dp.log.contains("queue 0 started"))
        #expect(dp.log.contains("stopped"))
    }

    /// Large O_DIRECT writes and reads as a user's `dd bs=1M` makes them: a
    /// Linux guest sends requests of as many segments as seg_max allows, in
    /// indirect tables of seg_max + 2 = 130 entries on QEMU's default
    /// 128-entry ring (these were refused once, and the guest, reading a
    /// status byte nobody wrote, believed its writes done). Several boots:
    /// where the guest's pages land, and so the segment count, varies.
    /// Packed: the device with packed=on; the guest's features (bit 34) and
    /// dpctl's log both say the ring is packed.
    @Test(arguments: [(nil, false), (64, false), (nil, true)] as [(Int?, Bool)])
    func largeDirectIOReachesTheImage(queueSize: Int?, packed: Bool) throws {
        let w = try Workspace(imageSize: 64 << 20)
        defer { w.remove() }
        let dp = try Instance(["--disk", w.image, "--socket", w.socket, "--num-queues", "1"], log: w.dir + "/dpctl.log")
        let boots = queueSize == nil ? 3 : 1
        for boot in 0..<boots {
            var args = ["--socket", w.socket, "--workload", "dio-large", "--log", w.dir + "/guest\(boot).log",
                        "--verify-image", w.image, "--timeout", "300"]
            if let queueSize { args += ["--queue-size", String(queueSize)] }
            if packed { args.append("--packed") }
            let result = try Self.boot(args)
            let guest = (try? String(contentsOfFile: w.dir + "/guest\(boot).log", encoding: .utf8)) ?? ""
            #expect(result.status == 0, "boot \(boot): \(result.output)\nguest: \(guest.suffix(3000))\ndpctl: \(dp.log)")
            #expect(guest.contains("max_segments=128"), "guest: \(guest.suffix(2000))")
            #expect(guest.contains(packed ? "ring=packed" : "ring=split"), "guest: \(guest.suffix(2000))")
        }
        // The guest really sent requests of seg_max segments: 130 iovecs
        // (header and status besides), more than a 64-entry ring holds.
        let disk = try #require(Self.controlStats(w.socket + ".ctl")?["disks"] as? [[String: Any]]).first
        #expect(disk?["longestChain"] as? Int == 130, "\(disk ?? [:])")
        _ = dp.terminate()
        #expect(!dp.log.contains("broken"), "dpctl: \(dp.log)")
        #expect(dp.log.contains("packed ring") == packed, "dpctl: \(dp.log)")
    }

    @Test func twoQueuesOnTwoIOThreads() throws {
        let w = try Workspace(imageSize: 128 << 20)
        defer { w.remove() }
        let dp = try Instance(["--iothreads", "2", "--cpuset", "0-1", "--disk", w.image, "--socket", w.socket, "--num-queues", "2"],
                              log: w.dir + "/dpctl.log")
        let result = try Self.boot(["--socket", w.socket, "--workload", "mq", "--queues", "2", "--log", w.dir + "/guest.log",
                                    "--verify-image", w.image, "--timeout", "300"])
        _ = dp.terminate()
        #expect(result.status == 0, "boot.sh: \(result.output)\nguest: \(guestTail(w))\ndpctl: \(dp.log)")
        #expect(dp.log.contains("queue 0 started") && dp.log.contains("iothread0"))
        #expect(dp.log.contains("queue 1 started") && dp.log.contains("iothread1"))
    }

    /// Packed: QEMU keeps no packed ring position of its own and, after the
    /// kill, sends the base from its last GET_VRING_BASE: the new dpctl takes
    /// the ring's place from the inflight region.
    @Test(arguments: [false, true])
    func guestSurvivesBackendKillAndRestart(packed: Bool) throws {
        let w = try Workspace(imageSize: 128 << 20)
        let args = ["--disk", w.image, "--socket", w.socket, "--num-queues", "1"]
        var dp = try Instance(args, log: w.dir + "/dpctl.log")
        let boot = Process()
        boot.executableURL = URL(fileURLWithPath: "/bin/bash")
        boot.arguments = [Self.root.appendingPathComponent("Tests/e2e/boot.sh").path, "--socket", w.socket,
                          "--workload", "long-io", "--seconds", "20", "--reconnect", "--log", w.dir + "/guest.log",
                          "--timeout", "300"] + (packed ? ["--packed"] : [])
        let out = Pipe()
        boot.standardOutput = out
        boot.standardError = out
        try boot.run()
        // Wait until the guest is doing I/O, then kill dpctl mid-flight and start a new one.
        let deadline = Date().addingTimeInterval(240)
        while !guestTail(w).contains("E2E-PROGRESS") && Date() < deadline && boot.isRunning { usleep(200_000) }
        sleep(2)
        dp.kill9()
        let firstLog = dp.log
        usleep(500_000)
        dp = try Instance(args, log: w.dir + "/dpctl2.log")
        let output = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        boot.waitUntilExit()
        _ = dp.terminate()
        #expect(boot.terminationStatus == 0, "boot.sh: \(output)\nguest: \(guestTail(w))\nfirst dpctl: \(firstLog)\nsecond: \(dp.log)\nkept in \(w.dir)")
        #expect(dp.log.contains("frontend connected"), "QEMU reconnected to the new dpctl: \(dp.log)")
        #expect(dp.log.contains("packed ring") == packed, "\(dp.log)")
        #expect(guestTail(w).contains(packed ? "ring=packed" : "ring=split"), "\(guestTail(w))")
        if boot.terminationStatus == 0 { w.remove() }
    }

    /// The "stats" answer of a running dpctl's control socket, as JSON: its
    /// snapshot (counters per disk survive the guest's disconnect).
    static func controlStats(_ control: String) throws -> [String: Any]? {
        let fd = dps_unix_connect(control)
        guard fd >= 0 else { throw TestFailure("connect \(control): \(fd)") }
        defer { close(fd) }
        let request = Array("{\"command\":\"stats\"}\n".utf8)
        guard request.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == request.count else { return nil }
        var reply: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while reply.last != UInt8(ascii: "\n") {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            reply += buffer[0..<n]
        }
        let object = try JSONSerialization.jsonObject(with: Data(reply)) as? [String: Any]
        return object?["snapshot"] as? [String: Any]
    }

    func guestTail(_ w: Workspace) -> String {
        let text = (try? String(contentsOfFile: w.dir + "/guest.log", encoding: .utf8)) ?? ""
        return String(text.suffix(3000))
    }
}

