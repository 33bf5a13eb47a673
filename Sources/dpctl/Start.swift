import CDataPlaneSys
import DataPlane
import Foundation
import Logging

/// What `dpctl start` serves: from the command line or a --config file
/// (see ConfigFile). Unset settings take the defaults.
struct InstanceConfiguration {
    struct DiskEntry {
        var path: String
        var socket: String
        /// Further sockets serving the same disk (socket= repeated), each
        /// to a frontend of its own: a migrating guest's destination QEMU
        /// connects to one while its source still uses `socket`.
        var extraSockets: [String] = []
        var readOnly: Bool?
        var numQueues: Int?
        var queueSize: Int?
        var backend: String?
        var serial: String?
        var directIO: Bool?
        var logicalBlockSize: UInt32?
        var nullSize: UInt64?
        var nullReadZeroes: Bool?
        var readErrorPolicy: ErrorPolicy?
        var writeErrorPolicy: ErrorPolicy?
        var fault: String?
        var locking: ImageLocking?
        var fixedBuffers: Bool?
        /// Who may connect: a user and group (names or numbers) and a mode.
        var socketOwner: String?
        var socketGroup: String?
        var socketMode: mode_t?
        /// --fd: the disk's socket is this inherited, listening fd (and
        /// `socket` is the path it is bound to, or "fd N").
        var fd: Int32?
        /// I/O limit keys given (IOLimits.keys) and the throttle group.
        var limits: [String: UInt64] = [:]
        var group: String?
        /// write-cache=on|off: the disk's starting write cache mode.
        var writeCache: Bool?
    }

    var iothreads: Int?
    var cpuset: String?
    var pollMicroseconds: UInt32?
    var notifyAfter: UInt32?
    var control: String?
    var disabledIOURing: IOURingFeatures?
    /// The socket owner, group and mode of disks that do not set their own.
    var socketOwner: String?
    var socketGroup: String?
    var socketMode: mode_t?
    /// Where to serve GET /metrics (nil: nowhere).
    var metricsAddress: MetricsAddress?
    var disks: [DiskEntry]
    /// --check: print the configuration and exit without serving.
    var checkOnly = false
}

/// The configuration `dpctl start --check` prints: a --config file with every
/// default filled in, keys named as the flags.
struct EffectiveConfiguration: Encodable {
    struct Disk: Encodable {
        var path: String
        /// One path, or a list when the disk is served on several sockets.
        var socket: SocketPaths
        var readonly: Bool
        var numQueues: Int
        var queueSize: Int
        var backend: String
        var nullSize: UInt64
        var nullReadZeroes: Bool
        var serial: String
        var direct: Bool
        /// nil: follows the image (known once it is opened).
        var blockSize: UInt32?
        var rerror: ErrorPolicy
        var werror: ErrorPolicy
        var fault: String?
        var locking: ImageLocking
        var fixedBuffers: Bool
        var socketOwner: String?
        var socketGroup: String?
        var socketMode: String?
        var writeCache: Bool = true

        enum CodingKeys: String, CodingKey {
            case path, socket, readonly, backend, serial, direct, rerror, werror, fault, locking
            case numQueues = "num-queues", queueSize = "queue-size", nullSize = "null-size"
            case nullReadZeroes = "null-read-zeroes", blockSize = "block-size", fixedBuffers = "fixed-buffers"
            case socketOwner = "socket-owner", socketGroup = "socket-group", socketMode = "socket-mode"
            case writeCache = "write-cache"
        }
    }

    /// A disk's socket= as the config file takes it: a string, or a list.
    struct SocketPaths: Encodable {
        var paths: [String]

        func encode(to encoder: any Encoder) throws {
            var container = encoder.singleValueContainer()
            if paths.count == 1 { try container.encode(paths[0]) } else { try container.encode(paths) }
        }
    }

    var iothreads: Int
    var cpuset: String
    var pollMicroseconds: UInt32
    var notifyAfter: UInt32
    /// nil: no control socket (see StartCommand.controlPath).
    var control: String?
    /// The names of the io_uring features left unused.
    var disableIOURing: [String]
    /// Absent when the metrics are not served.
    var metricsAddress: String?
    var disks: [DiskWithLimits]

