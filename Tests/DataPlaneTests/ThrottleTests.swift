import CDataPlane
import CGuestDriver
import CVhostFrontend
import Foundation
import Synchronization
import Testing

@testable import DataPlane

/// I/O limits (QEMU's throttling): rates held over 10 s, groups, bursts,
/// changes at run time, order, drains, validation, and dpctl's verb.
/// Serialized: the rate measurements want the machine's attention.
@Suite(.serialized) struct ThrottleTests {
    static func monotonic() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// A guest keeping `depth` requests of `size` bytes in flight on its one
    /// queue from a thread of its own, noting when each completes.
    final class Load: @unchecked Sendable {
        let guest: TestGuest
        let depth: Int
        let size: UInt32
        let type: UInt32
        private let state = Mutex<(times: [Double], stop: Bool, failures: Int)>(([], false, 0))
        private var thread: Thread?
        private let finished = DispatchSemaphore(value: 0)

        init(guest: TestGuest, depth: Int, size: UInt32 = 4096, type: UInt32 = UInt32(GD_BLK_T_IN)) {
            self.guest = guest
            self.depth = depth
            self.size = size
            self.type = type
        }

        func start() {
            let t = Thread { [self] in
                run()
                finished.signal()
            }
            t.stackSize = 1 << 20
            thread = t
            t.start()
        }

        private func run() {
            let buffers = (0..<depth).map { _ in guest.alloc(UInt64(size)) }
            var slot: [UInt16: Int] = [:]
            var inFlight = 0
            for i in 0..<depth {
                guard let head = try? guest.submit(type: type, sector: UInt64(i) * 8, segments: [(buffers[i], size)]) else { break }
                slot[head] = i
                inFlight += 1
            }
            while inFlight > 0 {
                guard let done = try? guest.complete(timeout: 10) else {
                    state.withLock { $0.failures += 1 }
                    return
                }
                inFlight -= 1
                let now = ThrottleTests.monotonic()
                let stop = state.withLock { s in
                    s.times.append(now)
                    if done.status != 0 { s.failures += 1 }
                    return s.stop
                }
                let i = slot[done.head] ?? 0
                if !stop, let head = try? guest.submit(type: type, sector: UInt64(i) * 8, segments: [(buffers[i], size)]) {
                    slot[head] = i
                    inFlight += 1
                }
            }
        }

        /// Stops submitting and waits for what is in flight.
        func stop() {
            state.withLock { $0.stop = true }
            finished.wait()
        }

        var failures: Int { state.withLock { $0.failures } }

        /// Completions in [from, to) (monotonic seconds).
        func count(from: Double, to: Double) -> Int {
            state.withLock { s in s.times.reduce(0) { $0 + ($1 >= from && $1 < to ? 1 : 0) } }
        }
    }

    /// A data plane with `threads` IOThreads and null disks, each with a
    /// guest of its own on one queue, on the IOThread `placement` names.
    final class Bench: @unchecked Sendable {
        let plane: DataPlane
        var disks: [Disk] = []
        var guests: [TestGuest] = []

        init(threads: Int = 1, placement: [Int]) throws {
            let cpus = try CPUSet(parsing: "0-\(ProcessInfo.processInfo.activeProcessorCount - 1)")
            plane = try DataPlane(iothreads: (0..<threads).map {
                IOThreadConfiguration(name: "thr-io\($0)", cpuset: cpus, pollMaxMicroseconds: 0)
            })
            for (i, thread) in placement.enumerated() {
                var config = DiskConfiguration(path: "null\(i)", backend: .null)
                config.numQueues = 1
                config.queueSize = 128
                let disk = try plane.addDisk(config, iothreads: [thread])
                let guest = try TestGuest(queues: 1, queueSize: 128)
                _ = try plane.startQueue(disk: disk, index: 0, memory: guest.memory, configuration: guest.queueConfiguration(0))
                disks.append(disk)
                guests.append(guest)
            }
        }

        deinit { plane.stop() }
    }

