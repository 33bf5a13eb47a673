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
        var locking: Bool?
        var fixedBuffers: Bool?
    }

    var iothreads: Int?
    var cpuset: String?
    var pollMicroseconds: UInt32?
    var notifyAfter: UInt32?
    var control: String?
    var disabledIOURing: IOURingFeatures?
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
        var socket: String
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
        var locking: Bool
        var fixedBuffers: Bool

        enum CodingKeys: String, CodingKey {
            case path, socket, readonly, backend, serial, direct, rerror, werror, fault, locking
            case numQueues = "num-queues", queueSize = "queue-size", nullSize = "null-size"
            case nullReadZeroes = "null-read-zeroes", blockSize = "block-size", fixedBuffers = "fixed-buffers"
        }
    }

    var iothreads: Int
    var cpuset: String
    var pollMicroseconds: UInt32
    var notifyAfter: UInt32
    var control: String
    /// The names of the io_uring features left unused.
    var disableIOURing: [String]
    /// Absent when the metrics are not served.
    var metricsAddress: String?
    var disks: [Disk]

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
        config.disks = try o.disks.map { (text: String) throws(CLIError) in try DiskSpec.parse(text) }
        if let configFile = o.config {
            if !config.disks.isEmpty { throw CLIError("--config and --disk conflict: put the disks in the file", usage: true) }
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
            fromFile.metricsAddress = config.metricsAddress ?? fromFile.metricsAddress
            fromFile.checkOnly = config.checkOnly
            config = fromFile
        }
        if config.disks.isEmpty {
            throw CLIError("nothing to serve: give --disk path=PATH,socket=PATH (or --config FILE)", usage: true)
        }
        let sockets = config.disks.map(\.socket)
        if Set(sockets).count != sockets.count { throw CLIError("two disks share a socket path", usage: true) }
        return config
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
        if let locking = d.locking { c.locking = locking }
        if let fixed = d.fixedBuffers { c.fixedBuffers = fixed }
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

    static func run(_ config: InstanceConfiguration, logging: LoggingOptions) throws {
        let cpuset = try resolveCPUSet(config.cpuset)
        let threadCount = config.iothreads ?? defaultIOThreads
        let pollMicroseconds = config.pollMicroseconds ?? defaultPollMicroseconds
        let notifyAfter = config.notifyAfter ?? IOThreadConfiguration.defaultNotifyAfter
        let disks = try config.disks.map(diskConfiguration)
        let totalQueues = disks.reduce(0) { $0 + $1.numQueues }
        if totalQueues > threadCount * 256 {
            throw CLIError("\(totalQueues) queues are more than \(threadCount) IOThread(s) serve (256 each): add --iothreads or lower num-queues")
        }
        let controlPath = config.control ?? config.disks[0].socket + ".ctl"
        if config.checkOnly {
            for (entry, disk) in zip(config.disks, disks) {
                do { try disk.validate() } catch { throw CLIError("disk \(entry.path): \(error)") }
            }
            let effective = EffectiveConfiguration(
                iothreads: threadCount, cpuset: cpuset.description, pollMicroseconds: pollMicroseconds,
                notifyAfter: notifyAfter, control: controlPath,
                disableIOURing: (config.disabledIOURing ?? []).names,
                metricsAddress: config.metricsAddress?.description,
                disks: zip(config.disks, disks).map { entry, d in
                    EffectiveConfiguration.Disk(
                        path: d.path, socket: entry.socket, readonly: d.readOnly, numQueues: d.numQueues, queueSize: d.queueSize,
                        backend: d.backend.rawValue, nullSize: d.nullSizeBytes, nullReadZeroes: d.nullReadZeroes, serial: d.serial,
                        direct: d.directIO, blockSize: d.logicalBlockSize, rerror: d.readErrorPolicy, werror: d.writeErrorPolicy,
                        fault: entry.fault, locking: d.locking, fixedBuffers: d.fixedBuffers)
                })
            StatusCommand.printJSON(effective)
            return
        }

        // Signals are taken by sigwait in this thread; every other thread inherits the mask.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &signals, nil)

        let threads = (0..<threadCount).map { i in
            var thread = IOThreadConfiguration(name: "iothread\(i)", cpuset: cpuset.individualCPUs[i % cpuset.cpus.count],
                                               pollMaxMicroseconds: pollMicroseconds, notifyAfterCompletions: notifyAfter)
            thread.disabledIOURingFeatures = config.disabledIOURing ?? []
            return thread
        }
        logging.bootstrap()
        let logger = Logger(label: "dpctl")
        let plane = try DataPlane(iothreads: threads)
        let server = try VhostUserServer(plane: plane, logger: Logger(label: "dataplane.vhost-user"))
        var opened: [(Disk, String)] = []
        do {
            for (entry, diskConfig) in zip(config.disks, disks) {
                let disk = try plane.addDisk(diskConfig)
                if let spec = entry.fault {
                    disk.injectFaults(try parseFault(spec))
                    logger.warning("\(disk.name): injecting faults: \(spec)", metadata: ["disk": "\(disk.name)"])
                }
                try server.addExport(disk: disk, socketPath: entry.socket)
                opened.append((disk, entry.socket))
            }
        } catch {
            server.stop()
            plane.stop()
            throw error
        }
        let control: ControlServer
        do {
            control = try ControlServer(path: controlPath, plane: plane, server: server, cpus: threads.map { $0.cpuset },
                                        logger: logger)
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
                control.stop()
                server.stop()
                plane.stop()
                throw error
            }
        }
        try server.start()
        if let warning = sharedCPUWarning(threads: threadCount, cpuset: cpuset) { logger.warning("\(warning)") }
        for (i, t) in plane.threads.enumerated() {
            logger.info("\(t.configuration.name): CPU \(threads[i].cpuset), NUMA node \(t.numaNode.map(String.init) ?? "unknown"), poll window up to \(t.configuration.pollMaxMicroseconds) us, io_uring: \(t.statistics().ioURingFeatures)",
                        metadata: ["iothread": "\(t.configuration.name)"])
        }
        for (disk, socket) in opened {
            logger.info("serving \(disk.name) (\(disk.capacityBytes) bytes, \(disk.configuration.readOnly ? "read-only" : "read-write"), \(disk.usesDirectIO ? "O_DIRECT" : "page cache"), \(disk.logicalBlockSize)-byte blocks, up to \(disk.configuration.numQueues) queues\(disk.configuration.fixedBuffers && disk.configuration.backend == .file ? ", guest memory registered as fixed buffers" : "")) on \(socket)",
                        metadata: ["disk": "\(disk.name)", "socket": "\(socket)"])
        }
        if let metrics { logger.info("metrics on http://\(metrics.boundAddress)/metrics") }
        logger.info("control socket \(controlPath); ready")

        var received: Int32 = 0
        sigwait(&signals, &received)
        logger.info("\(received == SIGINT ? "SIGINT" : "SIGTERM"): draining and stopping")
        control.stop()
        metrics?.stop()
        server.stop() // frontends are disconnected after their in-flight requests complete
        plane.stop()
        logger.info("stopped")
    }
}

