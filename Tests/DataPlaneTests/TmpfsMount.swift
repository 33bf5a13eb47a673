import Foundation

/// A tmpfs of a given size at a fresh directory, unmounted on deinit (root).
final class TmpfsMount: @unchecked Sendable {
    let path: String

    init(size: String) throws {
        path = "/tmp/dp-tmpfs-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        guard mount("tmpfs", path, "tmpfs", 0, "size=\(size)") == 0 else {
            let code = errno
            try? FileManager.default.removeItem(atPath: path)
            throw TestFailure("mounting a tmpfs at \(path) needs root (errno \(code))")
        }
    }

    func resize(_ size: String) throws {
        guard mount("tmpfs", path, "tmpfs", UInt(MS_REMOUNT), "size=\(size)") == 0 else {
            throw TestFailure("remounting \(path) with size \(size): errno \(errno)")
        }
    }

    deinit {
        _ = umount2(path, Int32(MNT_DETACH))
        try? FileManager.default.removeItem(atPath: path)
    }
}
