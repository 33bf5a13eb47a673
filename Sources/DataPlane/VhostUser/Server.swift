#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlaneSys
import Logging
import Synchronization
import SystemPackage

/// A vhost-user-blk server: unix sockets that each serve a disk, one
/// frontend at a time per socket, each socket served by its own control
/// thread. A disk served on several sockets has a frontend on each, with
/// queues of its own: a migrating guest's source QEMU on one and its
/// destination on another. A frontend can only hold up its own socket: a
/// flood of messages, replies it does not read, or a drain that waits for
/// its guest's slow requests (GET_VRING_BASE, memory changes) never delay
/// another socket's frontend. The data path never passes
/// through here.
///
/// It logs to a swift-log `Logger`, each line with the disk's `disk` and
/// `socket`, the `frontend` (the connection's number on that socket) and its
/// `frontend-pid`, and `queue` where one is concerned; at `trace` level every
/// vhost-user message and reply.
public final class VhostUserServer: Sendable {
    // An export's session (its device and connection) is its control
    // thread's own; what other threads see of it, and `started`, `stopping`,
    // is in `state`.

    /// Messages one wake-up handles before polling again (and seeing a stop).
    private static let messagesPerWake = 64

    /// A disk served on a listening socket: what any thread may read of it.
    private final class Export: Sendable {
        let disk: Disk
        let path: String
        /// Its place among the disk's exports: its frontend's queues are the disk's frontend `frontend`.
        let frontend: Int
        let listenFD: FileDescriptor
        /// Whether the socket file is ours to remove at the end: not when it
        /// was inherited (systemd's socket unit owns it, and keeps listening).
        let ownsPath: Bool
        /// With the disk's and socket's metadata.
        let logger: Logger
        /// Set by the first `close`.
        let closed = Atomic<Bool>(false)
        /// Readable once `removeExport` ends this export alone; `removing`
        /// says so. Closed at deinit, never while someone may write it.
        let wakeFD: FileDescriptor
        let removing = Atomic<Bool>(false)
        /// What its control thread's last disconnect did to the frontend's
        /// requests, for `removeExport` to report.
        let removal = Mutex<RemovedExport?>(nil)
        /// Its frontend's backend-request channel, while it gave one.
        let backendChannel = BackendChannel()

        init(disk: Disk, path: String, frontend: Int, listenFD: FileDescriptor, ownsPath: Bool, logger: Logger,
             wakeFD: FileDescriptor) {
            self.disk = disk
            self.path = path
            self.frontend = frontend
            self.listenFD = listenFD
            self.ownsPath = ownsPath
            self.logger = logger
            self.wakeFD = wakeFD
        }

        deinit { try? wakeFD.close() }
    }

    /// What changes of an export, in `state`.
    private struct ExportState {
        let export: Export
        /// A frontend is connected (for status).
        var connected = false
        /// Its rings mark the pages they write into this dirty log (bytes): a migration is under way.
        var dirtyLogBytes: Int?
        var thread: ControlThread?
        var joined = false
    }

    private struct State {
        var exports: [ExportState] = []
        /// Per disk, the exports it has had: the next one's `frontend`.
        var exportsMade: [ObjectIdentifier: Int] = [:]
        var started = false
        var stopping = false

        func index(of export: Export) -> Int? { exports.firstIndex { $0.export === export } }
    }

    /// An export's frontend side: made, used and dropped by its control thread.
    private final class Session {
        let export: Export
        let device: VhostUserBlkDevice
        /// The export's, with the frontend's metadata while one is connected.
        var logger: Logger
        /// Frontends accepted so far: the `frontend` metadata.
        var frontends = 0
        var connection: Connection?

        init(export: Export, plane: DataPlane) {
            self.export = export
            self.logger = export.logger
            self.device = VhostUserBlkDevice(disk: export.disk, plane: plane, frontend: export.frontend,
                                             backendChannel: export.backendChannel, logger: export.logger)
        }
    }

    private final class Connection {
        let fd: FileDescriptor
        var header = [UInt8](repeating: 0, count: vhostUserHeaderSize)
        var headerFilled = 0
        var payload: [UInt8] = []
        var payloadFilled = 0
        var fds: [Int32] = []

        init(fd: FileDescriptor) { self.fd = fd }