    static func within(_ measured: Double, _ expected: Double, _ tolerance: Double) -> Bool {
        abs(measured - expected) <= expected * tolerance
    }

    /// Over 10 s, at once on one data plane: an iops limit, a bps limit,
    /// a group of two disks on two IOThreads, and a burst (max and
    /// max-length) each hold within 5%; an unlimited disk on the same
    /// IOThread as three of them keeps its pace.
    @Test func limitsHoldOverTenSecondsBesideAnUnlimitedDisk() throws {
        // 0: iops, 1: bps, 2 and 3: a group (3 on the other IOThread), 4: burst, 5: unlimited,
        // 6: iops with iops-size (16 KiB reads count as 4).
        let bench = try Bench(threads: 2, placement: [0, 0, 0, 1, 0, 0, 1])
        let plane = bench.plane
        try plane.setLimits(IOLimits([.iopsTotal: .init(rate: 2000)]), for: bench.disks[0])
        try plane.setLimits(IOLimits([.bpsRead: .init(rate: 8 << 20)]), for: bench.disks[1])
        try plane.join(bench.disks[2], group: "tenant", limits: IOLimits([.iopsTotal: .init(rate: 1500)]))
        try plane.join(bench.disks[3], group: "tenant")
        try plane.setLimits(IOLimits([.iopsTotal: .init(rate: 200, max: 2000, maxLength: 2)]), for: bench.disks[4])
        try plane.setLimits(IOLimits([.iopsRead: .init(rate: 400)], iopsSize: 4096), for: bench.disks[6])
        #expect(plane.limits(of: bench.disks[3]) == DiskLimits(group: "tenant", limits: IOLimits([.iopsTotal: .init(rate: 1500)])))

        let loads = [Load(guest: bench.guests[0], depth: 8), Load(guest: bench.guests[1], depth: 4, size: 64 << 10),
                     Load(guest: bench.guests[2], depth: 8), Load(guest: bench.guests[3], depth: 8),
                     Load(guest: bench.guests[4], depth: 8), Load(guest: bench.guests[5], depth: 16),
                     Load(guest: bench.guests[6], depth: 4, size: 16 << 10)]
        // The unlimited disk alone first: its pace without neighbours.
        loads[5].start()
        usleep(300_000)
        let soloStart = Self.monotonic()
        usleep(1_000_000)
        let solo = Double(loads[5].count(from: soloStart, to: soloStart + 1))

        let start = Self.monotonic()
        loads.enumerated().forEach { i, load in if i != 5 { load.start() } }
        usleep(11_100_000)
        loads.forEach { $0.stop() }
        #expect(loads.allSatisfy { $0.failures == 0 })

        // From 1 s in: the first bursts (a tenth of a second's worth) are behind.
        let from = start + 1, to = start + 11
        let iops = Double(loads[0].count(from: from, to: to)) / 10
        let bps = Double(loads[1].count(from: from, to: to)) * Double(64 << 10) / 10
        let group = Double(loads[2].count(from: from, to: to) + loads[3].count(from: from, to: to)) / 10
        let firstSecond = Double(loads[4].count(from: start, to: start + 1))
        let settled = Double(loads[4].count(from: start + 4, to: to)) / 7
        let unlimited = Double(loads[5].count(from: from, to: to)) / 10
        let sized = Double(loads[6].count(from: from, to: to)) / 10
        print("throttle: iops \(iops)/2000, bps \(bps)/\(8 << 20), group \(group)/1500 "
              + "(\(loads[2].count(from: from, to: to)) + \(loads[3].count(from: from, to: to))), "
              + "burst first second \(firstSecond) then \(settled)/200, 16K reads at iops-read=400,iops-size=4096 \(sized)/100, unlimited \(unlimited)/s beside them, \(solo)/s alone")
        #expect(Self.within(iops, 2000, 0.05), "iops-total=2000: \(iops)")
        #expect(Self.within(bps, Double(8 << 20), 0.05), "bps-read=8M: \(bps)")
        #expect(Self.within(group, 1500, 0.05), "group iops-total=1500: \(group)")
        #expect(loads[2].count(from: from, to: to) > 0 && loads[3].count(from: from, to: to) > 0, "both disks of the group ran")
        // max 2000/s for up to 2 s of a 4000-unit bucket: about 2000 (+200 of the burst bucket) in the first second.
        #expect(firstSecond >= 1800 && firstSecond <= 2300, "burst at iops-total-max=2000: \(firstSecond) in the first second")
        #expect(Self.within(settled, 200, 0.05), "after the burst, iops-total=200: \(settled)")
        #expect(Self.within(sized, 100, 0.05), "16 KiB reads at iops-read=400, iops-size=4096: \(sized)")
        // Waiting requests of its neighbours never hold the unlimited disk up: it runs
        // far past every limit, and at a pace near its own alone (this machine is shared: loosely).
        #expect(unlimited > 10 * 2000, "unlimited: \(unlimited)/s")
        #expect(unlimited > 0.3 * solo, "unlimited: \(unlimited)/s beside them, \(solo)/s alone")
        let stats = plane.queues(of: bench.disks[0])[0].statistics()
        #expect(stats.throttledRequests > 0 && stats.throttledNanoseconds > 0)
        #expect(plane.queues(of: bench.disks[5])[0].statistics().throttledRequests == 0)
    }

