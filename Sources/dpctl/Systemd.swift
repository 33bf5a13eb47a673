import CDataPlaneSys
import DataPlane
import Foundation
import Logging
import Synchronization

/// systemd's readiness protocol (sd_notify(3)) without libsystemd: one
/// datagram of newline-separated VAR=value fields to the unix socket named by
/// NOTIFY_SOCKET, a path or "@name" in the abstract namespace.
///
/// NOTIFY_SOCKET is read once and removed from the environment, so that
/// nothing dpctl runs (it runs nothing while serving today) talks to systemd
/// on its behalf. Without NOTIFY_SOCKET every call does nothing.
final class SystemdNotifier: Sendable {
    /// Where the messages go; nil when not run by systemd with Type=notify.
    let address: String?

    private struct State {
        var logger: Logger?
        /// A failure is logged once, not at every message.
        var failed = false
    }

    private let state = Mutex<State>(State())

    init() {
        address = getenv("NOTIFY_SOCKET").map { String(cString: $0) }
        unsetenv("NOTIFY_SOCKET")
    }

    /// Failures are logged here from now on (the notifier exists before logging starts).
    func setLogger(_ logger: Logger) { state.withLock { $0.logger = logger } }

    /// READY=1: every socket listens; STATUS= says what is served.
    func ready(status: String) { send(["READY=1", "STATUS=" + Self.oneLine(status)]) }

    /// RELOADING=1 (with MONOTONIC_USEC=, as Type=notify-reload wants) at the
    /// start of a reload; ``ready(status:)`` ends it.
    func reloading(status: String) {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let microseconds = UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec) / 1000
        send(["RELOADING=1", "MONOTONIC_USEC=\(microseconds)", "STATUS=" + Self.oneLine(status)])
    }

    /// STOPPING=1 as the drain begins.
    func stopping(status: String) { send(["STOPPING=1", "STATUS=" + Self.oneLine(status)]) }

    func status(_ text: String) { send(["STATUS=" + Self.oneLine(text)]) }

    private func send(_ fields: [String]) {
        guard let address else { return }
        let message = fields.joined(separator: "\n")
        let r = message.withCString { dps_notify(address, $0, strlen($0)) }
        guard r < 0 else { return }
        let (log, first): (Logger?, Bool) = state.withLock { state in
            defer { state.failed = true }
            return (state.logger, !state.failed)
        }
        guard first else { return }
        let reason = r == -EAFNOSUPPORT ? "only a path or an @abstract name is supported" : errnoText(-r)
        log?.warning("cannot notify systemd at NOTIFY_SOCKET=\(address): \(reason) (further failures are not logged)")
    }

    /// STATUS= is one line: newlines would start new fields.
    static func oneLine(_ text: String) -> String {
        text.split(whereSeparator: \.isNewline).joined(separator: " ")
    }
}

/// Sockets systemd passes (sd_listen_fds(3)): LISTEN_FDS fds from 3 on, for
/// this process when LISTEN_PID is its pid, named by LISTEN_FDNAMES
/// (FileDescriptorName=, colon-separated).
///
/// A passed socket serves the disk whose socket= path equals its name, or
/// else equals the path it is bound to (ListenStream=); one that names or is
/// bound to the control socket's path becomes the control socket. A passed
/// socket that matches nothing is an error, as is a disk given two. Disks no
/// socket was passed for listen on their own path as usual.
enum SocketActivation {
    /// The first passed fd (SD_LISTEN_FDS_START).
    static let firstFD: Int32 = 3

    struct Passed {
        var socket: UnixSocket.Inherited
        /// Its FileDescriptorName=, if LISTEN_FDNAMES was set.
        var name: String?

        var origin: String { "socket-activated fd \(socket.fd)\(name.map { " (\($0.debugDescription))" } ?? "")" }
    }