    /// A disk and its I/O limit keys (and group), side by side in one object.
    struct DiskWithLimits: Encodable {
        var disk: Disk
        var limits: IOLimits
        var group: String?

        private struct GroupKey: CodingKey {
            var stringValue: String
            var intValue: Int? { nil }
            init(stringValue: String) { self.stringValue = stringValue }
            init?(intValue: Int) { nil }
        }

        func encode(to encoder: any Encoder) throws {
            try disk.encode(to: encoder)
            try limits.encode(to: encoder)
            if let group {
                var c = encoder.container(keyedBy: GroupKey.self)
                try c.encode(group, forKey: GroupKey(stringValue: "group"))
            }
        }
    }

    enum CodingKeys: String, CodingKey {
        case iothreads, cpuset, control, disks
        case pollMicroseconds = "poll-us", notifyAfter = "notify-after", disableIOURing = "disable-io-uring"
        case metricsAddress = "metrics-address"
    }
}

enum StartCommand {
    /// dpctl's own defaults (the disk's others are DiskConfiguration's); the
    /// help shows these values.
    static let defaultIOThreads = 1
    static let defaultPollMicroseconds: UInt32 = 32
    /// QEMU asks for one queue per vCPU and refuses to start when offered fewer.
    static let defaultNumQueues = 16
    /// QEMU's largest virtqueue (VIRTQUEUE_MAX_SIZE).
    static let defaultQueueSize = 1024

