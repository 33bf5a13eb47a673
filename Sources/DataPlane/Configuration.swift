import CDataPlane
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// MARK: - CPUSet

/// A non-empty set of CPU numbers, written like `taskset -c` or a libvirt
/// cpuset: comma-separated CPU numbers and inclusive ranges, e.g. `"0-3,8"`.
///
/// Whitespace around entries and numbers is ignored (`" 1 , 3 "`). CPU numbers
/// are 0...4095.
public struct CPUSet: Sendable, Hashable, CustomStringConvertible {
    /// The highest CPU number accepted.
    static let maxCPU: Int32 = 4095

    /// The CPUs, sorted ascending, without duplicates; never empty.
    public let cpus: [Int32]

    /// Builds a set from CPUs that are already known to be valid, sorted and unique.
    init(sortedUnique cpus: [Int32]) {
        self.cpus = cpus
    }

    /// One single-CPU set per member: IOThread i of N can be pinned to
    /// `individualCPUs[i % count]`.
    public var individualCPUs: [CPUSet] { cpus.map { CPUSet(sortedUnique: [$0]) } }

    /// Parses a CPU list such as `"5,6"`, `"0-3,8"` or `" 1 , 3 "`.
    ///
    /// - Throws: ``ConfigurationError/invalidCPUSet(input:reason:)`` when the
    ///   text is empty, an entry is not a CPU number or an ascending range
    ///   `low-high`, a number is negative, or a CPU is above 4095.
    public init(parsing text: String) throws(ConfigurationError) {
        func fail(_ reason: String) -> ConfigurationError {
            .invalidCPUSet(input: text, reason: reason)
        }
        let usage = "expected CPU numbers and ranges such as \"0-3,8\""
        if Self.trimmed(Substring(text)).isEmpty {
            throw fail("it is empty; \(usage)")
        }
        var seen = Set<Int32>()
        for rawEntry in text.split(separator: ",", omittingEmptySubsequences: false) {
            let entry = Self.trimmed(rawEntry)
            if entry.isEmpty {
                throw fail("it has an empty entry; \(usage)")
            }
            let quoted = String(entry).debugDescription
            if entry.first == "-" {
                if Self.isDigits(Self.trimmed(entry.dropFirst())) {
                    throw fail("CPU numbers cannot be negative (\(quoted)); \(usage)")
                }
                throw fail("\(quoted) is not a CPU number or range; \(usage)")
            }
            let bounds = entry.split(separator: "-", omittingEmptySubsequences: false)
            switch bounds.count {
            case 1:
                let cpu = try Self.number(bounds[0], entry: quoted, usage: usage, fail: fail)
                seen.insert(cpu)
            case 2:
                let lowText = Self.trimmed(bounds[0])
                let highText = Self.trimmed(bounds[1])
                if highText.isEmpty {
                    throw fail("range \(quoted) has no upper bound; \(usage)")
                }
                let low = try Self.number(lowText, entry: quoted, usage: usage, fail: fail)
                let high = try Self.number(highText, entry: quoted, usage: usage, fail: fail)
                if low > high {
                    throw fail("range \(quoted) is reversed; write it as \"\(high)-\(low)\"")
                }
                for cpu in low...high {
                    seen.insert(cpu)
                }
            default:
                throw fail("\(quoted) is not a CPU number or range; \(usage)")
            }
        }
        self.cpus = seen.sorted()
    }

    /// The compact form in taskset style: runs of three or more CPUs become
    /// ranges, e.g. `"0-3,8"`; a run of two is written `"5,6"`.
    public var description: String {
        var parts: [String] = []
        var index = 0
        while index < cpus.count {
            var end = index
            while end + 1 < cpus.count, cpus[end + 1] == cpus[end] + 1 {
                end += 1
            }
            switch end - index {
            case 0: parts.append("\(cpus[index])")
            case 1: parts.append("\(cpus[index]),\(cpus[end])")
            default: parts.append("\(cpus[index])-\(cpus[end])")
            }
            index = end + 1
        }
        return parts.joined(separator: ",")
    }

