#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlaneSys
import Logging

/// A vhost-user-blk server: one unix socket per disk, one frontend at a time
/// per disk, each disk served by its own control thread. A frontend can only
/// hold up its own disk: a flood of messages, replies it does not read, or a
/// drain that waits for its guest's slow requests (GET_VRING_BASE, memory
/// changes) never delay another disk's frontend. The data path never passes
/// through here.
///
/// It logs to a swift-log `Logger`, each line with the disk's `disk` and
/// `socket`, the `frontend` (the connection's number on that socket) and its
/// `frontend-pid`, and `queue` where one is concerned; at `trace` level every
/// vhost-user message and reply.
public final class VhostUserServer: @unchecked Sendable {
    // An export's device and connection are touched by its own thread only;
    // `exports`, `started`, `stopping`, each export's `thread` and its
    // `connection` (for status) change under `lock`.

    /// Messages one wake-up handles before polling again (and seeing a stop).
    private static let messagesPerWake = 64

    private final class Export {
        let device: VhostUserBlkDevice
        let path: String
        let listenFD: Int32
        /// Whether the socket file is ours to remove at the end: not when it
        /// was inherited (systemd's socket unit owns it, and keeps listening).
        let ownsPath: Bool
        /// With the disk's and socket's metadata (and the frontend's, while one is connected).
        var logger: Logger
        /// Frontends accepted so far: the `frontend` metadata.
        var frontends = 0
        var connection: Connection?
        var thread: pthread_t?
        var joined = false
        var closed = false

        init(device: VhostUserBlkDevice, path: String, listenFD: Int32, ownsPath: Bool, logger: Logger) {
            self.device = device
            self.path = path
            self.listenFD = listenFD
            self.ownsPath = ownsPath
            self.logger = logger
        }
    }

    private final class Connection {
        let fd: Int32
        var header = [UInt8](repeating: 0, count: vhostUserHeaderSize)
        var headerFilled = 0
        var payload: [UInt8] = []
        var payloadFilled = 0
        var fds: [Int32] = []

        init(fd: Int32) { self.fd = fd }

        func resetMessage() {
            headerFilled = 0
            payload = []
            payloadFilled = 0
            fds = []
        }

        deinit {
            fds.forEach { closeFD($0) }
            closeFD(fd)
        }
    }

    private let plane: DataPlane
    private let logger: Logger
    private let lock = Lock()
    /// Held through a whole stop(): a second one waits for the first.
    private let stopLock = Lock()
    private var exports: [Export] = []
    private var started = false
    private var stopping = false
    /// Readable once stopping: every export's thread polls it.
    private let wakeFD: Int32

    /// A server for `plane`'s disks, logging to `logger` (by default one
    /// labelled "dataplane.vhost-user", through whatever LoggingSystem the
    /// program bootstrapped).
    public init(plane: DataPlane, logger: Logger = Logger(label: "dataplane.vhost-user")) throws(DataPlaneError) {
        self.plane = plane
        self.logger = logger
        let fd = dps_eventfd(0, true)
        guard fd >= 0 else { throw .system(operation: "eventfd", errno: -fd) }
        wakeFD = fd
    }

    deinit {
        stop()
        closeFD(wakeFD)
    }

    /// Listens for a frontend of `disk` at `socketPath` (served at once when
    /// the server has started). A stale socket file (nobody listening) is
    /// replaced; a live one, or a path that is not a socket, is an error
    /// (see ``UnixSocket/listen(at:backlog:permissions:)``). The path gets
    /// `permissions` before it listens, and is removed at stop.
    public func addExport(disk: Disk, socketPath: String,
                          permissions: SocketPermissions = SocketPermissions()) throws(DataPlaneError) {
        let fd = try UnixSocket.listen(at: socketPath, backlog: 4, permissions: permissions)
        try addExport(disk: disk, listenFD: fd, name: socketPath, ownsPath: true)
    }

    /// Serves `disk` on a socket that already listens (socket activation,
    /// `--fd`; see ``UnixSocket/adopt(fd:origin:)``), which the server now
    /// owns and closes at stop. `name` stands for it in logs and status. Its
    /// path, if any, is left in place: whoever bound it (systemd) keeps it.
    public func addExport(disk: Disk, inheritedFD fd: Int32, name: String) throws(DataPlaneError) {
        try addExport(disk: disk, listenFD: fd, name: name, ownsPath: false)
    }

