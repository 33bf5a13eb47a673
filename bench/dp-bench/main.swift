// dp-bench: the data plane, in-process, against the C guest driver.
//
// One IOThread (the real DataPlane, pinned) serves one virtqueue of one disk;
// the guest side is CGuestDriver's C loop `gd_bench_run`, pinned to another
// CPU. For every case it reports requests/s, the CPU time the IOThread itself
// spent per request (its thread CPU clock over the measured run divided by the
// requests the device completed in it), the driver's CPU per request, what the
// rest of the process used (io_uring io-wq workers, if any), latency
// percentiles from the driver's histogram and the loop's counters.
//
// Each case runs twice back to back: a warm-up run, then the measured run.
// The measured run starts with an empty ring and ends when its last request
// completed, so every counter delta covers exactly the same requests.

import CDataPlane
import CGuestDriver
import DataPlane
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// MARK: - Output helpers

/// Writes to stderr without touching the C `stderr` global (not concurrency-safe in Swift 6).
func note(_ text: String) {
    let line = text + "\n"
    _ = line.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
}

func fail(_ text: String) -> Never {
    note("dp-bench: " + text)
    exit(2)
}

func errnoText(_ code: Int32) -> String {
    guard let message = strerror(code) else { return "errno \(code)" }
    return String(cString: message)
}

func pad(_ text: String, _ width: Int, right: Bool = false) -> String {
    let n = text.count
    if n >= width { return text }
    let fill = String(repeating: " ", count: width - n)
    return right ? fill + text : text + fill
}

func fixed(_ value: Double, _ digits: Int) -> String {
    String(format: "%.\(digits)f", value)
}

// MARK: - Options

enum ClientMode: String, Codable, CaseIterable {
    /// The driver sleeps on the call eventfd when nothing has completed.
    case block
    /// The driver spins on the used ring; calls stay disabled.
    case poll
}

enum BackendChoice: String, Codable, CaseIterable {
    case null
    case file
}

struct Options {
    var quick = false
    var seconds: Double?
    var warmup: Double?
    var file = "/dev/shm/dp-bench.img"
    var size: UInt64 = 1 << 30
    var cpuDriver: Int32 = 0
    var cpuIOThread: Int32 = 1
    var pollWindows: [UInt32] = [32, 0]
    var depths: [UInt32] = [1, 32, 128]
    var clients: [ClientMode] = [.block, .poll]
    var backends: [BackendChoice] = [.null, .file]
    var queueSize: UInt32 = 256
    var blockSize: UInt32 = 4096
    var buffered = false
    var json = false
    var seed: UInt64 = 0x5EED

    var measureSeconds: Double { seconds ?? (quick ? 1.0 : 5.0) }
    var warmupSeconds: Double { warmup ?? (quick ? 0.25 : 1.0) }
}

let usage = """
    usage: dp-bench [options]

    4K random reads through the data plane, in-process: one IOThread, one
    virtqueue, the guest driver's C loop on another CPU.

      --quick              1 s per case after 0.25 s of warm-up (default 5 s after 1 s)
      --seconds N          measured seconds per case
      --warmup N           warm-up seconds per case
      --file PATH          image for the file backend (default /dev/shm/dp-bench.img);
                           created with pseudo-random data when missing
      --size N             image size when creating it, and the null disk's size
                           (default 1G; K, M, G suffixes)
      --buffered           open the image without O_DIRECT
      --cpu-driver N       CPU for the guest driver loop (default 0)
      --cpu-iothread N     CPU for the IOThread (default 1)
      --poll-us LIST       IOThread poll windows in microseconds (default 32,0)
      --depths LIST        queue depths (default 1,32,128)
      --clients LIST       block (sleep on the call eventfd), poll (spin) (default block,poll)
      --backends LIST      null, file (default null,file)
      --queue-size N       virtqueue size (default 256)
      --bs N               block size in bytes (default 4096)
      --seed N             request offset seed
      --json               print JSON to stdout instead of the table
    """

func parseSize(_ text: String) -> UInt64? {
    var digits = Substring(text)
    var scale: UInt64 = 1
    switch digits.last.map({ Character($0.uppercased()) }) {
    case "K": scale = 1 << 10
    case "M": scale = 1 << 20
    case "G": scale = 1 << 30
    case "T": scale = 1 << 40
    default: break
    }
    if scale != 1 { digits = digits.dropLast() }
    guard let n = UInt64(digits), n <= UInt64.max / scale else { return nil }
    return n * scale
}