    /// Checks that every CPU of this set is online.
    ///
    /// - Parameter online: The online CPUs; when `nil`, they are read with ``online(from:)``.
    /// - Throws: ``ConfigurationError/cpusNotOnline(missing:online:)`` naming
    ///   exactly the CPUs that are not online, or
    ///   ``ConfigurationError/unreadableOnlineCPUs(_:)`` if the online CPUs
    ///   cannot be read.
    public func validateOnline(_ online: CPUSet? = nil) throws(ConfigurationError) {
        let onlineSet: CPUSet
        if let online {
            onlineSet = online
        } else {
            onlineSet = try CPUSet.online()
        }
        let available = Set(onlineSet.cpus)
        let missing = cpus.filter { !available.contains($0) }
        if !missing.isEmpty {
            throw .cpusNotOnline(missing: CPUSet(sortedUnique: missing), online: onlineSet)
        }
    }

    /// Reads the online CPUs of this machine.
    ///
    /// - Parameter path: A file holding a CPU list; by default the kernel's
    ///   `/sys/devices/system/cpu/online`. A cgroup's `cpuset.cpus.effective`
    ///   has the same syntax.
    /// - Throws: ``ConfigurationError/unreadableOnlineCPUs(_:)`` if the file
    ///   cannot be read or does not hold a valid, non-empty CPU list.
    public static func online(
        from path: String = "/sys/devices/system/cpu/online"
    ) throws(ConfigurationError) -> CPUSet {
        let text = try readSmallFile(path)
        do {
            return try CPUSet(parsing: text)
        } catch {
            throw .unreadableOnlineCPUs("\(path): \(error)")
        }
    }

    // MARK: Helpers

    private static func trimmed(_ text: Substring) -> Substring {
        var result = text
        while let first = result.first, first.isWhitespace { result.removeFirst() }
        while let last = result.last, last.isWhitespace { result.removeLast() }
        return result
    }

    private static func isDigits(_ text: Substring) -> Bool {
        !text.isEmpty && text.utf8.allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
    }

    private static func number(
        _ raw: Substring,
        entry: String,
        usage: String,
        fail: (String) -> ConfigurationError
    ) throws(ConfigurationError) -> Int32 {
        let text = trimmed(raw)
        if text.first == "-", isDigits(text.dropFirst()) {
            throw fail("CPU numbers cannot be negative (\(entry)); \(usage)")
        }
        guard isDigits(text) else {
            throw fail("\(entry) is not a CPU number or range; \(usage)")
        }
        var value: Int64 = 0
        for byte in text.utf8 {
            value = value * 10 + Int64(byte - UInt8(ascii: "0"))
            if value > Int64(maxCPU) {
                throw fail("CPU \(text) is above the maximum CPU number \(maxCPU)")
            }
        }
        return Int32(value)
    }

