import CGuestDriver
import CVhostFrontend
import Foundation
import Testing

/// dpctl's log on swift-log: --log-level filters, --log-format json writes
/// one JSON object per line, metadata names the disk, queue and frontend,
/// `trace` shows the vhost-user messages, and a stalled reader of the log
/// slows nothing.
@Suite(.serialized) struct DpctlLoggingTests {
    typealias JSON = [String: Any]

    func scratch() throws -> String {
        let dir = "/tmp/dp-log-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Runs an instance with `options`, a frontend that does one FLUSH, then
    /// stops it; returns its log.
    func serveOneRequest(_ options: [String], in dir: String) throws -> String {
        let socket = dir + "/vu.sock", control = dir + "/ctl"
        let dp = try QEMUEndToEndTests.Instance(options + ["--disk", "path=nul,backend=null,null-size=16M,socket=\(socket),num-queues=1",
                                                           "--control", control], log: dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        #expect(DpctlTests.waitFor(control), "\(dp.log)")
        do {
            let g = try TestGuest(queues: 1, queueSize: 64)
            let conn = try g.connectFrontend(socket)
            defer { vuf_close(conn) }
            #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0)
        }
        #expect(try DpctlTests.dpctl(["stop", "--control", control], timeout: 20).status == 0)
        dp.process.waitUntilExit()
        return dp.log
    }

    @Test func theLogLevelFiltersLowerLevels() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // Two IOThreads on one CPU: a warning.
        let warning = try serveOneRequest(["--iothreads", "2", "--cpuset", "0", "--log-level", "warning"], in: dir)
        #expect(warning.contains("warning: 2 IOThreads on 1 CPU(s)"), "\(warning)")
        #expect(!warning.contains("info:") && !warning.contains("serving") && !warning.contains("queue 0 started"), "\(warning)")
        let error = try serveOneRequest(["--iothreads", "2", "--cpuset", "0", "--log-level", "error"], in: dir)
        #expect(error.isEmpty, "\(error)")
        let info = try serveOneRequest([], in: dir)
        #expect(info.contains("info: serving null") && info.contains("queue 0 started") && info.contains("info: stopped"), "\(info)")
        #expect(!info.contains("VHOST_USER_"), "no message trace at info: \(info)")
        let bad = try DpctlTests.dpctl(["start", "--log-level", "loud", "--disk", "path=x,socket=/tmp/dp-never.sock"], timeout: 10)
        #expect(bad.status == 2 && bad.stderr.contains("'loud'") && bad.stderr.contains("--log-level"), "\(bad.stderr)")
    }

    /// Text lines: an ISO-8601 timestamp with milliseconds and the zone,
    /// the level, the message, then the metadata as key=value.
    @Test func textLinesCarryTimestampLevelAndMetadata() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = try serveOneRequest([], in: dir)
        let stamp = #/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (trace|debug|info|notice|warning|error|critical): /#
        let lines = log.split(separator: "\n")
        #expect(!lines.isEmpty)
        for line in lines { #expect(line.contains(stamp), "\(line)") }
        let started = try #require(lines.first { $0.contains("queue 0 started") }, "\(log)")
        #expect(started.contains(" disk=null") && started.contains(" queue=0") && started.contains(" frontend=1")
                && started.contains(" iothread=iothread0") && started.contains(" socket=\(dir)/vu.sock"), "\(started)")
        #expect(started.contains(" frontend-pid=\(getpid())"), "the frontend is this process: \(started)")
    }

