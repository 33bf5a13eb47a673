import CVhostFrontend
import Foundation
import Testing

@testable import DataPlane

/// What a command printed and how it ended.
struct ToolResult {
    var status: Int32
    var stdout: String
    var stderr: String
    var output: String { stdout + stderr }
}

/// Runs a system tool (found in the sbin and bin directories, as root's PATH
/// would, unless given as a path) to completion.
@discardableResult
func runTool(_ name: String, _ arguments: [String]) throws -> ToolResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: try toolPath(name))
    p.arguments = arguments
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return ToolResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                      stderr: String(decoding: e, as: UTF8.self))
}

/// Runs a tool that must succeed; throws with its output otherwise.
@discardableResult
func runToolChecked(_ name: String, _ arguments: [String]) throws -> String {
    let r = try runTool(name, arguments)
    guard r.status == 0 else { throw TestFailure("\(name) \(arguments.joined(separator: " ")): exit \(r.status): \(r.output)") }
    return r.stdout
}

/// Runs a tool that should end by itself within `timeout` seconds; one still
/// running then is killed, and `timedOut` says so (a test must not hang on
/// a program that unexpectedly runs on, such as a dpctl that should refuse).
func runTool(_ name: String, _ arguments: [String], timeout: Double) throws -> (result: ToolResult, timedOut: Bool) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: try toolPath(name))
    p.arguments = arguments
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let deadline = Date().addingTimeInterval(timeout)
    while p.isRunning && Date() < deadline { usleep(20_000) }
    let timedOut = p.isRunning
    // Not SIGTERM: children of the test process inherit its blocked signals,
    // and qemu-storage-daemon and QEMU never see one.
    if timedOut { kill(p.processIdentifier, SIGKILL) }
    p.waitUntilExit()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    return (ToolResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                       stderr: String(decoding: e, as: UTF8.self)), timedOut)
}

func toolPath(_ name: String) throws -> String {
    if name.contains("/") { return name }
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] where FileManager.default.isExecutableFile(atPath: dir + "/" + name) {
        return dir + "/" + name
    }
    throw TestFailure("\(name) is not installed (scripts/setup installs what the tests need)")
}

/// Loop devices and mounts need root; CI runs as root, so these tests run there.
let runningAsRoot = getuid() == 0

/// A loop device over a sparse file with the given logical sector size,
/// detached (and the file removed) on deinit, whatever the test did.
final class LoopDevice {
    let path: String
    private let backingFile: String
    private let ownsBackingFile: Bool

    init(sizeBytes: Int, sectorSize: Int) throws {
        backingFile = NSTemporaryDirectory() + "/dataplane-loop-" + UUID().uuidString + ".img"
        ownsBackingFile = true
        guard FileManager.default.createFile(atPath: backingFile, contents: nil),
              truncate(backingFile, off_t(sizeBytes)) == 0
        else { throw TestFailure("cannot create \(backingFile)") }
        do {
            let device = try runToolChecked("losetup", ["--direct-io=on", "--sector-size", "\(sectorSize)",
                                                        "-f", "--show", backingFile])
            path = device.trimmingCharacters(in: .whitespacesAndNewlines)
        } catch {
            try? FileManager.default.removeItem(atPath: backingFile)
            throw error
        }
    }

    /// Over an existing file (kept on deinit), through the page cache: its
    /// writes reach the file only on writeback.
    init(backing file: String) throws {
        backingFile = file
        ownsBackingFile = false
        path = try runToolChecked("losetup", ["-f", "--show", file]).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    deinit {
        _ = try? runTool("losetup", ["-d", path])
        if ownsBackingFile { try? FileManager.default.removeItem(atPath: backingFile) }
    }
}

/// An ext4 filesystem on a loop device of `sectorSize`-byte sectors, mounted
/// in a temporary directory; unmounted and detached on deinit.
final class ScratchFilesystem {
    let device: LoopDevice
    let mountPoint: String

    init(sectorSize: Int, filesystemBlockSize: Int = 4096, sizeBytes: Int = 64 << 20) throws {
        device = try LoopDevice(sizeBytes: sizeBytes, sectorSize: sectorSize)
        try runToolChecked("mkfs.ext4", ["-q", "-F", "-b", "\(filesystemBlockSize)", device.path])
        mountPoint = NSTemporaryDirectory() + "/dataplane-mnt-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        do {
            try runToolChecked("mount", [device.path, mountPoint])
        } catch {
            try? FileManager.default.removeItem(atPath: mountPoint)
            throw error
        }
    }

