import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

@Suite struct LifecycleTests {
    /// Adds `count` writes of `size` bytes (sector i * size/512, pattern seeded
    /// by i) without publishing, then publishes once and kicks.
    func postWrites(_ g: TestGuest, queue: Int = 0, count: Int, size: Int, firstSector: UInt64 = 0) throws -> [UInt64] {
        var buffers: [UInt64] = []
        for i in 0..<count {
            let buf = g.alloc(UInt64(size))
            g.write(buf, pattern(size, seed: UInt8(truncatingIfNeeded: i)))
            buffers.append(buf)
            let seg = [gd_seg(gpa: buf, len: UInt32(size))]
            var head: UInt16 = 0
            let ret = seg.withUnsafeBufferPointer { b in
                var req = gd_req(type: UInt32(GD_BLK_T_OUT), sector: firstSector + UInt64(i * size / 512),
                                 segs: b.baseAddress, nsegs: 1, indirect: true)
                return gd_request_add(g.driver, UInt32(queue), &req, &head)
            }
            guard ret == 0 else { throw TestFailure("gd_request_add \(ret)") }
        }
        gd_avail_publish(g.driver, UInt32(queue))
        gd_kick(g.driver, UInt32(queue))
        return buffers
    }

    @Test func stopWith128InFlightLosesNone() throws {
        let size = 128 << 10
        let image = try TestImage(size: 128 * size)
        let h = try Harness(disk: DiskConfiguration(path: image.path), queueSize: 256)
        let g = h.guest
        _ = try postWrites(g, count: 128, size: size)
        // Let the IOThread pop them all, then stop while they are in flight.
        let deadline = Date().addingTimeInterval(5)
        while h.stats().lastAvailIndex != 128 && Date() < deadline { sched_yield() }
        let inFlightAtStop = h.stats().inFlight
        let last = h.queues[0].stop()
        #expect(last == 128)
        let after = h.stats()
        #expect(after.inFlight == 0)
        #expect(after.writes == 128)
        #expect(gd_used_idx(g.driver, 0) == 128)
        var seen = Set<UInt16>()
        for _ in 0..<128 {
            let c = try g.complete(timeout: 1)
            #expect(c.status == UInt8(GD_BLK_S_OK))
            seen.insert(c.head)
        }
        #expect(seen.count == 128)
        for i in 0..<128 {
            #expect(image.read(offset: i * size, count: 4096) == Array(pattern(size, seed: UInt8(i)).prefix(4096)))
        }
        // Recorded so a run shows the stop really raced with I/O.
        print("stopWith128InFlight: \(inFlightAtStop) requests were in flight at stop")
    }

    @Test func threadStopDrainsEveryQueue() throws {
        let size = 64 << 10
        let image = try TestImage(size: 2 * 64 * size)
        let h = try Harness(disk: DiskConfiguration(path: image.path), threads: 2, queues: 2, queueSize: 128)
        let g = h.guest
        _ = try postWrites(g, queue: 0, count: 64, size: size)
        _ = try postWrites(g, queue: 1, count: 64, size: size, firstSector: UInt64(64 * size / 512))
        let deadline = Date().addingTimeInterval(5)
        while (h.stats(0).lastAvailIndex != 64 || h.stats(1).lastAvailIndex != 64) && Date() < deadline { sched_yield() }
        h.plane.stop()
        for q in 0..<2 {
            #expect(gd_used_idx(g.driver, UInt32(q)) == 64)
            #expect(h.queues[q].statistics().inFlight == 0)
            #expect(h.queues[q].stop() == 64)
        }
    }

