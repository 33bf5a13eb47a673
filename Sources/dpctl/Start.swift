import CDataPlaneSys
import DataPlane
import Foundation

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
    var disks: [Disk]

    enum CodingKeys: String, CodingKey {
        case iothreads, cpuset, control, disks
        case pollMicroseconds = "poll-us", notifyAfter = "notify-after", disableIOURing = "disable-io-uring"
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

    static let help = """
    USAGE: dpctl start [--iothreads N] [--cpuset LIST] [--poll-us N] [--notify-after N] [--control PATH]
                       [--disable-io-uring LIST]
                       --disk PATH --socket PATH [disk options] [--disk PATH --socket PATH ...]
           dpctl start --config FILE
           dpctl start ... --check

    Serves each disk as a vhost-user-blk device on its unix socket, in the
    foreground. SIGINT or SIGTERM (or 'dpctl stop') drain in-flight I/O and exit.

    INSTANCE OPTIONS:
      --iothreads N       IOThreads to run, 1-256 (default \(defaultIOThreads)); queues are spread over them
                          round-robin (more IOThreads than CPUs in the cpuset share CPUs: logged
                          as a warning)
      --cpuset LIST       CPUs the IOThreads are pinned to, like taskset: 5,6 or 0-3,8;
                          IOThread i gets the i-th CPU (round-robin). (default: every CPU this
                          process may run on, what taskset, systemd AllowedCPUs= or the
                          container's cpuset leave it; CPUs outside those are refused)
      --poll-us N         Busy-poll window upper bound in microseconds, adaptive, 0-1000000
                          (default \(defaultPollMicroseconds); 0 = never poll)
      --notify-after N    Completions after which a queue's pass publishes them and signals
                          the guest at once, before finishing the pass (once per pass),
                          0-\(IOThreadConfiguration.maxNotifyAfter) (default \(IOThreadConfiguration.defaultNotifyAfter); 0 = at the end of each pass only)
      --control PATH      Control socket for status, stats, resume and stop (default
                          FIRST-SOCKET.ctl); like --socket, it replaces only a stale socket
      --disable-io-uring LIST
                          io_uring features to leave unused even where the kernel has them, to
                          measure what each brings: a comma list of defer-taskrun,
                          registered-files, fixed-buffers, single-rw, multishot-kicks, or all
                          (default none: each is used where the kernel has it; 'dpctl status'
                          lists them)
      --config FILE       Read the instance and its disks from a JSON file. Its keys are the
                          names of these options without the dashes, with the values they
                          take: "iothreads", "cpuset", "poll-us", "notify-after", "control",
                          "disable-io-uring" (a list of names, or the comma list), and
                          "disks", a list of objects with "path", "socket", "readonly",
                          "num-queues", "queue-size", "backend", "null-size" ("1G" or bytes),
                          "null-read-zeroes", "serial", "direct" (false for --no-direct),
                          "block-size", "rerror", "werror", "fault", "locking",
                          "fixed-buffers". An unknown key is an error. --iothreads, --cpuset,
                          --poll-us, --notify-after, --control and --disable-io-uring override
                          the file; --disk cannot be combined with it.
      --check             Check the options (no image is opened, no socket made), print the
                          configuration with every default filled in, as a --config file,
                          and exit

    DISK OPTIONS (apply to the --disk before them):
      --disk PATH         Raw image file or block device (a name, with --backend null)
      --socket PATH       vhost-user socket to listen on (required per disk). A socket nobody
                          listens on is replaced; a live one, or anything else (a file), is
                          refused and left as it is
      --readonly          Refuse writes (the guest sees a read-only disk)
      --num-queues N      Queues offered to the frontend, 1-64 (default \(defaultNumQueues): QEMU asks
                          one per vCPU and refuses to start when offered fewer)
      --queue-size N      Largest ring a frontend may set, a power of two 1-32768 (default
                          \(defaultQueueSize), QEMU's maximum); a larger SET_VRING_NUM is refused. The
                          guest is told seg_max = min(128, N-2) segments per request
      --backend file|null file: I/O on the image with io_uring (default file); null: complete
                          without I/O (a null disk)
      --null-size SIZE    Capacity of a null disk, e.g. 64M (default 1G)
      --null-read-zeroes on|off
                          Whether null-disk reads fill the buffers with zeroes (default on; off
                          leaves the guest's buffers as they are, like QEMU null-co's default)
      --serial TEXT       Serial number the guest sees, at most 20 bytes (default the image's
                          file name)
      --block-size N      Logical block size, a power of two 512-65536 (default what the image
                          takes: its device's sector size, or with O_DIRECT its filesystem's
                          direct-I/O alignment; 512 for most images, 4096 on 4K-sector storage)
      --no-direct         Use the page cache instead of O_DIRECT (default O_DIRECT)
      --locking on|off    Lock the image as QEMU's locking=on does (default on): two writers,
                          or a writer and a read-only user, exclude each other, whether QEMU,
                          qemu-img, qemu-storage-daemon or dpctl; off only for storage shared
                          on purpose, where something else keeps writers apart
      --fixed-buffers on|off
                          Register the guest's memory with io_uring, so that one-segment reads
                          and writes need no page pinning each (default off): it pins all of
                          the guest's RAM (allocating all of it) while the frontend is
                          connected, which counts against RLIMIT_MEMLOCK (not as root); and
                          the guest must not give RAM back to the host (no balloon, free page
                          reporting or virtio-mem unplug): QEMU does not know we pinned it,
                          and I/O would go to the pages it gave up. Where registering fails,
                          plain I/O is used ('dpctl status' says so)
      --rerror POLICY     A failed read: report (the guest gets an I/O error), ignore, enospc,
                          or stop (hold it; 'dpctl resume' retries it) (default report)
      --werror POLICY     A failed write/flush/discard: enospc (stop only when the host is out
                          of space, else report), report, ignore, or stop (default enospc)
      --fault SPEC        Inject failures, e.g. errno=EIO,ops=write,sectors=0-2048,after=10,every=2
                          (errno EIO|ENOSPC|number; ops read+write+flush+discard+write-zeroes)
    """

    static func parse(_ words: [String]) throws -> InstanceConfiguration {
        var args = Arguments(words)
        var config = InstanceConfiguration(disks: [])
        var configFile: String?
        var current: InstanceConfiguration.DiskEntry?
        func needDisk(_ option: String) throws(CLIError) {
            if current == nil { throw CLIError("\(option) must follow a --disk", usage: true) }
        }
        func finishDisk() throws(CLIError) {
            guard let disk = current else { return }
            if disk.socket.isEmpty { throw CLIError("--disk \(disk.path) has no --socket", usage: true) }
            config.disks.append(disk)
            current = nil
        }
        while let word = args.next() {
            let (option, inline) = Arguments.split(word)
            switch option {
            case "-h", "--help":
                print(help)
                exit(0)
            case "--config": configFile = try args.value(for: option, inline: inline)
            case "--check": config.checkOnly = true
            case "--iothreads": config.iothreads = try parseInt(try args.value(for: option, inline: inline), option: option, range: 1...256)
            case "--cpuset": config.cpuset = try args.value(for: option, inline: inline)
            case "--poll-us":
                config.pollMicroseconds = UInt32(try parseInt(try args.value(for: option, inline: inline), option: option, range: 0...1_000_000))
            case "--notify-after":
                config.notifyAfter = UInt32(try parseInt(try args.value(for: option, inline: inline), option: option,
                                                         range: 0...Int(IOThreadConfiguration.maxNotifyAfter)))
            case "--control": config.control = try args.value(for: option, inline: inline)
            case "--disable-io-uring": config.disabledIOURing = try parseIOURingFeatures(try args.value(for: option, inline: inline), option: option)
            case "--disk":
                try finishDisk()
                current = .init(path: try args.value(for: option, inline: inline), socket: "")
            case "--socket":
                try needDisk(option)
                if current?.socket.isEmpty == false { throw CLIError("--disk \(current?.path ?? "") has two --socket options", usage: true) }
                current?.socket = try args.value(for: option, inline: inline)
            case "--readonly":
                try needDisk(option)
                current?.readOnly = true
            case "--no-direct":
                try needDisk(option)
                current?.directIO = false
            case "--num-queues":
                try needDisk(option)
                current?.numQueues = try parseInt(try args.value(for: option, inline: inline), option: option, range: 1...64)
            case "--queue-size":
                try needDisk(option)
                current?.queueSize = try parseInt(try args.value(for: option, inline: inline), option: option, range: 1...32768)
            case "--backend":
                try needDisk(option)
                let b = try args.value(for: option, inline: inline)
                guard BackendKind(rawValue: b) != nil else { throw CLIError("--backend \(b.debugDescription): use file or null", usage: true) }
                current?.backend = b
            case "--null-size":
                try needDisk(option)
                current?.nullSize = try parseSize(try args.value(for: option, inline: inline), option: option)
            case "--null-read-zeroes":
                try needDisk(option)
                let text = try args.value(for: option, inline: inline)
                switch text {
                case "on": current?.nullReadZeroes = true
                case "off": current?.nullReadZeroes = false
                default: throw CLIError("--null-read-zeroes \(text.debugDescription): use on or off", usage: true)
                }
            case "--serial":
                try needDisk(option)
                current?.serial = try args.value(for: option, inline: inline)
            case "--rerror", "--werror":
                try needDisk(option)
                let text = try args.value(for: option, inline: inline)
                guard let policy = ErrorPolicy(rawValue: text) else {
                    throw CLIError("\(option) \(text.debugDescription): use report, ignore, enospc or stop", usage: true)
                }
                if option == "--rerror" { current?.readErrorPolicy = policy } else { current?.writeErrorPolicy = policy }
            case "--fault":
                try needDisk(option)
                let text = try args.value(for: option, inline: inline)
                _ = try parseFault(text)
                current?.fault = text
            case "--locking":
                try needDisk(option)
                let text = try args.value(for: option, inline: inline)
                guard text == "on" || text == "off" else {
                    throw CLIError("--locking \(text.debugDescription): use on or off", usage: true)
                }
                current?.locking = text == "on"
            case "--fixed-buffers":
                try needDisk(option)
                let text = try args.value(for: option, inline: inline)
                guard text == "on" || text == "off" else {
                    throw CLIError("--fixed-buffers \(text.debugDescription): use on or off", usage: true)
                }
                current?.fixedBuffers = text == "on"
            case "--block-size":
                try needDisk(option)
                current?.logicalBlockSize = UInt32(try parseInt(try args.value(for: option, inline: inline), option: option, range: 512...65536))
            default:
                throw CLIError("unknown option \(word.debugDescription) for start (see dpctl start --help)", usage: true)
            }
        }
        try finishDisk()
        if let configFile {
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
            fromFile.checkOnly = config.checkOnly
            config = fromFile
        }
        if config.disks.isEmpty { throw CLIError("nothing to serve: give --disk PATH --socket PATH (or --config FILE)", usage: true) }
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
        return "warning: \(threads) IOThreads on \(cpuset.cpus.count) CPU(s) (\(cpuset)): IOThreads take the CPUs round-robin "
            + "and share them, which costs latency; use --iothreads \(cpuset.cpus.count) or more CPUs"
    }

    static func run(_ words: [String]) throws -> Int32 {
        let config = try parse(words)
        let cpuset = try resolveCPUSet(config.cpuset)
        let threadCount = config.iothreads ?? defaultIOThreads
        let pollMicroseconds = config.pollMicroseconds ?? defaultPollMicroseconds
        let notifyAfter = config.notifyAfter ?? IOThreadConfiguration.defaultNotifyAfter
        let disks = try config.disks.map(diskConfiguration)
        let totalQueues = disks.reduce(0) { $0 + $1.numQueues }
        if totalQueues > threadCount * 256 {
            throw CLIError("\(totalQueues) queues are more than \(threadCount) IOThread(s) serve (256 each): add --iothreads or lower --num-queues")
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
                disks: zip(config.disks, disks).map { entry, d in
                    EffectiveConfiguration.Disk(
                        path: d.path, socket: entry.socket, readonly: d.readOnly, numQueues: d.numQueues, queueSize: d.queueSize,
                        backend: d.backend.rawValue, nullSize: d.nullSizeBytes, nullReadZeroes: d.nullReadZeroes, serial: d.serial,
                        direct: d.directIO, blockSize: d.logicalBlockSize, rerror: d.readErrorPolicy, werror: d.writeErrorPolicy,
                        fault: entry.fault, locking: d.locking, fixedBuffers: d.fixedBuffers)
                })
            StatusCommand.printJSON(effective)
            return 0
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
        let plane = try DataPlane(iothreads: threads)
        let server = try VhostUserServer(plane: plane, log: { log($0) })
        var opened: [(Disk, String)] = []
        do {
            for (entry, diskConfig) in zip(config.disks, disks) {
                let disk = try plane.addDisk(diskConfig)
                if let spec = entry.fault {
                    disk.injectFaults(try parseFault(spec))
                    log("\(disk.name): injecting faults: \(spec)")
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
            control = try ControlServer(path: controlPath, plane: plane, server: server, cpus: threads.map { $0.cpuset })
        } catch {
            server.stop()
            plane.stop()
            throw error
        }
        try server.start()
        if let warning = sharedCPUWarning(threads: threadCount, cpuset: cpuset) { log(warning) }
        for (i, t) in plane.threads.enumerated() {
            log("\(t.configuration.name): CPU \(threads[i].cpuset), NUMA node \(t.numaNode.map(String.init) ?? "unknown"), poll window up to \(t.configuration.pollMaxMicroseconds) us, io_uring: \(t.statistics().ioURingFeatures)")
        }
        for (disk, socket) in opened {
            log("serving \(disk.name) (\(disk.capacityBytes) bytes, \(disk.configuration.readOnly ? "read-only" : "read-write"), \(disk.usesDirectIO ? "O_DIRECT" : "page cache"), \(disk.logicalBlockSize)-byte blocks, up to \(disk.configuration.numQueues) queues\(disk.configuration.fixedBuffers && disk.configuration.backend == .file ? ", guest memory registered as fixed buffers" : "")) on \(socket)")
        }
        log("control socket \(controlPath); ready")

        var received: Int32 = 0
        sigwait(&signals, &received)
        log("\(received == SIGINT ? "SIGINT" : "SIGTERM"): draining and stopping")
        control.stop()
        server.stop() // frontends are disconnected after their in-flight requests complete
        plane.stop()
        log("stopped")
        return 0
    }
}