        func resetMessage() {
            headerFilled = 0
            payload = []
            payloadFilled = 0
            fds = []
        }

        deinit {
            fds.forEach { closeFD($0) }
            try? fd.close()
        }
    }

    let plane: DataPlane
    let logger: Logger
    private let state = Mutex<State>(State())
    /// Held through a whole stop(): a second one waits for the first.
    private let stopLock = Mutex<Void>(())
    /// Readable once stopping: every export's thread polls it.
    private let wakeFD: FileDescriptor

    /// A server for `plane`'s disks, logging to `logger` (by default one
    /// labelled "dataplane.vhost-user", through whatever LoggingSystem the
    /// program bootstrapped).
    public init(plane: DataPlane, logger: Logger = Logger(label: "dataplane.vhost-user")) throws(DataPlaneError) {
        self.plane = plane
        self.logger = logger
        let fd = dps_eventfd(0, true)
        guard fd >= 0 else { throw .system(operation: "eventfd", errno: -fd) }
        wakeFD = FileDescriptor(rawValue: fd)
    }

    deinit {
        stop()
        try? wakeFD.close()
    }

    /// Listens for a frontend of `disk` at `socketPath` (served at once when
    /// the server has started). A stale socket file (nobody listening) is
    /// replaced; a live one, or a path that is not a socket, is an error
    /// (see ``UnixSocket/listen(at:backlog:permissions:)``). The path gets
    /// `permissions` before it listens, and is removed at stop.
    public func addExport(disk: Disk, socketPath: String,
                          permissions: SocketPermissions = SocketPermissions()) throws(DataPlaneError) {
        let fd = try UnixSocket.listen(at: socketPath, backlog: 4, permissions: permissions)
        try addExport(disk: disk, listenFD: FileDescriptor(rawValue: fd), name: socketPath, ownsPath: true)
    }

    /// Serves `disk` on a socket that already listens (socket activation,
    /// `--fd`; see ``UnixSocket/adopt(fd:origin:)``), which the server now
    /// owns and closes at stop. `name` stands for it in logs and status. Its
    /// path, if any, is left in place: whoever bound it (systemd) keeps it.
    public func addExport(disk: Disk, inheritedFD fd: Int32, name: String) throws(DataPlaneError) {
        try addExport(disk: disk, listenFD: FileDescriptor(rawValue: fd), name: name, ownsPath: false)
    }

    private func addExport(disk: Disk, listenFD fd: FileDescriptor, name socketPath: String,
                           ownsPath: Bool) throws(DataPlaneError) {
        var logger = self.logger
        logger[metadataKey: "disk"] = "\(disk.name)"
        logger[metadataKey: "socket"] = "\(socketPath)"
        let wake = dps_eventfd(0, true)
        guard wake >= 0 else {
            if ownsPath { unlink(socketPath) }
            try? fd.close()
            throw .system(operation: "eventfd", errno: -wake)
        }
        let wakeFD = FileDescriptor(rawValue: wake)
        let made: (export: Export, serveNow: Bool)? = state.withLock { state in
            guard !state.stopping else { return nil }
            let frontend = state.exportsMade[ObjectIdentifier(disk), default: 0]
            state.exportsMade[ObjectIdentifier(disk)] = frontend + 1
            let export = Export(disk: disk, path: socketPath, frontend: frontend, listenFD: fd, ownsPath: ownsPath, logger: logger,
                                wakeFD: wakeFD)
            state.exports.append(ExportState(export: export))
            return (export, state.started)
        }
        guard let (export, serveNow) = made else {
            if ownsPath { unlink(socketPath) }
            try? fd.close()
            try? wakeFD.close()
            throw .stopped
        }
        guard serveNow else { return }
        do {
            try launch(export)
        } catch {
            // Unless a start() racing us launched it after all.
            let unserved: Bool = state.withLock { state in
                guard let i = state.index(of: export), state.exports[i].thread == nil else { return false }
                state.exports.remove(at: i)
                return true
            }
            if unserved { close(export) }
            throw error
        }
    }

