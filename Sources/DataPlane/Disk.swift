#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlane
import Logging
import Synchronization

/// An opened image (or the null backend) that virtqueues serve; queues on
/// many IOThreads share it. Its capacity and write cache mode may change
/// while served (``DataPlane/resize(disk:toBytes:allowShrink:)``,
/// ``setWriteCache(_:)``); nothing else does.
public final class Disk: Sendable {
    /// The C disk.
    private struct Handle: @unchecked Sendable {
        // Unchecked: a dp_disk is immutable once created, but for its capacity,
        // write cache mode, flush error and fault injection, which are atomics for any thread.
        let pointer: OpaquePointer
    }

    private let disk: Handle
    var handle: OpaquePointer { disk.pointer }
    /// The configuration the disk was opened with.
    public let configuration: DiskConfiguration
    /// Size in bytes the guest sees and requests are checked against: the
    /// file's or device's when opened (or the null backend's size), then
    /// what the last resize set.
    public var capacityBytes: UInt64 { dp_disk_capacity(handle) * 512 }
    /// Whether writes complete once in the host's (or the storage's)
    /// cache (write-back, the default), or only once durable (write-through:
    /// each carries RWF_DSYNC). The guest may change it (virtio-blk's
    /// writeback byte); ``DiskConfiguration/writeCache`` is the start value.
    public var writeCache: Bool { dp_disk_write_cache(handle) }
    /// The image is a block device: its size is the device's own.
    public let isBlockDevice: Bool
    /// Held through a resize: one at a time per disk.
    let resizing = Mutex<Void>(())
    /// Whether reads and writes bypass the page cache (O_DIRECT).
    public let usesDirectIO: Bool
    /// The alignment O_DIRECT wants of guest buffers; others go through a bounce buffer.
    public let directIOAlignment: UInt32
    /// The logical block size the guest sees: the configured one, or what
    /// the image takes (its device's sector size; with O_DIRECT, its
    /// filesystem's direct-I/O alignment), 512 at least.
    public let logicalBlockSize: UInt32
    /// The physical block size the guest sees (VIRTIO_BLK_F_TOPOLOGY): the
    /// device's, or the image's filesystem block size; never below
    /// ``logicalBlockSize``.
    public let physicalBlockSize: UInt32

    /// Its I/O limits (IOLimits.swift): own buckets or a group's.
    let throttle = DiskThrottle()

    /// A short name for logs and statistics: the image path, or "null".
    public var name: String { configuration.backend == .null ? "null" : configuration.path }

    /// How long opening an image waits for the requests a killed process
    /// left in flight on it (see ``init(_:logger:)``).
    public static let previousIOTimeout: Duration = .seconds(60)

