import ArgumentParser
import Foundation

/// qemu-args and libvirt-xml: how to connect a guest to a socket.
enum GuestConfigCommand {
    static let defaultQueues = 1
    static let defaultMemory = "1G"
    static let defaultID = "dp0"
    static let defaultTarget = "vda"
    /// The first QEMU that wants `reconnect-ms` (9.2 deprecated `reconnect`).
    static let reconnectMillisecondsSince = QEMUVersion(major: 9, minor: 2)

    static let discussion = """
        Prints what connects a guest to a dpctl socket. vhost-user needs the guest's
        RAM in shared memory (memfd, share=on); the chardev reconnects when dpctl
        restarts.
        """
}

/// The options qemu-args and libvirt-xml share.
struct GuestOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The disk's vhost-user socket (required)", valueName: "path"), completion: .file())
    var socket: String

    @Option(name: .customLong("num-queues"), help: ArgumentHelp("""
        Queues the guest's device asks for, 1-64; at most the disk's own num-queues (dpctl start defaults \
        to \(StartCommand.defaultNumQueues)): QEMU refuses to start when it asks for more than dpctl offers
        """, valueName: "n"))
    var numQueues: Int = GuestConfigCommand.defaultQueues

    func queues() throws(CLIError) -> Int { try parseInt(String(numQueues), option: "--num-queues", range: 1...64) }
}

struct QemuArgs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qemu-args",
        abstract: "Print the QEMU options that connect a guest to a socket.",
        discussion: GuestConfigCommand.discussion)

    @OptionGroup var guest: GuestOptions

    @Option(help: ArgumentHelp("The guest's RAM, e.g. 4G", valueName: "size"))
    var memory: String = GuestConfigCommand.defaultMemory

    @Option(help: ArgumentHelp("The chardev's id", valueName: "name"))
    var id: String = GuestConfigCommand.defaultID

    @Option(name: .customLong("qemu-version"), help: ArgumentHelp("""
        The QEMU the options are for (default: what 'qemu-system-x86_64 --version' says when it is on \
        PATH, else 7.x/8.x). From \(GuestConfigCommand.reconnectMillisecondsSince) the chardev gets \
        reconnect-ms=1000; before, reconnect=1 (\(GuestConfigCommand.reconnectMillisecondsSince) deprecated reconnect)
        """, valueName: "x.y"))
    var qemuVersion: String?

    func run() throws {
        let queues = try guest.queues()
        _ = try parseSize(memory, option: "--memory")
        var version: QEMUVersion?
        if let text = qemuVersion {
            guard let v = QEMUVersion(text) else {
                throw CLIError("--qemu-version \(text.debugDescription) is not a version such as 8.2 or 9.2", usage: true)
            }
            version = v
        }
        print("""
        -object memory-backend-memfd,id=mem,size=\(memory),share=on -machine memory-backend=mem -m \(memory) \\
          -chardev socket,id=\(id),path=\(guest.socket),\(GuestConfigCommand.reconnectOption(for: version ?? QEMUVersion.installed())) \\
          -device vhost-user-blk-pci,chardev=\(id),num-queues=\(queues)
        """)
    }
}

struct LibvirtXML: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "libvirt-xml",
        abstract: "Print the libvirt <disk> and <memoryBacking> snippet for a socket.",
        discussion: GuestConfigCommand.discussion)

    @OptionGroup var guest: GuestOptions

    @Option(help: ArgumentHelp("The guest's device name", valueName: "vdX"))
    var target: String = GuestConfigCommand.defaultTarget

    func run() throws {
        let queues = try guest.queues()
        print("""
        <!-- in <domain>: guest RAM must be shared memory for vhost-user -->
        <memoryBacking>
          <source type='memfd'/>
          <access mode='shared'/>
        </memoryBacking>
        <!-- in <devices>: -->
        <disk type='vhostuser' device='disk'>
          <driver name='qemu' type='raw' queues='\(queues)'/>
          <source type='unix' path='\(guest.socket)'>
            <reconnect enabled='yes' timeout='1'/>
          </source>
          <target dev='\(target)' bus='virtio'/>
        </disk>
        """)
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