    @Test func restartResumesFromTheReportedIndex() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try Harness(disk: DiskConfiguration(path: image.path), queueSize: 16)
        let g = h.guest
        let buf = g.alloc(4096)
        for i in 0..<20 { // wraps the 16-entry ring
            #expect(try g.run(type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * 8), segments: [(buf, 4096)]).status == 0)
        }
        let last = h.queues[0].stop()
        #expect(last == 20)
        // Requests posted while stopped wait in the ring and are served after restart.
        let pending = try g.submit(type: UInt32(GD_BLK_T_FLUSH))
        var config = g.queueConfiguration(0)
        config.lastAvailIndex = last
        let q = try h.plane.startQueue(disk: h.disk, index: 0, memory: g.memory, configuration: config)
        gd_kick(g.driver, 0)
        let c = try g.complete()
        #expect(c.head == pending && c.status == 0)
        #expect(q.statistics().flushes == 1)
        #expect(q.stop() == 21)
    }

    @Test func pauseHoldsRequestsUntilResume() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try Harness(disk: DiskConfiguration(path: image.path))
        let g = h.guest
        try h.plane.pause(disk: h.disk)
        let head = try g.submit(type: UInt32(GD_BLK_T_FLUSH))
        usleep(100_000)
        #expect(gd_used_idx(g.driver, 0) == 0)
        try h.plane.resume(disk: h.disk)
        gd_kick(g.driver, 0)
        let c = try g.complete()
        #expect(c.head == head && c.status == 0)
    }

    @Test func memoryTableSwapKeepsServing() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try Harness(disk: DiskConfiguration(path: image.path))
        let g = h.guest
        let buf = g.alloc(4096)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]).status == 0)
        let copy = try GuestMemory(regions: g.memory.regions)
        try h.queues[0].setMemory(copy)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]).status == 0)
        // A table that no longer holds the rings is refused and changes nothing.
        let partial = try GuestMemory(regions: [g.memory.regions.last!])
        #expect(throws: DataPlaneError.self) { try h.queues[0].setMemory(partial) }
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]).status == 0)
    }

    @Test(arguments: [true, false])
    func fourQueuesOnTwoIOThreadsUnderConcurrentLoad(eventIndex: Bool) throws {
        let queues = 4, depth = 8, rounds = 40, size = 8192
        let image = try TestImage(size: queues * depth * size)
        let h = try Harness(disk: DiskConfiguration(path: image.path), threads: 2, queues: queues, queueSize: 64,
                            eventIndex: eventIndex, pollMicroseconds: 16)
        let g = h.guest
        #expect(Set(h.queues.map { $0.thread.configuration.name }).count == 2)
        // Buffers first: the driver's allocator is not shared across threads.
        let buffers = (0..<queues).map { _ in (0..<depth).map { _ in (w: g.alloc(UInt64(size)), r: g.alloc(UInt64(size))) } }
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: queues) { q in
            do {
                for round in 0..<rounds {
                    for slot in 0..<depth {
                        let seed = UInt8(truncatingIfNeeded: q * 64 + slot * 8 + round)
                        g.write(buffers[q][slot].w, pattern(size, seed: seed))
                        let sector = UInt64((q * depth + slot) * size / 512)
                        try g.submit(q, type: UInt32(GD_BLK_T_OUT), sector: sector, segments: [(buffers[q][slot].w, UInt32(size))])
                    }
                    for _ in 0..<depth where try g.complete(q).status != 0 { throw TestFailure("write failed on queue \(q)") }
                    for slot in 0..<depth {
                        let sector = UInt64((q * depth + slot) * size / 512)
                        try g.submit(q, type: UInt32(GD_BLK_T_IN), sector: sector, segments: [(buffers[q][slot].r, UInt32(size))])
                    }
                    for _ in 0..<depth where try g.complete(q).status != 0 { throw TestFailure("read failed on queue \(q)") }
                    for slot in 0..<depth {
                        let seed = UInt8(truncatingIfNeeded: q * 64 + slot * 8 + round)
                        if g.read(buffers[q][slot].r, size) != pattern(size, seed: seed) {
                            throw TestFailure("queue \(q) slot \(slot) round \(round): data mismatch")
                        }
                    }
                }
            } catch {
                failures.withLock { $0.append("\(error)") }
            }
        }
        #expect(failures.withLock { $0 } == [])
        let snapshot = h.plane.statistics()
        for q in 0..<queues {
            let s = snapshot.queues[q]
            #expect(s.writes == UInt64(depth * rounds) && s.reads == UInt64(depth * rounds))
            #expect(s.errors == 0 && s.inFlight == 0 && !s.broken)
        }
        #expect(snapshot.disks.count == 1 && snapshot.disks[0].requests == UInt64(queues * depth * rounds * 2))
        #expect(snapshot.threads.count == 2 && snapshot.threads.allSatisfy { $0.queues == 2 && $0.cpuNanoseconds > 0 })
    }
}

import Synchronization