    /// A disk's two queues on two IOThreads share its buckets: the limit
    /// holds for their sum.
    @Test func aDisksQueuesOnTwoIOThreadsShareItsLimit() throws {
        let cpus = try CPUSet(parsing: "0-\(ProcessInfo.processInfo.activeProcessorCount - 1)")
        let plane = try DataPlane(iothreads: (0..<2).map {
            IOThreadConfiguration(name: "thr-io\($0)", cpuset: cpus, pollMaxMicroseconds: 0)
        })
        defer { plane.stop() }
        var config = DiskConfiguration(path: "null", backend: .null)
        config.numQueues = 2
        config.queueSize = 128
        let disk = try plane.addDisk(config, iothreads: [0, 1])
        // A guest each (one ring each), as two vCPUs' queues of one device would be.
        let guests = try (0..<2).map { _ in try TestGuest(queues: 1, queueSize: 128) }
        for (i, g) in guests.enumerated() {
            _ = try plane.startQueue(disk: disk, index: i, memory: g.memory, configuration: g.queueConfiguration(0))
        }
        #expect(plane.queues(of: disk).map(\.thread.configuration.name) == ["thr-io0", "thr-io1"])
        try plane.setLimits(IOLimits([.iopsTotal: .init(rate: 1000)]), for: disk)
        let loads = guests.map { Load(guest: $0, depth: 8) }
        let start = Self.monotonic()
        loads.forEach { $0.start() }
        usleep(2_600_000)
        loads.forEach { $0.stop() }
        let counts = loads.map { $0.count(from: start + 0.5, to: start + 2.5) }
        let sum = Double(counts.reduce(0, +)) / 2
        print("throttle: one disk, two queues on two IOThreads: \(sum)/1000 (\(counts))")
        #expect(Self.within(sum, 1000, 0.05), "iops-total=1000 over two queues: \(sum) (\(counts))")
        #expect(counts.allSatisfy { $0 > 0 })
    }