    /// Reads a small text file (at most 64 KiB) such as a sysfs attribute.
    private static func readSmallFile(_ path: String) throws(ConfigurationError) -> String {
        let fd = open(path, O_RDONLY)
        if fd < 0 {
            throw .unreadableOnlineCPUs("cannot open \(path): \(errorText(errno))")
        }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while bytes.count < 65536 {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                let code = errno
                if code == EINTR { continue }
                throw .unreadableOnlineCPUs("cannot read \(path): \(errorText(code))")
            }
            if count == 0 { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func errorText(_ code: Int32) -> String {
        guard let message = strerror(code) else { return "error \(code)" }
        return String(cString: message)
    }
}

// MARK: - Disk

/// Where a disk's data lives.
public enum BackendKind: String, Sendable {
    /// An image file or block device, accessed through io_uring.
    case file
    /// No storage: reads return zeros and writes are discarded.
    case null
}

/// One virtio-blk disk.
///
/// Build it with the defaults you need, then call ``validate()`` before use.
/// What a failed read or write does: QEMU's `rerror`/`werror`.
public enum ErrorPolicy: String, Sendable, Codable, CaseIterable {
    /// The guest gets VIRTIO_BLK_S_IOERR.
    case report
    /// The request completes as if it had worked.
    case ignore
    /// Stop on ENOSPC (keep the request, retry on resume); report other errors.
    case enospc
    /// Stop the queue on any error, keep the failed requests, retry them on resume.
    case stop
}

public struct DiskConfiguration: Sendable, Equatable {
    /// The longest serial, in bytes, that virtio-blk's GET_ID can return.
    static let maxSerialBytes = 20
    /// The most virtqueues a disk may have.
    static let maxQueues = 64

    /// The image file or block device; ignored by the null backend.
    public var path: String
    /// Where the data lives.
    public var backend: BackendKind
    /// Whether the guest sees a read-only disk.
    public var readOnly: Bool
    /// Whether the file is opened with `O_DIRECT`, bypassing the host page cache.
    public var directIO: Bool
    /// The serial the guest sees: at most 20 bytes of printable ASCII.
    public var serial: String
    /// The logical block size the guest sees, in bytes: a power of two in
    /// 512...65536. `nil` (the default) follows the image: what its device,
    /// or with ``directIO`` its filesystem, takes (``Disk/logicalBlockSize``
    /// is the size chosen). A size smaller than the image takes is refused.
    public var logicalBlockSize: UInt32?
    /// The number of virtqueues: 1...64.
    public var numQueues: Int
    /// The largest virtqueue a frontend may set up: a power of two in
    /// 1...32768 (the default, 1024, is the largest QEMU makes). A larger
    /// ring is refused. It also bounds what a request may carry
    /// (``segmentsPerRequest``), so that a guest without indirect
    /// descriptors can always fit one in its ring.
    public var queueSize: Int
    /// The capacity of a null-backend disk in bytes: a non-zero multiple of
    /// ``logicalBlockSize`` (512 when that is `nil`). Ignored by the file backend.
    public var nullSizeBytes: UInt64
    /// Whether the null backend fills read buffers with zeroes (the default).
    /// `false` leaves the guest's buffers untouched, as QEMU's null-co does by
    /// default (`read-zeroes=off`): the guest reads back its own memory, no
    /// host data. Ignored by the file backend.
    public var nullReadZeroes: Bool = true
    /// What a failed read does.
    public var readErrorPolicy: ErrorPolicy = .report
    /// What a failed write, flush, discard or write-zeroes does.
    public var writeErrorPolicy: ErrorPolicy = .enospc
    /// How the image is locked against other users (QEMU's byte-range
    /// locks, which QEMU, qemu-img, qemu-storage-daemon and other disks
    /// check). Ignored by the null backend.
    public var imageLocking: ImageLocking = .on
    /// Whether the image is locked at all (``imageLocking`` is not `.off`);
    /// setting it true means `.on`.
    public var locking: Bool {
        get { imageLocking != .off }
        set { imageLocking = newValue ? .on : .off }
    }
    /// Whether the guest memory of this disk's queues is registered with
    /// their IOThread's io_uring, so that one-segment reads and writes are
    /// READ_FIXED/WRITE_FIXED (no pages pinned and unpinned per request).
    /// Off by default: registering pins all of the guest's memory (and so
    /// allocates it, all of it, at once) for as long as a queue uses it, it
    /// counts against RLIMIT_MEMLOCK (unless CAP_IPC_LOCK, as root has), and
    /// the frontend does not know: a balloon, free page reporting or
    /// virtio-mem that discards guest RAM and maps new pages there would
    /// leave our I/O going to the old pages. (QEMU refuses to discard guest
    /// RAM for VFIO and vDPA devices, which pin it too; it does not know a
    /// vhost-user backend does.) Use it where nothing discards guest RAM
    /// (hugepages, no balloon, as SPDK's vhost-user target requires). Where
    /// registering fails, plain I/O is used
    /// (``IOThreadStatistics/bufferRegistrationFailures``). Ignored by the
    /// null backend.
    public var fixedBuffers: Bool = false
    /// Whether the disk starts in write-back mode (the default: a write
    /// completes once the host has it, a FLUSH makes it durable) or
    /// write-through (`false`: each write is durable before it completes,
    /// RWF_DSYNC). The guest sees it as virtio-blk's writeback byte and may
    /// change it (``Disk/writeCache``).
    public var writeCache: Bool = true

    /// Creates a disk configuration; nothing is checked until ``validate()``.
    ///
    /// - Parameter serial: The serial; when `nil`, it is the path's file name
    ///   with non-printable and non-ASCII characters removed, cut to 20 bytes.
    ///   It is not updated if ``path`` changes later.
    public init(
        path: String,
        backend: BackendKind = .file,
        readOnly: Bool = false,
        directIO: Bool = true,
        serial: String? = nil,
        logicalBlockSize: UInt32? = nil,
        numQueues: Int = 1,
        queueSize: Int = 1024,
        nullSizeBytes: UInt64 = 1 << 30
    ) {
        self.path = path
        self.backend = backend
        self.readOnly = readOnly
        self.directIO = directIO
        self.serial = serial ?? Self.defaultSerial(forPath: path)
        self.logicalBlockSize = logicalBlockSize
        self.numQueues = numQueues
        self.queueSize = queueSize
        self.nullSizeBytes = nullSizeBytes
    }

    /// Checks every field, in declaration order, and throws the first problem found.
    ///
    /// The path must be non-empty for the file backend; ``nullSizeBytes`` is
    /// checked only for the null backend.
    public func validate() throws(ConfigurationError) {
        if backend == .file, path.isEmpty {
            throw .missingPath
        }
        let serialBytes = serial.utf8.count
        if serialBytes > Self.maxSerialBytes {
            throw .invalidSerial(serial, reason: "it is \(serialBytes) bytes long")
        }
        if !serial.utf8.allSatisfy(Self.isPrintableASCII) {
            throw .invalidSerial(serial, reason: "it contains a non-printable or non-ASCII character")
        }
        if let logicalBlockSize, !(512...65536).contains(logicalBlockSize) || logicalBlockSize.nonzeroBitCount != 1 {
            throw .invalidBlockSize(logicalBlockSize)
        }
        if !(1...Self.maxQueues).contains(numQueues) {
            throw .invalidQueueCount(numQueues)
        }
        if !(1...32768).contains(queueSize) || queueSize.nonzeroBitCount != 1 {
            throw .invalidQueueSize(queueSize)
        }
        let nullBlockSize = logicalBlockSize ?? 512
        if backend == .null,
            nullSizeBytes == 0 || !nullSizeBytes.isMultiple(of: UInt64(nullBlockSize))
        {
            throw .invalidNullSize(nullSizeBytes, logicalBlockSize: nullBlockSize)
        }
    }

    /// The data segments one request may carry, announced to the guest as
    /// seg_max: 128, or ``queueSize`` - 2 when that is smaller (a guest
    /// without indirect descriptors must fit a request in its ring). A
    /// guest sending more breaks its queue (DEVICE_NEEDS_RESET).
    public var segmentsPerRequest: Int {
        max(1, min(Int(DP_SEG_MAX), queueSize - 2))
    }

    static func isPrintableASCII(_ byte: UInt8) -> Bool {
        (0x20...0x7E).contains(byte)
    }

    static func defaultSerial(forPath path: String) -> String {
        let name = path.split(separator: "/").last ?? ""
        let bytes = name.utf8.filter(isPrintableASCII).prefix(maxSerialBytes)
        return String(decoding: bytes, as: UTF8.self)
    }
}

// MARK: - IOThread

/// io_uring features an IOThread uses where its kernel has them. Each is
/// probed when the thread sets its ring up, and what the kernel lacks falls
/// back to what works without it.
public struct IOURingFeatures: OptionSet, Sendable, Hashable, Codable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// IORING_SETUP_DEFER_TASKRUN (Linux 6.1): completions are posted only
    /// when the thread asks for them, never by interrupting it.
    public static let deferTaskRun = IOURingFeatures(rawValue: DP_URING_DEFER_TASKRUN.rawValue)
    /// Disk fds in a registered file table: no file lookup per request.
    public static let registeredFiles = IOURingFeatures(rawValue: DP_URING_REGISTERED_FILES.rawValue)
    /// A registered buffer table for the guest memory of disks that ask for
    /// it (``DiskConfiguration/fixedBuffers``): READ_FIXED/WRITE_FIXED.
    public static let fixedBuffers = IOURingFeatures(rawValue: DP_URING_FIXED_BUFFERS.rawValue)
    /// One-segment reads and writes as READ/WRITE rather than READV/WRITEV.
    public static let singleSegmentReadWrite = IOURingFeatures(rawValue: DP_URING_SINGLE_RW.rawValue)
    /// One multishot poll per kick eventfd (Linux 5.13) rather than a read
    /// armed again after every kick.
    public static let multishotKicks = IOURingFeatures(rawValue: DP_URING_MULTISHOT_KICKS.rawValue)
    public static let all = IOURingFeatures(rawValue: DP_URING_ALL.rawValue)

    /// Each feature by the name dpctl uses for it.
    public static let named: [(name: String, feature: IOURingFeatures)] = [
        ("defer-taskrun", .deferTaskRun), ("registered-files", .registeredFiles), ("fixed-buffers", .fixedBuffers),
        ("single-rw", .singleSegmentReadWrite), ("multishot-kicks", .multishotKicks),
    ]

    /// The names of the features in the set, in a fixed order.
    public var names: [String] { Self.named.filter { contains($0.feature) }.map(\.name) }

    /// Parses names as ``names`` gives them; "all" stands for every one and
    /// "none" for none. Nil for an unknown name.
    public init?(names: [String]) {
        var set: IOURingFeatures = []
        for name in names {
            switch name {
            case "all": set.formUnion(.all)
            case "none": break
            default:
                guard let feature = Self.named.first(where: { $0.name == name })?.feature else { return nil }
                set.formUnion(feature)
            }
        }
        self = set
    }

    public var description: String { names.isEmpty ? "none" : names.joined(separator: ",") }
}

/// One IOThread: an event loop pinned to a set of CPUs that serves virtqueues.
public struct IOThreadConfiguration: Sendable, Equatable {
    /// The longest thread name Linux accepts (16 bytes with the terminating NUL).
    static let maxNameBytes = 15
    /// The longest busy-poll window, in microseconds.
    static let maxPollMicroseconds: UInt32 = 1_000_000

