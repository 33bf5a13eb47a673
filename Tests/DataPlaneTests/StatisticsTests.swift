import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// Counters are per disk and per queue index and only go up: a ring restart
/// (GET_VRING_BASE, SET_VRING_ADDR, a reconnect) makes a new queue, which
/// used to start the counters from zero again, and `dpctl stats` printed
/// 1.8e19 IOPS from the difference.
@Suite struct StatisticsTests {
    static let blockBytes: UInt32 = 4096

    func reads(_ g: TestGuest, _ count: Int, queue: Int = 0) throws {
        let buf = g.alloc(UInt64(Self.blockBytes))
        for _ in 0..<count {
            #expect(try g.run(queue, type: UInt32(GD_BLK_T_IN), segments: [(buf, Self.blockBytes)]).status == 0)
        }
    }

    func index(_ snapshot: DataPlane.Snapshot, _ queue: Int) -> QueueStatistics? {
        snapshot.queues.first { $0.queue == queue }
    }

    @Test func countersSurviveStoppingAndRestartingAQueue() throws {
        let h = try Harness(disk: DiskConfiguration(path: "", backend: .null, nullSizeBytes: 1 << 20), queues: 2)
        let g = h.guest
        let n = 5, m = 3, k = 2
        try reads(g, n)
        try reads(g, 1, queue: 1)
        let before = h.plane.statistics()

        let last = try #require(h.plane.stopQueue(disk: h.disk, index: 0))
        #expect(last == UInt16(n))
        let stopped = h.plane.statistics()
        #expect(stopped.disks[0].requests == UInt64(n + 1), "a stopped queue's requests still count for its disk")
        #expect(stopped.queues.map(\.queue) == [1])
        #expect(stopped.stoppedQueues.map(\.queue) == [0])
        let retired = try #require(stopped.stoppedQueues.first, "the stopped queue's counters are reported")
        #expect(retired.requests == UInt64(n))
        #expect(retired.inFlight == 0 && retired.lastAvailIndex == 0, "no gauges of a stopped queue")
        #expect(stopped.thread("test-io0").requests == UInt64(n + 1))

        var config = g.queueConfiguration(0)
        config.lastAvailIndex = last
        try h.plane.startQueue(disk: h.disk, index: 0, memory: g.memory, configuration: config)
        try reads(g, m)
        let restarted = h.plane.statistics()
        let q0 = try #require(index(restarted, 0))
        #expect(q0.requests == UInt64(n + m) && q0.reads == UInt64(n + m))
        #expect(q0.bytesRead == UInt64(n + m) * UInt64(Self.blockBytes))
        #expect(q0.latency.count == UInt64(n + m))
        #expect(q0.lastAvailIndex == UInt16(n + m), "gauges come from the running queue")
        #expect(restarted.stoppedQueues.isEmpty)
        #expect(restarted.disks[0].requests == UInt64(n + m + 1))

        // startQueue over a running queue restarts it as well.
        config.lastAvailIndex = UInt16(n + m)
        try h.plane.startQueue(disk: h.disk, index: 0, memory: g.memory, configuration: config)
        try reads(g, k)
        let again = h.plane.statistics()
        #expect(index(again, 0)?.requests == UInt64(n + m + k))
        #expect(again.disks[0].requests == UInt64(n + m + k + 1))

        // Rates across the restarts: what happened in between, never negative or huge.
        let rates = again.disks[0].rates(since: before.disks[0], seconds: 1)
        #expect(rates.iops == Double(m + k))
        #expect(rates.readMBps == Double((m + k) * Int(Self.blockBytes)) / 1e6)
        let queueRates = try #require(index(again, 0)).rates(since: try #require(index(before, 0)), seconds: 1)
        #expect(queueRates.iops == Double(m + k))
        #expect(counterIncrease(from: before.thread("test-io0").requests, to: again.thread("test-io0").requests) == UInt64(m + k))
    }

    /// Two snapshots of different processes (an instance restarted between
    /// them): a counter that went backwards is no increase, not 2^64 - x.
    @Test func aCounterThatWentBackwardsGivesARateOfZero() {
        var earlier = QueueStatistics(disk: "d", queue: 0, thread: "t")
        earlier.reads = 1000
        earlier.bytesRead = 4_096_000
        earlier.polled = 700
        earlier.kicks = 300
        earlier.latency.buckets[10] = 1000
        var later = QueueStatistics(disk: "d", queue: 0, thread: "t")
        later.reads = 10
        later.bytesRead = 40_960
        later.kicks = 10
        later.latency.buckets[12] = 10
        let rates = later.rates(since: earlier, seconds: 1)
        #expect(rates.iops == 0)
        #expect(rates.readMBps == 0 && rates.writeMBps == 0)
        #expect(rates.polledShare == nil, "both polls and kicks went backwards: no share to give")
        let p99 = rates.p99Microseconds ?? 0
        #expect(p99 < 1e6, "only the 10 new latencies count")
        #expect(counterIncrease(from: 5, to: 3) == 0 && counterIncrease(from: 3, to: 5) == 2)
    }

    /// The IOThread's time: busy, poll and sleep add up to its wall-clock
    /// time (the stretch under way included), and an idle thread sleeps.
    @Test func anIOThreadsTimeAddsUpAndAnIdleOneSleeps() throws {
        let h = try Harness(disk: DiskConfiguration(path: "n", backend: .null), pollMicroseconds: 50)
        let start = DataPlane.monotonicNanoseconds()
        let first = h.plane.threads[0].statistics()
        for _ in 0..<50 { #expect(try h.guest.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0) }
        usleep(300_000)
        let t = h.plane.threads[0].statistics()
        let elapsed = DataPlane.monotonicNanoseconds() - start
        #expect(t.sleepTimeNanoseconds > first.sleepTimeNanoseconds + 200_000_000, "\(t)")
        #expect(t.pollTimeNanoseconds > 0 && t.busyTimeNanoseconds > 0, "\(t)")
        let grew = (t.busyTimeNanoseconds + t.pollTimeNanoseconds + t.sleepTimeNanoseconds)
            - (first.busyTimeNanoseconds + first.pollTimeNanoseconds + first.sleepTimeNanoseconds)
        #expect(grew <= elapsed + 1_000_000 && grew + 50_000_000 >= elapsed, "\(grew) ns accounted in \(elapsed) ns")
    }
}
