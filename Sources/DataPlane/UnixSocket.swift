#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlaneSys

/// Listening unix sockets that take over a stale socket file and nothing else.
public enum UnixSocket {
    /// Listens at `path` (non-blocking, close-on-exec) and returns the fd.
    ///
    /// Something already at `path` is replaced only when it is a socket that
    /// nobody listens on (left behind by a process that died). A live socket
    /// is refused, and so is anything that is not a socket — a regular file,
    /// a directory, a symbolic link — which is left exactly as it is.
    ///
    /// - Throws: ``DataPlaneError/socketPath(path:reason:)`` when the path is
    ///   served by another process or is not a socket;
    ///   ``DataPlaneError/system(operation:errno:)`` when listening fails.
    public static func listen(at path: String, backlog: Int32) throws(DataPlaneError) -> Int32 {
        // Two rounds: the stale file may vanish or be taken over between our
        // look and our unlink; after that, give up rather than loop.
        for _ in 0..<2 {
            let fd = dps_unix_listen(path, backlog)
            if fd >= 0 { return fd }
            guard fd == -EADDRINUSE else { throw .system(operation: "listening on \(path)", errno: -fd) }
            var st = stat()
            if lstat(path, &st) != 0 {
                if errno == ENOENT { continue }
                throw .system(operation: "looking at \(path)", errno: errno)
            }
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw .socketPath(path: path, reason: "it is \(kind(of: st.st_mode)), not a socket; it was left as it is "
                                  + "(remove it yourself or choose another path)")
            }
            let live = dps_unix_probe(path)
            if live == 1 { throw .socketPath(path: path, reason: "another process serves it (stop that process or choose another path)") }
            if live == -ENOENT { continue }
            guard live == 0 else { throw .system(operation: "checking whether a process listens on \(path)", errno: -live) }
            // Stale: its listener died without removing it.
            if unlink(path) != 0 && errno != ENOENT {
                throw .system(operation: "removing the stale socket \(path)", errno: errno)
            }
        }
        throw .socketPath(path: path, reason: "another process keeps creating it")
    }

    private static func kind(of mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFREG: return "a regular file"
        case S_IFDIR: return "a directory"
        case S_IFLNK: return "a symbolic link"
        case S_IFIFO: return "a FIFO"
        case S_IFCHR: return "a character device"
        case S_IFBLK: return "a block device"
        default: return "a file of unknown type"
        }
    }
}
