import CDataPlaneSys
import ArgumentParser
import DataPlane
import Foundation

struct Top: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A live view of a running instance, like top: IOThreads, disks and queues.",
        usage: "dpctl top (--control PATH | --socket PATH) [--interval SECONDS] [--sort KEY] [--iterations N] [--plain]",
        discussion: """
        Refreshes every --interval seconds (default 1) from the instance's control
        socket: per IOThread its CPU use, requests served, CPU per request,
        wake-ups and the share of passes that found work by busy-polling rather
        than after sleeping; per disk and queue its state, IOPS, read and write
        MB/s, latency p50/p99 (from the queues' log2 histograms), errors and
        requests in flight.

        KEYS (on a terminal): q quit; i sort by IOPS, m by MB/s, l by p99
        latency, e by errors, n by name; + and - lengthen and shorten the
        interval.

        When standard output is not a terminal (or with --plain) it prints one
        block of plain lines per refresh instead, each headed by the time.
        """)

    enum SortKey: String, ExpressibleByArgument, CaseIterable {
        case iops, mbps, p99, errors, name
    }

    @OptionGroup var instance: InstanceOptions
    @Option(help: ArgumentHelp("Seconds between refreshes, 0.1-60", valueName: "seconds"))
    var interval: String = "1"
    @Option(help: ArgumentHelp("Order of disks and queues: iops, mbps, p99, errors or name", valueName: "key"))
    var sort: SortKey = .iops
    @Option(help: ArgumentHelp("Stop after N refreshes (default: until q or interrupted)", valueName: "n"))
    var iterations: Int?
    @Flag(help: "Plain lines even on a terminal") var plain = false

    func run() throws {
        guard var seconds = Double(interval), seconds >= 0.1, seconds <= 60 else {
            throw CLIError("--interval \(interval.debugDescription) is not a number of seconds in 0.1...60", usage: true)
        }
        let limit = try checkRange(iterations, option: "--iterations", range: 1...1_000_000)
        let path = try instance.controlPath()
        var order = sort
        let terminal = !plain && isatty(STDOUT_FILENO) == 1 && isatty(STDIN_FILENO) == 1
        let screen = terminal ? try TopTerminal() : nil
        defer { screen?.restore() }

        var before = try TopSample(path)
        var shown = 0
        while limit.map({ shown < $0 }) ?? true {
            // Between samples: the interval, or a key on the terminal.
            if let screen {
                let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
                keys: while let key = screen.readKey(until: deadline) {
                    switch key {
                    case "q", "\u{3}", "\u{4}": return // q, Ctrl-C, Ctrl-D (the terminal is raw: no SIGINT)
                    case "i": order = .iops
                    case "m": order = .mbps
                    case "l": order = .p99
                    case "e": order = .errors
                    case "n": order = .name
                    case "+": seconds = min(60, seconds * 2)
                    case "-": seconds = max(0.1, seconds / 2)
                    default: continue keys
                    }
                    break keys // a key changed the view: show it now
                }
            } else {
                Thread.sleep(forTimeInterval: seconds)
            }
            let after = try TopSample(path)
            let view = TopView(before: before, after: after, sort: order, interval: seconds)
            if let screen {
                screen.draw(view.lines(width: screen.width), height: screen.height)
            } else {
                // Written at once, not through stdio's buffer: a pipe sees
                // each block as it comes; a reader that went away (| head)
                // ends top quietly.
                guard TopTerminal.writeAll(STDOUT_FILENO, view.lines(width: Int.max).joined(separator: "\n") + "\n\n") else {
                    return
                }
            }
            before = after
            shown += 1
        }
    }
}

/// One look at the instance: its counters and its status.
struct TopSample {
    var stats: DataPlane.Snapshot
    var status: ControlResponse
    var time = Date()

    init(_ path: String) throws {
        let stats = try controlCall(path, "stats")
        guard let snapshot = stats.snapshot else { throw CLIError("the instance sent no statistics") }
        self.stats = snapshot
        status = try controlCall(path, "status")
    }
}

/// What one refresh shows, as lines of text.
struct TopView {
    var report: StatsReport
    var sample: TopSample
    var sort: Top.SortKey
    var interval: Double

    init(before: TopSample, after: TopSample, sort: Top.SortKey, interval: Double) {
        report = StatsReport(before: before.stats, after: after.stats)
        sample = after
        self.sort = sort
        self.interval = interval
    }

