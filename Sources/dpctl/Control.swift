import CDataPlaneSys
import DataPlane
import Foundation

/// The control protocol: one JSON request line, one JSON response line.
struct ControlRequest: Codable {
    var command: String
}

struct ThreadStatus: Codable {
    var name: String
    var cpus: String
    var numaNode: Int?
    var pollMaxMicroseconds: UInt32
}

struct QueueStatus: Codable {
    var index: Int
    var thread: String
    var lastAvailIndex: UInt16
    var usedIndex: UInt16
    var inFlight: UInt64
    var broken: String?
    var stoppedOnError: String?
    var heldRequests: UInt64?
}

struct DiskStatus: Codable {
    var path: String
    var socket: String
    var connected: Bool
    var readOnly: Bool
    var capacityBytes: UInt64
    var maxQueues: Int
    var directIO: Bool
    var queues: [QueueStatus]
}

struct ControlResponse: Codable {
    var ok: Bool
    var error: String?
    var pid: Int32?
    var threads: [ThreadStatus]?
    var disks: [DiskStatus]?
    var snapshot: DataPlane.Snapshot?
}

/// Serves control requests on a unix socket from its own thread.
final class ControlServer: @unchecked Sendable {
    // `stopping` and `thread` are guarded by `lock`; the rest is immutable.
    private let path: String
    private let listenFD: Int32
    private let plane: DataPlane
    private let server: VhostUserServer
    private let cpus: [CPUSet]
    private let lock = NSLock()
    private var stopping = false
    private var thread: Thread?
    /// What was last logged of each queue's error state, and when the queues
    /// were last looked at (the control thread's own).
    private var loggedStates: [String: String] = [:]
    private var lastWatch = Date.distantPast

    init(path: String, plane: DataPlane, server: VhostUserServer, cpus: [CPUSet]) throws {
        let fd: Int32
        do {
            fd = try UnixSocket.listen(at: path, backlog: 8)
        } catch {
            throw CLIError("control socket: \(error)")
        }
        self.path = path
        self.listenFD = fd
        self.plane = plane
        self.server = server
        self.cpus = cpus
        let thread = Thread { [weak self] in self?.run() }
        thread.name = "dpctl-control"
        self.thread = thread
        thread.start()
    }

    func stop() {
        lock.withLock { stopping = true }
        // The loop polls with a timeout and sees the flag.
        while lock.withLock({ thread?.isFinished == false }) { usleep(10_000) }
        close(listenFD)
        unlink(path)
    }

    private func run() {
        while !lock.withLock({ stopping }) {
            logErrorStates()
            var p = pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 200) > 0 else { continue }
            let client = dps_accept(listenFD)
            guard client >= 0 else { continue }
            handle(client)
            close(client)
        }
    }

    /// Logs, once a second at most, a queue that stopped on an I/O error,
    /// runs again, or broke: the log tells an operator without anyone
    /// polling `dpctl status`.
    private func logErrorStates() {
        guard Date().timeIntervalSince(lastWatch) >= 1 else { return }
        lastWatch = Date()
        var states: [String: String] = [:]
        for disk in plane.disks {
            for queue in plane.queues(of: disk) {
                let s = queue.statistics()
                let key = "\(disk.name) queue \(s.queue)"
                let state = s.brokenReason.map { "broken (\($0)): the guest must reset the device" }
                    ?? s.stoppedOnError.map { "stopped on error: \($0); fix the cause, then 'dpctl resume'" }
                    ?? "running"
                states[key] = state
                if state != loggedStates[key, default: "running"] {
                    log("\(key): \(state)" + (s.stoppedOnError != nil ? " (\(s.heldRequests) request(s) held)" : ""))
                }
            }
        }
        loggedStates = states
    }

    private func handle(_ fd: Int32) {
        _ = dps_set_nonblocking(fd, false)
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var line = Data()
        var byte: UInt8 = 0
        while line.count < 4096, read(fd, &byte, 1) == 1, byte != UInt8(ascii: "\n") { line.append(byte) }
        var response: ControlResponse
        var stopAfterReply = false
        if let request = try? JSONDecoder().decode(ControlRequest.self, from: line) {
            switch request.command {
            case "status": response = status()
            case "stats":
                response = status()
                response.snapshot = plane.statistics()
            case "stop":
                response = ControlResponse(ok: true, pid: getpid())
                stopAfterReply = true
            case "resume":
                var failures: [String] = []
                for disk in plane.disks {
                    do { try plane.resume(disk: disk) } catch { failures.append("\(disk.name): \(error)") }
                }
                log("resume requested on the control socket")
                response = failures.isEmpty ? status() : ControlResponse(ok: false, error: failures.joined(separator: "; "))
            default:
                response = ControlResponse(ok: false, error: "unknown command \(request.command.debugDescription)")
            }
        } else {
            response = ControlResponse(ok: false, error: "malformed request (want one JSON line)")
        }
        if var data = try? JSONEncoder().encode(response) {
            data.append(UInt8(ascii: "\n"))
            data.withUnsafeBytes { _ = write(fd, $0.baseAddress, $0.count) }
        }
        if stopAfterReply {
            log("stop requested on the control socket")
            kill(getpid(), SIGTERM)
        }
    }

    private func status() -> ControlResponse {
        let threads = plane.threads.enumerated().map { i, t in
            ThreadStatus(name: t.configuration.name, cpus: cpus[i].description, numaNode: t.numaNode,
                         pollMaxMicroseconds: t.configuration.pollMaxMicroseconds)
        }
        let exports = server.exportStatus
        let disks = zip(plane.disks, exports).map { disk, export in
            DiskStatus(
                path: disk.name, socket: export.socketPath, connected: export.connected,
                readOnly: disk.configuration.readOnly, capacityBytes: disk.capacityBytes,
                maxQueues: disk.configuration.numQueues, directIO: disk.usesDirectIO,
                queues: plane.queues(of: disk).map { q in
                    let s = q.statistics()
                    return QueueStatus(index: q.index, thread: q.thread.configuration.name, lastAvailIndex: s.lastAvailIndex,
                                       usedIndex: s.usedIndex, inFlight: s.inFlight, broken: s.brokenReason,
                                       stoppedOnError: s.stoppedOnError, heldRequests: s.heldRequests)
                })
        }
        return ControlResponse(ok: true, pid: getpid(), threads: threads, disks: disks)
    }
}

/// Sends one request to a running instance and returns its answer.
func controlCall(_ path: String, _ command: String) throws -> ControlResponse {
    let fd = dps_unix_connect(path)
    guard fd >= 0 else {
        let reason = -fd == ENOENT || -fd == ECONNREFUSED ? "no dpctl is running there" : String(cString: strerror(-fd))
        throw CLIError("cannot reach control socket \(path): \(reason)")
    }
    defer { close(fd) }
    var data = try JSONEncoder().encode(ControlRequest(command: command))
    data.append(UInt8(ascii: "\n"))
    guard data.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == data.count else {
        throw CLIError("cannot send to control socket \(path)")
    }
    var reply = Data()
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buffer, buffer.count)
        if n <= 0 { break }
        reply.append(contentsOf: buffer[0..<n])
        if reply.last == UInt8(ascii: "\n") { break }
    }
    do {
        let response = try JSONDecoder().decode(ControlResponse.self, from: reply)
        if !response.ok { throw CLIError(response.error ?? "the instance refused the request") }
        return response
    } catch let error as CLIError {
        throw error
    } catch {
        throw CLIError("unreadable answer from \(path): \(error)")
    }
}
