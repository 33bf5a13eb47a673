import CGuestDriver
import CVhostFrontend
@testable import DataPlane
import Foundation
import Synchronization
import Testing

/// Disks added and removed while others serve: the library's
/// removeExport, and what it must not do to the other disks' I/O.
@Suite(.serialized) struct LiveDisksTests {
    static func makePlane(name: String = "live-io") throws -> DataPlane {
        let cpus = try CPUSet(parsing: "0-\(ProcessInfo.processInfo.activeProcessorCount - 1)")
        return try DataPlane(iothreads: [IOThreadConfiguration(name: name, cpuset: cpus, pollMaxMicroseconds: 0)])
    }

    static func fileDisk(_ image: TestImage, queues: Int = 1) -> DiskConfiguration {
        var c = DiskConfiguration(path: image.path)
        c.numQueues = queues
        return c
    }

    /// A frontend's disk goes: its frontend is disconnected, its socket
    /// removed, its image closed (its lock free for the next opener); the
    /// other disk's frontend goes on as if nothing happened.
    @Test func removingADiskEndsItsFrontendSocketAndImageOnly() throws {
        let a = try TestImage(size: 1 << 20), b = try TestImage(size: 1 << 20)
        let plane = try Self.makePlane()
        defer { plane.stop() }
        let server = try VhostUserServer(plane: plane)
        defer { server.stop() }
        let socketA = a.directory + "/a.sock", socketB = b.directory + "/b.sock"
        var diskA: Disk? = try plane.addDisk(Self.fileDisk(a))
        let diskB = try plane.addDisk(Self.fileDisk(b))
        try server.addExport(disk: try #require(diskA), socketPath: socketA)
        try server.addExport(disk: diskB, socketPath: socketB)
        try server.start()
        let ga = try TestGuest(queues: 1, queueSize: 64, memorySize: 4 << 20)
        let gb = try TestGuest(queues: 1, queueSize: 64, memorySize: 4 << 20)
        let connA = try ga.connectFrontend(socketA)
        defer { vuf_close(connA) }
        let connB = try gb.connectFrontend(socketB)
        defer { vuf_close(connB) }
        let bufA = ga.alloc(4096), bufB = gb.alloc(4096)
        ga.write(bufA, pattern(4096, seed: 1))
        #expect(try ga.run(type: UInt32(GD_BLK_T_OUT), segments: [(bufA, 4096)]).status == 0)

        let report = try server.removeExport(socketPath: socketA)
        #expect(report.socketPath == socketA && report.frontendWasConnected, "\(report)")
        #expect(report.frontendPID == getpid())
        #expect(report.inFlight == 0 && report.heldFailed == 0 && report.heldLeftInInflightRegion == 0)
        #expect(vuf_is_closed(connA, 2000) == 1, "the frontend was disconnected")
        #expect(!FileManager.default.fileExists(atPath: socketA), "the socket file is gone")
        #expect(server.socketPaths == [socketB])
        #expect(throws: DataPlaneError.self) { try server.removeExport(socketPath: socketA) }
        plane.removeDisk(try #require(diskA))
        #expect(plane.disks.count == 1 && plane.disks.first === diskB)
        diskA = nil
        // Closed: its image lock is free (an open Disk would be refused here).
        _ = try Disk(Self.fileDisk(a))
        #expect(a.read(offset: 0, count: 4096) == pattern(4096, seed: 1), "the write reached the image")

        // The other disk never noticed.
        #expect(server.isConnected(socketPath: socketB))
        gb.write(bufB, pattern(4096, seed: 2))
        #expect(try gb.run(type: UInt32(GD_BLK_T_OUT), sector: 8, segments: [(bufB, 4096)]).status == 0)
        #expect(try gb.run(type: UInt32(GD_BLK_T_IN), sector: 8, segments: [(bufB, 4096)]).status == 0)
        #expect(b.read(offset: 4096, count: 4096) == pattern(4096, seed: 2))
    }

    /// A request the error policy holds (werror=stop) when its disk is
    /// removed: without inflight tracking it fails with an I/O error, the
    /// guest told; with it, it stays marked in the frontend's inflight
    /// region, unanswered, for the backend the frontend reconnects to.
    @Test(arguments: [false, true])
    func heldRequestsAreFailedOrLeftForTheNextBackend(inflight: Bool) throws {
        let image = try TestImage(size: 1 << 20)
        let plane = try Self.makePlane()
        defer { plane.stop() }
        let server = try VhostUserServer(plane: plane)
        defer { server.stop() }
        var config = Self.fileDisk(image)
        config.writeErrorPolicy = .stop
        let disk = try plane.addDisk(config)
        disk.injectFaults(FaultInjection(errno: EIO, operations: [.write]))
        let socket = image.directory + "/vu.sock"
        try server.addExport(disk: disk, socketPath: socket)
        try server.start()
        let g = try TestGuest(queues: 1, queueSize: 64, memorySize: 4 << 20)
        var options = vuf_options()
        options.inflight = inflight
        let conn = try g.connectFrontend(socket, options: options)
        defer { vuf_close(conn) }
        let buf = g.alloc(4096)
        let held = try g.submit(type: UInt32(GD_BLK_T_OUT), segments: [(buf, 4096)])
        let deadline = Date().addingTimeInterval(5)
        while plane.queues(of: disk).first?.statistics().heldRequests != 1 && Date() < deadline { usleep(5000) }
        try #require(plane.queues(of: disk).first?.statistics().heldRequests == 1)
        var region: UnsafeMutableRawPointer?
        var regionSize: UInt64 = 0
        if inflight {
            let fd = vuf_inflight_dup(conn, &regionSize)
            try #require(fd >= 0)
            let mapped = mmap(nil, Int(regionSize), PROT_READ, MAP_SHARED, fd, 0)
            close(fd)
            try #require(mapped != MAP_FAILED)
            region = mapped
        }
        defer { if let region { munmap(region, Int(regionSize)) } }

        let report = try server.removeExport(socketPath: socket)
        plane.removeDisk(disk)
        if let region {
            #expect(report.heldLeftInInflightRegion == 1 && report.heldFailed == 0, "\(report)")
            #expect((try? g.complete(timeout: 0.3)) == nil, "unanswered: the next backend runs it")
            // Split layout: a 16-byte header, then 16 bytes per descriptor, `inflight` first.
            #expect(region.load(fromByteOffset: 16 + Int(held) * 16, as: UInt8.self) == 1, "still marked in flight")
        } else {
            #expect(report.heldFailed == 1 && report.heldLeftInInflightRegion == 0, "\(report)")
            let done = try g.complete()
            #expect(done.head == held && done.status == UInt8(GD_BLK_S_IOERR))
        }
    }

    /// removeExport and stop at once, over and over: each removal either
    /// finishes or finds the server stopped; nothing hangs, every socket goes.
    @Test func removeExportRacingStop() throws {
        let dir = NSTemporaryDirectory() + "dp-race-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for round in 0..<20 {
            let plane = try Self.makePlane()
            defer { plane.stop() }
            let server = try VhostUserServer(plane: plane)
            var sockets: [String] = []
            for i in 0..<4 {
                var config = DiskConfiguration(path: "null\(i)", backend: .null)
                config.numQueues = 1
                let disk = try plane.addDisk(config)
                let socket = dir + "/\(round)-\(i).sock"
                try server.addExport(disk: disk, socketPath: socket)
                sockets.append(socket)
            }
            try server.start()
            let outcomes = Shared<[String]>([])
            let done = DispatchSemaphore(value: 0)
            let toRemove = sockets
            Thread.detachNewThread {
                for socket in toRemove {
                    do {
                        try server.removeExport(socketPath: socket)
                        outcomes.value.withLock { $0.append("removed") }
                    } catch {
                        outcomes.value.withLock { $0.append((error as? DataPlaneError) == .stopped ? "stopped" : "\(error)") }
                    }
                }
                done.signal()
            }
            if round % 2 == 0 { usleep(UInt32(round * 100)) }
            server.stop()
            #expect(done.wait(timeout: .now() + 10) == .success, "removeExport hung against stop")
            let seen = outcomes.value.withLock { $0 }
            #expect(seen.count == 4 && seen.allSatisfy { $0 == "removed" || $0 == "stopped" }, "\(seen)")
            for socket in sockets { #expect(!FileManager.default.fileExists(atPath: socket)) }
        }
    }

    // MARK: - Stalls

    /// The kernel's thread id of the calling thread.
    static func currentThreadID() -> Int32 {
        var buffer = [CChar](repeating: 0, count: 64)
        let n = readlink("/proc/thread-self", &buffer, buffer.count - 1)
        guard n > 0 else { return -1 }
        let text = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return Int32(text.split(separator: "/").last ?? "") ?? -1
    }

    /// The thread of this process named `name` (an IOThread names itself).
    static func threadID(named name: String) -> Int32? {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.first { task in
            (try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) == String(name.prefix(15))
        }.flatMap { Int32($0) }
    }

    /// Nanoseconds a thread has spent runnable but waiting for a CPU
    /// (schedstat's second field): time the machine, not we, kept it off.
    static func runQueueWait(_ tid: Int32) -> UInt64? {
        guard let fd = Optional(open("/proc/self/task/\(tid)/schedstat", O_RDONLY)), fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 128)
        let n = read(fd, &buffer, buffer.count)
        guard n > 0 else { return nil }
        let fields = String(decoding: buffer.prefix(n), as: UTF8.self).split(separator: " ")
        return fields.count >= 2 ? UInt64(fields[1]) : nil
    }

    /// What a load saw: its completions, the largest gap between two, and
    /// the gaps over the limit with the part the CPU scheduler explains.
    struct LoadReport: Sendable, CustomStringConvertible {
        var completions = 0
        var largestGapNanoseconds: UInt64 = 0
        /// (gap, of which the load's or the IOThread's wait for a CPU)
        var longGaps: [(gap: UInt64, waited: UInt64)] = []
        var unexplained: [(gap: UInt64, waited: UInt64)] { longGaps.filter { $0.gap > $0.waited + LiveDisksTests.stallLimit } }
        var description: String {
            let gaps = longGaps.map { "\($0.gap / 1000) us (\($0.waited / 1000) us waiting for a CPU)" }
            return "\(completions) completions, largest gap \(largestGapNanoseconds / 1000) us, gaps over \(LiveDisksTests.stallLimit / 1_000_000) ms: \(gaps.isEmpty ? "none" : gaps.joined(separator: ", "))"
        }
    }

    static let stallLimit: UInt64 = 10_000_000

    /// A value threads share (a Mutex cannot be captured: it is not copyable).
    final class Shared<Value: Sendable>: Sendable {
        let value: Mutex<Value>
        init(_ value: Value) { self.value = Mutex(value) }
    }

    /// Runs 4 KiB reads one at a time on `guest`'s queue 0 until `stop`,
    /// timing the gap between completions. A gap over the limit counts
    /// against us unless the scheduler explains it: the time this thread or
    /// the IOThread spent runnable but waiting for a CPU over that gap (a
    /// 2-core machine shared with builds does that, whatever we do).
    static func runLoad(_ guest: TestGuest, ioThread: Int32, stop: Shared<Bool>) -> LoadReport {
        let me = currentThreadID()
        let buf = guest.alloc(4096)
        var report = LoadReport()
        func waited() -> UInt64 { (runQueueWait(me) ?? 0) &+ (runQueueWait(ioThread) ?? 0) }
        var last = DataPlane.monotonicNanoseconds(), lastWaited = waited()
        while !stop.value.withLock({ $0 }) {
            guard (try? guest.submit(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)])) != nil,
                  (try? guest.complete()) != nil else {
                report.longGaps.append((UInt64.max, 0)) // no completion within seconds: a stall
                break
            }
            let now = DataPlane.monotonicNanoseconds(), nowWaited = waited()
            let gap = now - last
            report.completions += 1
            report.largestGapNanoseconds = max(report.largestGapNanoseconds, gap)
            if gap > stallLimit { report.longGaps.append((gap, nowWaited &- lastWaited)) }
            last = now
            lastWaited = nowWaited
        }
        return report
    }

    /// Disks added and removed, over and over, each with a frontend doing
    /// I/O and connected at its removal, while another disk on the same
    /// IOThread serves a load: that load never waits more than 10 ms for a
    /// completion (beyond what the CPU scheduler explains). The same load
    /// runs alone first, for comparison.
    @Test func disksComingAndGoingNeverStallAnotherDisk() throws {
        let plane = try Self.makePlane(name: "stall-io0")
        defer { plane.stop() }
        let server = try VhostUserServer(plane: plane)
        defer { server.stop() }
        let dir = NSTemporaryDirectory() + "dp-stall-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var loaded = DiskConfiguration(path: "loaded", backend: .null)
        loaded.numQueues = 1
        let loadedDisk = try plane.addDisk(loaded)
        try server.addExport(disk: loadedDisk, socketPath: dir + "/loaded.sock")
        try server.start()
        let guest = try TestGuest(queues: 1, queueSize: 64, memorySize: 4 << 20)
        let conn = try guest.connectFrontend(dir + "/loaded.sock")
        defer { vuf_close(conn) }
        let ioThread = try #require(Self.threadID(named: "stall-io0"))
        #expect(Self.runQueueWait(ioThread) != nil, "schedstat is readable")

        func measure(_ churn: () throws -> Void) throws -> LoadReport {
            let stop = Shared(false)
            let result = Shared<LoadReport?>(nil)
            let finished = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                let report = Self.runLoad(guest, ioThread: ioThread, stop: stop)
                result.value.withLock { $0 = report }
                finished.signal()
            }
            usleep(50_000)
            var failure: (any Error)?
            do { try churn() } catch { failure = error }
            usleep(50_000)
            stop.value.withLock { $0 = true }
            finished.wait()
            if let failure { throw failure }
            return result.value.withLock { $0 } ?? LoadReport()
        }

        let images = try (0..<2).map { _ in try TestImage(size: 1 << 20, in: dir) }
        let cycles = 40
        var removed: [VhostUserServer.RemovedExport] = []
        let clock = ContinuousClock()
        let churnStart = clock.now
        let churned = try measure {
            for cycle in 0..<cycles {
                let image = images[cycle % images.count]
                let disk = try plane.addDisk(Self.fileDisk(image))
                let socket = dir + "/churn\(cycle).sock"
                try server.addExport(disk: disk, socketPath: socket)
                let g = try TestGuest(queues: 1, queueSize: 64, memorySize: 4 << 20)
                let c = try g.connectFrontend(socket)
                let buf = g.alloc(4096)
                #expect(try g.run(type: UInt32(GD_BLK_T_OUT), segments: [(buf, 4096)]).status == 0)
                try g.submit(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]) // in flight, or just done, at the removal
                removed.append(try server.removeExport(socketPath: socket))
                plane.removeDisk(disk)
                vuf_close(c)
            }
        }
        let churnTime = clock.now - churnStart
        let alone = try measure { usleep(UInt32(min(2_000_000, Double(churnTime.components.seconds) * 1e6 + Double(churnTime.components.attoseconds) / 1e12))) }
        print("stall test: \(cycles) disks added and removed in \(churnTime); under churn: \(churned); alone: \(alone)")
        #expect(removed.count == cycles && removed.allSatisfy(\.frontendWasConnected))
        #expect(churned.completions > 100, "the load ran: \(churned)")
        #expect(churned.unexplained.isEmpty, "the other disk stalled: \(churned) (alone: \(alone))")
        #expect(plane.disks.count == 1 && server.socketPaths == [dir + "/loaded.sock"])
    }

    // MARK: - dpctl

    /// The sockets a running instance serves, from `dpctl status --json`.
    static func servedSockets(_ control: String) throws -> [String] {
        let status = try DpctlTests.dpctl(["status", "--control", control, "--json"])
        let object = try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any]
        return ((object?["disks"] as? [[String: Any]]) ?? []).compactMap { $0["socket"] as? String }
    }

    /// add-disk checks a disk as start does and serves it; remove-disk
    /// refuses a disk in use without --force, and with it disconnects the
    /// frontend, removes the socket and closes the image.
    @Test func addDiskAndRemoveDiskThroughDpctl() throws {
        let image = try TestImage(size: 1 << 20)
        let dir = image.directory
        let first = dir + "/a.sock", control = first + ".ctl", socket = dir + "/b.sock"
        let dp = try QEMUEndToEndTests.Instance(["--disk", "path=n,backend=null,socket=\(first),num-queues=1"], log: dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        #expect(DpctlTests.waitFor(control))

        // The same refusal as start's, before the instance is asked.
        let spec = "path=\(image.path),socket=\(socket),num-queues=99"
        let bad = try DpctlTests.dpctl(["add-disk", "--control", control, "--disk", spec])
        let startBad = try DpctlTests.dpctl(["start", "--disk", spec, "--check"])
        #expect(bad.status == 2 && bad.stderr == startBad.stderr && bad.stderr.contains("num-queues"), "\(bad.stderr)")
        // The grouped form, as start takes it.
        let added = try DpctlTests.dpctl(["add-disk", "--control", control, "--disk", image.path, "--socket", socket, "--num-queues", "1"])
        #expect(added.status == 0 && added.stdout.contains("added \(image.path)"), "\(added.stderr)")
        let twice = try DpctlTests.dpctl(["add-disk", "--control", control, "--disk", "path=m,backend=null,socket=\(socket)"])
        #expect(twice.status == 1 && twice.stderr.contains("socket \(socket) already serves disk \(image.path)"), "\(twice.stderr)")
        #expect(try Self.servedSockets(control) == [first, socket])

        let g = try TestGuest(queues: 1, queueSize: 64, memorySize: 4 << 20)
        let conn = try g.connectFrontend(socket)
        defer { vuf_close(conn) }
        let buf = g.alloc(4096)
        g.write(buf, pattern(4096, seed: 3))
        #expect(try g.run(type: UInt32(GD_BLK_T_OUT), segments: [(buf, 4096)]).status == 0)

        let refused = try DpctlTests.dpctl(["remove-disk", "--control", control, "--socket", socket])
        #expect(refused.status == 1 && refused.stderr.contains("is in use") && refused.stderr.contains("--force"), "\(refused.stderr)")
        #expect(vuf_is_closed(conn, 100) == 0 && FileManager.default.fileExists(atPath: socket), "refused: nothing changed")
        let removed = try DpctlTests.dpctl(["remove-disk", "--control", control, "--socket", socket, "--force"])
        #expect(removed.status == 0, "\(removed.stderr)")
        #expect(removed.stdout.contains("\(socket): frontend (pid \(getpid())) disconnected; 0 request(s) in flight completed"), "\(removed.stdout)")
        #expect(removed.stdout.contains("removed \(image.path); image closed"), "\(removed.stdout)")
        #expect(vuf_is_closed(conn, 2000) == 1)
        #expect(!FileManager.default.fileExists(atPath: socket))
        _ = try Disk(DiskConfiguration(path: image.path)) // its lock is free
        #expect(image.read(offset: 0, count: 4096) == pattern(4096, seed: 3))
        #expect(try Self.servedSockets(control) == [first])
        #expect(dp.log.contains("remove-disk: \(socket): frontend (pid \(getpid())) disconnected"), "\(dp.log)")

        let unknown = try DpctlTests.dpctl(["remove-disk", "--control", control, "--socket", socket])
        #expect(unknown.status == 1 && unknown.stderr.contains("no disk is served on \(socket) (served: \(first))"), "\(unknown.stderr)")
        let reload = try DpctlTests.dpctl(["reload", "--control", control])
        #expect(reload.status == 1 && reload.stderr.contains("started without --config"), "\(reload.stderr)")
    }

    /// A reload serves what the file lists: it adds disks new to it,
    /// removes those gone from it, keeps disks added with add-disk and
    /// disks whose frontend is connected; a disk whose second socket fails
    /// is not left listening on its first. SIGHUP does the same.
    @Test func reloadFollowsTheFileAndKeepsWhatAnOperatorWouldMiss() throws {
        let dir = NSTemporaryDirectory() + "dp-reload-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/config.json", control = dir + "/ctl"
        func sock(_ name: String) -> String { dir + "/\(name).sock" }
        func write(_ disks: [(String, [String])]) {
            let entries = disks.map { name, sockets in
                "{\"path\": \"\(name)\", \"backend\": \"null\", \"num-queues\": 1, \"socket\": [\(sockets.map { "\"\($0)\"" }.joined(separator: ", "))]}"
            }
            _ = FileManager.default.createFile(atPath: file, contents: Data("{\"control\": \"\(control)\", \"disks\": [\(entries.joined(separator: ", "))]}".utf8))
        }
        write([("a", [sock("a")]), ("b", [sock("b")])])
        let dp = try QEMUEndToEndTests.Instance(["--config", file], log: dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        #expect(DpctlTests.waitFor(control))
        let added = try DpctlTests.dpctl(["add-disk", "--control", control, "--disk", "path=c,backend=null,num-queues=1,socket=\(sock("c"))"])
        #expect(added.status == 0 && added.stdout.contains("not in \(file): a reload leaves it served"), "\(added.stdout)\(added.stderr)")

        // b goes, d comes, e's second socket is a plain file: e is refused whole.
        let notASocket = dir + "/plain-file"
        _ = FileManager.default.createFile(atPath: notASocket, contents: Data("keep".utf8))
        write([("a", [sock("a")]), ("d", [sock("d")]), ("e", [sock("e"), notASocket])])
        let reload = try DpctlTests.dpctl(["reload", "--control", control])
        #expect(reload.status == 0, "\(reload.stderr)")
        #expect(reload.stdout.contains("\(sock("b")): no frontend was connected; socket removed"), "\(reload.stdout)")
        #expect(reload.stdout.contains("added null (1073741824 bytes, read-write, up to 1 queue(s)) on \(sock("d"))"), "\(reload.stdout)")
        #expect(reload.stdout.contains("reload of \(file) done: 2 change(s) applied, 1 not applied, 0 waiting for a restart"), "\(reload.stdout)")
        #expect(reload.stdout.contains("\(sock("c")): not in the file, kept (added with dpctl add-disk"), "\(reload.stdout)")
        #expect(reload.stdout.contains("not applied: \(sock("e")): cannot serve e"), "\(reload.stdout)")
        #expect(try Self.servedSockets(control) == [sock("a"), sock("c"), sock("d")])
        #expect(!FileManager.default.fileExists(atPath: sock("b")) && !FileManager.default.fileExists(atPath: sock("e")),
                "b removed; e not left half served")
        #expect(FileManager.default.contents(atPath: notASocket) == Data("keep".utf8))

        // SIGHUP: d goes; a's frontend is connected, so a stays although the file drops it.
        let g = try TestGuest(queues: 1, queueSize: 64, memorySize: 4 << 20)
        let conn = try g.connectFrontend(sock("a"))
        defer { vuf_close(conn) }
        write([("c", [sock("c")])])
        kill(dp.process.processIdentifier, SIGHUP)
        let deadline = Date().addingTimeInterval(10)
        while dp.log.components(separatedBy: "reload of \(file) done").count < 3 && Date() < deadline { usleep(20_000) }
        #expect(dp.log.contains("reload of \(file) done: 2 change(s) applied, 1 not applied"), "\(dp.log)")
        #expect(dp.log.contains("reload: not applied: \(sock("a")): removed from the file, still served: a frontend is connected"), "\(dp.log)")
        #expect(dp.log.contains("\(sock("c")): added with dpctl add-disk, now in the file"), "\(dp.log)")
        #expect(try Self.servedSockets(control) == [sock("a"), sock("c")])
        #expect(vuf_is_closed(conn, 100) == 0, "a's frontend was left alone")
        let buf = g.alloc(4096)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]).status == 0)
    }
}