    /// A new limit reaches a queue within 100 ms, both ways, also one
    /// whose request waits for a bucket that refills only in 0.5 s.
    @Test func aChangedLimitTakesEffectWithin100ms() throws {
        let bench = try Bench(placement: [0])
        let plane = bench.plane, disk = bench.disks[0]
        try plane.setLimits(IOLimits([.iopsTotal: .init(rate: 2)]), for: disk)
        let load = Load(guest: bench.guests[0], depth: 4)
        load.start()
        usleep(1_200_000)
        let raised = Self.monotonic()
        try plane.setLimits(IOLimits([.iopsTotal: .init(rate: 5000)]), for: disk)
        usleep(600_000)
        let lowered = Self.monotonic()
        try plane.setLimits(IOLimits([.iopsTotal: .init(rate: 100)]), for: disk)
        usleep(700_000)
        load.stop()
        let before = load.count(from: raised - 1, to: raised)
        let first100ms = load.count(from: raised, to: raised + 0.1)
        let afterLowering = load.count(from: lowered + 0.1, to: lowered + 0.6)
        print("throttle change: \(before) in the second before (2/s), \(first100ms) in 100 ms after raising to 5000/s, "
              + "\(afterLowering) in 0.5 s from 100 ms after lowering to 100/s")
        #expect(before <= 3)
        // 5000/s for 100 ms is 500 (and the emptied bucket's 500 at once): far more than 2/s allows.
        #expect(first100ms >= 100, "\(first100ms) completions in the 100 ms after raising the limit")
        #expect(afterLowering >= 40 && afterLowering <= 60, "\(afterLowering) completions in 0.5 s at 100/s")
    }

    /// Requests over the limit wait in order, and nothing of their queue
    /// (a flush here) overtakes them; a stop does not wait for the bucket.
    @Test func requestsWaitInOrderAndAStopDoesNotWaitForTheBucket() throws {
        let bench = try Bench(placement: [0])
        let plane = bench.plane, disk = bench.disks[0], g = bench.guests[0]
        try plane.setLimits(IOLimits([.iopsWrite: .init(rate: 20)]), for: disk)
        let buf = g.alloc(4096)
        var heads: [UInt16] = []
        let start = Self.monotonic()
        for i in 0..<10 { heads.append(try g.submit(type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * 8), segments: [(buf, 4096)])) }
        heads.append(try g.submit(type: UInt32(GD_BLK_T_FLUSH)))
        var order: [UInt16] = []
        for _ in 0..<11 { order.append(try g.complete(timeout: 5).head) }
        let took = Self.monotonic() - start
        #expect(order == heads, "completed \(order), submitted \(heads)")
        // 3 at once (the bucket holds a tenth of a second's worth, 2, and
        // admits while not over it, as QEMU's), then 7 at 20/s.
        #expect(took >= 0.3 && took < 1.5, "10 writes at 20/s took \(took) s")
        let s = plane.queues(of: disk)[0].statistics()
        #expect(s.throttledRequests >= 7 && s.writes == 10 && s.flushes == 1)
        let metrics = parseExposition(PrometheusExporter(plane: plane).renderString())
        #expect(metrics["dataplane_throttled_requests_total{disk=\"null\",queue=\"0\"}"] == Double(s.throttledRequests))
        #expect((metrics["dataplane_throttled_seconds_total{disk=\"null\",queue=\"0\"}"] ?? 0) > 0.2, "\(metrics)")

