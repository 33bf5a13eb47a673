import ArgumentParser
import DataPlane
import Foundation

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a running instance's disks, frontends, queues and IOThreads.",
        usage: "dpctl status (--control PATH | --socket PATH) [--json]",
        discussion: """
        Shows the IOThreads (CPUs, NUMA node), each disk (socket, frontend
        connected or not, size, mode, write cache mode: write back or write
        through, a failed flush, its I/O limits and throttle group) and its
        running queues
        (IOThread, ring indices, requests in flight, broken rings, queues
        stopped on error).

        EXIT STATUS (a health check):
          0  every queue runs
          3  a queue is broken (the guest corrupted its ring and must reset the
             device) or stopped on an I/O error by rerror/werror (fix the
             cause, then 'dpctl resume'); or a disk's flush of the page cache
             failed (direct=off: writes may be lost, every flush fails until
             dpctl is restarted); or an IOThread's io_uring failed
          1  the instance could not be asked (not running, no answer)
          2  usage error
        """)

    @OptionGroup var instance: InstanceOptions
    @Flag(help: "Print the status as JSON") var json = false

    func run() throws {
        let response = try controlCall(try instance.controlPath(), "status")
        if json {
            StatusCommand.printJSON(response)
        } else {
            StatusCommand.printStatus(response)
        }
        let queues = (response.disks ?? []).flatMap(\.queues)
        let unhealthy = queues.contains { $0.broken != nil || $0.stoppedOnError != nil }
            || (response.disks ?? []).contains { $0.flushFailure != nil }
            || (response.threads ?? []).contains { $0.failure != nil }
        if unhealthy { throw ExitCode(StatusCommand.unhealthyExitStatus) }
    }
}

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show IOPS, MB/s and latency per IOThread, disk and queue.",
        usage: "dpctl stats (--control PATH | --socket PATH) [--json] [--watch] [--interval SECONDS]",
        discussion: """
        Samples the counters twice, --interval apart (default 1 s), and shows per
        IOThread (CPU use, wake-ups, busy-poll hits), per disk and per queue: IOPS,
        read and write MB/s, latency p50/p99 (from the queues' log2 histograms), and
        the share of requests found by polling rather than after a kick; then each
        disk's size and write cache mode, and each limited disk's I/O limits
        and how many requests a second waited for them. --watch repeats until
        interrupted.
        """)

    @OptionGroup var instance: InstanceOptions
    @Flag(help: "Print the figures as JSON") var json = false
    @Flag(help: "Repeat until interrupted") var watch = false
    @Option(help: ArgumentHelp("Seconds between the two samples, 0.1-3600", valueName: "seconds"))
    var interval: String = "1"

    func run() throws {
        guard let seconds = Double(interval), seconds >= 0.1, seconds <= 3600 else {
            throw CLIError("--interval \(interval.debugDescription) is not a number of seconds in 0.1...3600", usage: true)
        }
        let path = try instance.controlPath()
        repeat {
            let before = try controlCall(path, "stats")
            usleep(useconds_t(seconds * 1_000_000))
            let after = try controlCall(path, "stats")
            guard let a = before.snapshot, let b = after.snapshot else { throw CLIError("the instance sent no statistics") }
            var report = StatsReport(before: a, after: b)
            report.diskModes = (after.disks ?? []).map {
                StatsReport.DiskMode(disk: $0.path, capacityBytes: $0.capacityBytes, writeCache: $0.writeCache)
            }
            if json {
                StatusCommand.printJSON(report)
            } else {
                print(report.table())
                // I/O limits, and how many requests a second waited for them.
                // Both list the disks in the order they were added (names may repeat: "null").
                for (i, d) in (after.disks ?? []).enumerated() where d.ioLimits != nil || d.throttleGroup != nil {
                    let waited = i < report.disks.count ? report.disks[i].throttledPerSecond : nil
                    print("I/O limits of \(d.path): \(d.ioLimits?.description ?? "none")\(d.throttleGroup.map { " (group \($0))" } ?? "")"
                          + ", \(waited.map { String(format: "%.0f", $0) } ?? "0") request(s)/s waited")
                }
            }
        } while watch
    }
}

enum StatusCommand {
    /// The exit status of `dpctl status` when something needs an operator.
    static let unhealthyExitStatus: Int32 = 3