    private func addExport(disk: Disk, listenFD fd: Int32, name socketPath: String, ownsPath: Bool) throws(DataPlaneError) {
        var logger = self.logger
        logger[metadataKey: "disk"] = "\(disk.name)"
        logger[metadataKey: "socket"] = "\(socketPath)"
        let export = Export(device: VhostUserBlkDevice(disk: disk, plane: plane, logger: logger), path: socketPath,
                            listenFD: fd, ownsPath: ownsPath, logger: logger)
        let serveNow: Bool? = lock.withLock {
            guard !stopping else { return nil }
            exports.append(export)
            return started
        }
        guard let serveNow else {
            close(export)
            throw .stopped
        }
        guard serveNow else { return }
        do {
            try launch(export)
        } catch {
            // Unless a start() racing us launched it after all.
            let unserved: Bool = lock.withLock {
                guard export.thread == nil else { return false }
                exports.removeAll { $0 === export }
                return true
            }
            if unserved { close(export) }
            throw error
        }
    }

    /// What each export serves and whether a frontend is connected.
    public struct ExportStatus: Sendable, Codable {
        public var socketPath: String
        public var disk: String
        public var connected: Bool
        /// The socket was inherited (socket activation, --fd) rather than made here.
        public var inherited: Bool?
    }

    public var exportStatus: [ExportStatus] {
        lock.withLock {
            exports.map { ExportStatus(socketPath: $0.path, disk: $0.device.disk.name, connected: $0.connection != nil,
                                       inherited: $0.ownsPath ? nil : true) }
        }
    }

    /// The socket paths served.
    public var socketPaths: [String] { lock.withLock { exports.map(\.path) } }

    /// Whether a frontend is connected to the disk's socket.
    public func isConnected(socketPath: String) -> Bool {
        lock.withLock { exports.first { $0.path == socketPath }?.connection != nil }
    }

    /// Starts serving: a control thread for each export.
    public func start() throws(DataPlaneError) {
        let waiting: [Export] = lock.withLock {
            started = true
            return stopping ? [] : exports.filter { $0.thread == nil }
        }
        for export in waiting { try launch(export) }
    }

    /// What a new control thread is handed.
    private final class Launch {
        let server: VhostUserServer
        let export: Export
        init(server: VhostUserServer, export: Export) {
            self.server = server
            self.export = export
        }
    }

    private func launch(_ export: Export) throws(DataPlaneError) {
        let box = Unmanaged.passRetained(Launch(server: self, export: export))
        // Held across the create: stop() must not miss the thread (it would
        // close the socket under it).
        let ret: Int32 = lock.withLock {
            guard !stopping else { return ESHUTDOWN }
            guard export.thread == nil else { return EALREADY } // start() and addExport() raced
            var tid = pthread_t()
            let ret = pthread_create(&tid, nil, { arg in
                let launch = Unmanaged<Launch>.fromOpaque(arg!).takeRetainedValue()
                launch.server.run(launch.export)
                return nil
            }, box.toOpaque())
            if ret == 0 { export.thread = tid }
            return ret
        }
        guard ret == 0 else {
            box.release()
            if ret == EALREADY { return }
            if ret == ESHUTDOWN { throw .stopped }
            throw .system(operation: "starting the vhost-user thread of \(export.path)", errno: ret)
        }
    }

    /// Disconnects every frontend (their queues drain first), removes the
    /// sockets and ends the control threads. Idempotent.
    public func stop() {
        stopLock.withLock {
            let (threads, unserved): ([pthread_t], [Export]) = lock.withLock {
                stopping = true
                let running = exports.filter { $0.thread != nil && !$0.joined }
                running.forEach { $0.joined = true }
                return (running.compactMap(\.thread), exports.filter { $0.thread == nil })
            }
            var one: UInt64 = 1
            _ = write(wakeFD, &one, 8)
            threads.forEach { pthread_join($0, nil) }
            unserved.forEach(close)
        }
    }

    // MARK: - The control threads

