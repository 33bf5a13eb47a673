#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlane

/// What went wrong while starting, steering or stopping the data plane.
/// Each case's `description` is a one-line message a user can act on.
public enum DataPlaneError: Error, Equatable, CustomStringConvertible {
    /// The configuration was rejected before anything started.
    case configuration(ConfigurationError)
    /// The image could not be opened.
    case cannotOpen(path: String, errno: Int32)
    /// The path is neither a regular file nor a block device, or its size is unusable.
    case unusableImage(path: String, reason: String)
    /// Another process uses the image in a way that excludes this disk
    /// (image locking, as QEMU's): with `heldByOther`, it has `permission`
    /// and this disk does not share it; otherwise this disk needs
    /// `permission` and the other does not share it.
    case imageLocked(path: String, permission: ImagePermission, heldByOther: Bool)
    /// A system call failed.
    case system(operation: String, errno: Int32)
    /// The IOThread could not start.
    case threadStart(name: String, errno: Int32)
    /// A virtqueue was rejected (ring addresses, size, fds).
    case queue(disk: String, index: Int, errno: Int32)
    /// A socket path cannot be listened on: another process serves it, or it
    /// is not a socket (and is left alone).
    case socketPath(path: String, reason: String)
    /// A request named a disk, queue or thread that does not exist.
    case notFound(String)
    /// The data plane was already stopped.
    case stopped
    /// A resize or write-cache change of a served disk was refused (why, and what to do instead).
    case diskChangeRefused(disk: String, reason: String)

    public var description: String {
        switch self {
        case .configuration(let error):
            return error.description
        case .cannotOpen(let path, let err):
            var hint = ""
            if err == EACCES || err == EPERM { hint = " (check permissions, or serve it readonly=on)" }
            if err == EINVAL { hint = " (the filesystem may not support O_DIRECT: disable direct I/O)" }
            if err == ENOENT { hint = " (no such file)" }
            return "cannot open image \(path.debugDescription): \(Self.message(err))\(hint)"
        case .unusableImage(let path, let reason):
            return "cannot use image \(path.debugDescription): \(reason)"
        case .imageLocked(let path, let permission, let heldByOther):
            let conflict = heldByOther
                ? "another process has it open with \(permission.access), which this disk cannot share"
                : "this disk needs \(permission.access), which another process using it does not share"
            return "failed to get the \"\(permission.rawValue)\" lock on image \(path.debugDescription): \(conflict) "
                + "(a QEMU guest, qemu-img, qemu-io, qemu-storage-daemon or another dpctl?). Stop that process "
                + "first. For a migration's source and destination serving one image, give both "
                + "locking=shared; only for storage shared on purpose, where something else keeps writers "
                + "apart, turn image locking off (locking=off)"
        case .system(let operation, let err):
            return "\(operation) failed: \(Self.message(err))"
        case .threadStart(let name, let err):
            return "cannot start IOThread \(name.debugDescription): \(Self.message(err))"
        case .queue(let disk, let index, let err):
            let detail = err == EFAULT ? "ring addresses lie outside guest memory"
                : err == EINVAL ? "invalid queue size, misaligned ring, or a ring base outside the ring"
                : err == EBADMSG ? "its vhost-user inflight region does not agree with the ring (refused rather than guessing which requests were in flight)"
                : Self.message(err)
            return "cannot start queue \(index) of disk \(disk.debugDescription): \(detail)"
        case .socketPath(let path, let reason):
            return "cannot listen on \(path.debugDescription): \(reason)"
        case .notFound(let what):
            return "\(what) does not exist"
        case .stopped:
            return "the data plane is stopped"
        case .diskChangeRefused(let disk, let reason):
            return "disk \(disk.debugDescription): \(reason)"
        }
    }

    /// strerror for an errno value, without the shared static buffer.
    static func message(_ err: Int32) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        // Swift sees the XSI strerror_r: 0 on success, message in the buffer.
        guard strerror_r(err, &buffer, buffer.count) == 0 else { return "errno \(err)" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// A permission on an image, as QEMU's image locking names them (BLK_PERM_*).
public enum ImagePermission: String, Sendable, Equatable {
    case consistentRead = "consistent read"
    case write
    case writeUnchanged = "write unchanged"
    case resize

    init(_ bit: UInt32) {
        switch bit {
        case DP_PERM_WRITE.rawValue: self = .write
        case DP_PERM_WRITE_UNCHANGED.rawValue: self = .writeUnchanged
        case DP_PERM_RESIZE.rawValue: self = .resize
        default: self = .consistentRead
        }
    }

    /// What the permission lets its holder do, for messages.
    var access: String {
        switch self {
        case .consistentRead: return "read access"
        case .write: return "write access"
        case .writeUnchanged: return "unchanging-write access"
        case .resize: return "the right to resize it"
        }
    }
}