    /// The sockets passed to this process, taken over (close-on-exec,
    /// non-blocking), and the LISTEN_* variables removed from the
    /// environment. None when LISTEN_FDS is unset or LISTEN_PID names
    /// another process (then `ignored` says why).
    static func take() throws(CLIError) -> (passed: [Passed], ignored: String?) {
        let environment = ProcessInfo.processInfo.environment
        defer { for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] { unsetenv(name) } }
        guard let countText = environment["LISTEN_FDS"] else { return ([], nil) }
        guard let pidText = environment["LISTEN_PID"], let pid = Int32(pidText) else {
            return ([], "LISTEN_FDS is set without a LISTEN_PID: ignored")
        }
        guard pid == getpid() else { return ([], "LISTEN_FDS is for process \(pid), not this one (\(getpid())): ignored") }
        guard let count = Int32(countText), (0...4096).contains(count) else {
            throw CLIError("LISTEN_FDS=\(countText.debugDescription) is not a count of file descriptors")
        }
        var names: [String]?
        if let text = environment["LISTEN_FDNAMES"] {
            let split = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            guard split.count == Int(count) else {
                throw CLIError("LISTEN_FDNAMES names \(split.count) socket(s), LISTEN_FDS passes \(count)")
            }
            names = split
        }
        var passed: [Passed] = []
        for i in 0..<count {
            let fd = firstFD + i
            let name = names?[Int(i)]
            do {
                passed.append(Passed(socket: try UnixSocket.adopt(fd: fd, origin: "socket-activated fd \(fd)"),
                                     name: name?.isEmpty == true ? nil : name))
            } catch {
                throw CLIError("\(error)")
            }
        }
        return (passed, nil)
    }

    /// Which passed socket serves which disk (by index) and which is the
    /// control socket (see the type's comment).
    static func assign(_ passed: [Passed], sockets: [String], control: String?) throws(CLIError)
        -> (disks: [Int: Passed], control: Passed?) {
        func absolute(_ path: String) -> String {
            path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
        }
        func matches(_ p: Passed, _ path: String) -> Bool {
            p.name == path || p.name.map(absolute) == absolute(path)
                || p.socket.address.map { $0 == path || absolute($0) == absolute(path) } == true
        }
        var disks: [Int: Passed] = [:]
        var controlSocket: Passed?
        for p in passed {
            // By name first: a name is an explicit choice, an address a coincidence.
            let byName = sockets.firstIndex { p.name == $0 || p.name.map(absolute) == absolute($0) }
            if let index = byName ?? sockets.firstIndex(where: { matches(p, $0) }) {
                if let earlier = disks[index] {
                    throw CLIError("\(earlier.origin) and \(p.origin) both match the disk on \(sockets[index]): pass one socket per disk")
                }
                disks[index] = p
            } else if let control, matches(p, control) {
                if let earlier = controlSocket {
                    throw CLIError("\(earlier.origin) and \(p.origin) both match the control socket \(control)")
                }
                controlSocket = p
            } else {
                throw CLIError("\(p.origin), bound to \(p.socket.address ?? "no address"), matches no disk's socket= path "
                               + "(disks: \(sockets.joined(separator: ", "))): set FileDescriptorName= or ListenStream= to a disk's socket path")
            }
        }
        return (disks, controlSocket)
    }
}

/// The backend program conventions of QEMU's docs/interop/vhost-user.rst:
/// `--print-capabilities` prints what the vhost-user.json schema's
/// VHostUserBackendCapabilities describes for the block type.
enum BackendCapabilities {
    /// The block type's features (the schema's VHostUserBackendBlockFeature):
    /// both of its command-line options work.
    static let features = ["read-only", "blk-file"]

    static var json: String {
        """
        {
          "type": "block",
          "features": [
        \(features.map { "    \"\($0)\"" }.joined(separator: ",\n"))
          ]
        }
        """
    }

    /// Options that make `dpctl` with no verb mean `dpctl start`, as a
    /// management layer that follows the conventions runs it.
    static let startOptions = ["--socket-path", "--fd", "--blk-file"]

    static func mentions(_ option: String, in words: [String]) -> Bool {
        words.prefix { $0 != "--" }.contains { $0 == option || $0.hasPrefix(option + "=") }
    }
}