    private func run(_ export: Export) {
        while !lock.withLock({ stopping }) {
            var fds = [pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: export.listenFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: export.connection?.fd ?? -1, events: Int16(POLLIN), revents: 0)]
            if poll(&fds, nfds_t(fds.count), -1) < 0 {
                if errno == EINTR { continue }
                export.logger.error("\(export.path): poll failed, no longer served: \(DataPlaneError.message(errno))")
                break
            }
            if fds[2].revents != 0, let connection = export.connection, let reason = serve(export, connection) {
                disconnect(export, reason: reason)
            }
            if fds[1].revents & Int16(POLLIN) != 0 { accept(export) }
        }
        if export.connection != nil { disconnect(export, reason: "server stopping") }
        close(export)
    }

    /// Removes an export's path and closes its socket, once. In that order:
    /// closed first, the path would look stale to another process, which
    /// could take it over before our unlink removed its socket.
    private func close(_ export: Export) {
        let first: Bool = lock.withLock {
            defer { export.closed = true }
            return !export.closed
        }
        guard first else { return }
        if export.ownsPath { unlink(export.path) }
        closeFD(export.listenFD)
    }

    private func accept(_ export: Export) {
        let fd = dps_accept(export.listenFD)
        guard fd >= 0 else { return }
        let pid = dps_peer_pid(fd)
        if export.connection != nil {
            export.logger.warning("\(export.path): refused a second frontend (one is connected)",
                                  metadata: pid > 0 ? ["frontend-pid": "\(pid)"] : nil)
            closeFD(fd)
            return
        }
        lock.withLock { export.connection = Connection(fd: fd) }
        export.frontends += 1
        export.logger[metadataKey: "frontend"] = "\(export.frontends)"
        export.logger[metadataKey: "frontend-pid"] = pid > 0 ? "\(pid)" : nil
        export.device.logger = export.logger
        export.logger.info("\(export.path): frontend connected")
    }

    private func disconnect(_ export: Export, reason: String) {
        export.logger.info("\(export.path): frontend disconnected: \(reason)")
        export.device.reset()
        lock.withLock { export.connection = nil }
        export.logger[metadataKey: "frontend"] = nil
        export.logger[metadataKey: "frontend-pid"] = nil
        export.device.logger = export.logger
    }

    /// Reads what is there; handles complete messages (a bounded number, so
    /// a flood cannot keep the thread from seeing a stop). Returns why the
    /// connection must close, or nil to keep it.
    private func serve(_ export: Export, _ c: Connection) -> String? {
        var handled = 0
        while handled < Self.messagesPerWake {
            let inHeader = c.headerFilled < vhostUserHeaderSize
            let want = inHeader ? vhostUserHeaderSize - c.headerFilled : c.payload.count - c.payloadFilled
            if !inHeader && want == 0 {
                let message = VhostUserMessage(request: header(c, 0), flags: header(c, 4), payload: c.payload, fds: c.fds)
                c.fds = []
                c.resetMessage()
                if let reason = process(export, c, message) { return reason }
                handled += 1
                continue
            }
            var received = [Int32](repeating: -1, count: 8)
            var count: Int32 = 0
            var truncated = false
            let r: Int = inHeader
                ? c.header.withUnsafeMutableBytes { dps_recv_fds(c.fd, $0.baseAddress! + c.headerFilled, want, &received, 8, &count, &truncated) }
                : c.payload.withUnsafeMutableBytes { dps_recv_fds(c.fd, $0.baseAddress! + c.payloadFilled, want, &received, 8, &count, &truncated) }
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
    private func process(_ export: Export, _ c: Connection, _ message: VhostUserMessage) -> String? {
        export.logger.trace("vhost-user \(VhostUserRequest.name(message.request))",
                            metadata: Self.traceMetadata(flags: message.flags, payload: message.payload, fds: message.fds.count))
        let outcome = export.device.process(message)
        if let logLine = outcome.logLine { export.logger.warning("\(export.path): \(logLine)") }
        if let reply = outcome.reply {
            export.logger.trace("vhost-user \(VhostUserRequest.name(message.request)) reply",
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
                    dps_send_fds(c.fd, raw.baseAddress! + sent, raw.count - sent,
                                 first ? fdBuffer.baseAddress : nil, first ? Int32(fdBuffer.count) : 0)
                }
            }
            if r == -EAGAIN || r == -EWOULDBLOCK {
                var p = pollfd(fd: c.fd, events: Int16(POLLOUT), revents: 0)
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