    /// The thread's name: 1 to 15 bytes, shown by `top -H` and `ps -L`.
    public var name: String
    /// The CPUs the thread is pinned to.
    public var cpuset: CPUSet
    /// How long the loop busy-polls for work before sleeping, in microseconds;
    /// 0 disables busy polling, at most 1_000_000.
    public var pollMaxMicroseconds: UInt32
    /// The io_uring submission queue size: a power of two in 8...32768.
    public var ringEntries: UInt32
    /// After how many completions a queue's pass publishes them and signals
    /// the guest at once, before finishing the pass (once per pass; 0: only
    /// at the end of each pass). An interrupt-driven guest then wakes while
    /// the rest complete. At most ``maxNotifyAfter``.
    public var notifyAfterCompletions: UInt32
    /// The largest ``notifyAfterCompletions``: a pass pops at most this many chains.
    public static let maxNotifyAfter: UInt32 = 1024
    /// The default of ``notifyAfterCompletions`` (bench/RESULTS.md, "Notification policy").
    public static let defaultNotifyAfter: UInt32 = 0
    /// io_uring features never to use, even where the kernel has them: to
    /// measure what each brings, or to run as on a kernel without them.
    public var disabledIOURingFeatures: IOURingFeatures = []

    /// Creates an IOThread configuration; nothing is checked until ``validate(online:)``.
    public init(
        name: String,
        cpuset: CPUSet,
        pollMaxMicroseconds: UInt32 = 32,
        ringEntries: UInt32 = 256,
        notifyAfterCompletions: UInt32 = IOThreadConfiguration.defaultNotifyAfter
    ) {
        self.name = name
        self.cpuset = cpuset
        self.pollMaxMicroseconds = pollMaxMicroseconds
        self.ringEntries = ringEntries
        self.notifyAfterCompletions = notifyAfterCompletions
    }

