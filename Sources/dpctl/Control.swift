import CDataPlaneSys
import DataPlane
import Foundation
import Logging
import Synchronization

/// The control protocol: one JSON request line, one JSON response line.
struct ControlRequest: Codable {
    var command: String
    /// The disk a verb acts on, by one of its sockets (resize, remove-disk, throttle, ...).
    var socket: String? = nil
    /// add-disk: the disk, as a --disk value (path=PATH,socket=PATH[,KEY=VALUE...]).
    var disk: String? = nil
    /// remove-disk: disconnect a connected frontend.
    var force: Bool? = nil
    /// throttle: the I/O limit keys to change (0 removes one), and the group to put the disk in ("" takes it out).
    var limits: [String: UInt64]? = nil
    var group: String? = nil
    /// resize: the new size in bytes (nil: the image's size now), and whether it may shrink.
    var sizeBytes: UInt64? = nil
    var shrink: Bool? = nil
}

struct ThreadStatus: Codable {
    var name: String
    var cpus: String
    var numaNode: Int?
    var pollMaxMicroseconds: UInt32
    /// Set when the thread's io_uring failed it (every queue on it is broken).
    var failure: String?
    /// The io_uring features it uses ("defer-taskrun,registered-files,..."; older instances leave it out).
    var ioURing: String?
    /// Guest memory registered as fixed buffers now (pieces of regions), and
    /// memory tables that could not be registered, with the last reason.
    var registeredBuffers: UInt32?
    var bufferRegistrationFailures: UInt64?
    var bufferRegistrationError: String?
}

struct QueueStatus: Codable {
    var index: Int
    /// The socket whose frontend runs it (the disk's `socket` or one of its `moreSockets`), when the disk has several.
    var socket: String? = nil
    var thread: String
    var lastAvailIndex: UInt16
    var usedIndex: UInt16
    var inFlight: UInt64
    var broken: String?
    var stoppedOnError: String?
    var heldRequests: UInt64?
}

/// A disk's further socket and its frontend.
struct SocketStatus: Codable {
    var socket: String
    var connected: Bool
    var dirtyLogBytes: Int?
}

struct DiskStatus: Codable {
    var path: String
    var socket: String
    var connected: Bool
    /// While the frontend migrates the guest: its dirty log's size in bytes.
    var dirtyLogBytes: Int? = nil
    /// The disk's further sockets (socket= repeated), each with a frontend of its own.
    var moreSockets: [SocketStatus]? = nil
    var readOnly: Bool
    var capacityBytes: UInt64
    var maxQueues: Int
    var directIO: Bool
    /// Set once a flush of the page cache failed: every later FLUSH fails.
    var flushFailure: String?
    var queues: [QueueStatus]
    /// Its I/O limits (keys as `dpctl throttle` takes them; absent: none), its
    /// throttle group, and the requests that waited for a limit so far.
    var ioLimits: IOLimits? = nil
    var throttleGroup: String? = nil
    var throttledRequests: UInt64? = nil
    /// "write back" or "write through" (the guest may switch it).
    var writeCache: String? = nil
    /// The logical block size: a resize's size is a multiple of it.
    var logicalBlockSize: UInt32? = nil
}

struct ControlResponse: Codable {
    var ok: Bool
    var error: String?
    var pid: Int32?
    /// In the answer to "stop": the instance keeps this connection open until
    /// it exits, so the client's end of file means "exited". Older instances
    /// leave it out (and close at once).
    var closesAtExit: Bool?
    var threads: [ThreadStatus]?
    var disks: [DiskStatus]?
    var snapshot: DataPlane.Snapshot?
    /// add-disk, remove-disk, reload: what was done, a line per change.
    var report: [String]? = nil
    /// In the answer to "resize".
    var resize: ResizeOutcome? = nil
}

