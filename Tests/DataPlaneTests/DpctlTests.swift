import CDataPlaneSys
import CGuestDriver
import CVhostFrontend
import Foundation
import Testing

/// dpctl's verbs, run as a user would, against a null-backend instance.
@Suite(.serialized) struct DpctlTests {
    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
        /// It was still running at its deadline and was killed.
        var timedOut = false
    }

    static func dpctl(_ arguments: [String]) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: QEMUEndToEndTests.dpctl)
        p.arguments = arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Result(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
    }

    /// Runs dpctl with its output in files and a deadline: a test of a
    /// refusal must fail, not hang, when dpctl starts serving instead.
    /// `stderr` replaces the captured standard error (a closed pipe, /dev/full).
    static func dpctl(_ arguments: [String], timeout: Double, stderr: FileHandle? = nil,
                      wrapper: [String] = [], environment: [String: String]? = nil) throws -> Result {
        let dir = NSTemporaryDirectory() + "/dp-run-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = FileManager.default.createFile(atPath: dir + "/out", contents: nil)
        _ = FileManager.default.createFile(atPath: dir + "/err", contents: nil)
        let out = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/out"))
        let err = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/err"))
        let p = Process()
        if let program = wrapper.first {
            p.executableURL = URL(fileURLWithPath: program)
            p.arguments = Array(wrapper.dropFirst()) + [QEMUEndToEndTests.dpctl] + arguments
        } else {
            p.executableURL = URL(fileURLWithPath: QEMUEndToEndTests.dpctl)
            p.arguments = arguments
        }
        p.standardOutput = out
        p.standardError = stderr ?? err
        if let environment { p.environment = environment }
        try p.run()
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        let timedOut = p.isRunning
        if timedOut { p.terminate() }
        p.waitUntilExit()
        try out.close()
        try err.close()
        return Result(status: p.terminationStatus,
                      stdout: (try? String(contentsOfFile: dir + "/out", encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOfFile: dir + "/err", encoding: .utf8)) ?? "",
                      timedOut: timedOut)
    }

    func scratch() throws -> String {
        let dir = "/tmp/dp-cli-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    @Test func everyVerbOfARunningInstance() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/a.sock"
        let image = dir + "/b.raw"
        _ = FileManager.default.createFile(atPath: image, contents: Data(count: 1 << 20))
        let start = Process()
        start.executableURL = URL(fileURLWithPath: QEMUEndToEndTests.dpctl)
        start.arguments = ["start", "--iothreads", "2", "--cpuset", "0-1", "--poll-us", "0",
                           "--disk", "nulldisk", "--backend", "null", "--null-size", "64M", "--socket", socket, "--num-queues", "2",
                           "--disk", image, "--socket", dir + "/b.sock", "--readonly"]
        let log = Pipe()
        start.standardError = log
        try start.run()
        defer { if start.isRunning { start.terminate() } }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket + ".ctl") && Date() < deadline { usleep(20_000) }

        let status = try Self.dpctl(["status", "--socket", socket])
        #expect(status.status == 0, "\(status.stderr)")
        #expect(status.stdout.contains("iothread0: CPU 0") && status.stdout.contains("iothread1: CPU 1"))
        #expect(status.stdout.contains("disk null: 64 MiB, read-write"))
        #expect(status.stdout.contains("waiting for a frontend"))
        #expect(status.stdout.contains("read-only"))

        let json = try Self.dpctl(["status", "--control", socket + ".ctl", "--json"])
        let parsed = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any]
        #expect((parsed?["disks"] as? [Any])?.count == 2)

        let stats = try Self.dpctl(["stats", "--socket", socket, "--interval", "0.2", "--json"])
        #expect(stats.status == 0, "\(stats.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(stats.stdout.utf8)) as? [String: Any]
        #expect((report?["threads"] as? [Any])?.count == 2)
        let table = try Self.dpctl(["stats", "--socket", socket, "--interval", "0.2"])
        #expect(table.stdout.contains("IOTHREAD") && table.stdout.contains("p99 us"))

        let resume = try Self.dpctl(["resume", "--socket", socket])
        #expect(resume.status == 0 && resume.stdout.contains("disk null"), "\(resume.stderr)")

        let stop = try Self.dpctl(["stop", "--socket", socket])
        #expect(stop.status == 0, "\(stop.stderr)")
        start.waitUntilExit()
        #expect(start.terminationStatus == 0)
        let output = String(decoding: log.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(output.contains("stop requested") && output.contains("stopped"))
        #expect(!FileManager.default.fileExists(atPath: socket))
    }

    /// A disk stopped by its error policy: `dpctl status` says so and why,
    /// and so does dpctl's log, unasked.
    @Test func aDiskStoppedOnErrorShowsInStatusAndLog() throws {
        let image = try TestImage(size: 1 << 20)
        let socket = image.directory + "/vu.sock"
        let dp = try QEMUEndToEndTests.Instance(["--disk", image.path, "--socket", socket, "--num-queues", "1",
                                                 "--werror", "stop", "--fault", "errno=EIO,ops=write,after=1"],
                                                log: image.directory + "/dpctl.log")
        defer { _ = dp.terminate() }
        let g = try TestGuest(queues: 1, queueSize: 64)
        let conn = try g.connectFrontend(socket)
        defer { vuf_close(conn) }
        let buf = g.alloc(4096)
        #expect(try g.run(type: UInt32(GD_BLK_T_OUT), segments: [(buf, 4096)]).status == 0) // the first gets through
        let held = try g.submit(type: UInt32(GD_BLK_T_OUT), segments: [(buf, 4096)])
        func waitForLog(_ text: String) {
            let deadline = Date().addingTimeInterval(10)
            while !dp.log.contains(text) && Date() < deadline { usleep(50_000) }
        }
        waitForLog("stopped on error")
        #expect(dp.log.contains("\(image.path) queue 0: stopped on error: Input/output error; fix the cause, then 'dpctl resume' (1 request(s) held)"),
                "\(dp.log)")
        let status = try Self.dpctl(["status", "--socket", socket])
        #expect(status.stdout.contains("STOPPED on error: Input/output error, 1 request(s) held"), "\(status.stdout)")
        #expect(status.status == 3, "status is a health check: a queue stopped on error exits 3")
        #expect(try Self.dpctl(["status", "--socket", socket, "--json"]).status == 3)
        // Resumed with the fault still there (every write after the first
        // fails), the write is held again.
        #expect(try Self.dpctl(["resume", "--socket", socket]).status == 0)
        #expect((try? g.complete(timeout: 0.5)) == nil)
        #expect(try Self.dpctl(["status", "--socket", socket]).stdout.contains("1 request(s) held"))
        // The guest's request is answered when the queue stops: nothing is lost.
        #expect(dp.terminate() == 0)
        let done = try g.complete()
        #expect(done.head == held && done.status == UInt8(GD_BLK_S_IOERR))
    }

    /// A guest that corrupts its ring breaks the queue: `dpctl status` says
    /// so and exits 3; it exited 0 before anything was wrong.
    @Test func aBrokenQueueMakesStatusExit3() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/vu.sock"
        let dp = try QEMUEndToEndTests.Instance(["--disk", "x", "--backend", "null", "--null-size", "16M", "--socket", socket,
                                                 "--num-queues", "2"], log: dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        let g = try TestGuest(queues: 2, queueSize: 64)
        let conn = try g.connectFrontend(socket)
        defer { vuf_close(conn) }
        #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0)
        let healthy = try Self.dpctl(["status", "--socket", socket])
        #expect(healthy.status == 0 && healthy.stdout.contains("queue 0 on iothread0: running"), "\(healthy.stdout)")
        gd_set_avail_idx(g.driver, 0, UInt16(g.queueSize + 5))
        gd_kick(g.driver, 0)
        let deadline = Date().addingTimeInterval(10)
        var status = try Self.dpctl(["status", "--socket", socket])
        while !status.stdout.contains("BROKEN") && Date() < deadline {
            usleep(50_000)
            status = try Self.dpctl(["status", "--socket", socket])
        }
        #expect(status.stdout.contains("queue 0 on iothread0: BROKEN"), "\(status.stdout)")
        #expect(status.status == 3, "\(status.stdout)")
        #expect(try Self.dpctl(["status", "--socket", socket, "--json"]).status == 3)
    }

    /// A failed flush of the page cache (--no-direct; a loop device over a
    /// tmpfs too small for what was written) shows in status, which then
    /// exits 3, and in the log; it stays so after space is freed.
    @Test func aFailedFlushShowsInStatusAndLog() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fs = try TmpfsMount(size: "4m")
        let backing = fs.path + "/backing.raw"
        #expect(FileManager.default.createFile(atPath: backing, contents: nil) && truncate(backing, 32 << 20) == 0)
        let loop = try LoopDevice(backing: backing)
        let socket = dir + "/vu.sock"
        let dp = try QEMUEndToEndTests.Instance(["--disk", loop.path, "--no-direct", "--werror", "report", "--socket", socket,
                                                 "--num-queues", "1", "--locking", "off"], log: dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        let g = try TestGuest(queues: 1, queueSize: 64)
        let conn = try g.connectFrontend(socket)
        defer { vuf_close(conn) }
        let buf = g.alloc(65536)
        for i in 0..<128 { // 8 MiB into the page cache: twice the room behind it
            #expect(try g.run(type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * 128), segments: [(buf, 65536)]).status == 0)
        }
        #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == UInt8(GD_BLK_S_IOERR))
        try fs.resize("64m")
        #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == UInt8(GD_BLK_S_IOERR))
        let status = try Self.dpctl(["status", "--socket", socket])
        #expect(status.status == 3 && status.stdout.contains("FLUSH FAILED"), "\(status.stdout)")
        let deadline = Date().addingTimeInterval(5)
        while !dp.log.contains("FLUSH FAILED") && Date() < deadline { usleep(50_000) }
        #expect(dp.log.contains("FLUSH FAILED"), "\(dp.log)")
    }

    @Test func guestConfigurationSnippets() throws {
        let q = try Self.dpctl(["qemu-args", "--socket", "/run/x.sock", "--num-queues", "4", "--memory", "2G", "--qemu-version", "7.2"])
        #expect(q.status == 0)
        #expect(q.stdout.contains("memory-backend-memfd,id=mem,size=2G,share=on"))
        #expect(q.stdout.contains("-chardev socket,id=dp0,path=/run/x.sock,reconnect=1"))
        #expect(q.stdout.contains("vhost-user-blk-pci,chardev=dp0,num-queues=4"))
        let x = try Self.dpctl(["libvirt-xml", "--socket", "/run/x.sock"])
        #expect(x.stdout.contains("<disk type='vhostuser' device='disk'>") && x.stdout.contains("path='/run/x.sock'"))
        #expect(x.stdout.contains("<access mode='shared'/>"))
    }

    @Test func everyCommandHasHelp() throws {
        for verb in ["start", "status", "stats", "resume", "stop", "qemu-args", "libvirt-xml"] {
            let r = try Self.dpctl([verb, "--help"])
            #expect(r.status == 0 && r.stdout.contains("USAGE: dpctl ") && r.stdout.contains("dpctl \(verb) "), "\(verb)")
        }
        #expect(try Self.dpctl(["--help"]).stdout.contains("SUBCOMMANDS:"))
    }

    @Test(arguments: [
        (["start", "--disk", "/nonexistent/x.raw", "--socket", "/tmp/x.sock"], "cannot open image"),
        (["start", "--cpuset", "4000", "--disk", "x", "--backend", "null", "--socket", "/tmp/x.sock"], "not online"),
        (["start", "--disk", "x", "--backend", "null"], "has no socket"),
        (["start", "--readonly"], "must follow a --disk"),
        (["start", "--config", "/tmp/c.json", "--disk", "x", "--socket", "/tmp/y.sock"], "conflict"),
        (["start", "--disk", "x", "--backend", "null", "--socket", "/tmp/x.sock", "--num-queues", "65"], "not a number in 1...64"),
        (["start", "--disk", "x", "--backend", "null", "--socket", "/tmp/x.sock", "--queue-size", "300"], "not a power of two"),
        (["start", "--iothreads", "1", "--disk", "a", "--backend", "null", "--socket", "/tmp/a.sock", "--num-queues", "64",
          "--disk", "b", "--backend", "null", "--socket", "/tmp/b.sock", "--num-queues", "64",
          "--disk", "c", "--backend", "null", "--socket", "/tmp/c.sock", "--num-queues", "64",
          "--disk", "d", "--backend", "null", "--socket", "/tmp/d.sock", "--num-queues", "64",
          "--disk", "e", "--backend", "null", "--socket", "/tmp/e.sock", "--num-queues", "64"], "more than 1 IOThread"),
        (["status", "--socket", "/tmp/nothing-here.sock"], "no dpctl is running there"),
        (["frobnicate"], "unknown command"),
        (["start", "--disk", "x", "--backend", "null", "--socket", "/tmp/x.sock", "--werror", "panic"], "use report, ignore, enospc or stop"),
        (["start", "--disk", "x", "--backend", "null", "--socket", "/tmp/x.sock", "--fault", "errno=EWHAT"], "use EIO, ENOSPC or a number"),
        (["start", "--disk", "x", "--backend", "null", "--socket", "/tmp/x.sock", "--null-read-zeroes", "maybe"], "use on or off"),
    ] as [([String], String)])
    func badInputGetsAOneLineError(arguments: [String], message: String) throws {
        let r = try Self.dpctl(arguments)
        #expect(r.status != 0)
        #expect(r.stderr.contains(message), "\(arguments): \(r.stderr)")
        #expect(r.stderr.split(separator: "\n").count == 1, "one line: \(r.stderr)")
    }

    /// --control (or --socket) naming something that is not a socket is
    /// refused, and the file is left as it was: dpctl used to unlink it.
    @Test(arguments: ["--control", "--socket"])
    func aPathThatIsNotASocketIsRefusedAndKept(option: String) throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let precious = dir + "/precious.txt"
        let contents = Data("someone's notes\n".utf8)
        #expect(FileManager.default.createFile(atPath: precious, contents: contents))
        let socket = option == "--socket" ? precious : dir + "/a.sock"
        let control = option == "--control" ? precious : dir + "/a.ctl"
        let r = try Self.dpctl(["start", "--disk", "x", "--backend", "null", "--socket", socket, "--control", control],
                               timeout: 10)
        #expect(!r.timedOut, "dpctl started serving over \(precious)")
        #expect(r.status == 1, "\(r.stderr)")
        #expect(r.stderr.contains("\(precious.debugDescription): it is a regular file, not a socket; it was left as it is"),
                "\(r.stderr)")
        #expect(FileManager.default.contents(atPath: precious) == contents)
    }

    /// Waits until `path` exists; false at the deadline.
    static func waitFor(_ path: String, seconds: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while !FileManager.default.fileExists(atPath: path) {
            if Date() > deadline { return false }
            usleep(20_000)
        }
        return true
    }

    /// Sends a raw request line on a control socket and returns the fd, reply unread.
    static func sendWithoutReading(_ control: String, _ command: String) throws -> Int32 {
        let fd = dps_unix_connect(control)
        guard fd >= 0 else { throw TestFailure("connect \(control): \(fd)") }
        let line = Array("{\"command\":\"\(command)\"}\n".utf8)
        guard line.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == line.count else {
            close(fd)
            throw TestFailure("send to \(control)")
        }
        return fd
    }

    /// Control clients that hang up before their reply, or never read it,
    /// cost the instance nothing: no SIGPIPE, and the control thread gives up
    /// on a reader that stalls and serves the next client. The reply (stats
    /// of 40 disks with 3.8 KB paths) is larger than a socket buffer.
    @Test func controlClientsThatDoNotReadTheirReplyCostNothing() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = dir + "/img.raw"
        _ = FileManager.default.createFile(atPath: image, contents: Data(count: 1 << 20))
        var arguments = ["--control", dir + "/c.ctl"]
        for i in 0..<40 {
            let longPath = dir + "/" + String(repeating: "./", count: 1900 + i) + "img.raw"
            arguments += ["--disk", longPath, "--socket", dir + "/s\(i)", "--num-queues", "1", "--readonly", "--no-direct"]
        }
        let dp = try QEMUEndToEndTests.Instance(arguments, log: dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        #expect(Self.waitFor(dir + "/c.ctl"), "\(dp.log.suffix(2000))")

        // Hangs up at once: the reply is written to a closed socket.
        for command in ["stats", "status", "stats"] {
            close(try Self.sendWithoutReading(dir + "/c.ctl", command))
        }
        usleep(300_000)
        #expect(dp.process.isRunning, "a client that hung up killed dpctl: \(dp.log.suffix(2000))")

        // Stays connected and never reads: the reply fills the socket buffer.
        let stalled = try Self.sendWithoutReading(dir + "/c.ctl", "stats")
        defer { close(stalled) }
        let next = try Self.dpctl(["status", "--control", dir + "/c.ctl"], timeout: 20)
        #expect(!next.timedOut && next.status == 0, "the control thread stayed stuck on a client that does not read: \(next.stderr)")
        #expect(dp.log.contains("a control client did not take its"), "\(dp.log.suffix(2000))")
        #expect(dp.process.isRunning)
    }

    /// Logging to a standard error that fails (a pipe nobody reads any more,
    /// a full device) loses log lines, not the instance.
    @Test(arguments: ["closed pipe", "/dev/full"])
    func startKeepsServingWhenItsStandardErrorFails(stderr kind: String) throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let control = dir + "/c.ctl"
        let start = Process()
        start.executableURL = URL(fileURLWithPath: QEMUEndToEndTests.dpctl)
        start.arguments = ["start", "--disk", "x", "--backend", "null", "--socket", dir + "/a.sock", "--control", control]
        let sink: FileHandle
        if kind == "/dev/full" {
            sink = try #require(FileHandle(forWritingAtPath: "/dev/full"))
        } else {
            let pipe = Pipe()
            try pipe.fileHandleForReading.close()
            sink = pipe.fileHandleForWriting
        }
        start.standardError = sink
        try start.run()
        try sink.close()
        defer { if start.isRunning { start.terminate() } }
        #expect(Self.waitFor(control))
        // Each of these logs a line as well.
        #expect(try Self.dpctl(["resume", "--control", control], timeout: 10).status == 0)
        let status = try Self.dpctl(["status", "--control", control], timeout: 10)
        #expect(status.status == 0 && status.stdout.contains("disk null"), "\(status.stderr)")
        #expect(start.isRunning, "dpctl died writing to a failing standard error")
        #expect(try Self.dpctl(["stop", "--control", control], timeout: 20).status == 0)
        start.waitUntilExit()
        #expect(start.terminationReason == .exit && start.terminationStatus == 0)
    }

    /// Whether the process has exited: gone, or a zombie its parent has not reaped.
    static func hasExited(_ pid: Int32) -> Bool {
        if kill(pid, 0) != 0 { return errno == ESRCH }
        let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
        guard let close = stat.lastIndex(of: ")") else { return true }
        let state = stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first
        return state == "Z" || state == "X"
    }

    /// `dpctl stop` returns once the instance has exited, so a new one can
    /// take the same sockets at once; it used to return when the control
    /// socket went, at the start of the drain, and the next start found the
    /// disk socket still served. Each round has a frontend connected (the
    /// drain resets a device) and, before the stop, fills the instance's
    /// log pipe: each line of the drain then waits out its 250 ms before it
    /// is dropped, so the drain takes long enough that returning early is
    /// seen every time, not one run in ten.
    @Test func stopThenStartOnTheSameSocketsWorksEveryTime() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/disk.sock", control = dir + "/ctl"
        for round in 0..<10 {
            var ends: [Int32] = [-1, -1]
            #expect(pipe(&ends) == 0)
            ends.forEach { _ = fcntl($0, F_SETFD, FD_CLOEXEC) }
            defer { ends.forEach { close($0) } }
            let start = Process()
            start.executableURL = URL(fileURLWithPath: QEMUEndToEndTests.dpctl)
            start.arguments = ["start", "--disk", "x", "--backend", "null", "--null-size", "16M", "--socket", socket,
                               "--num-queues", "2", "--control", control]
            start.standardError = FileHandle(fileDescriptor: ends[1], closeOnDealloc: false)
            try start.run()
            defer { if start.isRunning { start.terminate(); start.waitUntilExit() } }
            #expect(Self.waitFor(control), "round \(round): no control socket")
            let g = try TestGuest(queues: 2, queueSize: 64)
            let conn = try g.connectFrontend(socket)
            defer { vuf_close(conn) }
            #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0, "round \(round)")
            // A writer of our own (O_NONBLOCK on its own open file) fills the pipe.
            let filler = open("/proc/self/fd/\(ends[1])", O_WRONLY | O_NONBLOCK | O_CLOEXEC)
            #expect(filler >= 0)
            let block = [UInt8](repeating: UInt8(ascii: "."), count: 4096)
            while block.withUnsafeBytes({ write(filler, $0.baseAddress, $0.count) }) > 0 {}
            close(filler)
            let stop = try Self.dpctl(["stop", "--control", control], timeout: 30)
            #expect(stop.status == 0, "round \(round): \(stop.stderr)")
            let exited = Self.hasExited(start.processIdentifier)
            #expect(exited, "round \(round): dpctl stop returned while the instance still ran")
            if !exited || stop.status != 0 { break }
        }
    }

    /// `dpctl stats --json` started in the background; `finish()` waits for
    /// it and returns the parsed report.
    final class BackgroundStats {
        let process = Process()
        let output: String

        init(control: String, interval: Double, in dir: String) throws {
            output = dir + "/stats-\(UUID().uuidString.prefix(6)).json"
            _ = FileManager.default.createFile(atPath: output, contents: nil)
            process.executableURL = URL(fileURLWithPath: QEMUEndToEndTests.dpctl)
            process.arguments = ["stats", "--control", control, "--interval", "\(interval)", "--json"]
            process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
            process.standardError = FileHandle.nullDevice
            try process.run()
        }

        func finish() throws -> [String: Any] {
            process.waitUntilExit()
            let data = FileManager.default.contents(atPath: output) ?? Data()
            guard process.terminationStatus == 0, let report = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw TestFailure("dpctl stats exited \(process.terminationStatus): \(String(decoding: data, as: UTF8.self))")
            }
            return report
        }

        /// Every rate of every row, named.
        static func rates(_ report: [String: Any]) -> [(String, Double)] {
            var all: [(String, Double)] = []
            for table in ["threads", "disks", "queues"] {
                for row in report[table] as? [[String: Any]] ?? [] {
                    for key in ["iops", "readMBps", "writeMBps", "cpuPercent", "wakeupsPerSecond", "pollHitsPerSecond"] {
                        if let v = row[key] as? Double { all.append(("\(table) \(row["name"] ?? "?") \(key)", v)) }
                    }
                }
            }
            return all
        }
    }

    /// A frontend that reconnects (every ring restarts) during a `dpctl stats`
    /// interval: the disk's rate counts exactly the requests of the interval.
    /// Its counters used to start from zero again with the new rings.
    @Test func statsCountEveryRequestOnceAcrossAReconnect() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/vu.sock", control = dir + "/ctl"
        let dp = try QEMUEndToEndTests.Instance(["--disk", "x", "--backend", "null", "--null-size", "16M", "--socket", socket,
                                                 "--num-queues", "1", "--control", control], log: dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        let first = try TestGuest(queues: 1, queueSize: 64)
        let before = try first.connectFrontend(socket)
        for _ in 0..<20 { #expect(try first.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0) }
        let stats = try BackgroundStats(control: control, interval: 2, in: dir)
        usleep(400_000)
        vuf_close(before)
        let second = try TestGuest(queues: 1, queueSize: 64)
        let after = try second.connectFrontend(socket)
        defer { vuf_close(after) }
        for _ in 0..<5 { #expect(try second.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0) }
        let report = try stats.finish()
        let seconds = try #require(report["seconds"] as? Double)
        let disk = try #require((report["disks"] as? [[String: Any]])?.first)
        let served = (disk["iops"] as? Double ?? -1) * seconds
        #expect(abs(served - 5) < 0.01, "the interval saw 5 requests; stats say \(served): \(report)")
    }

    /// `dpctl stats --watch` across a restart of the instance (the second
    /// sample comes from a new process with smaller counters): no rate is
    /// negative or astronomical.
    @Test func statsAcrossAnInstanceRestartShowNoHugeRates() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/vu.sock", control = dir + "/ctl"
        let arguments = ["--disk", "x", "--backend", "null", "--null-size", "16M", "--socket", socket, "--num-queues", "1",
                         "--control", control]
        let first = try QEMUEndToEndTests.Instance(arguments, log: dir + "/first.log")
        defer { _ = first.terminate() }
        let g = try TestGuest(queues: 1, queueSize: 64)
        let conn = try g.connectFrontend(socket)
        for _ in 0..<50 { #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0) }
        let stats = try BackgroundStats(control: control, interval: 3, in: dir)
        usleep(400_000)
        #expect(try Self.dpctl(["stop", "--control", control], timeout: 20).status == 0)
        vuf_close(conn)
        let second = try QEMUEndToEndTests.Instance(arguments, log: dir + "/second.log")
        defer { _ = second.terminate() }
        #expect(Self.waitFor(control))
        let report = try stats.finish()
        let rates = BackgroundStats.rates(report)
        #expect(rates.count >= 4, "\(report)")
        for (name, value) in rates {
            #expect(value >= 0 && value < 1e9, "\(name) = \(value)")
        }
    }

    static let twoCPUs = ProcessInfo.processInfo.activeProcessorCount > 1

    /// Under `taskset -c 1` (as under systemd's AllowedCPUs= or a container's
    /// cpuset) the default cpuset is CPU 1: it used to be every online CPU,
    /// and the IOThread went to CPU 0, where the process may not run.
    @Test(.enabled(if: twoCPUs)) func theDefaultCPUSetIsWhatTheProcessMayRunOn() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let control = dir + "/ctl"
        let start = Process()
        start.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
        start.arguments = ["-c", "1", QEMUEndToEndTests.dpctl, "start", "--disk", "x", "--backend", "null",
                           "--socket", dir + "/a.sock", "--control", control]
        _ = FileManager.default.createFile(atPath: dir + "/log", contents: nil)
        start.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/log"))
        try start.run()
        defer { if start.isRunning { start.terminate(); start.waitUntilExit() } }
        #expect(Self.waitFor(control))
        let status = try Self.dpctl(["status", "--control", control], timeout: 10)
        #expect(status.stdout.contains("iothread0: CPU 1,"), "\(status.stdout)")
        let log = (try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? ""
        #expect(log.contains("iothread0: CPU 1,"), "\(log)")
    }

    @Test(.enabled(if: twoCPUs)) func aCPUSetOutsideTheAllowedCPUsIsRefusedNamingThem() throws {
        let r = try Self.dpctl(["start", "--cpuset", "0-1", "--disk", "x", "--backend", "null", "--socket", "/tmp/dp-never.sock"],
                               timeout: 10, wrapper: ["/usr/bin/taskset", "-c", "1"])
        #expect(!r.timedOut && r.status == 1)
        #expect(r.stderr == "dpctl: error: --cpuset: CPU 0 is outside the CPUs this process may run on (1); taskset, "
            + "systemd's AllowedCPUs=/CPUAffinity= or the container's cpuset set those\n", "\(r.stderr)")
    }

    @Test func moreIOThreadsThanCPUsIsLoggedAsAWarning() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let dp = try QEMUEndToEndTests.Instance(["--iothreads", "3", "--cpuset", "0", "--disk", "x", "--backend", "null",
                                                 "--socket", dir + "/a.sock"], log: dir + "/log")
        defer { _ = dp.terminate() }
        #expect(Self.waitFor(dir + "/a.sock.ctl"))
        let deadline = Date().addingTimeInterval(5)
        while !dp.log.contains("ready") && Date() < deadline { usleep(20_000) }
        #expect(dp.log.contains("warning: 3 IOThreads on 1 CPU(s) (0): IOThreads take the CPUs round-robin"), "\(dp.log)")
    }

    @Test func socketPathInUse() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/busy.sock"
        let first = Process()
        first.executableURL = URL(fileURLWithPath: QEMUEndToEndTests.dpctl)
        first.arguments = ["start", "--disk", "x", "--backend", "null", "--socket", socket, "--control", dir + "/1.ctl"]
        first.standardError = Pipe()
        try first.run()
        defer { first.terminate(); first.waitUntilExit() }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: dir + "/1.ctl") && Date() < deadline { usleep(20_000) }
        let second = try Self.dpctl(["start", "--disk", "y", "--backend", "null", "--socket", socket, "--control", dir + "/2.ctl"])
        #expect(second.status == 1)
        #expect(second.stderr.contains("another process serves it"), "\(second.stderr)")
    }
}