    /// The configuration from start's options: disks from --disk (already in
    /// key=value form) or --config, instance options overriding the file.
    static func configuration(_ o: Start) throws(CLIError) -> InstanceConfiguration {
        var config = InstanceConfiguration(disks: [])
        config.checkOnly = o.check
        config.iothreads = try checkRange(o.iothreads, option: "--iothreads", range: 1...256)
        config.cpuset = o.cpuset
        config.pollMicroseconds = try checkRange(o.pollUs, option: "--poll-us", range: 0...1_000_000).map(UInt32.init)
        config.notifyAfter = try checkRange(o.notifyAfter, option: "--notify-after",
                                            range: 0...Int(IOThreadConfiguration.maxNotifyAfter)).map(UInt32.init)
        config.control = o.control
        if let text = o.disableIOURing { config.disabledIOURing = try parseIOURingFeatures(text, option: "--disable-io-uring") }
        if let text = o.metricsAddress { config.metricsAddress = try MetricsAddress.parse(text, option: "--metrics-address") }
        if o.socketPath != nil && o.fd != nil {
            throw CLIError("--socket-path and --fd conflict: the one disk listens on a path or on an inherited socket", usage: true)
        }
        let socketElsewhere = o.socketPath != nil || o.fd != nil
        config.disks = try o.disks.map { (text: String) throws(CLIError) in try DiskSpec.parse(text, socketElsewhere: socketElsewhere) }
        config.socketOwner = try o.socketOwner.map { (t: String) throws(CLIError) in try SocketOwnership.checkName(t, option: "--socket-owner") }
        config.socketGroup = try o.socketGroup.map { (t: String) throws(CLIError) in try SocketOwnership.checkName(t, option: "--socket-group") }
        config.socketMode = try o.socketMode.map { (t: String) throws(CLIError) in try SocketOwnership.parseMode(t, option: "--socket-mode") }
        if let configFile = o.config {
            if !config.disks.isEmpty { throw CLIError("--config and --disk conflict: put the disks in the file", usage: true) }
            if socketElsewhere {
                throw CLIError("--config and \(o.fd != nil ? "--fd" : "--socket-path") conflict: put the socket in the file", usage: true)
            }
            guard let data = FileManager.default.contents(atPath: configFile) else {
                throw CLIError("cannot read config file \(configFile.debugDescription)")
            }
            var fromFile = try ConfigFile.parse(data, file: configFile)
            fromFile.iothreads = config.iothreads ?? fromFile.iothreads
            fromFile.cpuset = config.cpuset ?? fromFile.cpuset
            fromFile.pollMicroseconds = config.pollMicroseconds ?? fromFile.pollMicroseconds
            fromFile.notifyAfter = config.notifyAfter ?? fromFile.notifyAfter
            fromFile.control = config.control ?? fromFile.control
            fromFile.disabledIOURing = config.disabledIOURing ?? fromFile.disabledIOURing
            fromFile.socketOwner = config.socketOwner ?? fromFile.socketOwner
            fromFile.socketGroup = config.socketGroup ?? fromFile.socketGroup
            fromFile.socketMode = config.socketMode ?? fromFile.socketMode
            fromFile.metricsAddress = config.metricsAddress ?? fromFile.metricsAddress
            fromFile.checkOnly = config.checkOnly
            config = fromFile
        }
        if config.disks.isEmpty {
            throw CLIError("nothing to serve: give --disk path=PATH,socket=PATH (or --config FILE)", usage: true)
        }
        if socketElsewhere {
            let option = o.fd != nil ? "--fd" : "--socket-path"
            guard config.disks.count == 1 else {
                throw CLIError("\(option) serves one disk; \(config.disks.count) are given (give each its socket=)", usage: true)
            }
            guard config.disks[0].socket.isEmpty else {
                throw CLIError("\(option) and the disk's socket= conflict: give one", usage: true)
            }
            if let path = o.socketPath {
                guard !path.isEmpty else { throw CLIError("--socket-path needs a path", usage: true) }
                config.disks[0].socket = path
            }
            if let fd = o.fd {
                guard fd >= 0 else { throw CLIError("--fd \(fd) is not a file descriptor", usage: true) }
                let inherited: UnixSocket.Inherited
                do { inherited = try UnixSocket.describe(fd: fd, origin: "--fd \(fd)") } catch { throw CLIError("\(error)") }
                config.disks[0].fd = fd
                config.disks[0].socket = inherited.address ?? "fd \(fd)"
            }
        }
        for i in config.disks.indices {
            if o.readOnly {
                if config.disks[i].readOnly == false {
                    throw CLIError("--read-only and readonly=off of \(config.disks[i].path) conflict", usage: true)
                }
                config.disks[i].readOnly = true
            }
            config.disks[i].socketOwner = config.disks[i].socketOwner ?? config.socketOwner
            config.disks[i].socketGroup = config.disks[i].socketGroup ?? config.socketGroup
            config.disks[i].socketMode = config.disks[i].socketMode ?? config.socketMode
            // Names are looked up now, so that --check and a reload catch an unknown one.
            _ = try SocketOwnership.permissions(config.disks[i])
        }
        let sockets = config.disks.flatMap { [$0.socket] + $0.extraSockets }
        if Set(sockets).count != sockets.count {
            let twice = Dictionary(grouping: sockets, by: { $0 }).filter { $0.value.count > 1 }.keys.sorted()
            throw CLIError("socket \(twice.joined(separator: ", ")) is given twice (each socket serves one frontend)", usage: true)
        }
        return config
    }

    /// The control socket's path: --control, else the first disk's socket
    /// path + ".ctl"; nil when the first disk has no path (--fd on a socket
    /// bound to none, or to an abstract name) and no --control was given.
    static func controlPath(_ config: InstanceConfiguration) -> String? {
        if let control = config.control { return control }
        let first = config.disks[0]
        if first.fd != nil && (first.socket.hasPrefix("fd ") || first.socket.hasPrefix("@")) { return nil }
        return first.socket + ".ctl"
    }

    static func diskConfiguration(_ d: InstanceConfiguration.DiskEntry) throws -> DiskConfiguration {
        guard let backend = BackendKind(rawValue: d.backend ?? "file") else {
            throw CLIError("backend \(d.backend ?? "").debugDescription) of \(d.path): use file or null")
        }
        var c = DiskConfiguration(path: d.path, backend: backend, serial: d.serial)
        if let readOnly = d.readOnly { c.readOnly = readOnly }
        if let direct = d.directIO { c.directIO = direct }
        if let size = d.logicalBlockSize { c.logicalBlockSize = size }
        c.numQueues = d.numQueues ?? defaultNumQueues
        c.queueSize = d.queueSize ?? defaultQueueSize
        if let size = d.nullSize { c.nullSizeBytes = size }
        if let zeroes = d.nullReadZeroes { c.nullReadZeroes = zeroes }
        if let p = d.readErrorPolicy { c.readErrorPolicy = p }
        if let p = d.writeErrorPolicy { c.writeErrorPolicy = p }
        if let locking = d.locking { c.imageLocking = locking }
        if let fixed = d.fixedBuffers { c.fixedBuffers = fixed }
        if let writeCache = d.writeCache { c.writeCache = writeCache }
        return c
    }