/// Serves control requests on a unix socket from its own thread.
final class ControlServer: Sendable {
    private let path: String
    private let listenFD: Int32
    private let ownsPath: Bool
    private let plane: DataPlane
    private let server: VhostUserServer
    private let cpus: [CPUSet]
    let logger: Logger
    /// What add-disk, remove-disk and reload change (nil: they are refused).
    let instance: Instance?

    private struct State {
        var stopping = false
        var thread: ControlThread?
    }

    private let state = Mutex<State>(State())

    /// What the control thread remembers between requests (its own).
    private struct Watch {
        /// What was last logged of each queue's error state, and when the
        /// queues were last looked at.
        var loggedStates: [String: String] = [:]
        var lastWatch = Date.distantPast
    }

    /// Serves at `path`; on `inheritedFD` when socket activation passed the
    /// control socket (which is then left in place at stop, systemd's).
    init(path: String, inheritedFD: Int32? = nil, plane: DataPlane, server: VhostUserServer, cpus: [CPUSet],
         logger: Logger, instance: Instance? = nil) throws {
        let fd: Int32
        if let inheritedFD {
            fd = inheritedFD
        } else {
            do {
                fd = try UnixSocket.listen(at: path, backlog: 8)
            } catch {
                throw CLIError("control socket: \(error)")
            }
        }
        self.path = path
        self.ownsPath = inheritedFD == nil
        self.listenFD = fd
        self.plane = plane
        self.server = server
        self.cpus = cpus
        self.logger = logger
        self.instance = instance
        do {
            let thread = try ControlThread(name: "dpctl-control") { [weak self] in self?.run() }
            state.withLock { $0.thread = thread }
        } catch {
            closeSocket()
            throw CLIError("cannot start the control thread: \(errnoText(error.rawValue))")
        }
    }

    /// Ends the control thread and closes the socket. Idempotent.
    func stop() {
        let (first, thread) = state.withLock { state in
            defer { state.stopping = true }
            return (!state.stopping, state.thread)
        }
        guard first else { return }
        // The loop polls with a timeout and sees the flag.
        thread?.join()
        closeSocket()
    }

    private func closeSocket() {
        close(listenFD)
        if ownsPath { unlink(path) }
    }