func parseList<T>(_ text: String, _ option: String, _ each: (String) -> T?) -> [T] {
    let items = text.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }
    var out: [T] = []
    for item in items {
        guard let value = each(item) else { fail("\(option): cannot use \(item.debugDescription)") }
        out.append(value)
    }
    if out.isEmpty { fail("\(option): empty list") }
    return out
}

func parseOptions(_ args: [String]) -> Options {
    var o = Options()
    var i = 1
    func value(_ name: String) -> String {
        i += 1
        guard i < args.count else { fail("\(name) needs a value\n\n\(usage)") }
        return args[i]
    }
    func number<T: LosslessStringConvertible>(_ name: String) -> T {
        let text = value(name)
        guard let n = T(text) else { fail("\(name): not a number: \(text.debugDescription)") }
        return n
    }
    while i < args.count {
        let arg = args[i]
        switch arg {
        case "--quick": o.quick = true
        case "--seconds": o.seconds = number(arg)
        case "--warmup": o.warmup = number(arg)
        case "--file": o.file = value(arg)
        case "--size":
            let text = value(arg)
            guard let n = parseSize(text), n > 0 else { fail("--size: cannot use \(text.debugDescription)") }
            o.size = n
        case "--buffered": o.buffered = true
        case "--cpu-driver": o.cpuDriver = number(arg)
        case "--cpu-iothread": o.cpuIOThread = number(arg)
        case "--poll-us": o.pollWindows = parseList(value(arg), arg) { UInt32($0) }
        case "--depths": o.depths = parseList(value(arg), arg) { UInt32($0).flatMap { $0 > 0 ? $0 : nil } }
        case "--clients": o.clients = parseList(value(arg), arg) { ClientMode(rawValue: $0) }
        case "--backends": o.backends = parseList(value(arg), arg) { BackendChoice(rawValue: $0) }
        case "--queue-size": o.queueSize = number(arg)
        case "--bs": o.blockSize = number(arg)
        case "--seed": o.seed = number(arg)
        case "--json": o.json = true
        case "-h", "--help":
            print(usage)
            exit(0)
        default:
            fail("unknown option \(arg.debugDescription)\n\n\(usage)")
        }
        i += 1
    }
    if !(o.measureSeconds > 0) || !(o.warmupSeconds >= 0) { fail("--seconds must be > 0 and --warmup >= 0") }
    if o.blockSize == 0 || o.blockSize % 512 != 0 { fail("--bs must be a multiple of 512") }
    if o.size % UInt64(o.blockSize) != 0 || o.size < UInt64(o.blockSize) {
        fail("--size must be a non-zero multiple of the block size")
    }
    if let d = o.depths.first(where: { $0 > o.queueSize }) { fail("depth \(d) exceeds the queue size \(o.queueSize)") }
    return o
}

// MARK: - Clocks

