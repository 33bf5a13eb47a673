// libFuzzer target over vhost-user message handling and the device state
// machine: each input decodes into a sequence of messages (requests, flags,
// payloads — structured or raw — and file descriptors: memfds with ring
// contents taken from the input, eventfds). They go through the same
// VhostUserBlkDevice.process the server calls, with a real DataPlane and
// IOThread behind it. After each input the device is reset and the harness
// checks that no queue runs and no file descriptor leaked.
//
// Built only by fuzz/build.sh (DATAPLANE_FUZZ=1 adds the target to the package).
import CDataPlaneSys
import DataPlane
import Glibc
import Logging

/// VHOST_USER_FUZZ_CPU=LIST puts the IOThread on those CPUs (default: all).
/// With the harness on the same CPU (taskset -c N), the round trip every
/// queue start and stop makes to the IOThread needs no cross-CPU wake-up.
private let plane: DataPlane = {
    do {
        let cpus = try getenv("VHOST_USER_FUZZ_CPU").map { try CPUSet(parsing: String(cString: $0)) } ?? CPUSet.online()
        return try DataPlane(iothreads: [IOThreadConfiguration(name: "fuzz-io", cpuset: cpus, pollMaxMicroseconds: 0)])
    } catch {
        fatalError("cannot start the data plane: \(error)")
    }
}()

private let disk: Disk = {
    do {
        return try plane.addDisk(DiskConfiguration(path: "", backend: .null, numQueues: 2, queueSize: 256, nullSizeBytes: 1 << 20))
    } catch {
        fatalError("cannot add the disk: \(error)")
    }
}()

// libFuzzer calls the entry point from one thread only.
nonisolated(unsafe) private var runs = 0
/// VHOST_USER_FUZZ_TRACE=1: print each message, its outcome and the device's log
/// (to see how far an input gets; e.g. with -runs=0 over a corpus).
private let trace = getenv("VHOST_USER_FUZZ_TRACE") != nil
nonisolated(unsafe) private var baselineFDs = -1

/// The memfds and eventfds open: the kinds messages bring (other fds come
/// and go with libFuzzer and the runtime).
private func openFDs() -> Int {
    guard let dir = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        var target = [CChar](repeating: 0, count: 256)
        let length = readlink("/proc/self/fd/" + name, &target, 255)
        guard length > 0 else { continue }
        let link = String(decoding: target.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if link.contains("memfd:") || link.contains("[eventfd]") { n += 1 }
    }
    return n
}

private func describeFDs() -> String {
    guard let dir = opendir("/proc/self/fd") else { return "" }
    defer { closedir(dir) }
    var lines: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        var target = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/" + name, &target, 255)
        lines.append("\(name) -> \(n > 0 ? String(decoding: target.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?")")
    }
    return lines.joined(separator: "\n")
}

/// Reads the input front to back; past the end everything reads as zero.
private struct Input {
    let bytes: UnsafeBufferPointer<UInt8>
    var at = 0
    var isAtEnd: Bool { at >= bytes.count }

    mutating func u8() -> UInt8 {
        defer { at += 1 }
        return at < bytes.count ? bytes[at] : 0
    }

    mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
    mutating func take(_ n: Int) -> [UInt8] { (0..<n).map { _ in u8() } }
}

/// Guest memory the structured messages describe: at user address userBase.
private let userBase: UInt64 = 0x1000_0000
private let requests: [UInt32] = [1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 31, 32, 34, 36, 37, 38, 39, 40, 0, 6, 7, 99]

private func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