        // Reads are not writes: iops-write leaves them alone.
        let readStart = Self.monotonic()
        for _ in 0..<20 { #expect(try g.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]).status == 0) }
        #expect(Self.monotonic() - readStart < 0.5)

        // A request waiting a second for its bucket: stopping the queue runs it at once.
        try plane.setLimits(IOLimits([.iopsWrite: .init(rate: 1)]), for: disk)
        for i in 0..<3 { try g.submit(type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * 8), segments: [(buf, 4096)]) }
        usleep(50_000)
        let stopStart = Self.monotonic()
        #expect(plane.stopQueue(disk: disk, index: 0) != nil)
        #expect(Self.monotonic() - stopStart < 0.3, "the stop waited \(Self.monotonic() - stopStart) s")
    }

    /// QEMU's refusals, each naming the key to change.
    @Test func invalidLimitsAreRefusedNamingTheKey() throws {
        let cases: [([String: UInt64], IOLimitsError)] = [
            (["iops-total": 100, "iops-read": 10], .totalWithDirection(total: "iops-total", direction: "iops-read")),
            (["bps-total": 100, "bps-write": 10], .totalWithDirection(total: "bps-total", direction: "bps-write")),
            (["iops-size": 4096], .iopsSizeWithoutIOPS),
            (["bps-read": 1_000_000_000_000_001], .tooLarge(key: "bps-read", value: 1_000_000_000_000_001)),
            (["iops-total": 10, "iops-total-max-length": 5], .lengthWithoutMax(key: "iops-total")),
            (["iops-read-max": 100], .maxWithoutRate(key: "iops-read")),
            (["iops-total": 100, "iops-total-max": 50], .maxBelowRate(key: "iops-total", rate: 100, max: 50)),
            (["bps-total": 1, "bps-total-max": 1_000_000_000_000, "bps-total-max-length": 10_000], .burstTooLong(key: "bps-total")),
        ]
        for (keys, expected) in cases {
            #expect(throws: expected) { try IOLimits().merging(keys).validate() }
            // The core refuses them too.
            var c = (try IOLimits().merging(keys)).cValue
            #expect(dp_throttle_check(&c, nil) < 0, "\(keys)")
        }
        #expect(throws: IOLimitsError.unknownKey("iops")) { try IOLimits().merging(["iops": 1]) }
        let fine = try IOLimits().merging(["iops-read": 100, "iops-write": 50, "bps-total": 1 << 20, "bps-total-max": 2 << 20,
                                           "bps-total-max-length": 3, "iops-size": 4096])
        try fine.validate()
        var c = fine.cValue
        #expect(dp_throttle_check(&c, nil) == 0)
        #expect(fine.description == "bps-total=1048576 bps-total-max=2097152 bps-total-max-length=3 iops-read=100 iops-write=50 iops-size=4096")
        let bench = try Bench(placement: [0])
        #expect(throws: IOLimitsError.maxWithoutRate(key: "iops-read")) {
            try bench.plane.setLimits(IOLimits([.iopsRead: .init(max: 5)]), for: bench.disks[0])
        }
        #expect(bench.plane.limits(of: bench.disks[0]).limits.isUnlimited, "a refused change changes nothing")
    }

    /// dpctl: limits and a group from start's keys (both forms), status
    /// shows them, `dpctl throttle` changes them on a guest's live queue,
    /// refuses a conflict naming the keys, and a config reload applies them.
    @Test func dpctlThrottleStatusAndReload() throws {
        let dir = "/tmp/dp-thr-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let a = dir + "/a.sock", b = dir + "/b.sock"
        let dp = try QEMUEndToEndTests.Instance(
            ["--poll-us", "0", "--disk", "path=x,backend=null,null-size=16M,num-queues=1,socket=\(a),iops-total=1000,group=g1",
             "--disk", "y", "--backend", "null", "--null-size", "16M", "--num-queues", "1", "--socket", b, "--iops-write", "500",
             "--bps-read", "10M"],
            log: dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        #expect(DpctlTests.waitFor(a + ".ctl"), "\(dp.log)")
        var status = try DpctlTests.dpctl(["status", "--socket", a])
        #expect(status.stdout.contains("I/O limits: iops-total=1000 (group g1)"), "\(status.stdout)\(dp.log)")
        #expect(status.stdout.contains("I/O limits: bps-read=10485760 iops-write=500,"), "\(status.stdout)")

        // A guest on b: 20 writes at the new iops-write=20 take about 0.9 s.
        let guest = try TestGuest(queues: 1, queueSize: 64)
        let conn = try guest.connectFrontend(b)
        defer { vuf_close(conn) }
        // The instance answers on the first disk's socket + .ctl; --socket names the disk.
        let changed = try DpctlTests.dpctl(["throttle", "--control", a + ".ctl", "--socket", b, "--iops-write", "20"])
        #expect(changed.status == 0 && changed.stdout.contains("I/O limits: bps-read=10485760 iops-write=20,"),
                "\(changed.stdout)\(changed.stderr)")
        let buf = guest.alloc(4096)
        let start = Self.monotonic()
        for i in 0..<20 {
            #expect(try guest.run(type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * 8), segments: [(buf, 4096)]).status == 0)
        }
        let took = Self.monotonic() - start
        #expect(took > 0.7 && took < 2, "20 writes at iops-write=20 took \(took) s")
        status = try DpctlTests.dpctl(["status", "--socket", a, "--json"])
        let parsed = try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any]
        let disks = parsed?["disks"] as? [[String: Any]] ?? []
        let diskB = disks.first { $0["socket"] as? String == b }
        #expect((diskB?["ioLimits"] as? [String: Any])?["iops-write"] as? Int == 20, "\(status.stdout)")
        #expect((diskB?["throttledRequests"] as? Int ?? 0) >= 15, "\(status.stdout)")
        let stats = try DpctlTests.dpctl(["stats", "--socket", a, "--interval", "0.2"])
        #expect(stats.stdout.contains("I/O limits of null: bps-read=10485760 iops-write=20, ")
                && stats.stdout.contains("I/O limits of null: iops-total=1000 (group g1)"), "\(stats.stdout)\(stats.stderr)")

        // Total and read of one kind exclude each other: refused, the key named, nothing changed.
        let refused = try DpctlTests.dpctl(["throttle", "--control", a + ".ctl", "--socket", b, "--iops-total", "100"])
        #expect(refused.status != 0 && refused.stderr.contains("iops-total and iops-write cannot both be set"), "\(refused.stderr)")
        // In a group, keys change the group's limits; --group "" takes the disk out.
        let inGroup = try DpctlTests.dpctl(["throttle", "--socket", a, "--bps-total", "1G"])
        #expect(inGroup.stdout.contains("I/O limits: bps-total=1073741824 iops-total=1000 (group g1)"), "\(inGroup.stdout)\(inGroup.stderr)")
        let out = try DpctlTests.dpctl(["throttle", "--socket", a, "--group", ""])
        #expect(out.status == 0 && !out.stdout.contains("group g1"), "\(out.stdout)\(out.stderr)")
        let unknown = try DpctlTests.dpctl(["throttle", "--socket", dir + "/none.sock", "--control", a + ".ctl", "--iops-total", "5"])
        #expect(unknown.status != 0 && unknown.stderr.contains("no disk is served on"), "\(unknown.stderr)")
        let bad = try DpctlTests.dpctl(["start", "--check", "--disk", "path=x,backend=null,socket=\(dir)/c.sock,iops-read-max=5"])
        #expect(bad.status == 2 && bad.stderr.contains("iops-read-max needs iops-read"), "\(bad.stderr)")
        #expect(dp.terminate() == 0)

        // A config file's keys, and a reload that changes them.
        let config = dir + "/c.json"
        try #"{"disks": [{"path": "x", "backend": "null", "null-size": "16M", "num-queues": 1, "socket": "\#(a)", "iops-total": 300, "group": "g2"}]}"#
            .write(toFile: config, atomically: true, encoding: .utf8)
        let check = try DpctlTests.dpctl(["start", "--check", "--config", config])
        #expect(check.stdout.contains("\"iops-total\" : 300") && check.stdout.contains("\"group\" : \"g2\""), "\(check.stdout)\(check.stderr)")
        let fromFile = try QEMUEndToEndTests.Instance(["--config", config], log: dir + "/dpctl2.log")
        defer { _ = fromFile.terminate() }
        #expect(DpctlTests.waitFor(a + ".ctl"), "\(fromFile.log)")
        status = try DpctlTests.dpctl(["status", "--socket", a])
        #expect(status.stdout.contains("I/O limits: iops-total=300 (group g2)"), "\(status.stdout)")
        try #"{"disks": [{"path": "x", "backend": "null", "null-size": "16M", "num-queues": 1, "socket": "\#(a)", "bps-write": "1M"}]}"#
            .write(toFile: config, atomically: true, encoding: .utf8)
        kill(fromFile.process.processIdentifier, SIGHUP)
        let deadline = Date().addingTimeInterval(5)
        repeat {
            usleep(50_000)
            status = try DpctlTests.dpctl(["status", "--socket", a])
        } while !status.stdout.contains("I/O limits: bps-write=1048576,") && Date() < deadline
        #expect(status.stdout.contains("I/O limits: bps-write=1048576,") && !status.stdout.contains("g2"), "\(status.stdout)\(fromFile.log)")
    }
}
