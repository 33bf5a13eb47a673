#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlane

/// An opened image (or the null backend) that virtqueues serve.
/// Immutable once opened; queues on many IOThreads share it.
public final class Disk: @unchecked Sendable {
    let handle: OpaquePointer
    /// The configuration the disk was opened with.
    public let configuration: DiskConfiguration
    /// Size in bytes, from the file or device (or the null backend's size).
    public let capacityBytes: UInt64
    /// Whether reads and writes bypass the page cache (O_DIRECT).
    public let usesDirectIO: Bool
    /// The alignment O_DIRECT wants of guest buffers; others go through a bounce buffer.
    public let directIOAlignment: UInt32

    /// A short name for logs and statistics: the image path, or "null".
    public var name: String { configuration.backend == .null ? "null" : configuration.path }

    /// Opens the image. Validates the configuration first.
    public init(_ configuration: DiskConfiguration) throws(DataPlaneError) {
        do { try configuration.validate() } catch { throw .configuration(error) }
        self.configuration = configuration

        var cConfig = dp_disk_config()
        cConfig.logical_block_size = configuration.logicalBlockSize
        cConfig.read_only = configuration.readOnly
        cConfig.read_policy = configuration.readErrorPolicy.cValue
        cConfig.write_policy = configuration.writeErrorPolicy.cValue
        cConfig.seg_max = UInt32(configuration.segmentsPerRequest)
        withUnsafeMutableBytes(of: &cConfig.serial) { serial in
            for (i, byte) in configuration.serial.utf8.prefix(Int(DP_SERIAL_LEN)).enumerated() {
                serial[i] = byte
            }
        }
        var fd: Int32 = -1
        defer { if fd >= 0 { close(fd) } }

        switch configuration.backend {
        case .null:
            cConfig.backend = Int32(DP_BACKEND_NULL.rawValue)
            cConfig.fd = -1
            cConfig.null_read_zeroes = configuration.nullReadZeroes
            cConfig.capacity_sectors = configuration.nullSizeBytes / 512
            capacityBytes = configuration.nullSizeBytes
            usesDirectIO = false
            directIOAlignment = 0
        case .file:
            let path = configuration.path
            fd = dp_open_image(path, configuration.readOnly, configuration.directIO)
            if fd < 0 { throw .cannotOpen(path: path, errno: -fd) }
            var size: UInt64 = 0
            var deviceBlockSize: UInt32 = 512
            var alignment: UInt32 = 512
            let ret = dp_fd_probe(fd, &size, &deviceBlockSize, &alignment)
            if ret == -EINVAL {
                throw .unusableImage(path: path, reason: "not a regular file or block device")
            }
            if ret < 0 { throw .system(operation: "probing \(path)", errno: -ret) }
            let blockSize = UInt64(configuration.logicalBlockSize)
            if size == 0 {
                throw .unusableImage(path: path, reason: "it is empty (create it first, e.g. truncate -s 1G \(path))")
            }
            if size % blockSize != 0 {
                throw .unusableImage(
                    path: path,
                    reason: "its size \(size) is not a multiple of the \(blockSize)-byte logical block size")
            }
            if configuration.logicalBlockSize < deviceBlockSize {
                throw .unusableImage(
                    path: path,
                    reason: "the device's logical block size is \(deviceBlockSize); use at least that")
            }
            cConfig.backend = Int32(DP_BACKEND_FILE.rawValue)
            cConfig.fd = fd
            cConfig.capacity_sectors = size / 512
            cConfig.mem_align = configuration.directIO ? max(alignment, 512) : 0
            capacityBytes = size
            usesDirectIO = configuration.directIO
            directIOAlignment = cConfig.mem_align
        }
        var disk: OpaquePointer?
        let ret = dp_disk_create(&cConfig, &disk)
        guard ret == 0, let disk else {
            throw .system(operation: "setting up disk \(configuration.path)", errno: -ret)
        }
        handle = disk
    }

    /// Set once a flush of the page cache failed (without O_DIRECT): the
    /// pages it could not write are marked clean, so data the guest was told
    /// is durable may be lost, and every later FLUSH fails until the disk is
    /// opened again (restart dpctl). The errno of the failure.
    public var flushFailure: Int32? {
        let error = dp_disk_flush_error(handle)
        return error < 0 ? -error : nil
    }

    /// ``flushFailure`` as text (e.g. "Input/output error").
    public var flushFailureReason: String? { flushFailure.map { DataPlaneError.message($0) } }

    /// Makes matching requests fail (for tests and rehearsals), or stops that with nil.
    public func injectFaults(_ fault: FaultInjection?) {
        var c = dp_fault_config()
        if let fault {
            c.error = fault.errno
            c.ops = fault.operations.reduce(0) { $0 | (1 << $1.rawValue) }
            c.sector_start = fault.sectors.lowerBound
            c.sector_end = fault.sectors.upperBound == .max ? 0 : fault.sectors.upperBound
            c.after = fault.after
            c.every = fault.every
        }
        dp_disk_set_fault(handle, &c)
    }

    deinit {
        dp_disk_destroy(handle)
    }
}

/// Which requests fault injection fails, and how.
public struct FaultInjection: Sendable, Equatable, Codable {
    public enum Operation: UInt32, Sendable, Codable, CaseIterable {
        case read = 0, write, flush, getID, discard, writeZeroes
    }

    /// The errno matching requests fail with (EIO = 5, ENOSPC = 28, ...).
    public var errno: Int32
    public var operations: [Operation]
    /// Requests touching these sectors (all of the disk by default).
    public var sectors: Range<UInt64>
    /// Let this many matching requests through first.
    public var after: UInt64
    /// Then fail one in `every` (1: all of them).
    public var every: UInt32

    public init(errno: Int32, operations: [Operation] = [.read, .write], sectors: Range<UInt64> = 0..<UInt64.max,
                after: UInt64 = 0, every: UInt32 = 1) {
        self.errno = errno
        self.operations = operations
        self.sectors = sectors
        self.after = after
        self.every = every
    }
}

extension ErrorPolicy {
    var cValue: Int32 {
        switch self {
        case .report: return Int32(DP_POLICY_REPORT.rawValue)
        case .ignore: return Int32(DP_POLICY_IGNORE.rawValue)
        case .enospc: return Int32(DP_POLICY_ENOSPC.rawValue)
        case .stop: return Int32(DP_POLICY_STOP.rawValue)
        }
    }
}