    /// "defer-taskrun,fixed-buffers", "all" or "none".
    static func parseIOURingFeatures(_ text: String, option: String) throws(CLIError) -> IOURingFeatures {
        let names = text.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }
        guard !names.isEmpty, let features = IOURingFeatures(names: names) else {
            let known = (IOURingFeatures.named.map(\.name) + ["all", "none"]).joined(separator: ", ")
            throw CLIError("\(option) \(text.debugDescription): use a comma list of \(known)", usage: true)
        }
        return features
    }

    /// errno=EIO,ops=read+write,sectors=A-B,after=N,every=N
    static func parseFault(_ text: String) throws(CLIError) -> FaultInjection {
        var fault = FaultInjection(errno: 5)
        for part in text.split(separator: ",") {
            let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { throw CLIError("--fault: \(String(part).debugDescription) is not key=value", usage: true) }
            switch kv[0] {
            case "errno":
                let names: [String: Int32] = ["EIO": 5, "ENOSPC": 28, "EROFS": 30, "EDQUOT": 122]
                guard let e = names[kv[1].uppercased()] ?? Int32(kv[1]), e > 0 else {
                    throw CLIError("--fault: errno \(kv[1].debugDescription): use EIO, ENOSPC or a number", usage: true)
                }
                fault.errno = e
            case "ops":
                let names: [String: FaultInjection.Operation] = ["read": .read, "write": .write, "flush": .flush,
                                                                 "discard": .discard, "write-zeroes": .writeZeroes]
                fault.operations = try kv[1].split(separator: "+").map { (op: Substring) throws(CLIError) -> FaultInjection.Operation in
                    guard let o = names[String(op)] else { throw CLIError("--fault: unknown op \(String(op).debugDescription)", usage: true) }
                    return o
                }
            case "sectors":
                let ends = kv[1].split(separator: "-").compactMap { UInt64($0) }
                guard ends.count == 2, ends[0] < ends[1] else { throw CLIError("--fault: sectors \(kv[1].debugDescription) is not START-END", usage: true) }
                fault.sectors = ends[0]..<ends[1]
            case "after":
                guard let n = UInt64(kv[1]) else { throw CLIError("--fault: after \(kv[1].debugDescription) is not a count", usage: true) }
                fault.after = n
            case "every":
                guard let n = UInt32(kv[1]), n > 0 else { throw CLIError("--fault: every \(kv[1].debugDescription) is not a positive count", usage: true) }
                fault.every = n
            default:
                throw CLIError("--fault: unknown key \(kv[0].debugDescription) (errno, ops, sectors, after, every)", usage: true)
            }
        }
        return fault
    }

    /// The IOThreads' CPUs: --cpuset, checked to be online and allowed to
    /// this process, or by default every CPU the process may run on (so
    /// taskset, systemd's AllowedCPUs= and a container's cpuset are obeyed).
    static func resolveCPUSet(_ text: String?) throws -> CPUSet {
        let allowed: CPUSet
        do { allowed = try CPUSet.allowed() } catch { throw CLIError("\(error)") }
        guard let text else { return allowed }
        let cpuset: CPUSet
        do { cpuset = try CPUSet(parsing: text) } catch { throw CLIError("--cpuset: \(error)", usage: true) }
        do {
            // Offline CPUs are named as such; sysfs may be missing in a sandbox.
            if let online = try? CPUSet.online() { try cpuset.validateOnline(online) }
            try cpuset.validateAllowed(allowed)
        } catch {
            throw CLIError("--cpuset: \(error)")
        }
        return cpuset
    }

    /// A warning when IOThreads outnumber their CPUs, or nil.
    static func sharedCPUWarning(threads: Int, cpuset: CPUSet) -> String? {
        guard threads > cpuset.cpus.count else { return nil }
        return "\(threads) IOThreads on \(cpuset.cpus.count) CPU(s) (\(cpuset)): IOThreads take the CPUs round-robin "
            + "and share them, which costs latency; use --iothreads \(cpuset.cpus.count) or more CPUs"
    }

    static func run(_ options: Start) throws {
        let config = try configuration(options)
        let cpuset = try resolveCPUSet(config.cpuset)
        let threadCount = config.iothreads ?? defaultIOThreads
        let pollMicroseconds = config.pollMicroseconds ?? defaultPollMicroseconds
        let notifyAfter = config.notifyAfter ?? IOThreadConfiguration.defaultNotifyAfter
        let disks = try config.disks.map(diskConfiguration)
        let totalQueues = disks.reduce(0) { $0 + $1.numQueues }
        if totalQueues > threadCount * 256 {
            throw CLIError("\(totalQueues) queues are more than \(threadCount) IOThread(s) serve (256 each): add --iothreads or lower num-queues")
        }
        let controlPath = controlPath(config)
        if config.checkOnly {
            for (entry, disk) in zip(config.disks, disks) {
                do { try disk.validate() } catch { throw CLIError("disk \(entry.path): \(error)") }
            }
            let effective = EffectiveConfiguration(
                iothreads: threadCount, cpuset: cpuset.description, pollMicroseconds: pollMicroseconds,
                notifyAfter: notifyAfter, control: controlPath,
                disableIOURing: (config.disabledIOURing ?? []).names,
                metricsAddress: config.metricsAddress?.description,
                disks: try zip(config.disks, disks).map { entry, d in
                    EffectiveConfiguration.DiskWithLimits(disk: EffectiveConfiguration.Disk(
                        path: d.path, socket: .init(paths: [entry.socket] + entry.extraSockets), readonly: d.readOnly, numQueues: d.numQueues, queueSize: d.queueSize,
                        backend: d.backend.rawValue, nullSize: d.nullSizeBytes, nullReadZeroes: d.nullReadZeroes, serial: d.serial,
                        direct: d.directIO, blockSize: d.logicalBlockSize, rerror: d.readErrorPolicy, werror: d.writeErrorPolicy,
                        fault: entry.fault, locking: d.imageLocking, fixedBuffers: d.fixedBuffers, socketOwner: entry.socketOwner,
                        socketGroup: entry.socketGroup, socketMode: entry.socketMode.map(SocketOwnership.format),
                        writeCache: d.writeCache),
                        limits: try IOLimitKeys.limits(entry.limits, what: "disk \(entry.path)"), group: entry.group)
                })
            StatusCommand.printJSON(effective)
            return
        }

        // Before anything else reads the environment: NOTIFY_SOCKET and the
        // LISTEN_* variables are taken out of it (nothing we run inherits them).
        let notifier = SystemdNotifier()
        let activation = try SocketActivation.take()
        let assigned = try SocketActivation.assign(activation.passed, sockets: config.disks.map(\.socket), control: controlPath)
        var inherited: [Int: (fd: Int32, origin: String)] = assigned.disks.mapValues { ($0.socket.fd, $0.origin) }
        for (i, entry) in config.disks.enumerated() {
            guard let fd = entry.fd else { continue }
            do { _ = try UnixSocket.adopt(fd: fd, origin: "--fd \(fd)") } catch { throw CLIError("\(error)") }
            inherited[i] = (fd, "--fd \(fd)")
        }

        // Signals are taken by sigwait in this thread; every other thread inherits the mask.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGHUP)
        pthread_sigmask(SIG_BLOCK, &signals, nil)

        let threads = (0..<threadCount).map { i in
            var thread = IOThreadConfiguration(name: "iothread\(i)", cpuset: cpuset.individualCPUs[i % cpuset.cpus.count],
                                               pollMaxMicroseconds: pollMicroseconds, notifyAfterCompletions: notifyAfter)
            thread.disabledIOURingFeatures = config.disabledIOURing ?? []
            return thread
        }
        options.logging.bootstrap()
        let logger = Logger(label: "dpctl")
        notifier.setLogger(logger)
        if let ignored = activation.ignored { logger.notice("\(ignored)") }
        let plane = try DataPlane(iothreads: threads)
        let server = try VhostUserServer(plane: plane, logger: Logger(label: "dataplane.vhost-user"))
        let source = options.config.map { file in
            Instance.ConfigSource(file: file, read: { [options] in try configuration(options) })
        }
        let instance = Instance(plane: plane, server: server, logger: logger, configuration: config, source: source,
                                readOnlyAll: options.readOnly, notifier: notifier)
        do {
            for (i, (entry, diskConfig)) in zip(config.disks, disks).enumerated() {
                try instance.serve(entry, diskConfig, inherited: inherited[i])
            }
        } catch {
            server.stop()
            plane.stop()
            throw error
        }
        let control: ControlServer?
        do {
            control = try controlPath.map { path in
                try ControlServer(path: path, inheritedFD: assigned.control?.socket.fd, plane: plane, server: server,
                                  cpus: threads.map { $0.cpuset }, logger: logger, instance: instance)
            }
        } catch {
            server.stop()
            plane.stop()
            throw error
        }
        // After the signal mask: its thread must leave SIGINT and SIGTERM to sigwait.
        var metrics: MetricsServer?
        if let address = config.metricsAddress {
            do {
                metrics = try MetricsServer(address: address, exporter: PrometheusExporter(plane: plane))
            } catch {
                control?.stop()
                server.stop()
                plane.stop()
                throw error
            }
        }
        do {
            try server.start()
        } catch {
            metrics?.stop()
            control?.stop()
            server.stop()
            plane.stop()
            throw error
        }
        if let warning = sharedCPUWarning(threads: threadCount, cpuset: cpuset) { logger.warning("\(warning)") }
        for (i, t) in plane.threads.enumerated() {
            logger.info("\(t.configuration.name): CPU \(threads[i].cpuset), NUMA node \(t.numaNode.map(String.init) ?? "unknown"), poll window up to \(t.configuration.pollMaxMicroseconds) us, io_uring: \(t.statistics().ioURingFeatures)",
                        metadata: ["iothread": "\(t.configuration.name)"])
        }
        for (disk, socket) in instance.served.map({ ($0.disk, $0.entry.socket) }) {
            logger.info("serving \(disk.name) (\(disk.capacityBytes) bytes, \(disk.configuration.readOnly ? "read-only" : "read-write"), \(disk.usesDirectIO ? "O_DIRECT" : "page cache"), \(disk.logicalBlockSize)-byte blocks, up to \(disk.configuration.numQueues) queues, \(WriteCacheMode.name(disk.writeCache))\(disk.configuration.fixedBuffers && disk.configuration.backend == .file ? ", guest memory registered as fixed buffers" : "")) on \(socket)",
                        metadata: ["disk": "\(disk.name)", "socket": "\(socket)"])
        }
        if let controlPath {
            logger.info("control socket \(controlPath)\(assigned.control != nil ? " (socket-activated)" : ""); ready")
        } else {
            logger.info("no control socket (the disk's inherited socket has no path: give --control PATH for status, stats and stop); ready")
        }
        if let metrics { logger.info("metrics on http://\(metrics.boundAddress)/metrics") }
        // Every socket listens and every control thread runs: a frontend that connects now is served.
        notifier.ready(status: instance.summary)

        var received: Int32 = 0
        while true {
            sigwait(&signals, &received)
            guard received == SIGHUP else { break }
            guard options.config != nil else {
                logger.notice("SIGHUP: started without --config, so there is nothing to reload")
                continue
            }
            // Logged, and told to systemd, by the reload; a failure changes nothing.
            _ = try? instance.reload(by: "SIGHUP")
        }
        logger.info("\(received == SIGINT ? "SIGINT" : "SIGTERM"): draining and stopping")
        notifier.stopping(status: "draining in-flight I/O and stopping")
        control?.stop()
        metrics?.stop()
        server.stop() // frontends are disconnected after their in-flight requests complete
        plane.stop()
        logger.info("stopped")
    }
}
