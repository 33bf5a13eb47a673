#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlaneSys

/// Who may connect to a listening socket's path: its owner, group and mode
/// (each nil: as bind(2) and the umask leave it).
public struct SocketPermissions: Sendable, Equatable, CustomStringConvertible {
    public var owner: uid_t?
    public var group: gid_t?
    /// Permission bits, 0...0o777.
    public var mode: mode_t?

    public init(owner: uid_t? = nil, group: gid_t? = nil, mode: mode_t? = nil) {
        self.owner = owner
        self.group = group
        self.mode = mode
    }

    public var isEmpty: Bool { owner == nil && group == nil && mode == nil }

    public var description: String {
        [owner.map { "owner \($0)" }, group.map { "group \($0)" }, mode.map { "mode 0" + String($0, radix: 8) }]
            .compactMap { $0 }.joined(separator: ", ")
    }
}

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
    ///
    /// `permissions` are set on the path before the socket listens; when
    /// they cannot be (chown to another user needs CAP_CHOWN), listening
    /// fails and the path is removed.
    public static func listen(at path: String, backlog: Int32,
                              permissions: SocketPermissions = SocketPermissions()) throws(DataPlaneError) -> Int32 {
        // Two rounds: the stale file may vanish or be taken over between our
        // look and our unlink; after that, give up rather than loop.
        for _ in 0..<2 {
            let fd = dps_unix_listen_as(path, backlog, permissions.mode.map { Int32($0) } ?? -1,
                                        permissions.owner.map { Int64($0) } ?? -1, permissions.group.map { Int64($0) } ?? -1)
            if fd >= 0 { return fd }
            guard fd == -EADDRINUSE else {
                let what = permissions.isEmpty ? "listening on \(path)" : "listening on \(path) with \(permissions)"
                throw .system(operation: what, errno: -fd)
            }
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

    /// Gives a live socket's path another owner, group or mode (a reload).
    public static func setPermissions(_ permissions: SocketPermissions, of path: String) throws(DataPlaneError) {
        let r = dps_path_permissions(path, permissions.mode.map { Int32($0) } ?? -1,
                                     permissions.owner.map { Int64($0) } ?? -1, permissions.group.map { Int64($0) } ?? -1)
        if r < 0 { throw .system(operation: "setting \(permissions) on \(path)", errno: -r) }
    }

    /// What an inherited listening socket is bound to.
    public struct Inherited: Sendable, Equatable {
        public var fd: Int32
        /// The path it is bound to, "@name" for the abstract namespace, nil when unbound.
        public var address: String?
    }

    /// Checks that `fd` (passed by systemd or a parent) is a listening unix
    /// stream socket and says where it is bound, changing nothing. `origin`
    /// names the fd in errors ("--fd 3").
    public static func describe(fd: Int32, origin: String) throws(DataPlaneError) -> Inherited {
        var type: Int32 = 0
        var listening = false
        var path = [CChar](repeating: 0, count: 256)
        let family = dps_socket_describe(fd, &type, &listening, &path, path.count)
        if family == -EBADF { throw .socketPath(path: origin, reason: "no such file descriptor is open") }
        if family == -ENOTSOCK { throw .socketPath(path: origin, reason: "it is not a socket") }
        if family < 0 { throw .system(operation: "looking at \(origin)", errno: -family) }
        guard family == AF_UNIX else { throw .socketPath(path: origin, reason: "it is not a unix socket (address family \(family))") }
        guard type == Int32(SOCK_STREAM.rawValue) else { throw .socketPath(path: origin, reason: "it is not a stream socket") }
        guard listening else {
            throw .socketPath(path: origin, reason: "it does not listen (vhost-user needs a bound, listening socket: in systemd, ListenStream= with Accept=no)")
        }
        let address = path.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        return Inherited(fd: fd, address: address.isEmpty ? nil : address)
    }

    /// ``describe(fd:origin:)``, then takes the fd over: close-on-exec (no
    /// child inherits it) and non-blocking.
    public static func adopt(fd: Int32, origin: String) throws(DataPlaneError) -> Inherited {
        let inherited = try describe(fd: fd, origin: origin)
        let claimed = dps_fd_claim(fd)
        if claimed < 0 { throw .system(operation: "taking over \(origin)", errno: -claimed) }
        return inherited
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