    /// What removing a socket (``removeExport(socketPath:)``) did to its
    /// frontend and to the requests of its queues.
    public struct RemovedExport: Sendable, Codable, Equatable {
        public var socketPath: String
        public var disk: String
        /// A frontend was connected, and was disconnected.
        public var frontendWasConnected = false
        public var frontendPID: Int32?
        /// Requests in flight on its queues when the removal began (not held
        /// by the error policy): they completed to the guest before the
        /// queues stopped.
        public var inFlight: UInt64 = 0
        /// Requests the error policy held: completed with an I/O error (the
        /// guest sees the error its policy would otherwise have kept from it).
        public var heldFailed: UInt64 = 0
        /// Requests the error policy held on a frontend that tracks inflight
        /// I/O: left marked in its inflight region, not completed, for the
        /// next backend that frontend connects to (after a reconnect) to run.
        public var heldLeftInInflightRegion: UInt64 = 0

        public init(socketPath: String, disk: String) {
            self.socketPath = socketPath
            self.disk = disk
        }
    }

    /// What each export serves and whether a frontend is connected.
    public struct ExportStatus: Sendable, Codable {
        public var socketPath: String
        public var disk: String
        public var connected: Bool
        /// While the frontend migrates its guest (VHOST_F_LOG_ALL with a
        /// dirty log from SET_LOG_BASE): the log's size in bytes.
        public var dirtyLogBytes: Int?
        /// The socket was inherited (socket activation, --fd) rather than made here.
        public var inherited: Bool?
    }

    public var exportStatus: [ExportStatus] { exportStatus { _ in true } }

    /// The sockets that serve `disk`, in the order they were added.
    public func exportStatus(of disk: Disk) -> [ExportStatus] { exportStatus { $0 === disk } }

    private func exportStatus(where include: (Disk) -> Bool) -> [ExportStatus] {
        state.withLock { state in
            state.exports.filter { include($0.export.disk) }.map {
                ExportStatus(socketPath: $0.export.path, disk: $0.export.disk.name, connected: $0.connected,
                             dirtyLogBytes: $0.dirtyLogBytes, inherited: $0.export.ownsPath ? nil : true)
            }
        }
    }

    /// The sockets that serve `disk`: whether a frontend is connected, and
    /// its backend-request channel (``notifyConfigChange(of:)``).
    func exportChannels(of disk: Disk) -> [(socketPath: String, connected: Bool, channel: BackendChannel)] {
        state.withLock { state in
            state.exports.filter { $0.export.disk === disk }.map { ($0.export.path, $0.connected, $0.export.backendChannel) }
        }
    }

    /// The socket paths served.
    public var socketPaths: [String] { state.withLock { $0.exports.map(\.export.path) } }

    /// Whether a frontend is connected to the disk's socket.
    public func isConnected(socketPath: String) -> Bool {
        state.withLock { $0.exports.first { $0.export.path == socketPath }?.connected ?? false }
    }

    /// Starts serving: a control thread for each export.
    public func start() throws(DataPlaneError) {
        let waiting: [Export] = state.withLock { state in
            state.started = true
            return state.stopping ? [] : state.exports.filter { $0.thread == nil }.map(\.export)
        }
        for export in waiting { try launch(export) }
    }

    private enum Launched { case started, alreadyRunning, stopping, failed(Errno) }

    private func launch(_ export: Export) throws(DataPlaneError) {
        // Held across the start: stop() must not miss the thread (it would
        // close the socket under it).
        let launched: Launched = state.withLock { state in
            guard !state.stopping else { return .stopping }
            // start() and addExport() raced (or a failed addExport, or a
            // removeExport, took it back).
            guard let i = state.index(of: export), state.exports[i].thread == nil, !state.exports[i].joined else {
                return .alreadyRunning
            }
            do throws(Errno) {
                state.exports[i].thread = try ControlThread { [self] in run(export) }
                return .started
            } catch {
                return .failed(error)
            }
        }
        switch launched {
        case .started, .alreadyRunning: return
        case .stopping: throw .stopped
        case .failed(let error):
            throw .system(operation: "starting the vhost-user thread of \(export.path)", errno: error.rawValue)
        }
    }