    static func printJSON<T: Encodable>(_ value: T) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        if let data = try? encoder.encode(value), let text = String(data: data, encoding: .utf8) { print(text) }
    }

    static func printStatus(_ r: ControlResponse) {
        print("dpctl pid \(r.pid.map(String.init) ?? "?")")
        for t in r.threads ?? [] {
            print("  \(t.name): CPU \(t.cpus), NUMA node \(t.numaNode.map(String.init) ?? "unknown"), poll up to \(t.pollMaxMicroseconds) us"
                  + (t.ioURing.map { ", io_uring: \($0)" } ?? "")
                  + (t.failure.map { "; FAILED (\($0)): its queues are broken, restart dpctl" } ?? ""))
            if let failures = t.bufferRegistrationFailures, failures > 0 {
                print("    \(failures) guest memory table(s) could not be registered as fixed buffers (last: \(t.bufferRegistrationError ?? "?")): their I/O is plain")
            }
        }
        for d in r.disks ?? [] {
            let size = binarySize(d.capacityBytes)
            print("disk \(d.path): \(size), \(d.readOnly ? "read-only" : "read-write"), \(d.directIO ? "O_DIRECT" : "page cache"), up to \(d.maxQueues) queues"
                  + (d.writeCache.map { ", \($0)" } ?? "") + (d.capacityBytes >= 1024 ? " (\(d.capacityBytes) bytes)" : ""))
            for socket in [SocketStatus(socket: d.socket, connected: d.connected, dirtyLogBytes: d.dirtyLogBytes)] + (d.moreSockets ?? []) {
                print("  socket \(socket.socket): \(socket.connected ? "frontend connected" : "waiting for a frontend")"
                      + (socket.dirtyLogBytes.map { ", migrating: logging dirty pages (log of \(binarySize(UInt64($0))))" } ?? ""))
            }
            if let reason = d.flushFailure { print("  \(ControlServer.flushFailureText(reason))") }
            if d.ioLimits != nil || d.throttleGroup != nil {
                print("  I/O limits: \(d.ioLimits?.description ?? "none")\(d.throttleGroup.map { " (group \($0))" } ?? "")"
                      + (d.throttledRequests.map { ", \($0) request(s) waited" } ?? ""))
            }
            for q in d.queues {
                let state = q.broken.map { "BROKEN (\($0)): the guest must reset the device" }
                    ?? q.stoppedOnError.map { "STOPPED on error: \($0), \(q.heldRequests ?? 0) request(s) held; fix the cause, then 'dpctl resume'" }
                    ?? "running"
                print("  queue \(q.index)\(q.socket.map { " (socket \($0))" } ?? "") on \(q.thread): \(state), avail \(q.lastAvailIndex), used \(q.usedIndex), in flight \(q.inFlight)")
            }
        }
    }
}

/// Rates between two snapshots.
struct StatsReport: Codable {
    struct Row: Codable {
        var name: String
        var iops: Double
        var readMBps: Double
        var writeMBps: Double
        var p50Microseconds: Double?
        var p99Microseconds: Double?
        var polledShare: Double?
        var errors: UInt64
        /// Requests a second that waited for an I/O limit (nil: none waited).
        var throttledPerSecond: Double? = nil
    }

    struct ThreadRow: Codable {
        var name: String
        var cpuPercent: Double
        var wakeupsPerSecond: Double
        var pollHitsPerSecond: Double
        var pollWindowMicroseconds: Double
        var cpuMicrosecondsPerRequest: Double?
        var iops: Double
    }

    /// A disk's size and write cache mode at the second sample.
    struct DiskMode: Codable {
        var disk: String
        var capacityBytes: UInt64
        var writeCache: String?
    }

    var seconds: Double
    var threads: [ThreadRow]
    var disks: [Row]
    var queues: [Row]
    var diskModes: [DiskMode]? = nil

    /// Every difference saturates at 0: counters that went backwards (the
    /// instance was restarted between the samples) show no activity rather
    /// than 1.8e19 IOPS.
    init(before a: DataPlane.Snapshot, after b: DataPlane.Snapshot) {
        seconds = Double(counterIncrease(from: a.monotonicNanoseconds, to: b.monotonicNanoseconds)) / 1e9
        let s = max(seconds, 1e-9)
        func row(_ name: String, _ x: QueueStatistics?, _ y: QueueStatistics) -> Row {
            let r = y.rates(since: x ?? QueueStatistics(disk: y.disk, queue: y.queue, thread: y.thread), seconds: s)
            let waited = counterIncrease(from: x?.throttledRequests ?? 0, to: y.throttledRequests)
            return Row(name: name, iops: r.iops, readMBps: r.readMBps, writeMBps: r.writeMBps,
                       p50Microseconds: r.p50Microseconds, p99Microseconds: r.p99Microseconds,
                       polledShare: r.polledShare, errors: counterIncrease(from: x?.errors ?? 0, to: y.errors),
                       throttledPerSecond: waited > 0 ? Double(waited) / s : nil)
        }
        disks = b.disks.map { d in row(d.disk, a.disks.first { $0.disk == d.disk }, d) }
        queues = b.queues.map { q in
            row("\(q.disk) q\(q.queue) (\(q.thread))", a.queues.first { $0.disk == q.disk && $0.queue == q.queue }, q)
        }
        threads = b.threads.map { t in
            let old = a.threads.first { $0.name == t.name }
            let cpu = Double(counterIncrease(from: old?.cpuNanoseconds ?? 0, to: t.cpuNanoseconds))
            let served = counterIncrease(from: a.thread(t.name).requests, to: b.thread(t.name).requests)
            return ThreadRow(
                name: t.name, cpuPercent: cpu / (s * 1e9) * 100,
                wakeupsPerSecond: Double(counterIncrease(from: old?.waits ?? 0, to: t.waits)) / s,
                pollHitsPerSecond: Double(counterIncrease(from: old?.pollHits ?? 0, to: t.pollHits)) / s,
                pollWindowMicroseconds: Double(t.pollWindowNanoseconds) / 1000,
                cpuMicrosecondsPerRequest: served > 0 ? cpu / Double(served) / 1000 : nil,
                iops: Double(served) / s)
        }
    }

