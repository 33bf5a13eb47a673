import CDataPlaneSys
import CGuestDriver
import CVhostFrontend
import Foundation
import Testing

/// dpctl under systemd and as a vhost-user backend program: readiness
/// notification (a fake NOTIFY_SOCKET bound here), socket activation
/// (LISTEN_FDS through `sh -c 'export LISTEN_PID=$$; exec dpctl ...'`),
/// --fd, --socket-path, --print-capabilities, socket owner/group/mode,
/// SIGHUP reload and the files in contrib/.
@Suite(.serialized) struct SystemdTests {
    /// A datagram socket standing in for systemd's notification socket.
    final class NotifyReceiver {
        let fd: Int32
        /// What NOTIFY_SOCKET is set to: a path, or "@name".
        let address: String

        init(address: String) throws {
            self.address = address
            fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(address.utf8)
            withUnsafeMutableBytes(of: &addr.sun_path) { path in
                for (i, b) in bytes.enumerated() { path[i] = b }
                if address.hasPrefix("@") { path[0] = 0 }
            }
            let length = MemoryLayout<sa_family_t>.size + bytes.count + (address.hasPrefix("@") ? 0 : 1)
            let r = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(length)) }
            }
            guard r == 0 else { throw TestFailure("bind \(address): \(String(cString: strerror(errno)))") }
        }

        deinit { close(fd) }

        /// The next message, or nil after `timeout` seconds.
        func next(timeout: Double = 15) -> String? {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, Int32(timeout * 1000)) == 1 else { return nil }
            var buffer = [UInt8](repeating: 0, count: 4096)
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            return n < 0 ? nil : String(decoding: buffer.prefix(n), as: UTF8.self)
        }
    }

    /// A process started with posix_spawn, so that chosen fds land at chosen
    /// numbers (Foundation's Process passes only 0-2); output in a log file.
    final class Spawned {
        let pid: pid_t
        let logPath: String
        private(set) var status: Int32?

        init(_ argv: [String], environment: [String: String] = [:], fds: [(from: Int32, to: Int32)] = [], log: String) throws {
            logPath = log
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
            // Through high numbers first: dup2 of an fd onto itself would keep its close-on-exec.
            var staged: [Int32] = []
            for (i, m) in fds.enumerated() {
                let high = fcntl(m.from, F_DUPFD_CLOEXEC, 200 + Int32(i))
                guard high >= 0 else { throw TestFailure("dup \(m.from)") }
                staged.append(high)
            }
            defer { staged.forEach { close($0) } }
            for (i, m) in fds.enumerated() { posix_spawn_file_actions_adddup2(&actions, staged[i], m.to) }
            var env = ProcessInfo.processInfo.environment
            for key in ["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] { env[key] = nil }
            env.merge(environment) { $1 }
            let cArgs = argv.map { strdup($0) } + [nil]
            let cEnv = env.map { strdup("\($0)=\($1)") } + [nil]
            defer { (cArgs + cEnv).forEach { free($0) } }
            var pid: pid_t = 0
            let r = posix_spawn(&pid, argv[0], &actions, nil, cArgs, cEnv)
            guard r == 0 else { throw TestFailure("posix_spawn \(argv[0]): \(r)") }
            self.pid = pid
        }

        deinit {
            if status == nil {
                kill(pid, SIGKILL)
                _ = wait(timeout: 10)
            }
        }

        /// The exit status (128 + N after signal N), or nil if it still runs after `timeout`.
        func wait(timeout: Double = 30) -> Int32? {
            if let status { return status }
            let deadline = Date().addingTimeInterval(timeout)
            repeat {
                var raw: Int32 = 0
                if waitpid(pid, &raw, WNOHANG) == pid {
                    status = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
                    return status
                }
                usleep(10_000)
            } while Date() < deadline
            return nil
        }

        func signal(_ number: Int32) { kill(pid, number) }

        var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    }

    func scratch() throws -> String {
        let dir = "/tmp/dp-sd-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// One connect, no retry: the socket must accept now. Then the handshake.
    static func connectNow(_ guest: TestGuest, _ socket: String) throws -> OpaquePointer {
        var conn: OpaquePointer?
        let rc = vuf_connect(socket, &conn)
        guard rc == 0, let conn else { throw TestFailure("connect \(socket) right after READY=1: \(rc)") }
        var options = vuf_options()
        let setup = vuf_setup(conn, guest.driver, &options, nil)
        guard setup == 0 else {
            defer { vuf_close(conn) }
            throw TestFailure("vuf_setup: \(setup) \(String(cString: vuf_last_error(conn)))")
        }
        return conn
    }

    /// Writes a pattern at sector 8 through the guest, reads it back, and
    /// checks the image holds it.
    static func writeAndReadBack(_ guest: TestGuest, image: TestImage, seed: UInt8) throws {
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7) &+ seed }
        let buffer = guest.alloc(4096)
        guest.write(buffer, pattern)
        #expect(try guest.run(type: UInt32(GD_BLK_T_OUT), sector: 8, segments: [(buffer, 4096)]).status == 0)
        guest.write(buffer, [UInt8](repeating: 0, count: 4096))
        #expect(try guest.run(type: UInt32(GD_BLK_T_IN), sector: 8, segments: [(buffer, 4096)]).status == 0)
        #expect(guest.read(buffer, 4096) == pattern)
        #expect(image.read(offset: 8 * 512, count: 4096) == pattern)
    }

    /// A listening unix socket at `path`, bound here (as systemd would).
    static func listeningSocket(_ path: String) throws -> Int32 {
        let fd = dps_unix_listen(path, 8)
        guard fd >= 0 else { throw TestFailure("listen \(path): \(fd)") }
        return fd
    }

    // MARK: - Readiness

    /// READY=1 (with STATUS=) comes once the vhost-user socket accepts a
    /// frontend, nothing comes before it, and SIGTERM brings STOPPING=1
    /// before a clean exit. Both address forms of NOTIFY_SOCKET.
    @Test(arguments: ["path", "abstract"])
    func readinessIsNotifiedInOrder(form: String) throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let address = form == "path" ? dir + "/notify" : "@dp-test-notify-" + UUID().uuidString.prefix(8)
        let receiver = try NotifyReceiver(address: address)
        let socket = dir + "/vu.sock"
        let dp = try Spawned([QEMUEndToEndTests.dpctl, "start", "--disk", "path=x,backend=null,null-size=16M,num-queues=1,socket=\(socket)"],
                             environment: ["NOTIFY_SOCKET": address], log: dir + "/dpctl.log")
        guard let ready = receiver.next() else {
            Issue.record("no READY=1: \(dp.log)")
            return
        }
        let fields = ready.split(separator: "\n").map(String.init)
        #expect(fields.first == "READY=1", "the first message: \(ready.debugDescription)")
        #expect(fields.contains("STATUS=serving 1 disk(s) on \(socket)"), "\(fields)")
        let guest = try TestGuest(queues: 1, queueSize: 64)
        let conn = try Self.connectNow(guest, socket)
        #expect(try guest.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0)
        vuf_close(conn)
        dp.signal(SIGTERM)
        let stopping = receiver.next()
        #expect(stopping?.split(separator: "\n").first == "STOPPING=1", "\(stopping ?? "nothing")")
        #expect(stopping?.contains("STATUS=") == true)
        #expect(dp.wait() == 0, "\(dp.log)")
        #expect(receiver.next(timeout: 0.2) == nil)
    }

    // MARK: - Socket activation

    /// The test binds the listening socket, as a socket unit would, and
    /// dpctl gets it as fd 3 with LISTEN_FDS=1 and LISTEN_PID its own pid;
    /// a frontend connects and does I/O; the socket's file stays (systemd's)
    /// when dpctl exits, and a second instance is served on it again.
    @Test func aSocketActivatedDiskServesIO() throws {
        let image = try TestImage(size: 1 << 20)
        let dir = image.directory
        let socket = dir + "/vu.sock"
        let listener = try Self.listeningSocket(socket)
        defer { close(listener) }
        let config = dir + "/dpctl.json"
        try #"{"disks": [{"path": "\#(image.path)", "socket": "\#(socket)", "num-queues": 1}]}"#
            .write(toFile: config, atomically: true, encoding: .utf8)
        for round in 0..<2 {
            let receiver = try NotifyReceiver(address: dir + "/notify\(round)")
            let dp = try Spawned(["/bin/sh", "-c", #"export LISTEN_PID=$$; exec "$0" "$@""#, QEMUEndToEndTests.dpctl,
                                  "start", "--config", config],
                                 environment: ["LISTEN_FDS": "1", "NOTIFY_SOCKET": receiver.address],
                                 fds: [(listener, 3)], log: dir + "/dpctl\(round).log")
            #expect(receiver.next()?.hasPrefix("READY=1") == true, "\(dp.log)")
            let guest = try TestGuest(queues: 1, queueSize: 64)
            let conn = try Self.connectNow(guest, socket)
            try Self.writeAndReadBack(guest, image: image, seed: UInt8(round))
            vuf_close(conn)
            #expect(dp.log.contains("\(socket): listening on socket-activated fd 3"), "\(dp.log)")
            dp.signal(SIGTERM)
            #expect(dp.wait() == 0, "\(dp.log)")
            var st = stat()
            #expect(lstat(socket, &st) == 0, "round \(round): the socket-activated socket's file was removed")
        }
    }

    /// A passed socket is matched by FileDescriptorName= before its address;
    /// one that matches no disk is refused (exit 1) naming it.
    @Test func passedSocketsAreMatchedByNameThenAddress() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let bound = dir + "/elsewhere.sock", socket = dir + "/a.sock"
        let listener = try Self.listeningSocket(bound)
        defer { close(listener) }
        let wrapper = ["/bin/sh", "-c", #"export LISTEN_PID=$$; exec "$0" "$@""#, QEMUEndToEndTests.dpctl, "start"]
        let disk = ["--disk", "path=x,backend=null,null-size=16M,num-queues=1,socket=\(socket)"]

        // Named after the disk's socket: it serves that disk, wherever it is bound.
        let receiver = try NotifyReceiver(address: dir + "/notify")
        let named = try Spawned(wrapper + disk, environment: ["LISTEN_FDS": "1", "LISTEN_FDNAMES": socket, "NOTIFY_SOCKET": receiver.address],
                                fds: [(listener, 3)], log: dir + "/named.log")
        #expect(receiver.next()?.hasPrefix("READY=1") == true, "\(named.log)")
        let guest = try TestGuest(queues: 1, queueSize: 64)
        let conn = try Self.connectNow(guest, bound)
        #expect(try guest.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0)
        vuf_close(conn)
        #expect(!FileManager.default.fileExists(atPath: socket), "the disk's own path was not to be made")
        named.signal(SIGTERM)
        #expect(named.wait() == 0)

        // Neither named nor bound after a disk's socket: refused.
        let stray = try Spawned(wrapper + disk, environment: ["LISTEN_FDS": "1", "LISTEN_FDNAMES": "dpctl@vm1.socket"],
                                fds: [(listener, 3)], log: dir + "/stray.log")
        #expect(stray.wait() == 1)
        #expect(stray.log.contains(#"socket-activated fd 3 ("dpctl@vm1.socket"), bound to \#(bound), matches no disk's socket= path"#),
                "\(stray.log)")

        // For another process (LISTEN_PID not ours): ignored, and said so.
        let other = try Spawned([QEMUEndToEndTests.dpctl, "start"] + disk, environment: ["LISTEN_FDS": "1", "LISTEN_PID": "1"],
                                fds: [(listener, 3)], log: dir + "/other.log")
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) && Date() < deadline { usleep(20_000) }
        other.signal(SIGTERM)
        #expect(other.wait() == 0)
        #expect(other.log.contains("LISTEN_FDS is for process 1, not this one"), "\(other.log)")
    }

    // MARK: - Backend program conventions

    @Test func printCapabilitiesIsJSONForTheBlockType() throws {
        for arguments in [["--print-capabilities"], ["start", "--print-capabilities"],
                          ["--print-capabilities", "--socket-path", "/nonexistent/x", "--no-such-option"]] {
            let r = try DpctlTests.dpctl(arguments)
            #expect(r.status == 0, "\(arguments): \(r.stderr)")
            let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
            #expect(json?["type"] as? String == "block", "\(r.stdout)")
            #expect(Set(json?["features"] as? [String] ?? []) == ["read-only", "blk-file"], "\(r.stdout)")
        }
    }

    /// --socket-path is --socket; with no command, the convention options
    /// mean start; --blk-file is the image and --read-only makes it read-only.
    @Test func socketPathIsSocket() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/vu.sock"
        let forms = [["start", "--disk", "img", "--socket", socket, "--check"],
                     ["start", "--socket-path", socket, "--disk", "img", "--check"],
                     ["start", "--disk", "path=img", "--socket-path=\(socket)", "--check"],
                     ["--socket-path", socket, "--blk-file", "img", "--check"]]
        let outputs = try forms.map { try DpctlTests.dpctl($0) }
        for (form, r) in zip(forms, outputs) {
            #expect(r.status == 0, "\(form): \(r.stderr)")
            #expect(r.stdout == outputs[0].stdout, "\(form)")
        }
        let readOnly = try DpctlTests.dpctl(["--socket-path", socket, "--blk-file", "img", "--read-only", "--check"])
        #expect(readOnly.stdout.contains(#""readonly" : true"#), "\(readOnly.stdout)")

        let refused: [([String], String)] = [
            (["start", "--socket-path", socket, "--disk", "a", "--disk", "b"], "--socket-path serves one disk; 2 are given"),
            (["start", "--socket-path", socket, "--fd", "3", "--disk", "a"], "--socket-path and --fd conflict"),
            (["start", "--socket-path", socket, "--disk", "path=a,socket=/x"], "--socket-path and the disk's socket= conflict"),
            (["start", "--fd", "0", "--disk", "a"], #"cannot listen on "--fd 0": it is not a socket"#),
            (["start", "--disk", "path=a,socket=/x,socket-mode=999"], #"socket-mode "999" is not an octal mode"#),
            (["start", "--disk", "path=a,socket=/x", "--socket-owner", "no-such-user-here"], #"no user named "no-such-user-here""#),
        ]
        for (arguments, message) in refused {
            let r = try DpctlTests.dpctl(arguments)
            #expect(r.status == (message.hasPrefix("cannot listen") ? 1 : 2), "\(arguments): \(r.stderr)")
            #expect(r.stderr.contains(message), "\(arguments): \(r.stderr)")
        }

        // And it serves: no command, --socket-path, --blk-file.
        let image = try TestImage(size: 1 << 20)
        let receiver = try NotifyReceiver(address: dir + "/notify")
        let dp = try Spawned([QEMUEndToEndTests.dpctl, "--socket-path", socket, "--blk-file", image.path, "--num-queues", "1"],
                             environment: ["NOTIFY_SOCKET": receiver.address], log: dir + "/dpctl.log")
        #expect(receiver.next()?.hasPrefix("READY=1") == true, "\(dp.log)")
        let guest = try TestGuest(queues: 1, queueSize: 64)
        let conn = try Self.connectNow(guest, socket)
        try Self.writeAndReadBack(guest, image: image, seed: 3)
        vuf_close(conn)
        dp.signal(SIGTERM)
        #expect(dp.wait() == 0, "\(dp.log)")
    }

    /// --fd: a listening socket bound here is passed as fd 5; the frontend
    /// connects to its path and does I/O; the control socket is PATH.ctl.
    @Test func fdServesAPassedListeningSocket() throws {
        let image = try TestImage(size: 1 << 20)
        let socket = image.directory + "/vu.sock"
        let listener = try Self.listeningSocket(socket)
        defer { close(listener) }
        let receiver = try NotifyReceiver(address: image.directory + "/notify")
        let dp = try Spawned([QEMUEndToEndTests.dpctl, "--fd", "5", "--blk-file", image.path, "--num-queues", "1"],
                             environment: ["NOTIFY_SOCKET": receiver.address], fds: [(listener, 5)], log: image.directory + "/dpctl.log")
        #expect(receiver.next()?.hasPrefix("READY=1") == true, "\(dp.log)")
        let guest = try TestGuest(queues: 1, queueSize: 64)
        let conn = try Self.connectNow(guest, socket)
        try Self.writeAndReadBack(guest, image: image, seed: 5)
        vuf_close(conn)
        let status = try DpctlTests.dpctl(["status", "--socket", socket])
        #expect(status.status == 0 && status.stdout.contains("socket \(socket)"), "\(status.stdout)\(status.stderr)")
        dp.signal(SIGTERM)
        #expect(dp.wait() == 0, "\(dp.log)")
        #expect(FileManager.default.fileExists(atPath: socket), "an inherited socket's file is not dpctl's to remove")
    }

    // MARK: - Socket owner, group and mode

    /// Owner, group and mode reach the socket file before it listens: per
    /// disk, and for every disk from the instance options.
    @Test func socketOwnerGroupAndModeAreSet() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // Root may give the socket away; anyone may keep it and pick a group of theirs.
        let owner = getuid() == 0 ? uid_t(65534) : getuid()
        let group = getuid() == 0 ? gid_t(65534) : getgid()
        let a = dir + "/a.sock", b = dir + "/b.sock"
        let receiver = try NotifyReceiver(address: dir + "/notify")
        let dp = try Spawned([QEMUEndToEndTests.dpctl, "start", "--socket-mode", "0640", "--socket-group", "\(group)",
                              "--disk", "path=x,backend=null,null-size=16M,num-queues=1,socket=\(a),socket-owner=\(owner),socket-mode=0660",
                              "--disk", "path=y,backend=null,null-size=16M,num-queues=1,socket=\(b)"],
                             environment: ["NOTIFY_SOCKET": receiver.address], log: dir + "/dpctl.log")
        #expect(receiver.next()?.hasPrefix("READY=1") == true, "\(dp.log)")
        var st = stat()
        #expect(stat(a, &st) == 0)
        #expect(st.st_mode & S_IFMT == S_IFSOCK && st.st_mode & 0o7777 == 0o660 && st.st_uid == owner && st.st_gid == group,
                "a: mode \(String(st.st_mode, radix: 8)) uid \(st.st_uid) gid \(st.st_gid)")
        #expect(stat(b, &st) == 0)
        #expect(st.st_mode & 0o7777 == 0o640 && st.st_uid == getuid() && st.st_gid == group,
                "b: mode \(String(st.st_mode, radix: 8)) uid \(st.st_uid) gid \(st.st_gid)")
        dp.signal(SIGTERM)
        #expect(dp.wait() == 0, "\(dp.log)")
    }

    @Test func socketSettingsInTheConfigFile() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = dir + "/c.json"
        try #"{"socket-mode": "0600", "disks": [{"path": "x", "socket": "/x", "socket-group": "0"}, {"path": "y", "socket": "/y", "socket-mode": "0666"}]}"#
            .write(toFile: config, atomically: true, encoding: .utf8)
        let r = try DpctlTests.dpctl(["start", "--config", config, "--check"])
        #expect(r.status == 0, "\(r.stderr)")
        let disks = (try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])?["disks"] as? [[String: Any]]
        #expect(disks?[0]["socket-mode"] as? String == "0600" && disks?[0]["socket-group"] as? String == "0")
        #expect(disks?[1]["socket-mode"] as? String == "0666")
        try #"{"disks": [{"path": "x", "socket": "/x", "socket-mode": 438}]}"#.write(toFile: config, atomically: true, encoding: .utf8)
        let number = try DpctlTests.dpctl(["start", "--config", config, "--check"])
        #expect(number.status == 1 && number.stderr.contains(#"must be an octal mode in a string, such as "0660""#), "\(number.stderr)")
    }

    // MARK: - SIGHUP

    /// SIGHUP re-reads the file: a new disk is served, a socket's mode
    /// changes, a fault is injected; a queue-count change is logged as
    /// needing a restart. systemd hears RELOADING=1, then READY=1.
    @Test func sighupReloadsTheConfigFile() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let a = dir + "/a.sock", b = dir + "/b.sock", config = dir + "/c.json"
        try #"{"disks": [{"path": "x", "backend": "null", "null-size": "16M", "num-queues": 1, "socket": "\#(a)", "socket-mode": "0600"}]}"#
            .write(toFile: config, atomically: true, encoding: .utf8)
        let receiver = try NotifyReceiver(address: dir + "/notify")
        let dp = try Spawned([QEMUEndToEndTests.dpctl, "start", "--config", config],
                             environment: ["NOTIFY_SOCKET": receiver.address], log: dir + "/dpctl.log")
        #expect(receiver.next()?.hasPrefix("READY=1") == true, "\(dp.log)")
        try """
            {"disks": [{"path": "x", "backend": "null", "null-size": "16M", "num-queues": 2, "socket": "\(a)", "socket-mode": "0660",
                        "fault": "errno=EIO,ops=read"},
                       {"path": "y", "backend": "null", "null-size": "16M", "num-queues": 1, "socket": "\(b)"}]}
            """.write(toFile: config, atomically: true, encoding: .utf8)
        dp.signal(SIGHUP)
        let reloading = receiver.next()
        #expect(reloading?.hasPrefix("RELOADING=1\nMONOTONIC_USEC=") == true, "\(reloading ?? "nothing")")
        let ready = receiver.next()
        #expect(ready?.hasPrefix("READY=1\nSTATUS=serving 2 disk(s)") == true, "\(ready ?? "nothing")")
        var st = stat()
        #expect(stat(a, &st) == 0 && st.st_mode & 0o777 == 0o660, "mode \(String(st.st_mode, radix: 8))")
        let guest = try TestGuest(queues: 1, queueSize: 64)
        let connB = try Self.connectNow(guest, b)
        #expect(try guest.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0)
        vuf_close(connB)
        let guestA = try TestGuest(queues: 1, queueSize: 64)
        let connA = try Self.connectNow(guestA, a)
        let buffer = guestA.alloc(4096)
        #expect(try guestA.run(type: UInt32(GD_BLK_T_IN), segments: [(buffer, 4096)]).status == UInt8(GD_BLK_S_IOERR),
                "the fault added by the reload")
        vuf_close(connA)
        let restartLogged = Date().addingTimeInterval(5)
        while !dp.log.contains("reload: added y on \(b)") && Date() < restartLogged { usleep(10_000) }
        #expect(dp.log.contains("reload: needs a restart to take effect: \(a): num-queues"), "\(dp.log)")
        #expect(dp.log.contains("reload: added y on \(b)"), "\(dp.log)")

        // A file that no longer parses: the running configuration stays, systemd hears READY=1 again.
        try "{".write(toFile: config, atomically: true, encoding: .utf8)
        dp.signal(SIGHUP)
        #expect(receiver.next()?.hasPrefix("RELOADING=1") == true)
        #expect(receiver.next()?.contains("reload of \(config) failed") == true)
        // The log goes out through its own writer thread: it may trail the notification.
        let logged = Date().addingTimeInterval(5)
        while !dp.log.contains("the running configuration is unchanged") && Date() < logged { usleep(10_000) }
        #expect(dp.log.contains("the running configuration is unchanged"), "\(dp.log)")
        dp.signal(SIGTERM)
        #expect(dp.wait() == 0, "\(dp.log)")
    }

    // MARK: - contrib/ and the install step

    @Test func theVhostUserDescriptorFollowsTheSchema() throws {
        let path = QEMUEndToEndTests.root.appendingPathComponent("contrib/vhost-user/50-dataplane.json").path
        let json = try JSONSerialization.jsonObject(with: try Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any]
        #expect(json?["type"] as? String == "block")
        #expect((json?["description"] as? String)?.isEmpty == false)
        #expect((json?["binary"] as? String)?.hasPrefix("/") == true)
        let keys = Set((json ?? [:]).keys)
        #expect(keys.isSubset(of: ["type", "description", "binary", "tags"]), "\(keys)")
    }

    /// scripts/install into a DESTDIR: the binary, the descriptor where
    /// libvirt looks (naming the installed binary) and the units (starting it).
    @Test func installPutsEveryFileWhereItBelongs() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [QEMUEndToEndTests.root.appendingPathComponent("scripts/install").path]
        p.environment = ProcessInfo.processInfo.environment.merging(["DESTDIR": dir, "PREFIX": "/opt/dp", "DPCTL": QEMUEndToEndTests.dpctl]) { $1 }
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        #expect(FileManager.default.isExecutableFile(atPath: dir + "/opt/dp/bin/dpctl"))
        let descriptor = dir + "/usr/share/qemu/vhost-user/50-dataplane.json"
        let json = try JSONSerialization.jsonObject(with: try Data(contentsOf: URL(fileURLWithPath: descriptor))) as? [String: Any]
        #expect(json?["binary"] as? String == "/opt/dp/bin/dpctl" && json?["type"] as? String == "block")
        for unit in ["dpctl.service", "dpctl@.service", "dpctl@.socket"] {
            let text = (try? String(contentsOfFile: dir + "/etc/systemd/system/" + unit, encoding: .utf8)) ?? ""
            #expect(!text.isEmpty, "\(unit) installed")
            if unit.hasSuffix(".service") {
                #expect(text.contains("ExecStart=/opt/dp/bin/dpctl start"), "\(unit): \(text)")
                #expect(text.contains("Type=notify"))
            }
        }
    }
}