    /// Disconnects every frontend (their queues drain first), removes the
    /// sockets and ends the control threads. Idempotent.
    public func stop() {
        stopLock.withLock { _ in
            let (threads, unserved): ([ControlThread], [Export]) = state.withLock { state in
                state.stopping = true
                var running: [ControlThread] = []
                for i in state.exports.indices where !state.exports[i].joined {
                    guard let thread = state.exports[i].thread else { continue }
                    running.append(thread)
                    state.exports[i].joined = true
                }
                return (running, state.exports.filter { $0.thread == nil }.map(\.export))
            }
            let one: UInt64 = 1
            _ = withUnsafeBytes(of: one) { try? wakeFD.write($0) }
            threads.forEach { $0.join() }
            unserved.forEach(close)
        }
    }

    /// Stops serving one socket: its control thread ends, its frontend (if
    /// any) is disconnected as at `stop` (the device's reset drains its
    /// queues: in-flight requests complete; requests the error policy holds
    /// fail with an I/O error, or, when the frontend tracks inflight I/O,
    /// stay marked in its inflight region for the next backend to run), and
    /// the socket is closed and its path removed (unless inherited). Other
    /// sockets, and their disks' I/O, go on untouched: nothing another export
    /// or an IOThread waits for is held while this one drains. The disk
    /// stays open (``DataPlane/removeDisk(_:)`` closes it). Waits for a
    /// concurrent `stop`, and for another `removeExport`, to finish first.
    /// Throws `.notFound` for a socket not served, `.stopped` after `stop`.
    @discardableResult
    public func removeExport(socketPath: String) throws(DataPlaneError) -> RemovedExport {
        try stopLock.withLock { _ throws(DataPlaneError) -> RemovedExport in
            try removeExportLocked(socketPath: socketPath)
        }
    }

    /// Removes every socket of `disk` (see ``removeExport(socketPath:)``),
    /// in the order they were added; returns what each removal did.
    @discardableResult
    public func removeExports(of disk: Disk) -> [RemovedExport] {
        stopLock.withLock { _ in
            let paths = state.withLock { state in state.exports.filter { $0.export.disk === disk }.map(\.export.path) }
            return paths.compactMap { path in try? removeExportLocked(socketPath: path) }
        }
    }

    /// removeExport, with `stopLock` held.
    private func removeExportLocked(socketPath: String) throws(DataPlaneError) -> RemovedExport {
        enum Found { case stopping, missing, found(Export, ControlThread?) }
        let found: Found = state.withLock { state in
            guard !state.stopping else { return .stopping }
            guard let i = state.exports.firstIndex(where: { $0.export.path == socketPath }) else { return .missing }
            let export = state.exports[i].export
            export.removing.store(true, ordering: .releasing)
            let thread = state.exports[i].joined ? nil : state.exports[i].thread
            state.exports[i].joined = true
            return .found(export, thread)
        }
        guard case .found(let export, let thread) = found else {
            if case .stopping = found { throw .stopped }
            throw .notFound("socket \(socketPath.debugDescription) among the served sockets")
        }
        if let thread {
            let one: UInt64 = 1
            _ = withUnsafeBytes(of: one) { try? export.wakeFD.write($0) }
            thread.join() // its last disconnect drains the frontend's queues
        }
        state.withLock { state in
            if let i = state.index(of: export) { state.exports.remove(at: i) }
            // A disk with no socket left starts its frontends from 0 again,
            // should its ObjectIdentifier come back.
            if !state.exports.contains(where: { $0.export.disk === export.disk }) {
                state.exportsMade[ObjectIdentifier(export.disk)] = nil
            }
        }
        close(export)
        return export.removal.withLock { $0 } ?? RemovedExport(socketPath: export.path, disk: export.disk.name)
    }

    // MARK: - The control threads

