import Foundation

/// qemu-args and libvirt-xml: how to connect a guest to a socket.
enum GuestConfigCommand {
    enum Kind { case qemu, libvirt }

    static let defaultQueues = 1
    static let defaultMemory = "1G"
    static let defaultID = "dp0"
    static let defaultTarget = "vda"
    /// The first QEMU that wants `reconnect-ms` (9.2 deprecated `reconnect`).
    static let reconnectMillisecondsSince = QEMUVersion(major: 9, minor: 2)

    static let help = """
    USAGE: dpctl qemu-args --socket PATH [--num-queues N] [--memory SIZE] [--id NAME] [--qemu-version X.Y]
           dpctl libvirt-xml --socket PATH [--num-queues N] [--target vdX]

    Prints what connects a guest to a dpctl socket. vhost-user needs the guest's
    RAM in shared memory (memfd, share=on); the chardev reconnects when dpctl
    restarts.

    OPTIONS:
      --socket PATH       The disk's vhost-user socket (required)
      --num-queues N      Queues the guest's device asks for, 1-64 (default \(defaultQueues)); at most the
                          disk's own --num-queues (dpctl start defaults to \(StartCommand.defaultNumQueues)): QEMU
                          refuses to start when it asks for more than dpctl offers
      --memory SIZE       qemu-args: the guest's RAM, e.g. 4G (default \(defaultMemory))
      --id NAME           qemu-args: the chardev's id (default \(defaultID))
      --qemu-version X.Y  qemu-args: the QEMU the options are for (default: what
                          'qemu-system-x86_64 --version' says when it is on PATH, else 7.x/8.x).
                          From \(reconnectMillisecondsSince) the chardev gets reconnect-ms=1000; before, reconnect=1
                          (\(reconnectMillisecondsSince) deprecated reconnect)
      --target vdX        libvirt-xml: the guest's device name (default \(defaultTarget))
    """

    static func run(_ words: [String], kind: Kind) throws -> Int32 {
        var args = Arguments(words)
        var socket: String?
        var queues = defaultQueues
        var memory = defaultMemory
        var id = defaultID
        var target = defaultTarget
        var qemuVersion: QEMUVersion?
        while let word = args.next() {
            let (option, inline) = Arguments.split(word)
            switch option {
            case "-h", "--help":
                print(help)
                return 0
            case "--socket": socket = try args.value(for: option, inline: inline)
            case "--num-queues": queues = try parseInt(try args.value(for: option, inline: inline), option: option, range: 1...64)
            case "--memory" where kind == .qemu:
                let m = try args.value(for: option, inline: inline)
                _ = try parseSize(m, option: option)
                memory = m
            case "--id" where kind == .qemu: id = try args.value(for: option, inline: inline)
            case "--qemu-version" where kind == .qemu:
                let text = try args.value(for: option, inline: inline)
                guard let version = QEMUVersion(text) else {
                    throw CLIError("--qemu-version \(text.debugDescription) is not a version such as 8.2 or 9.2", usage: true)
                }
                qemuVersion = version
            case "--target" where kind == .libvirt: target = try args.value(for: option, inline: inline)
            default: throw CLIError("unknown option \(word.debugDescription)", usage: true)
            }
        }
        guard let socket else { throw CLIError("--socket PATH is required", usage: true) }
        switch kind {
        case .qemu:
            print("""
            -object memory-backend-memfd,id=mem,size=\(memory),share=on -machine memory-backend=mem -m \(memory) \\
              -chardev socket,id=\(id),path=\(socket),\(reconnectOption(for: qemuVersion ?? QEMUVersion.installed())) \\
              -device vhost-user-blk-pci,chardev=\(id),num-queues=\(queues)
            """)
        case .libvirt:
            print("""
            <!-- in <domain>: guest RAM must be shared memory for vhost-user -->
            <memoryBacking>
              <source type='memfd'/>
              <access mode='shared'/>
            </memoryBacking>
            <!-- in <devices>: -->
            <disk type='vhostuser' device='disk'>
              <driver name='qemu' type='raw' queues='\(queues)'/>
              <source type='unix' path='\(socket)'>
                <reconnect enabled='yes' timeout='1'/>
              </source>
              <target dev='\(target)' bus='virtio'/>
            </disk>
            """)
        }
        return 0
    }
}

extension GuestConfigCommand {
    /// The chardev's reconnect option for a QEMU (nil: unknown, the 7.x/8.x form).
    static func reconnectOption(for version: QEMUVersion?) -> String {
        if let version, version >= reconnectMillisecondsSince { return "reconnect-ms=1000" }
        return "reconnect=1"
    }
}

/// A QEMU release, major.minor.
struct QEMUVersion: Comparable, CustomStringConvertible {
    var major: Int
    var minor: Int

    init(major: Int, minor: Int) {
        self.major = major
        self.minor = minor
    }

    /// "9.2", "9.2.0" or "10" (a micro version is ignored).
    init?(_ text: some StringProtocol) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard (1...3).contains(parts.count), let major = Int(parts[0]), major >= 0 else { return nil }
        var minor = 0
        if parts.count > 1 {
            guard let m = Int(parts[1]), m >= 0 else { return nil }
            minor = m
        }
        if parts.count > 2 && Int(parts[2]) == nil { return nil }
        self.init(major: major, minor: minor)
    }

    var description: String { "\(major).\(minor)" }

    static func < (a: QEMUVersion, b: QEMUVersion) -> Bool { (a.major, a.minor) < (b.major, b.minor) }

    /// The version of the qemu-system-x86_64 on PATH ("QEMU emulator version
    /// 7.2.22 (Debian ...)"), or nil when there is none or it does not say
    /// within 5 seconds.
    static func installed() -> QEMUVersion? {
        let directories = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":")
        guard let program = directories.map({ "\($0)/qemu-system-x86_64" })
            .first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else { return nil }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = ["--version"]
        let output = Pipe()
        p.standardOutput = output
        p.standardError = FileHandle.nullDevice
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch { return nil }
        let deadline = Date().addingTimeInterval(5)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        if p.isRunning {
            p.terminate()
            return nil
        }
        // Non-blocking: a child it left behind may hold the pipe open.
        let fd = output.fileHandleForReading.fileDescriptor
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = read(fd, &buffer, buffer.count)
        let text = String(decoding: buffer.prefix(max(count, 0)), as: UTF8.self)
        guard let range = text.range(of: "version ") else { return nil }
        return QEMUVersion(text[range.upperBound...].prefix { $0.isNumber || $0 == "." })
    }
}