    func table() -> String {
        func f(_ v: Double?, _ digits: Int = 1) -> String {
            guard let v else { return "-" }
            return String(format: "%.\(digits)f", v)
        }
        var out = "over \(f(seconds, 2)) s\n"
        out += "IOTHREAD        CPU%    IOPS        CPU us/req  wakeups/s  poll hits/s  poll window us\n"
        for t in threads {
            out += "\(t.name.padding(toLength: 14, withPad: " ", startingAt: 0))  \(f(t.cpuPercent).leftPad(5))  \(f(t.iops, 0).leftPad(10))  \(f(t.cpuMicrosecondsPerRequest, 3).leftPad(10))  \(f(t.wakeupsPerSecond, 0).leftPad(9))  \(f(t.pollHitsPerSecond, 0).leftPad(11))  \(f(t.pollWindowMicroseconds).leftPad(14))\n"
        }
        out += "DISK / QUEUE                          IOPS   READ MB/s  WRITE MB/s  p50 us  p99 us  polled  errors\n"
        for r in disks + queues {
            out += "\(r.name.padding(toLength: 32, withPad: " ", startingAt: 0))  \(f(r.iops, 0).leftPad(10))  \(f(r.readMBps).leftPad(9))  \(f(r.writeMBps).leftPad(10))  \(f(r.p50Microseconds).leftPad(6))  \(f(r.p99Microseconds).leftPad(6))  \(r.polledShare.map { f($0 * 100, 0) + "%" } ?? "-")".padding(toLength: 100, withPad: " ", startingAt: 0) + "  \(r.errors)\n"
        }
        for d in diskModes ?? [] {
            out += "disk \(d.disk): \(binarySize(d.capacityBytes)) (\(d.capacityBytes) bytes)\(d.writeCache.map { ", \($0)" } ?? "")\n"
        }
        return out
    }
}

/// 64 MiB, 1.5 GiB, 512 B.
func binarySize(_ bytes: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    let text = value == value.rounded() ? String(Int(value)) : String(format: "%.1f", value)
    return "\(text) \(units[unit])"
}

extension String {
    func leftPad(_ width: Int) -> String {
        count >= width ? self : String(repeating: " ", count: width - count) + self
    }
}

struct Resume: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Resume queues stopped by the error policy (retrying held requests).",
        usage: "dpctl resume (--control PATH | --socket PATH)",
        discussion: """
        Restarts the queues the error policy stopped (rerror/werror=stop, or
        enospc on ENOSPC): each retries the requests it holds, in order, then takes
        new ones; a request that fails again stops its queue again. Running queues
        are not affected. Prints the status afterwards.
        """)

    @OptionGroup var instance: InstanceOptions

    func run() throws {
        let response = try controlCall(try instance.controlPath(), "resume")
        StatusCommand.printStatus(response)
    }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Ask a running instance to drain and exit.",
        usage: "dpctl stop (--control PATH | --socket PATH) [--timeout SECONDS]",
        discussion: """
        Asks a running instance to stop: in-flight requests complete, frontends are
        disconnected, then it exits. Returns once the process has exited, so its
        sockets are free for the next 'dpctl start' (exit status 1 if it has not
        exited within --timeout).
        """)

    @OptionGroup var instance: InstanceOptions
    @Option(help: ArgumentHelp("Seconds to wait for the instance to exit, 1-3600", valueName: "seconds"))
    var timeout: Int = 30

    func run() throws {
        let timeout = try parseInt(String(self.timeout), option: "--timeout", range: 1...3600)
        let connection = try ControlConnection(try instance.controlPath())
        let response = try connection.request(ControlRequest(command: "stop"))
        let deadline = ContinuousClock.now + .seconds(timeout)
        let pid = response.pid.map(String.init) ?? "?"
        // The instance holds this connection until it exits; an older one
        // closes it at once, and then only its pid tells.
        let closed = connection.waitForClose(deadline: deadline)
        let exited = closed && (response.closesAtExit == true || StopCommand.waitForExit(response.pid, deadline: deadline))
        guard exited else { throw CLIError("dpctl pid \(pid) did not exit within \(timeout) s (it may still be draining: see its log)") }
        print("stopped dpctl pid \(pid)")
    }
}

enum StopCommand {
    /// Polls until the process is gone or a zombie; false at the deadline.
    /// Without a pid there is nothing to poll: true.
    static func waitForExit(_ pid: Int32?, deadline: ContinuousClock.Instant) -> Bool {
        guard let pid, pid > 0 else { return true }
        while ContinuousClock.now < deadline {
            if kill(pid, 0) != 0 && errno == ESRCH { return true }
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            if let end = stat.lastIndex(of: ")"), let state = stat[stat.index(after: end)...].first(where: { $0 != " " }),
               state == "Z" || state == "X" {
                return true
            }
            usleep(10_000)
        }
        return false
    }
}