    /// Opens the image. Validates the configuration first. With locking on,
    /// waits (up to ``previousIOTimeout``, saying so on `logger`) while a
    /// killed process's requests are still in flight on the image: the
    /// kernel completes them after the process is gone, and a write of
    /// theirs landing after ours, or a read filling guest memory the guest
    /// has reused, would corrupt it.
    public init(_ configuration: DiskConfiguration, logger: Logger? = nil) throws(DataPlaneError) {
        do { try configuration.validate() } catch { throw .configuration(error) }
        self.configuration = configuration

        var cConfig = dp_disk_config()
        cConfig.read_only = configuration.readOnly
        cConfig.read_policy = configuration.readErrorPolicy.cValue
        cConfig.write_policy = configuration.writeErrorPolicy.cValue
        cConfig.seg_max = UInt32(configuration.segmentsPerRequest)
        withUnsafeMutableBytes(of: &cConfig.serial) { serial in
            for (i, byte) in configuration.serial.utf8.prefix(Int(DP_SERIAL_LEN)).enumerated() {
                serial[i] = byte
            }
        }
        // The disk keeps a dup of this fd: one open file description, whose
        // image locks last until the disk closes its copy in deinit.
        var fd: Int32 = -1
        defer { if fd >= 0 { close(fd) } }

        switch configuration.backend {
        case .null:
            cConfig.backend = Int32(DP_BACKEND_NULL.rawValue)
            cConfig.fd = -1
            cConfig.null_read_zeroes = configuration.nullReadZeroes
            cConfig.capacity_sectors = configuration.nullSizeBytes / 512
            usesDirectIO = false
            isBlockDevice = false
            directIOAlignment = 0
            logicalBlockSize = configuration.logicalBlockSize ?? 512
            physicalBlockSize = logicalBlockSize
        case .file:
            let path = configuration.path
            fd = dp_open_image(path, configuration.readOnly, configuration.directIO)
            if fd < 0 { throw .cannotOpen(path: path, errno: -fd) }
            var info = dp_fd_info()
            let ret = dp_fd_probe(fd, &info)
            if ret == -EINVAL {
                throw .unusableImage(path: path, reason: "not a regular file or block device")
            }
            if ret < 0 { throw .system(operation: "probing \(path)", errno: -ret) }
            if configuration.locking {
                try Self.lock(fd: fd, path: path, readOnly: configuration.readOnly,
                              shareWriters: configuration.imageLocking == .shared)
            }
            // A block device takes nothing below its sector, page cache or
            // not; a file's filesystem asks for its alignment only of O_DIRECT.
            let required = info.block_device || configuration.directIO ? info.logical_block_size : 512
            let blockSize = configuration.logicalBlockSize ?? required
            if blockSize < required {
                let what = info.block_device
                    ? "the device's logical block size is \(required)"
                    : "its filesystem takes direct I/O only in \(required)-byte blocks"
                throw .unusableImage(
                    path: path,
                    reason: "\(what); use a block size of at least that (block-size=\(required)), "
                        + "or leave it unset to follow the image")
            }
            if blockSize > 65536 {
                throw .unusableImage(
                    path: path,
                    reason: "its filesystem takes direct I/O only in \(blockSize)-byte blocks, more than "
                        + "virtio-blk's 65536; serve it through the page cache (direct=off)")
            }
            let size = info.size_bytes
            if size == 0 {
                throw .unusableImage(path: path, reason: "it is empty (create it first, e.g. truncate -s 1G \(path))")
            }
            if size % UInt64(blockSize) != 0 {
                throw .unusableImage(
                    path: path,
                    reason: "its size \(size) is not a multiple of the \(blockSize)-byte logical block size")
            }
            cConfig.backend = Int32(DP_BACKEND_FILE.rawValue)
            cConfig.fd = fd
            cConfig.capacity_sectors = size / 512
            cConfig.mem_align = configuration.directIO ? max(info.dio_mem_align, 512) : 0
            cConfig.fixed_buffers = configuration.fixedBuffers
            usesDirectIO = configuration.directIO
            isBlockDevice = info.block_device
            directIOAlignment = cConfig.mem_align
            logicalBlockSize = blockSize
            physicalBlockSize = max(info.physical_block_size, blockSize)
        }
        cConfig.logical_block_size = logicalBlockSize
        var disk: OpaquePointer?
        let ret = dp_disk_create(&cConfig, &disk)
        guard ret == 0, let disk else {
            throw .system(operation: "setting up disk \(configuration.path)", errno: -ret)
        }
        if configuration.backend == .file && configuration.locking {
            do {
                try Self.claimIO(disk, path: configuration.path, exclusive: configuration.imageLocking == .on && !configuration.readOnly,
                                 logger: logger)
            } catch {
                dp_disk_destroy(disk)
                throw error
            }
        }
        if !configuration.writeCache {
            let ret = dp_disk_set_write_cache(disk, false)
            if ret < 0 {
                dp_disk_destroy(disk)
                throw .unusableImage(path: configuration.path, reason: Self.writeThroughRefusal(-ret))
            }
        }
        self.disk = Handle(pointer: disk)
    }