func clockNanoseconds(_ clock: clockid_t) -> UInt64 {
    var ts = timespec()
    clock_gettime(clock, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// io_uring's io-wq worker threads of this process ("iou-wrk-<tid>") right now.
func ioWorkerThreads() -> Int {
    guard let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task") else { return 0 }
    var n = 0
    for tid in tasks {
        if let comm = try? String(contentsOfFile: "/proc/self/task/\(tid)/comm", encoding: .utf8),
            comm.hasPrefix("iou-wrk")
        {
            n += 1
        }
    }
    return n
}

// MARK: - The image

struct ImageInfo: Codable {
    var path: String
    var sizeBytes: UInt64
    var directIO: Bool
    var created: Bool
    /// Why direct I/O is off, when it is.
    var bufferedReason: String?
}

/// Fills a new image with xorshift data (not zeroes: tmpfs would keep holes).
func createImage(_ path: String, size: UInt64) {
    let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
    if fd < 0 { fail("cannot create \(path): \(errnoText(errno))") }
    defer { close(fd) }
    let chunk = 1 << 20
    var buffer = [UInt64](repeating: 0, count: chunk / 8)
    var x: UInt64 = 0x9E37_79B9_7F4A_7C15
    var offset: UInt64 = 0
    while offset < size {
        for j in buffer.indices {
            x ^= x >> 12; x ^= x << 25; x ^= x >> 27
            buffer[j] = x &* 0x2545_F491_4F6C_DD1D
        }
        let n = Int(min(UInt64(chunk), size - offset))
        let written = buffer.withUnsafeBytes { pwrite(fd, $0.baseAddress, n, off_t(offset)) }
        if written != n { fail("writing \(path): \(written < 0 ? errnoText(errno) : "short write")") }
        offset += UInt64(n)
    }
}

/// Checks that O_DIRECT works on the image: opens it and reads one aligned block.
func directIOProblem(_ path: String, blockSize: Int) -> String? {
    let fd = dp_open_image(path, true, true)
    if fd < 0 { return "open(O_DIRECT) failed: \(errnoText(-fd))" }
    defer { close(fd) }
    var buffer: UnsafeMutableRawPointer?
    guard posix_memalign(&buffer, 4096, blockSize) == 0, let buffer else { return "posix_memalign failed" }
    defer { free(buffer) }
    let n = pread(fd, buffer, blockSize, 0)
    if n < 0 { return "pread with O_DIRECT failed: \(errnoText(errno))" }
    if n != blockSize { return "pread with O_DIRECT returned \(n) of \(blockSize) bytes" }
    return nil
}

func prepareImage(_ o: Options) -> ImageInfo {
    var st = stat()
    var created = false
    if stat(o.file, &st) != 0 {
        if errno != ENOENT { fail("cannot stat \(o.file): \(errnoText(errno))") }
        note("dp-bench: creating \(o.file) (\(o.size) bytes of pseudo-random data)")
        createImage(o.file, size: o.size)
        created = true
        _ = stat(o.file, &st)
    }
    var info = ImageInfo(path: o.file, sizeBytes: UInt64(st.st_size), directIO: !o.buffered, created: created)
    if o.buffered {
        info.bufferedReason = "--buffered"
    } else if let problem = directIOProblem(o.file, blockSize: Int(o.blockSize)) {
        info.directIO = false
        info.bufferedReason = problem
        note("dp-bench: WARNING: O_DIRECT does not work on \(o.file) (\(problem)); falling back to buffered I/O")
    }
    return info
}

// MARK: - The guest

/// The guest driver with its memory, as the data plane sees it.
final class Guest {
    let driver: OpaquePointer
    let memory: GuestMemory

    init(queueSize: UInt32) throws {
        // Rings, one slot and indirect table per head (queueSize^2 * 16 bytes),
        // data buffers for up to queueSize requests, all in the first half.
        let tables = UInt64(queueSize) * UInt64(queueSize) * 16
        var size: UInt64 = 16 << 20
        while size / 2 < tables + UInt64(queueSize) * 64 * 1024 + (4 << 20) { size *= 2 }
        var config = gd_config(mem_size: size, num_queues: 1, queue_size: queueSize, event_idx: true, packed: false)
        var driver: OpaquePointer?
        let ret = gd_create(&config, &driver)
        guard ret == 0, let driver else { fail("gd_create: \(errnoText(-ret))") }
        self.driver = driver
        var regions = [dp_mem_region](repeating: dp_mem_region(), count: 2)
        let count = gd_mem_regions(driver, &regions)
        memory = try GuestMemory(regions: regions.prefix(Int(count)).map {
            MemoryRegion(guestPhysicalAddress: $0.guest_phys_addr, size: $0.size, userAddress: $0.user_addr,
                         hostAddress: UInt(bitPattern: $0.host_addr))
        })
    }

    deinit { gd_destroy(driver) }

    func queueConfiguration() -> VirtqueueConfiguration {
        var c = dp_queue_config()
        gd_queue_config(driver, 0, &c)
        return VirtqueueConfiguration(size: Int(c.size), descriptorTable: c.desc_addr, availRing: c.avail_addr,
                                      usedRing: c.used_addr, addressesAreUser: c.addrs_are_user,
                                      eventIndex: c.event_idx, indirectDescriptors: c.indirect,
                                      lastAvailIndex: c.last_avail_idx, kickFD: c.kick_fd, callFD: c.call_fd,
                                      errorFD: c.err_fd)
    }
}

// MARK: - One case

struct CaseResult: Codable {
    var backend: BackendChoice
    /// "direct", "buffered" or "none" (null backend).
    var io: String
    var pollMicroseconds: UInt32
    var client: ClientMode
    var depth: UInt32
    var blockSize: UInt32
    var seconds: Double
    var ops: UInt64
    var iops: Double
    var mbPerSecond: Double
    var errors: UInt64
    /// CPU nanoseconds per request: the IOThread (its thread clock), the
    /// driver thread, and the rest of the process (io-wq workers and so on).
    var iothreadCPUPerRequestNs: Double
    var driverCPUPerRequestNs: Double
    var otherCPUPerRequestNs: Double
    /// Share of the wall-clock interval the IOThread was on a CPU.
    var iothreadBusy: Double
    var p50Microseconds: Double
    var p99Microseconds: Double
    var p999Microseconds: Double
    /// Device-side counters over the measured run.
    var deviceRequests: UInt64
    var requestsPerBatch: Double
    var iterationsPerRequest: Double
    var waitsPerRequest: Double
    var submitsPerRequest: Double
    var pollHits: UInt64
    var pollMisses: UInt64
    var pollWindowEndNs: UInt64
    var kicksPerRequest: Double
    var notifiesPerRequest: Double
    var polledShare: Double
    var bounces: UInt64
    /// Driver-side counters.
    var driverKicksPerRequest: Double
    var driverWaitsPerRequest: Double
    var ioWorkerThreads: Int
}

struct CaseSetup {
    var backend: BackendChoice
    var io: String
    var pollMicroseconds: UInt32
    var client: ClientMode
    var depth: UInt32
}

func runCase(_ setup: CaseSetup, _ o: Options, guest: Guest, queue: Virtqueue, thread: IOThread,
             capacitySectors: UInt64, seed: UInt64) -> CaseResult {
    let result = UnsafeMutablePointer<gd_bench_result>.allocate(capacity: 1)
    defer { result.deallocate() }

    var p = gd_bench_params()
    p.first_queue = 0
    p.num_queues = 1
    p.depth = setup.depth
    p.type = UInt32(GD_BLK_T_IN)
    p.block_size = o.blockSize
    p.random = true
    p.capacity_sectors = capacitySectors
    p.busy_poll = setup.client == .poll
    p.cpu = o.cpuDriver
    p.warmup_ns = 0

    if o.warmupSeconds > 0 {
        p.seed = seed ^ 0xA5A5_A5A5
        p.duration_ns = UInt64(o.warmupSeconds * 1e9)
        let ret = gd_bench_run(guest.driver, &p, result)
        if ret < 0 { fail("warm-up run failed: \(errnoText(-ret))") }
    }

    p.seed = seed
    p.duration_ns = UInt64(o.measureSeconds * 1e9)
    let thread0 = thread.statistics()
    let queue0 = queue.statistics()
    let driver0 = clockNanoseconds(CLOCK_THREAD_CPUTIME_ID)
    let process0 = clockNanoseconds(CLOCK_PROCESS_CPUTIME_ID)
    let wall0 = clockNanoseconds(CLOCK_MONOTONIC)
    let ret = gd_bench_run(guest.driver, &p, result)
    let wall1 = clockNanoseconds(CLOCK_MONOTONIC)
    let process1 = clockNanoseconds(CLOCK_PROCESS_CPUTIME_ID)
    let driver1 = clockNanoseconds(CLOCK_THREAD_CPUTIME_ID)
    let thread1 = thread.statistics()
    let queue1 = queue.statistics()
    if ret < 0 { fail("measured run failed: \(errnoText(-ret))") }

    let r = result.pointee
    let histOffset = MemoryLayout<gd_bench_result>.offset(of: \gd_bench_result.hist)!
    let hist = (UnsafeRawPointer(result) + histOffset).assumingMemoryBound(to: UInt64.self)
    func percentile(_ pct: Double) -> Double { Double(gd_hist_percentile(hist, pct)) / 1000 }

    let seconds = Double(r.elapsed_ns) / 1e9
    let device = queue1.requests &- queue0.requests
    let perDevice = { (value: UInt64) -> Double in device > 0 ? Double(value) / Double(device) : 0 }
    let iothreadCPU = thread1.cpuNanoseconds &- thread0.cpuNanoseconds
    let driverCPU = driver1 &- driver0
    let processCPU = process1 &- process0
    let otherCPU = processCPU > iothreadCPU + driverCPU ? processCPU - iothreadCPU - driverCPU : 0
    let batches = queue1.batches &- queue0.batches
    let polled = queue1.polled &- queue0.polled
    let kicks = queue1.kicks &- queue0.kicks

    return CaseResult(
        backend: setup.backend, io: setup.io, pollMicroseconds: setup.pollMicroseconds, client: setup.client,
        depth: setup.depth, blockSize: o.blockSize, seconds: seconds, ops: r.ops,
        iops: seconds > 0 ? Double(r.ops) / seconds : 0,
        mbPerSecond: seconds > 0 ? Double(r.bytes) / seconds / 1e6 : 0,
        errors: r.errors,
        iothreadCPUPerRequestNs: perDevice(iothreadCPU),
        driverCPUPerRequestNs: perDevice(driverCPU),
        otherCPUPerRequestNs: perDevice(otherCPU),
        iothreadBusy: wall1 > wall0 ? Double(iothreadCPU) / Double(wall1 - wall0) : 0,
        p50Microseconds: percentile(50), p99Microseconds: percentile(99), p999Microseconds: percentile(99.9),
        deviceRequests: device,
        requestsPerBatch: batches > 0 ? Double(device) / Double(batches) : 0,
        iterationsPerRequest: perDevice(thread1.iterations &- thread0.iterations),
        waitsPerRequest: perDevice(thread1.waits &- thread0.waits),
        submitsPerRequest: perDevice(thread1.submits &- thread0.submits),
        pollHits: thread1.pollHits &- thread0.pollHits,
        pollMisses: thread1.pollMisses &- thread0.pollMisses,
        pollWindowEndNs: thread1.pollWindowNanoseconds,
        kicksPerRequest: perDevice(kicks),
        notifiesPerRequest: perDevice(queue1.notifies &- queue0.notifies),
        polledShare: polled + kicks > 0 ? Double(polled) / Double(polled + kicks) : 0,
        bounces: queue1.bounces &- queue0.bounces,
        driverKicksPerRequest: r.ops > 0 ? Double(r.kicks) / Double(r.ops) : 0,
        driverWaitsPerRequest: r.ops > 0 ? Double(r.waits) / Double(r.ops) : 0,
        ioWorkerThreads: ioWorkerThreads())
}

// MARK: - The run

struct Report: Codable {
    var tool = "dp-bench"
    var date: String
    var cpuDriver: Int32
    var cpuIOThread: Int32
    var queueSize: UInt32
    var blockSize: UInt32
    var secondsPerCase: Double
    var warmupSeconds: Double
    var image: ImageInfo?
    var notes: [String]
    var cases: [CaseResult]
}

func run(_ o: Options) -> Report {
    var notes: [String] = []
    if o.cpuDriver == o.cpuIOThread {
        notes.append("driver and IOThread share CPU \(o.cpuDriver): figures include their contention")
    }
    let image = o.backends.contains(.file) ? prepareImage(o) : nil
    if let image, !image.directIO {
        notes.append("file backend uses BUFFERED I/O, not O_DIRECT: \(image.bufferedReason ?? "?")")
    }

    let cpuset: CPUSet
    do { cpuset = try CPUSet(parsing: "\(o.cpuIOThread)") } catch { fail("--cpu-iothread: \(error)") }
    var cases: [CaseResult] = []
    let total = o.pollWindows.count * o.backends.count * o.clients.count * o.depths.count
    var seed = o.seed

    for poll in o.pollWindows {
        let plane: DataPlane
        do {
            plane = try DataPlane(iothreads: [
                IOThreadConfiguration(name: "dp-bench-io", cpuset: cpuset, pollMaxMicroseconds: poll, ringEntries: 256)
            ])
        } catch { fail("\(error)") }
        defer { plane.stop() }
        let thread = plane.threads[0]

        for backend in o.backends {
            var config: DiskConfiguration
            let io: String
            switch backend {
            case .null:
                config = DiskConfiguration(path: "", backend: .null, readOnly: true, serial: "dp-bench-null",
                                           nullSizeBytes: o.size)
                io = "none"
            case .file:
                let image = image!
                config = DiskConfiguration(path: image.path, backend: .file, readOnly: true,
                                           directIO: image.directIO, serial: "dp-bench-file")
                io = image.directIO ? "direct" : "buffered"
            }
            config.queueSize = Int(o.queueSize)
            let disk: Disk
            let guest: Guest
            let queue: Virtqueue
            do {
                disk = try plane.addDisk(config)
                guest = try Guest(queueSize: o.queueSize)
                queue = try plane.startQueue(disk: disk, index: 0, memory: guest.memory,
                                             configuration: guest.queueConfiguration())
            } catch { fail("\(error)") }
            let capacity = disk.capacityBytes / 512

            for client in o.clients {
                for depth in o.depths {
                    let setup = CaseSetup(backend: backend, io: io, pollMicroseconds: poll, client: client, depth: depth)
                    note("dp-bench: [\(cases.count + 1)/\(total)] \(backend.rawValue) poll=\(poll)us "
                         + "client=\(client.rawValue) QD\(depth)")
                    seed &+= 0x9E37_79B9
                    let result = runCase(setup, o, guest: guest, queue: queue, thread: thread,
                                         capacitySectors: capacity, seed: seed)
                    if result.errors > 0 {
                        notes.append("\(backend.rawValue) poll=\(poll)us \(client.rawValue) QD\(depth): "
                                     + "\(result.errors) requests FAILED")
                    }
                    if result.bounces > 0 {
                        notes.append("\(backend.rawValue) poll=\(poll)us \(client.rawValue) QD\(depth): "
                                     + "\(result.bounces) requests went through a bounce buffer")
                    }
                    cases.append(result)
                }
            }
            plane.stopQueue(disk: disk, index: 0)
            plane.removeDisk(disk)
            withExtendedLifetime(guest) {}
        }
    }

    let formatter = ISO8601DateFormatter()
    return Report(date: formatter.string(from: Date()), cpuDriver: o.cpuDriver, cpuIOThread: o.cpuIOThread,
                  queueSize: o.queueSize, blockSize: o.blockSize, secondsPerCase: o.measureSeconds,
                  warmupSeconds: o.warmupSeconds, image: image, notes: notes, cases: cases)
}

// MARK: - Table

func printTable(_ report: Report) {
    let kib = report.blockSize % 1024 == 0 ? "\(report.blockSize / 1024)K" : "\(report.blockSize)B"
    print("dp-bench: \(kib) random read, queue size \(report.queueSize), IOThread on CPU \(report.cpuIOThread), "
          + "driver loop on CPU \(report.cpuDriver), \(report.secondsPerCase) s per case after "
          + "\(report.warmupSeconds) s warm-up")
    if let image = report.image {
        let mode = image.directIO ? "O_DIRECT" : "BUFFERED (\(image.bufferedReason ?? "?"))"
        print("file backend: \(image.path), \(image.sizeBytes >> 20) MiB, \(mode)")
    }
    print("""
        CPU columns are nanoseconds per request: io-thr = the IOThread's thread CPU clock, drv = the driver \
        loop's thread, other = the rest of the process (io_uring io-wq workers). busy = IOThread CPU / wall time.
        """)
    print("")
    let header: [(String, Int)] = [
        ("backend", 7), ("io", 8), ("poll", 5), ("client", 6), ("QD", 4), ("kIOPS", 8),
        ("io-thr", 7), ("drv", 7), ("other", 6), ("busy", 5),
        ("p50 us", 7), ("p99 us", 7), ("p99.9 us", 8),
        ("req/batch", 9), ("iter/req", 8), ("waits/req", 9), ("kicks/req", 9), ("calls/req", 9),
    ]
    let line = header.enumerated().map { i, h in pad(h.0, h.1, right: i >= 4) }.joined(separator: " ")
    print(line)
    print(String(repeating: "-", count: line.count))
    for c in report.cases {
        let cells = [
            c.backend.rawValue, c.io, "\(c.pollMicroseconds)us", c.client.rawValue, "\(c.depth)",
            fixed(c.iops / 1000, 1),
            fixed(c.iothreadCPUPerRequestNs, 0), fixed(c.driverCPUPerRequestNs, 0),
            fixed(c.otherCPUPerRequestNs, 0), fixed(c.iothreadBusy * 100, 0) + "%",
            fixed(c.p50Microseconds, 1), fixed(c.p99Microseconds, 1), fixed(c.p999Microseconds, 1),
            fixed(c.requestsPerBatch, 1), fixed(c.iterationsPerRequest, 2), fixed(c.waitsPerRequest, 3),
            fixed(c.kicksPerRequest, 3), fixed(c.notifiesPerRequest, 3),
        ]
        print(zip(cells, header).enumerated().map { i, pair in pad(pair.0, pair.1.1, right: i >= 4) }
            .joined(separator: " "))
    }
    if !report.notes.isEmpty {
        print("")
        for n in report.notes { print("NOTE: \(n)") }
    }
}

// MARK: - Main

let options = parseOptions(CommandLine.arguments)
let report = run(options)
if options.json {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    do {
        let data = try encoder.encode(report)
        print(String(decoding: data, as: UTF8.self))
    } catch { fail("encoding JSON: \(error)") }
} else {
    printTable(report)
}