    func ordered(_ rows: [StatsReport.Row]) -> [StatsReport.Row] {
        rows.sorted { a, b in
            switch sort {
            case .iops: return (a.iops, b.name) > (b.iops, a.name)
            case .mbps: return (a.readMBps + a.writeMBps, b.name) > (b.readMBps + b.writeMBps, a.name)
            case .p99: return (a.p99Microseconds ?? -1, b.name) > (b.p99Microseconds ?? -1, a.name)
            case .errors: return (a.errors, b.name) > (b.errors, a.name)
            case .name: return a.name < b.name
            }
        }
    }

    func lines(width: Int) -> [String] {
        func f(_ v: Double?, _ digits: Int = 1) -> String {
            guard let v else { return "-" }
            return String(format: "%.\(digits)f", v)
        }
        func count(_ v: Double) -> String {
            v >= 1e6 ? String(format: "%.2fM", v / 1e6) : v >= 1e4 ? String(format: "%.1fk", v / 1e3) : String(format: "%.0f", v)
        }
        func cols(_ fields: [(String, Int)]) -> String {
            // Positive widths pad right (text), negative ones left (numbers).
            fields.map { text, w in w < 0 ? text.leftPad(-w) : text.padding(toLength: max(w, text.count), withPad: " ", startingAt: 0) }
                .joined(separator: " ")
        }
        let clock = DateFormatter()
        clock.dateFormat = "HH:mm:ss"
        let disks = sample.status.disks ?? []
        let queueCount = disks.reduce(0) { $0 + $1.queues.count }
        var out = ["dpctl top - pid \(sample.status.pid.map(String.init) ?? "?"), \(disks.count) disk(s), \(queueCount) queue(s) running, every \(f(interval)) s, sorted by \(sort.rawValue)   \(clock.string(from: sample.time))", ""]

        out.append(cols([("IOTHREAD", 14), ("CPU%", -6), ("IOPS", -9), ("us/req", -7), ("wakeups/s", -10), ("polled", -7), ("window us", -9), ("STATE", 0)]))
        for t in report.threads {
            let failed = sample.status.threads?.first { $0.name == t.name }?.failure
            let passes = t.wakeupsPerSecond + t.pollHitsPerSecond
            out.append(cols([(t.name, 14), (f(t.cpuPercent), -6), (count(t.iops), -9), (f(t.cpuMicrosecondsPerRequest, 2), -7),
                             (count(t.wakeupsPerSecond), -10), (passes > 0 ? f(t.pollHitsPerSecond / passes * 100, 0) + "%" : "-", -7),
                             (f(t.pollWindowMicroseconds, 0), -9), (failed.map { "FAILED: \($0)" } ?? "ok", 0)]))
        }
        out.append("")
        out.append(cols([("DISK / QUEUE", 26), ("STATE", 12), ("IOPS", -9), ("READ MB/s", -9), ("WRITE MB/s", -10), ("p50 us", -7), ("p99 us", -7), ("errors", -7), ("inflight", -8)]))
        for d in ordered(report.disks) {
            let status = disks.first { $0.path == d.name }
            let inFlight = status?.queues.reduce(UInt64(0)) { $0 + $1.inFlight }
            let state = status.map { $0.flushFailure != nil ? "FLUSH FAILED" : $0.connected ? "connected" : "waiting" } ?? "-"
            out.append(cols([(d.name, 26), (state, 12), (count(d.iops), -9), (f(d.readMBps), -9), (f(d.writeMBps), -10),
                             (f(d.p50Microseconds), -7), (f(d.p99Microseconds), -7), (String(d.errors), -7),
                             (inFlight.map(String.init) ?? "-", -8)]))
            let prefix = d.name + " q"
            for q in ordered(report.queues.filter { $0.name.hasPrefix(prefix) }) {
                // "disk qN (thread)" -> "  qN thread"
                let rest = q.name.dropFirst(d.name.count + 1)
                let index = Int(rest.dropFirst().prefix { $0.isNumber })
                let qs = status?.queues.first { $0.index == index }
                let state = qs.map { $0.broken != nil ? "BROKEN" : $0.stoppedOnError != nil ? "STOPPED" : "running" } ?? "stopped"
                out.append(cols([("  " + rest.replacingOccurrences(of: "(", with: "").replacingOccurrences(of: ")", with: ""), 26),
                                 (state, 12), (count(q.iops), -9), (f(q.readMBps), -9), (f(q.writeMBps), -10),
                                 (f(q.p50Microseconds), -7), (f(q.p99Microseconds), -7), (String(q.errors), -7),
                                 (qs.map { String($0.inFlight) } ?? "-", -8)]))
            }
        }
        let problems = disks.flatMap { d in
            d.queues.compactMap { q in
                q.broken.map { "\(d.path) queue \(q.index) BROKEN: \($0)" }
                    ?? q.stoppedOnError.map { "\(d.path) queue \(q.index) STOPPED on error: \($0) ('dpctl resume' after fixing it)" }
            }
        }
        if !problems.isEmpty { out += [""] + problems }
        return out.map { $0.count > width ? String($0.prefix(width)) : $0 }
    }
}