    private func run() {
        var watch = Watch()
        while !state.withLock({ $0.stopping }) {
            logErrorStates(&watch)
            var p = pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 200) > 0 else { continue }
            let client = dps_accept(listenFD)
            guard client >= 0 else { continue }
            // The connection of a "stop" client is never closed: it closes
            // when the process exits (close-on-exec, so no child keeps it),
            // which is what that client waits for.
            if handle(client) == .close { close(client) }
        }
    }

    /// Logs, once a second at most, a queue that stopped on an I/O error,
    /// runs again, or broke: the log tells an operator without anyone
    /// polling `dpctl status`.
    private func logErrorStates(_ watch: inout Watch) {
        guard Date().timeIntervalSince(watch.lastWatch) >= 1 else { return }
        watch.lastWatch = Date()
        var states: [String: String] = [:]
        for thread in plane.threads {
            let key = thread.configuration.name
            states[key] = thread.statistics().failure.map { "FAILED (\($0)): its queues are broken; restart dpctl" } ?? "running"
            if states[key] != watch.loggedStates[key, default: "running"] {
                log(states[key], "\(key): \(states[key] ?? "")", ["iothread": "\(key)"])
            }
        }
        for disk in plane.disks {
            let key = "\(disk.name) flush"
            states[key] = disk.flushFailureReason.map(Self.flushFailureText) ?? "running"
            if states[key] != watch.loggedStates[key, default: "running"] {
                log(states[key], "\(disk.name): \(states[key] ?? "")", ["disk": "\(disk.name)"])
            }
            for queue in plane.queues(of: disk) {
                let s = queue.statistics()
                let key = "\(disk.name) queue \(s.queue)"
                let state = s.brokenReason.map { "broken (\($0)): the guest must reset the device" }
                    ?? s.stoppedOnError.map { "stopped on error: \($0); fix the cause, then 'dpctl resume'" }
                    ?? "running"
                states[key] = state
                if state != watch.loggedStates[key, default: "running"] {
                    log(state, "\(key): \(state)" + (s.stoppedOnError != nil ? " (\(s.heldRequests) request(s) held)" : ""),
                        ["disk": "\(disk.name)", "queue": "\(s.queue)"])
                }
            }
        }
        watch.loggedStates = states
    }

    /// A change of state: back to running is news (info), anything else an error.
    private func log(_ state: String?, _ message: String, _ metadata: Logger.Metadata) {
        if state == "running" {
            logger.info("\(message)", metadata: metadata)
        } else {
            logger.error("\(message)", metadata: metadata)
        }
    }

    /// What an operator must know of a failed flush of the page cache.
    static func flushFailureText(_ reason: String) -> String {
        "FLUSH FAILED (\(reason)): writes the guest was told are durable may be lost; every flush now fails until dpctl is restarted"
    }

    /// How long a client may take to send its request, and to take its reply.
    static let requestPatience: Duration = .seconds(2)
    static let replyPatience: Duration = .seconds(5)

    private enum AfterReply { case close, keepOpenUntilExit }

    private func handle(_ fd: Int32) -> AfterReply {
        let line = ControlIO.readLine(fd, limit: 4096, deadline: .now + Self.requestPatience)
        var response: ControlResponse
        var stopAfterReply = false
        if let request = try? JSONDecoder().decode(ControlRequest.self, from: line) {
            switch request.command {
            case "status": response = status()
            case "stats":
                response = status()
                response.snapshot = plane.statistics()
            case "stop":
                response = ControlResponse(ok: true, pid: getpid(), closesAtExit: true)
                stopAfterReply = true
            case "throttle":
                response = IOLimitKeys.handle(request, plane: plane, server: server, logger: logger)
                    .map { ControlResponse(ok: false, error: $0) } ?? status()
            case "resume":
                var failures: [String] = []
                for disk in plane.disks {
                    do { try plane.resume(disk: disk) } catch { failures.append("\(disk.name): \(error)") }
                }
                logger.info("resume requested on the control socket")
                response = failures.isEmpty ? status() : ControlResponse(ok: false, error: failures.joined(separator: "; "))
            case "add-disk", "remove-disk", "reload": response = changeDisks(request)
            case "resize":
                response = resize(request)
            default:
                response = ControlResponse(ok: false, error: "unknown command \(request.command.debugDescription)")
            }
        } else {
            response = ControlResponse(ok: false, error: "malformed request (want one JSON line)")
        }
        if var data = try? JSONEncoder().encode(response) {
            data.append(UInt8(ascii: "\n"))
            // A client that hung up gets nothing (EPIPE, no SIGPIPE); one that
            // stopped reading is given up on, so the next is served.
            if ControlIO.send(fd, data, deadline: .now + Self.replyPatience) == ETIMEDOUT {
                logger.warning("a control client did not take its \(data.count)-byte reply within \(Self.replyPatience); dropped it")
            }
        }
        guard stopAfterReply else { return .close }
        logger.info("stop requested on the control socket")
        kill(getpid(), SIGTERM)
        return .keepOpenUntilExit
    }

    private func status() -> ControlResponse {
        let threads = plane.threads.enumerated().map { i, t in
            let s = t.statistics()
            return ThreadStatus(name: t.configuration.name, cpus: cpus[i].description, numaNode: t.numaNode,
                                pollMaxMicroseconds: t.configuration.pollMaxMicroseconds, failure: s.failure,
                                ioURing: s.ioURingFeatures.description, registeredBuffers: s.registeredBuffers,
                                bufferRegistrationFailures: s.bufferRegistrationFailures,
                                bufferRegistrationError: s.bufferRegistrationError)
        }
        // Each disk with its counters, queues stopped since included, read together.
        let disks = plane.diskTotals().map { disk, total in
            let exports = server.exportStatus(of: disk)
            let first = exports.first
            let limits = plane.limits(of: disk)
            var status = DiskStatus(
                path: disk.name, socket: first?.socketPath ?? "", connected: first?.connected ?? false,
                dirtyLogBytes: first?.dirtyLogBytes,
                moreSockets: exports.count > 1
                    ? exports.dropFirst().map { SocketStatus(socket: $0.socketPath, connected: $0.connected, dirtyLogBytes: $0.dirtyLogBytes) }
                    : nil,
                readOnly: disk.configuration.readOnly, capacityBytes: disk.capacityBytes,
                maxQueues: disk.configuration.numQueues, directIO: disk.usesDirectIO,
                flushFailure: disk.flushFailureReason,
                queues: queues(of: disk, exports),
                writeCache: WriteCacheMode.name(disk.writeCache), logicalBlockSize: disk.logicalBlockSize)
            status.ioLimits = limits.limits.isUnlimited ? nil : limits.limits
            status.throttleGroup = limits.group
            status.throttledRequests = total.throttledRequests
            return status
        }
        return ControlResponse(ok: true, pid: getpid(), threads: threads, disks: disks)
    }

    /// The disk one of whose sockets is `socket`, as given or made absolute
    /// (the instance's working directory is not the client's: clients send
    /// absolute paths, see `socketArgument`).
    static func disk(servedOn socket: String, plane: DataPlane, server: VhostUserServer) -> Disk? {
        let wanted = absolutePath(socket)
        return plane.disks.first { disk in
            server.exportStatus(of: disk).contains { $0.socketPath == socket || absolutePath($0.socketPath) == wanted }
        }
    }

    /// resize: the disk served on `socket`, to `sizeBytes` (or its image's size now).
    private func resize(_ request: ControlRequest) -> ControlResponse {
        guard let socket = request.socket else {
            return ControlResponse(ok: false, error: "resize needs the disk's socket")
        }
        guard let disk = Self.disk(servedOn: socket, plane: plane, server: server) else {
            return ControlResponse(ok: false, error: "no disk is served on socket \(socket.debugDescription)")
        }
        do {
            let outcome = try server.resize(disk: disk, toBytes: request.sizeBytes, allowShrink: request.shrink ?? false)
            var response = status()
            response.resize = outcome
            return response
        } catch {
            logger.warning("resize of \(disk.name) refused: \(error)", metadata: ["disk": "\(disk.name)"])
            return ControlResponse(ok: false, error: "\(error)")
        }
    }

    private func queues(of disk: Disk, _ exports: [VhostUserServer.ExportStatus]) -> [QueueStatus] {
        plane.queues(of: disk).map { q in
            let s = q.statistics()
            return QueueStatus(index: q.index, socket: exports.count > 1 && q.frontend < exports.count ? exports[q.frontend].socketPath : nil,
                               thread: q.thread.configuration.name, lastAvailIndex: s.lastAvailIndex,
                               usedIndex: s.usedIndex, inFlight: s.inFlight, broken: s.brokenReason,
                               stoppedOnError: s.stoppedOnError, heldRequests: s.heldRequests)
        }
    }
}