    static func writeThroughRefusal(_ err: Int32) -> String {
        guard err == EOPNOTSUPP else {
            return "turning write-through on failed: making what was written durable (fdatasync) failed "
                + "(\(DataPlaneError.message(err))); it stays write-back"
        }
        return "write-through needs the kernel to take RWF_DSYNC on its writes, and it refused "
            + "(\(DataPlaneError.message(err))); serve it with write-cache=on"
    }

    /// Switches between write-back (`true`) and write-through. Writes
    /// submitted afterwards carry the new mode; turning write-through on
    /// also makes what was written before durable (fdatasync), since a
    /// write-through guest sends no flushes. Returns the previous mode.
    @discardableResult
    public func setWriteCache(_ writeBack: Bool) throws(DataPlaneError) -> Bool {
        let old = writeCache
        let ret = dp_disk_set_write_cache(handle, writeBack)
        if ret < 0 { throw .diskChangeRefused(disk: name, reason: Self.writeThroughRefusal(-ret)) }
        return old
    }

    /// The image's size now, read again: a file's length, a block device's
    /// size (after `losetup -c` or `lvextend`), the null backend's capacity.
    public func imageSizeBytes() throws(DataPlaneError) -> UInt64 {
        var bytes: UInt64 = 0
        let ret = dp_disk_image_size(handle, &bytes)
        if ret < 0 { throw .system(operation: "reading the size of \(name)", errno: -ret) }
        return bytes
    }

    private static func claimIO(_ disk: OpaquePointer, path: String, exclusive: Bool, logger: Logger?) throws(DataPlaneError) {
        let clock = ContinuousClock()
        let start = clock.now
        var told = false
        while true {
            let ret = dp_disk_claim_io(disk, exclusive)
            if ret == 0 {
                if told { logger?.info("\(path): the previous process's requests have finished; opening it") }
                return
            }
            guard ret == -EAGAIN else {
                throw .unusableImage(path: path, reason: "it cannot be locked (\(DataPlaneError.message(-ret)))")
            }
            let waited = clock.now - start
            if waited >= previousIOTimeout {
                throw .unusableImage(
                    path: path,
                    reason: "requests of a process that served it and was killed are still in flight in the "
                        + "kernel after \(previousIOTimeout) (its storage may hang); starting now could let its "
                        + "writes land after ours. Wait for them to finish (or the storage to fail them), then start again")
            }
            if !told && waited >= .milliseconds(100) {
                logger?.warning("\(path): waiting for the requests a killed process left in flight on it to finish (up to \(previousIOTimeout))")
                told = true
            }
            usleep(10_000)
        }
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

    /// Takes QEMU's image locks (block/file-posix.c) as a guest drive does,
    /// except that resizing is never shared either (we do not follow a size
    /// change). A writer needs read and write and shares neither write nor
    /// resize; unlike a qemu-storage-daemon export it refuses while another
    /// writer holds the image. A read-only disk needs read and shares no
    /// writer, so any number of read-only disks share an image. With
    /// `shareWriters` (locking=shared) write is shared too, as QEMU's
    /// share-rw=on does.
    private static func lock(fd: Int32, path: String, readOnly: Bool, shareWriters: Bool) throws(DataPlaneError) {
        let perm = DP_PERM_CONSISTENT_READ.rawValue | (readOnly ? 0 : DP_PERM_WRITE.rawValue)
        let shared = DP_PERM_CONSISTENT_READ.rawValue | DP_PERM_WRITE_UNCHANGED.rawValue
            | (shareWriters ? DP_PERM_WRITE.rawValue : 0)
        var conflict = dp_lock_conflict()
        let ret = dp_image_lock(fd, perm, shared, &conflict)
        if ret == -EAGAIN {
            throw .imageLocked(path: path, permission: ImagePermission(conflict.perm),
                               heldByOther: conflict.held_by_other)
        }
        if ret < 0 {
            throw .unusableImage(
                path: path,
                reason: "it cannot be locked (\(DataPlaneError.message(-ret))): its filesystem may lack "
                    + "byte-range locks; if nothing else writes it, turn locking off (locking=off)")
        }
    }

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
