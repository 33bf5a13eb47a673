import CGuestDriver
import CVhostFrontend
import Foundation
import Testing

/// `dpctl top` in a real terminal (a tmux pane), and as plain lines in a pipe.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct DpctlTopTests {
    /// Runs tmux with its own server socket, so tests never touch a user's sessions.
    struct Tmux {
        let socket: String
        let session = "top"

        @discardableResult
        func run(_ arguments: [String]) throws -> (status: Int32, output: String) {
            // posix_spawn and waitpid, not Process: the server that
            // new-session forks keeps what the client inherited, and
            // Foundation's Process then never sees the client end.
            let out = socket + ".out"
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
            let argv = ["tmux", "-S", socket] + arguments
            let cargs = argv.map { strdup($0) }
            defer { cargs.forEach { free($0) } }
            var pid: pid_t = 0
            let rc = posix_spawnp(&pid, "tmux", &actions, nil, cargs + [nil], environ)
            guard rc == 0 else { throw TestFailure("posix_spawnp tmux: \(rc)") }
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            let exit = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
            return (exit, (try? String(contentsOfFile: out, encoding: .utf8)) ?? "")
        }

        func capture() throws -> String { try run(["capture-pane", "-p", "-t", session]).output }
        var alive: Bool { (try? run(["has-session", "-t", session]).status) == 0 }
    }

    /// A dpctl serving a null disk (named "null" in statistics), and a guest
    /// reading from it on a thread until stopped.
    final class Load: @unchecked Sendable {
        let dir = "/tmp/dp-top-" + UUID().uuidString.prefix(8)
        var socket: String { dir + "/vu.sock" }
        let instance: QEMUEndToEndTests.Instance
        let guest: TestGuest
        let conn: OpaquePointer
        private let lock = NSLock()
        private var stopRequested = false
        private var finished = false
        private(set) var reads = 0

        init() throws {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            instance = try QEMUEndToEndTests.Instance(
                ["--disk", "path=null0,backend=null,null-size=64M,socket=\(dir)/vu.sock,num-queues=1"],
                log: dir + "/dpctl.log")
            guest = try TestGuest(queues: 1, queueSize: 64)
            conn = try guest.connectFrontend(dir + "/vu.sock")
            let buf = guest.alloc(4096)
            Thread.detachNewThread { [self] in
                while !lock.withLock({ stopRequested }) {
                    if (try? guest.run(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(buf, 4096)])) == nil { break }
                    lock.withLock { reads += 1 }
                    usleep(500) // about 2k IOPS: enough to see, little CPU
                }
                lock.withLock { finished = true }
            }
        }

        func stop() {
            lock.withLock { stopRequested = true }
            while !lock.withLock({ finished }) { usleep(1000) }
            vuf_close(conn)
            _ = instance.terminate()
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    /// The figure in the IOPS column of a line starting with `prefix`.
    static func iops(_ screen: String, line prefix: String) -> Double? {
        guard let line = screen.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }) else { return nil }
        let fields = line.split(separator: " ")
        // name, state, IOPS, ...: the first field that parses as a count.
        for f in fields.dropFirst() {
            var s = String(f)
            var scale = 1.0
            if s.hasSuffix("k") { scale = 1e3; s.removeLast() } else if s.hasSuffix("M") { scale = 1e6; s.removeLast() }
            if let v = Double(s) { return v * scale }
        }
        return nil
    }

    @Test func liveViewInATerminalMovesAndAnswersKeys() throws {
        let load = try Load()
        defer { load.stop() }
        let tmux = Tmux(socket: load.dir + "/tmux.sock")
        defer { _ = try? tmux.run(["kill-server"]) }
        try tmux.run(["new-session", "-d", "-s", tmux.session, "-x", "120", "-y", "30",
                      "\(QEMUEndToEndTests.dpctl) top --socket \(load.socket) --interval 0.3; sleep 30"])
        // Two refreshes with I/O going on: the disk's and the queue's IOPS show it.
        var screen = ""
        let deadline = Date().addingTimeInterval(10)
        var seen: [Double] = []
        while Date() < deadline && seen.count < 2 {
            usleep(400_000)
            screen = try tmux.capture()
            if let v = Self.iops(screen, line: "null "), v > 0, seen.last != v { seen.append(v) }
        }
        #expect(seen.count == 2, "the IOPS figure did not move:\n\(screen)")
        #expect(screen.contains("IOTHREAD") && screen.contains("DISK / QUEUE"), "\(screen)")
        #expect(screen.contains("sorted by iops"))
        #expect(screen.split(separator: "\n").contains { $0.hasPrefix("  q0 ") && $0.contains("running") }, "\(screen)")
        #expect(!screen.contains("\u{1B}"), "escape sequences leaked into the pane")

        // A key re-sorts at once.
        try tmux.run(["send-keys", "-t", tmux.session, "n"])
        let sortDeadline = Date().addingTimeInterval(3)
        repeat {
            usleep(100_000)
            screen = try tmux.capture()
        } while !screen.contains("sorted by name") && Date() < sortDeadline
        #expect(screen.contains("sorted by name"), "\(screen)")

        // q leaves top, and the terminal is back to normal (the shell's sleep runs in it).
        try tmux.run(["send-keys", "-t", tmux.session, "q"])
        let quitDeadline = Date().addingTimeInterval(3)
        repeat {
            usleep(100_000)
            screen = try tmux.capture()
        } while screen.contains("DISK / QUEUE") && Date() < quitDeadline
        #expect(!screen.contains("DISK / QUEUE"), "top did not leave the alternate screen:\n\(screen)")
        #expect(tmux.alive, "the pane's shell should still run after top exits")
    }

    @Test func plainLinesWhenNotATerminal() throws {
        let load = try Load()
        defer { load.stop() }
        let result = try DpctlTests.dpctl(["top", "--socket", load.socket, "--interval", "0.2", "--iterations", "3"],
                                          timeout: 20)
        #expect(result.status == 0, "\(result.stderr)")
        #expect(!result.stdout.contains("\u{1B}"))
        let blocks = result.stdout.components(separatedBy: "dpctl top - pid").count - 1
        #expect(blocks == 3, "\(result.stdout)")
        #expect((Self.iops(result.stdout, line: "null ") ?? 0) > 0, "\(result.stdout)")
    }

    @Test func badIntervalIsAUsageError() throws {
        let result = try DpctlTests.dpctl(["top", "--control", "/nonexistent", "--interval", "0"], timeout: 10)
        #expect(result.status == 2)
        #expect(result.stderr.contains("--interval"))
    }
}