/// How long a client waits for an instance's answer.
let controlReplyPatience: Duration = .seconds(30)

/// Sends one request to a running instance and returns its answer.
func controlCall(_ path: String, _ command: String) throws -> ControlResponse {
    try ControlConnection(path).request(ControlRequest(command: command))
}

/// Sends one request with its arguments to a running instance and returns its answer.
func controlCall(_ path: String, _ request: ControlRequest) throws -> ControlResponse {
    try ControlConnection(path).request(request)
}

/// A connection to a running instance's control socket.
final class ControlConnection {
    let path: String
    private let fd: Int32

    init(_ path: String) throws(CLIError) {
        let fd = dps_unix_connect(path)
        guard fd >= 0 else {
            let reason = -fd == ENOENT || -fd == ECONNREFUSED ? "no dpctl is running there" : errnoText(-fd)
            throw CLIError("cannot reach control socket \(path): \(reason)")
        }
        self.path = path
        self.fd = fd
    }

    deinit { close(fd) }

    /// Sends a request and returns the answer, or throws the instance's refusal.
    func request(_ request: ControlRequest) throws -> ControlResponse {
        var data = try JSONEncoder().encode(request)
        data.append(UInt8(ascii: "\n"))
        let deadline = ContinuousClock.now + controlReplyPatience
        let sent = ControlIO.send(fd, data, deadline: deadline)
        guard sent == 0 else { throw CLIError("cannot send to control socket \(path): \(errnoText(sent))") }
        let reply = ControlIO.readLine(fd, limit: 1 << 30, deadline: deadline)
        if reply.last != UInt8(ascii: "\n") && ContinuousClock.now >= deadline {
            throw CLIError("no answer from \(path) within \(controlReplyPatience) (the instance may be stuck: see its log)")
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

    /// Waits until the instance closes the connection; false at the deadline.
    func waitForClose(deadline: ContinuousClock.Instant) -> Bool {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while let wait = ControlIO.milliseconds(until: deadline) {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, wait)
            if ready < 0 && errno != EINTR { return true } // cannot wait on it: nothing left to see
            if ready <= 0 { continue }
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN) { return true }
        }
        return false
    }
}

