import ArgumentParser
import DataPlane
import Foundation

// Disks added and removed while an instance runs: the verbs add-disk,
// remove-disk and reload, and what the control socket does for them.

extension ControlServer {
    /// add-disk, remove-disk and reload, on the control socket's thread
    /// (Instance serializes them with a SIGHUP reload).
    func changeDisks(_ request: ControlRequest) -> ControlResponse {
        guard let instance else {
            return ControlResponse(ok: false, error: "this instance cannot change its disks while it runs")
        }
        do {
            let lines: [String]
            switch request.command {
            case "add-disk":
                guard let disk = request.disk, !disk.isEmpty else {
                    return ControlResponse(ok: false, error: "add-disk names no disk (want path=PATH,socket=PATH[,KEY=VALUE...])")
                }
                lines = try instance.add(spec: disk)
            case "remove-disk":
                guard let socket = request.socket, !socket.isEmpty else {
                    return ControlResponse(ok: false, error: "remove-disk names no disk (want the socket of the disk)")
                }
                lines = try instance.remove(socket: socket, force: request.force ?? false)
            default:
                lines = try instance.reload(by: "dpctl reload")
            }
            return ControlResponse(ok: true, pid: getpid(), report: lines)
        } catch {
            logger.warning("\(request.command) refused: \(error)")
            return ControlResponse(ok: false, error: "\(error)")
        }
    }
}

/// A --socket value as the instance must see it: a path that exists here
/// made absolute (the instance's working directory is not ours); anything
/// else (an inherited socket's name, "fd 3") as given.
func socketArgument(_ socket: String) -> String {
    FileManager.default.fileExists(atPath: socket) ? absolutePath(socket) : socket
}

/// A path as the instance must see it: its working directory is not ours.
func absolutePath(_ path: String) -> String {
    guard !path.hasPrefix("/") else { return path }
    return URL(fileURLWithPath: FileManager.default.currentDirectoryPath).appendingPathComponent(path).standardized.path
}

struct AddDisk: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "add-disk",
        abstract: "Serve one more disk on a running instance.",
        usage: """
        dpctl add-disk --control PATH --disk path=PATH,socket=PATH[,KEY=VALUE...]
        dpctl add-disk --control PATH --disk PATH --socket PATH [--num-queues N] [--readonly] ...
        """,
        discussion: """
        Opens the image and listens on the disk's socket(s), as 'dpctl start'
        does for each --disk, and with the same keys and checks (see 'dpctl
        start --help'): the instance's --read-only and socket owner, group and
        mode apply to it as well. Once it returns, QEMU may connect (QEMU:
        chardev-add, then device_add vhost-user-blk-pci). A socket another disk
        of the instance serves is refused; IOThreads and CPUs are the
        instance's. Relative paths are taken from this command's directory.

        A disk added this way is not in the instance's --config file: a later
        reload leaves it served (it is removed only by 'dpctl remove-disk');
        once the file lists its socket too, it is the file's like any other.

        Prints what was added. Exit status 1 if the instance refuses (an image
        that cannot be opened or is locked, a socket in use), 2 on a usage error.
        """)

    @Option(help: ArgumentHelp("The instance's control socket (its --control, by default its first disk's socket + .ctl)",
                               valueName: "path"), completion: .file())
    var control: String

    @Option(name: .customLong("disk"), help: ArgumentHelp("""
        The disk: path=PATH,socket=PATH[,KEY=VALUE...], the keys of 'dpctl start' (or the grouped form \
        --disk PATH --socket PATH --num-queues N ...)
        """, valueName: "keys"))
    var disks: [String] = []

    func run() throws {
        guard disks.count == 1 else {
            throw CLIError(disks.isEmpty ? "add-disk needs --disk path=PATH,socket=PATH[,KEY=VALUE...]"
                                         : "add-disk adds one disk: give one --disk (run add-disk again for the next)", usage: true)
        }
        let entry = try DiskSpec.parse(disks[0]) // start's checks, before asking the instance
        let null = entry.backend == "null"
        let items = DiskSpec.items(disks[0]).map { item -> String in
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, parts[0] == "socket" || (parts[0] == "path" && !null) else { return DiskSpec.escape(item) }
            return parts[0] + "=" + DiskSpec.escape(absolutePath(parts[1]))
        }
        let response = try controlCall(control, ControlRequest(command: "add-disk", disk: items.joined(separator: ",")))
        for line in response.report ?? [] { print(line) }
    }
}

struct RemoveDisk: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remove-disk",
        abstract: "Stop serving one disk of a running instance.",
        usage: "dpctl remove-disk --socket PATH [--control PATH] [--force]",
        discussion: """
        Removes the disk served on --socket (any of its sockets names it; the
        instance is reached at --control, by default PATH.ctl, which is the
        instance's control socket only when PATH is its first disk's socket
        and it was started without --control): each socket's
        frontend is disconnected after its queues drain (requests in flight
        complete; requests the error policy holds fail with an I/O error, or,
        when the frontend tracks inflight I/O, stay in its inflight region for
        the backend it reconnects to), the sockets are closed and removed, and
        the image is closed (its locks released). Other disks are not touched:
        their I/O goes on.

        A disk whose frontend is connected is refused without --force: the
        guest would lose it with requests outstanding. Unplug it from the
        guest first (QEMU: device_del, wait for the guest to release it, then
        chardev-remove; libvirt: virsh detach-device), then remove it here.
        --force disconnects it anyway.

        A disk from the --config file comes back at the next reload unless it
        is removed from the file too. Prints what happened to each socket's
        frontend and requests.
        """)

    @OptionGroup var instance: InstanceOptions

    @Flag(help: "Disconnect a connected frontend (the guest loses the disk)")
    var force = false

    func run() throws {
        guard let socket = instance.socket else {
            throw CLIError("remove-disk needs --socket PATH: the socket of the disk to remove", usage: true)
        }
        let control = instance.control ?? socket + ".ctl"
        let response = try controlCall(control, ControlRequest(command: "remove-disk", socket: absolutePath(socket),
                                                               force: force ? true : nil))
        for line in response.report ?? [] { print(line) }
    }
}

struct Reload: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a running instance re-read its --config file (as SIGHUP does).",
        usage: "dpctl reload (--control PATH | --socket PATH)",
        discussion: """
        The instance reads its --config file again and serves what it lists:
        disks new to the file are added; disks that came from the file and are
        gone from it are removed (one whose frontend is connected is kept, and
        said so: unplug it from the guest, then reload again, or use
        'dpctl remove-disk --force'); disks added with 'dpctl add-disk' and not
        in the file are kept. fault= and socket-owner/-group/-mode changes are
        applied; other changes need a restart (or remove-disk, then add-disk).
        Prints each change. An instance started without --config refuses
        (exit status 1), as does one whose file cannot be read or parsed (and
        then nothing changes).
        """)

    @OptionGroup var instance: InstanceOptions

    func run() throws {
        let response = try controlCall(try instance.controlPath(), ControlRequest(command: "reload"))
        for line in response.report ?? [] { print(line) }
    }
}