    /// A sparse image file of `size` bytes on the filesystem.
    func makeImage(name: String = "disk.raw", size: Int) throws -> String {
        let path = mountPoint + "/" + name
        guard FileManager.default.createFile(atPath: path, contents: nil) else { throw TestFailure("create \(path)") }
        guard truncate(path, off_t(size)) == 0 else { throw TestFailure("truncate \(path): errno \(errno)") }
        return path
    }

    deinit {
        // A disk or process still holding a file makes umount fail; detach
        // lazily then, so the loop device still goes once it is let go.
        if (try? runTool("umount", [mountPoint]))?.status != 0 {
            _ = try? runTool("umount", ["-l", mountPoint])
        }
        try? FileManager.default.removeItem(atPath: mountPoint)
    }
}

/// Reads `count` bytes at `offset` of a file through the page cache.
func readFile(_ path: String, offset: Int, count: Int) throws -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw TestFailure("open \(path): errno \(errno)") }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: count)
    let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    guard n == count else { throw TestFailure("pread \(path): \(n)") }
    return buffer
}

/// The virtio-blk config space fields the block-size tests look at.
struct AnnouncedTopology: Equatable {
    var blockSize: UInt32
    var physicalBlockExponent: UInt8

    /// What GET_CONFIG answers for this disk (the bytes the vhost-user device sends).
    init(_ disk: Disk) {
        let bytes = BlkConfigSpace.bytes(for: disk, numQueues: 1, segMax: 128)
        blockSize = (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[20 + $1]) << (8 * UInt32($1)) }
        physicalBlockExponent = bytes[24]
    }

    init(blockSize: UInt32, physicalBlockExponent: UInt8) {
        self.blockSize = blockSize
        self.physicalBlockExponent = physicalBlockExponent
    }

    /// What a frontend got from GET_CONFIG.
    init(_ config: vuf_blk_config) {
        blockSize = config.blk_size
        physicalBlockExponent = config.physical_block_exp
    }
}

/// The byte ranges any process holds locked in `path` (from /proc/locks).
func lockedRanges(of path: String) -> [ClosedRange<Int>] {
    var st = stat()
    guard stat(path, &st) == 0, let text = try? String(contentsOfFile: "/proc/locks", encoding: .utf8) else { return [] }
    // "1: OFDLCK ADVISORY  READ -1 fe:00:16221606 100 101"; waiters have "->".
    return text.split(separator: "\n").compactMap { line -> ClosedRange<Int>? in
        let fields = line.split(separator: " ")
        guard !line.contains("->"), fields.count >= 8, fields[5].hasSuffix(":\(st.st_ino)"),
              let start = Int(fields[6]), let end = Int(fields[7]), start <= end
        else { return nil }
        return start...end
    }
}

/// A QEMU program (qemu-io, qemu-storage-daemon, a paused guest) that holds
/// an image open, its locks taken, until stopped.
final class QEMUHolder {
    private let process = Process()
    private let input = Pipe()
    let logPath: String

    /// Starts the program and waits until `lockedByte` of the image is locked.
    init(_ tool: String, _ arguments: [String], image: String, lockedByte: Int, log: String) throws {
        logPath = log
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.executableURL = URL(fileURLWithPath: try toolPath(tool))
        process.arguments = arguments
        process.standardInput = input // qemu-io reads commands until end of input
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while !lockedRanges(of: image).contains(where: { $0.contains(lockedByte) }) {
            guard process.isRunning, Date() < deadline else {
                stop()
                throw TestFailure("\(tool) did not lock byte \(lockedByte) of \(image): \(self.log)")
            }
            usleep(20_000)
        }
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Ends the program: end of input (qemu-io quits on it), then SIGKILL.
    /// Not SIGTERM: children of the test process inherit its blocked
    /// signals, and qemu-storage-daemon and QEMU never see one.
    func stop() {
        try? input.fileHandleForWriting.close()
        let deadline = Date().addingTimeInterval(0.5)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { stop() }
}