/// The terminal while top runs: raw keys, the alternate screen, no cursor;
/// restored on exit.
final class TopTerminal {
    private var saved = termios()
    private var savedMask = sigset_t()
    private var signals: Int32 = -1
    private(set) var width = 80
    private(set) var height = 24

    init() throws {
        // SIGTERM and SIGHUP (kill, a closed terminal window) end top as q
        // does, with the terminal restored: blocked, and read from a
        // signalfd beside the keys.
        var mask = sigset_t()
        sigemptyset(&mask)
        for sig in [SIGTERM, SIGHUP, SIGINT] { sigaddset(&mask, sig) }
        pthread_sigmask(SIG_BLOCK, &mask, &savedMask)
        signals = dps_signalfd(&mask) // < 0: no signalfd, then kill leaves the terminal as it is
        guard tcgetattr(STDIN_FILENO, &saved) == 0 else { throw CLIError("cannot read the terminal's settings: \(errnoText(errno))") }
        var raw = saved
        // No line editing, echo or signal keys: q and Ctrl-C arrive as bytes.
        raw.c_lflag &= ~tcflag_t(ICANON | ECHO | ISIG)
        withUnsafeMutableBytes(of: &raw.c_cc) { cc in
            cc[Int(VMIN)] = 0
            cc[Int(VTIME)] = 0
        }
        guard tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0 else { throw CLIError("cannot set the terminal up: \(errnoText(errno))") }
        write("\u{1B}[?1049h\u{1B}[?25l")
        measure()
    }

    func restore() {
        write("\u{1B}[?25h\u{1B}[?1049l")
        _ = tcsetattr(STDIN_FILENO, TCSANOW, &saved)
        if signals >= 0 { close(signals) }
        pthread_sigmask(SIG_SETMASK, &savedMask, nil)
    }

    private func write(_ text: String) {
        _ = Self.writeAll(STDOUT_FILENO, text)
    }

    /// Writes all of text; false when the reader is gone (EPIPE) or the write fails.
    static func writeAll(_ fd: Int32, _ text: String) -> Bool {
        let bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            offset += n
        }
        return true
    }

    private func measure() {
        var size = winsize()
        if ioctl(STDOUT_FILENO, UInt(TIOCGWINSZ), &size) == 0, size.ws_col > 0, size.ws_row > 0 {
            width = Int(size.ws_col)
            height = Int(size.ws_row)
        }
    }

    /// Redraws the whole screen (resized terminals are measured again).
    func draw(_ lines: [String], height: Int) {
        measure()
        let shown = lines.prefix(self.height).map { $0.count > width ? String($0.prefix(width)) : $0 }
        write("\u{1B}[H" + shown.map { $0 + "\u{1B}[K" }.joined(separator: "\r\n") + "\u{1B}[J")
    }

    /// The next key pressed before the deadline, or nil.
    func readKey(until deadline: ContinuousClock.Instant) -> Character? {
        let left = deadline - ContinuousClock.now
        let ms = max(0, Int(left.components.seconds) * 1000 + Int(left.components.attoseconds / 1_000_000_000_000_000))
        var fds = [pollfd(fd: STDIN_FILENO, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: signals, events: Int16(POLLIN), revents: 0)]
        guard poll(&fds, 2, Int32(min(ms, 60_000))) > 0 else { return nil }
        if fds[1].revents != 0 { return "q" } // SIGTERM, SIGHUP or SIGINT: leave as q does
        var byte: UInt8 = 0
        guard Glibc.read(STDIN_FILENO, &byte, 1) == 1 else { return nil }
        return Character(Unicode.Scalar(byte))
    }
}