extension QEMUEndToEndTests {
    /// A guest under QEMU (TCG) writes and reads its disk (long-io) while
    /// other disks of the same dpctl are added and removed through dpctl,
    /// each with a frontend doing I/O and connected at its removal: the
    /// guest's workload passes, and the host finds what it wrote in its image.
    @Test func disksComeAndGoBesideARunningGuest() throws {
        let w = try Workspace(imageSize: 64 << 20)
        let dp = try Instance(["--disk", w.image, "--socket", w.socket, "--num-queues", "1"], log: w.dir + "/dpctl.log")
        defer { _ = dp.terminate() }
        let control = w.socket + ".ctl"
        let boot = Process()
        boot.executableURL = URL(fileURLWithPath: "/bin/bash")
        boot.arguments = [Self.root.appendingPathComponent("Tests/e2e/boot.sh").path, "--socket", w.socket,
                          "--workload", "long-io", "--seconds", "8", "--log", w.dir + "/guest.log",
                          "--verify-image", w.image, "--timeout", "240"]
        let out = Pipe()
        boot.standardOutput = out
        boot.standardError = out
        try boot.run()
        let deadline = Date().addingTimeInterval(200)
        while !guestTail(w).contains("E2E-PROGRESS") && Date() < deadline && boot.isRunning { usleep(100_000) }
        #expect(guestTail(w).contains("E2E-PROGRESS"), "the guest does I/O: \(guestTail(w))")

        var cycles = 0
        while boot.isRunning && cycles < 20 {
            let image = w.dir + "/other\(cycles % 2).raw", socket = w.dir + "/other\(cycles).sock"
            if !FileManager.default.fileExists(atPath: image) {
                _ = FileManager.default.createFile(atPath: image, contents: Data(count: 1 << 20))
            }
            let added = try DpctlTests.dpctl(["add-disk", "--control", control, "--disk", "path=\(image),socket=\(socket),num-queues=1"])
            #expect(added.status == 0, "\(added.stderr)")
            let g = try TestGuest(queues: 1, queueSize: 64, memorySize: 4 << 20)
            let conn = try g.connectFrontend(socket)
            let buf = g.alloc(4096)
            #expect(try g.run(type: UInt32(GD_BLK_T_OUT), sector: UInt64(cycles) * 8, segments: [(buf, 4096)]).status == 0)
            let removed = try DpctlTests.dpctl(["remove-disk", "--control", control, "--socket", socket, "--force"])
            #expect(removed.status == 0 && removed.stdout.contains("image closed"), "\(removed.stderr)")
            vuf_close(conn)
            cycles += 1
        }
        let output = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        boot.waitUntilExit()
        print("e2e: \(cycles) disks added and removed through dpctl while the guest ran")
        #expect(cycles >= 3, "disks came and went while the guest ran (\(cycles))")
        #expect(boot.terminationStatus == 0, "boot.sh: \(output)\nguest: \(guestTail(w))\ndpctl: \(dp.log)")
        #expect(output.contains("pattern.sh: OK"), "the host checked the image: \(output)")
        #expect(try LiveDisksTests.servedSockets(control) == [w.socket])
        #expect(!dp.log.contains("broken"), "\(dp.log)")
        if boot.terminationStatus == 0 { w.remove() }
    }
}
