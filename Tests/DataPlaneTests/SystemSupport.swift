import Foundation

/// Runs a command to completion; returns its standard output, or throws
/// with its standard error when it fails.
@discardableResult
func runCommand(_ arguments: [String]) throws -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = arguments
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let output = out.fileHandleForReading.readDataToEndOfFile()
    let errors = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    guard p.terminationStatus == 0 else {
        throw TestFailure("\(arguments.joined(separator: " ")): exit \(p.terminationStatus): \(String(decoding: errors, as: UTF8.self))")
    }
    return String(decoding: output, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
}

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

/// A loop device over a file, detached on deinit (root).
final class LoopDevice: @unchecked Sendable {
    let path: String

    init(backing file: String, extraArguments: [String] = []) throws {
        path = try runCommand(["losetup", "--find", "--show"] + extraArguments + [file])
    }

    deinit { _ = try? runCommand(["losetup", "--detach", path]) }
}