    /// --log-format json: every line a JSON object with timestamp, level,
    /// message and metadata; at trace, each vhost-user message and reply.
    @Test func jsonLinesParseAndTraceShowsTheVhostUserMessages() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = try serveOneRequest(["--log-format", "json", "--log-level", "trace"], in: dir)
        var events: [JSON] = []
        for line in log.split(separator: "\n") {
            let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? JSON
            #expect(object != nil, "not a JSON object: \(line)")
            if let object { events.append(object) }
        }
        #expect(events.count > 10)
        let stamp = #/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$/#
        for e in events {
            #expect((e["timestamp"] as? String)?.wholeMatch(of: stamp) != nil, "\(e)")
            #expect(["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(e["level"] as? String ?? ""), "\(e)")
            #expect(e["message"] is String && e["metadata"] is JSON, "\(e)")
        }
        func first(_ text: String) -> JSON? { events.first { ($0["message"] as? String)?.contains(text) == true } }
        let serving = try #require(first("serving null"))
        #expect(serving["level"] as? String == "info")
        #expect((serving["metadata"] as? JSON)?["disk"] as? String == "null")
        let started = try #require(first("queue 0 started"))
        let metadata = try #require(started["metadata"] as? JSON)
        #expect(metadata["disk"] as? String == "null" && metadata["queue"] as? String == "0" && metadata["frontend"] as? String == "1")
        // The handshake, message by message, with the frontend's metadata.
        let trace = events.filter { $0["level"] as? String == "trace" }.compactMap { $0["message"] as? String }
        for request in ["VHOST_USER_GET_FEATURES", "VHOST_USER_SET_FEATURES", "VHOST_USER_SET_MEM_TABLE", "VHOST_USER_SET_VRING_NUM",
                        "VHOST_USER_SET_VRING_KICK", "VHOST_USER_SET_VRING_ENABLE"] {
            #expect(trace.contains("vhost-user \(request)"), "no trace of \(request): \(trace)")
        }
        #expect(trace.contains("vhost-user VHOST_USER_GET_FEATURES reply"), "\(trace)")
        let memTable = try #require(events.first { $0["message"] as? String == "vhost-user VHOST_USER_SET_MEM_TABLE" })
        let m = try #require(memTable["metadata"] as? JSON)
        #expect(m["fds"] as? String == "1" && m["frontend"] as? String == "1" && m["disk"] as? String == "null", "\(m)")
        #expect((m["payload"] as? String)?.isEmpty == false, "\(m)")
    }

    /// A log reader that stopped reading (a full pipe) costs a trace-level
    /// instance nothing: the handshake's messages, each logged twice, and a
    /// request go through at full speed. Each line used to wait 250 ms for
    /// room in the pipe before it was dropped.
    @Test func aStalledLogReaderSlowsNothing() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var ends: [Int32] = [-1, -1]
        #expect(pipe(&ends) == 0)
        ends.forEach { _ = fcntl($0, F_SETFD, FD_CLOEXEC) }
        defer { ends.forEach { close($0) } }
        // Full before dpctl writes a line.
        let filler = open("/proc/self/fd/\(ends[1])", O_WRONLY | O_NONBLOCK | O_CLOEXEC)
        let block = [UInt8](repeating: UInt8(ascii: "."), count: 4096)
        while block.withUnsafeBytes({ write(filler, $0.baseAddress, $0.count) }) > 0 {}
        close(filler)
        let socket = dir + "/vu.sock", control = dir + "/ctl"
        let start = Process()
        start.executableURL = URL(fileURLWithPath: QEMUEndToEndTests.dpctl)
        start.arguments = ["start", "--log-level", "trace", "--disk", "path=n,backend=null,null-size=16M,socket=\(socket),num-queues=1",
                           "--control", control]
        start.standardError = FileHandle(fileDescriptor: ends[1], closeOnDealloc: false)
        try start.run()
        defer { if start.isRunning { start.terminate(); start.waitUntilExit() } }
        #expect(DpctlTests.waitFor(control))
        let began = Date()
        do {
            let g = try TestGuest(queues: 1, queueSize: 64)
            let conn = try g.connectFrontend(socket)
            defer { vuf_close(conn) }
            #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0)
        }
        let seconds = Date().timeIntervalSince(began)
        #expect(seconds < 2, "the handshake took \(seconds) s with the log pipe full")
        let status = try DpctlTests.dpctl(["status", "--control", control], timeout: 10)
        #expect(status.status == 0 && start.isRunning)
        #expect(try DpctlTests.dpctl(["stop", "--control", control], timeout: 20).status == 0)
        start.waitUntilExit()
        #expect(start.terminationReason == .exit && start.terminationStatus == 0)
    }
}