    private func run(_ export: Export) {
        let session = Session(export: export, plane: plane)
        while !state.withLock({ $0.stopping }) && !export.removing.load(ordering: .acquiring) {
            var fds = [pollfd(fd: wakeFD.rawValue, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: export.wakeFD.rawValue, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: export.listenFD.rawValue, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: session.connection?.fd.rawValue ?? -1, events: Int16(POLLIN), revents: 0)]
            if poll(&fds, nfds_t(fds.count), -1) < 0 {
                let error = Errno(rawValue: errno)
                if error == .interrupted { continue }
                session.logger.error("\(export.path): poll failed, no longer served: \(DataPlaneError.message(error.rawValue))")
                break
            }
            if fds[3].revents != 0, let connection = session.connection, let reason = serve(session, connection) {
                disconnect(session, reason: reason)
            }
            if fds[2].revents & Int16(POLLIN) != 0 { accept(session) }
        }
        let removing = export.removing.load(ordering: .acquiring)
        var report = RemovedExport(socketPath: export.path, disk: export.disk.name)
        if session.connection != nil {
            report.frontendWasConnected = true
            report.frontendPID = session.connection.map { dps_peer_pid($0.fd.rawValue) }.flatMap { $0 > 0 ? $0 : nil }
            // Counted before the reset stops the rings: what the stop then
            // does to them (see RemovedExport).
            for queue in session.device.runningQueues {
                let s = queue.statistics()
                report.inFlight += s.inFlight >= s.heldRequests ? s.inFlight - s.heldRequests : 0
                if session.device.tracksInflight {
                    report.heldLeftInInflightRegion += s.heldRequests
                } else {
                    report.heldFailed += s.heldRequests
                }
            }
            disconnect(session, reason: removing ? "its socket is being removed" : "server stopping")
        }
        close(export)
        if removing { export.removal.withLock { $0 = report } }
    }

    /// Removes an export's path and closes its socket, once. In that order:
    /// closed first, the path would look stale to another process, which
    /// could take it over before our unlink removed its socket.
    private func close(_ export: Export) {
        guard !export.closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if export.ownsPath { unlink(export.path) }
        try? export.listenFD.close()
    }

    private func accept(_ session: Session) {
        let path = session.export.path
        let fd = dps_accept(session.export.listenFD.rawValue)
        guard fd >= 0 else { return }
        let pid = dps_peer_pid(fd)
        if session.connection != nil {
            session.logger.warning("\(path): refused a second frontend (one is connected)",
                                   metadata: pid > 0 ? ["frontend-pid": "\(pid)"] : nil)
            closeFD(fd)
            return
        }
        session.connection = Connection(fd: FileDescriptor(rawValue: fd))
        setConnected(session.export, true)
        session.frontends += 1
        session.logger[metadataKey: "frontend"] = "\(session.frontends)"
        session.logger[metadataKey: "frontend-pid"] = pid > 0 ? "\(pid)" : nil
        session.device.logger = session.logger
        session.logger.info("\(path): frontend connected")
    }

    private func disconnect(_ session: Session, reason: String) {
        session.logger.info("\(session.export.path): frontend disconnected: \(reason)")
        session.device.reset()
        session.connection = nil
        setConnected(session.export, false)
        session.logger[metadataKey: "frontend"] = nil
        session.logger[metadataKey: "frontend-pid"] = nil
        session.device.logger = session.logger
    }

    private func setConnected(_ export: Export, _ connected: Bool) {
        state.withLock { state in
            if let i = state.index(of: export) {
                state.exports[i].connected = connected
                if !connected { state.exports[i].dirtyLogBytes = nil }
            }
        }
    }

    /// Reads what is there; handles complete messages (a bounded number, so
    /// a flood cannot keep the thread from seeing a stop). Returns why the
    /// connection must close, or nil to keep it.
    private func serve(_ session: Session, _ c: Connection) -> String? {
        var handled = 0
        while handled < Self.messagesPerWake {
            let inHeader = c.headerFilled < vhostUserHeaderSize
            let want = inHeader ? vhostUserHeaderSize - c.headerFilled : c.payload.count - c.payloadFilled
            if !inHeader && want == 0 {
                let message = VhostUserMessage(request: header(c, 0), flags: header(c, 4), payload: c.payload, fds: c.fds)
                c.fds = []
                c.resetMessage()
                if let reason = process(session, c, message) { return reason }
                handled += 1
                continue
            }
            var received = [Int32](repeating: -1, count: 8)
            var count: Int32 = 0
            var truncated = false
            let r: Int = inHeader
                ? c.header.withUnsafeMutableBytes { dps_recv_fds(c.fd.rawValue, $0.baseAddress! + c.headerFilled, want, &received, 8, &count, &truncated) }
                : c.payload.withUnsafeMutableBytes { dps_recv_fds(c.fd.rawValue, $0.baseAddress! + c.payloadFilled, want, &received, 8, &count, &truncated) }
            c.fds += received.prefix(Int(count))
            if truncated || c.fds.count > 8 { return "more file descriptors than a message may carry" }
            if r == -EAGAIN || r == -EWOULDBLOCK { return nil }
            if r == 0 { return inHeader && c.headerFilled == 0 ? "closed by the frontend" : "closed in the middle of a message" }
            if r < 0 { return "read failed: \(DataPlaneError.message(Int32(-r)))" }
            if inHeader {
                c.headerFilled += r
                if c.headerFilled == vhostUserHeaderSize {
                    let flags = header(c, 4), size = Int(header(c, 8))
                    if flags & VhostUserFlags.versionMask != VhostUserFlags.version {
                        return "protocol version \(flags & VhostUserFlags.versionMask) (expected 1)"
                    }
                    if size > vhostUserMaxPayload { return "payload size \(size) exceeds \(vhostUserMaxPayload)" }
                    c.payload = [UInt8](repeating: 0, count: size)
                }
            } else {
                c.payloadFilled += r
            }
        }
        return nil
    }