    /// Checks the name, poll window and ring size, then that the CPU set is online.
    ///
    /// - Parameter online: The online CPUs; when `nil`, they are read from
    ///   `/sys/devices/system/cpu/online`.
    public func validate(online: CPUSet? = nil) throws(ConfigurationError) {
        if name.isEmpty || name.utf8.count > Self.maxNameBytes || name.utf8.contains(0) {
            throw .invalidThreadName(name)
        }
        if pollMaxMicroseconds > Self.maxPollMicroseconds {
            throw .invalidPollWindow(pollMaxMicroseconds)
        }
        if !(8...32768).contains(ringEntries) || ringEntries.nonzeroBitCount != 1 {
            throw .invalidRingEntries(ringEntries)
        }
        if notifyAfterCompletions > Self.maxNotifyAfter {
            throw .invalidNotifyAfter(notifyAfterCompletions)
        }
        try cpuset.validateOnline(online)
    }
}

/// How a disk locks its image (`locking=on|shared|off`).
public enum ImageLocking: String, Sendable, Codable, CaseIterable {
    /// As QEMU locks a drive (`locking=on`): no QEMU (guest, qemu-img,
    /// qemu-io, qemu-storage-daemon) or other disk writes it behind this
    /// one's back. A writable disk refuses, and is refused by, any other
    /// writer and any user that shares no writer (a QEMU guest drive, a
    /// read-only disk); read-only disks share an image. A disk also waits
    /// for the requests a killed process that served it left in flight.
    case on
    /// Writers share the image with other writers that share it too (QEMU's
    /// `share-rw=on`), still refusing users that share no writer: for two
    /// instances that serve one image on purpose, a migrating guest's source
    /// and destination, which the frontend keeps from writing at once. A
    /// disk does not wait for the requests a killed sharer left in flight.
    case shared
    /// No locks at all: for storage something else keeps writers apart on.
    case off
}