/// Control-socket I/O under one deadline per exchange, so neither side
/// waits forever on the other. Sends use MSG_NOSIGNAL: a peer that hung up is
/// EPIPE, not SIGPIPE. Blocking or not, the fd is never waited on outside poll.
enum ControlIO {
    /// Sends every byte of `data`, continuing after short writes. Returns 0,
    /// ETIMEDOUT when the deadline passed first, or the errno that ended it.
    static func send(_ fd: Int32, _ data: Data, deadline: ContinuousClock.Instant) -> Int32 {
        var offset = 0
        while offset < data.count {
            guard let wait = milliseconds(until: deadline) else { return ETIMEDOUT }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            let ready = poll(&p, 1, wait)
            if ready < 0 {
                if errno == EINTR { continue }
                return errno
            }
            if ready == 0 { continue } // the deadline check says when to stop
            let n = data.withUnsafeBytes { raw -> Int in
                guard let base = raw.baseAddress else { return 0 }
                return Glibc.send(fd, base + offset, raw.count - offset, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            }
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                return errno
            }
            offset += n
        }
        return 0
    }

    /// Reads up to and including the first newline, at most `limit` bytes.
    /// What came before an end of file, an error or the deadline is returned
    /// as it is (without its newline: incomplete).
    static func readLine(_ fd: Int32, limit: Int, deadline: ContinuousClock.Instant) -> Data {
        var line = Data()
        var buffer = [UInt8](repeating: 0, count: 65536)
        while line.count < limit && line.last != UInt8(ascii: "\n") {
            guard let wait = milliseconds(until: deadline) else { break }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, wait)
            if ready < 0 && errno != EINTR { break }
            if ready <= 0 { continue }
            // Never past the newline: a request line is all we take.
            let want = min(buffer.count, limit - line.count)
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, want, Int32(MSG_DONTWAIT | MSG_PEEK)) }
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                break
            }
            if n == 0 { break }
            let take = (buffer[0..<n].firstIndex(of: UInt8(ascii: "\n")).map { $0 + 1 }) ?? n
            let got = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, take, Int32(MSG_DONTWAIT)) }
            guard got > 0 else { break }
            line.append(contentsOf: buffer[0..<got])
        }
        return line
    }

    /// Milliseconds left until `deadline` for poll (at least 1), or nil once it passed.
    static func milliseconds(until deadline: ContinuousClock.Instant) -> Int32? {
        let left = ContinuousClock.now.duration(to: deadline)
        guard left > .zero else { return nil }
        let (seconds, attoseconds) = left.components
        return Int32(clamping: max(1, seconds * 1000 + attoseconds / 1_000_000_000_000_000))
    }
}