    private func header(_ c: Connection, _ offset: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(c.header[offset + $1]) << (8 * UInt32($1)) }
    }

    /// Handles one message; returns why the connection must close, or nil.
    private func process(_ session: Session, _ c: Connection, _ message: VhostUserMessage) -> String? {
        session.logger.trace("vhost-user \(VhostUserRequest.name(message.request))",
                            metadata: Self.traceMetadata(flags: message.flags, payload: message.payload, fds: message.fds.count))
        let outcome = session.device.process(message)
        if message.request == VhostUserRequest.setLogBase.rawValue || message.request == VhostUserRequest.setFeatures.rawValue
            || message.request == VhostUserRequest.resetOwner.rawValue || message.request == VhostUserRequest.resetDevice.rawValue {
            let logging = session.device.loggingDirtyPages ? session.device.dirtyLogBytes : nil
            state.withLock { state in
                if let i = state.index(of: session.export) { state.exports[i].dirtyLogBytes = logging }
            }
        }
        if let logLine = outcome.logLine { session.logger.warning("\(session.export.path): \(logLine)") }
        if let reply = outcome.reply {
            session.logger.trace("vhost-user \(VhostUserRequest.name(message.request)) reply",
                                metadata: Self.traceMetadata(flags: VhostUserFlags.version | VhostUserFlags.reply,
                                                             payload: reply.payload, fds: reply.fds.count))
        }
        if let reply = outcome.reply, !send(c, request: message.request, payload: reply.payload, fds: reply.fds) {
            return "reply failed"
        }
        return outcome.closeReason
    }

    /// A message's flags, size, file descriptors and (up to 64 bytes) payload in hex.
    private static func traceMetadata(flags: UInt32, payload: [UInt8], fds: Int) -> Logger.Metadata {
        var m: Logger.Metadata = ["flags": "0x\(String(flags, radix: 16))", "size": "\(payload.count)", "fds": "\(fds)"]
        if !payload.isEmpty {
            let hex = payload.prefix(64).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
            m["payload"] = "\(hex)\(payload.count > 64 ? "..." : "")"
        }
        return m
    }

    private func send(_ c: Connection, request: UInt32, payload: [UInt8], fds: [Int32]) -> Bool {
        defer { fds.forEach { closeFD($0) } }
        var bytes: [UInt8] = []
        bytes.appendLE(request)
        bytes.appendLE(VhostUserFlags.version | VhostUserFlags.reply)
        bytes.appendLE(UInt32(payload.count))
        bytes += payload
        var sent = 0
        var first = true
        while sent < bytes.count {
            let r = bytes.withUnsafeBytes { raw in
                fds.withUnsafeBufferPointer { fdBuffer in
                    dps_send_fds(c.fd.rawValue, raw.baseAddress! + sent, raw.count - sent,
                                 first ? fdBuffer.baseAddress : nil, first ? Int32(fdBuffer.count) : 0)
                }
            }
            if r == -EAGAIN || r == -EWOULDBLOCK {
                var p = pollfd(fd: c.fd.rawValue, events: Int16(POLLOUT), revents: 0)
                if poll(&p, 1, 1000) <= 0 { return false }
                continue
            }
            if r <= 0 { return false }
            sent += r
            first = false
        }
        return true
    }
}