/// A payload shaped like the request's, with fields from the input nudged
/// toward values that pass the first checks (so deeper states are reached).
private func structuredPayload(_ request: UInt32, _ input: inout Input, memorySize: UInt64) -> [UInt8] {
    let index = UInt32(input.u8() % 3)
    switch request {
    case 2: return le(input.u64() | (1 << 32) | (1 << 30))
    case 16: return le(input.u64() & 0x1_FFFF)
    case 8, 10, 18: // vring state
        let num: UInt32 = request == 8 ? 1 << (input.u8() % 10) : UInt32(input.u16() % 4)
        return le(index) + le(num)
    case 9: // vring addr: desc, used, avail within the memory, in 64-byte steps
        // (rings can then share the page one memfd chunk writes)
        let desc = userBase + UInt64(input.u16()) * 64 % max(memorySize, 4096)
        let used = userBase + UInt64(input.u16()) * 64 % max(memorySize, 4096)
        let avail = userBase + UInt64(input.u16()) * 64 % max(memorySize, 4096)
        return le(index) + le(UInt32(0)) + le(desc) + le(used) + le(avail) + le(UInt64(0))
    case 11: return le(index) + le(UInt32(0))
    case 12, 13, 14: return le(UInt64(index) | (input.u8() & 1 == 1 ? 0x100 : 0))
    case 5: // one region over the memfd
        return le(UInt32(1)) + le(UInt32(0)) + le(UInt64(0)) + le(memorySize) + le(userBase) + le(UInt64(input.u8() & 1) * 4096)
    case 37, 38: return le(UInt64(0)) + le(UInt64(0)) + le(memorySize) + le(userBase) + le(UInt64(0))
    case 24, 25:
        let offset = UInt32(input.u8() % 80), size = UInt32(input.u8() % 80)
        return le(offset) + le(size) + le(UInt32(0)) + [UInt8](repeating: 0, count: Int(size))
    case 31, 32: return le(UInt64(input.u16()) * 64) + le(UInt64(0)) + le(UInt16(input.u8() % 3)) + le(UInt16(1 << (input.u8() % 9))) + [0, 0, 0, 0]
    default: return le(input.u64())
    }
}

/// Silent unless tracing (then swift-log's default, to stderr, every message).
let fuzzLogger: Logger = {
    guard trace else { return Logger(label: "vhost-user-fuzz", factory: { _ in SwiftLogNoOpLogHandler() }) }
    var logger = Logger(label: "vhost-user-fuzz")
    logger.logLevel = .trace
    return logger
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var input = Input(bytes: UnsafeBufferPointer(start: data, count: size))
    if baselineFDs < 0 {
        _ = disk
        baselineFDs = openFDs()
    }
    let device = VhostUserBlkDevice(disk: disk, plane: plane, logger: fuzzLogger)
    let memorySize = UInt64(1 + input.u8() % 16) * 4096
    var messages = 0
    while !input.isAtEnd && messages < 48 {
        messages += 1
        let request = requests[Int(input.u8()) % requests.count]
        let mode = input.u8()
        let flags: UInt32 = 1 | (mode & 1 == 1 ? 8 : 0)
        let payload = mode & 2 == 0 ? structuredPayload(request, &input, memorySize: memorySize)
                                    : input.take(Int(input.u8() % 48))
        var fds: [Int32] = []
        for _ in 0..<Int(input.u8() % 4) {
            if input.u8() & 1 == 0 {
                // Room for every pwrite below (offsets up to 255 * 64 + 255):
                // dps_memfd's files are sealed against growing.
                let fd = dps_memfd("fuzz-mem", memorySize + 20480)
                if fd >= 0 {
                    // Ring contents from the input: the IOThread will walk them.
                    let content = input.take(Int(input.u8()))
                    _ = content.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(input.u8()) * 64) }
                    fds.append(fd)
                }
            } else {
                let fd = dps_eventfd(0, true)
                if fd >= 0 { fds.append(fd) }
            }
        }
        let outcome = device.process(VhostUserMessage(request: request, flags: flags, payload: payload, fds: fds))
        if trace {
            print("request \(request) payload \(payload.count) B fds \(fds.count): reply \(outcome.reply?.payload.count ?? -1) B"
                  + (outcome.closeReason.map { ", close: \($0)" } ?? ""))
        }
        outcome.reply?.fds.forEach { close($0) }
        if outcome.closeReason != nil { break }
    }
    device.reset()
    if !plane.queues(of: disk).isEmpty { fatalError("a queue still runs after reset") }
    runs += 1
    // Every 256 runs: walking /proc/self/fd costs as much as a few inputs.
    if runs % 256 == 0, openFDs() != baselineFDs {
        fatalError("file descriptors leaked: \(openFDs()) open, \(baselineFDs) at start:\n\(describeFDs())")
    }
    return 0
}

// SwiftPM links an executable's entry point under its own name; hand over
// to libFuzzer's driver from there.
@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@_cdecl("vhost_user_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var count = argc
    var arguments = argv
    return LLVMFuzzerRunDriver(&count, &arguments) { data, size in
        guard let data else { return 0 }
        return fuzzOneInput(data, size)
    }
}
