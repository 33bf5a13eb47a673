import CDataPlane
import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// The benchmark loop over several drivers (gd_bench_run_many): a guest with
/// several disks, each signalled queue handled on its own.
@Suite struct BenchLoopTests {
    /// Three disks, each its own data plane and guest driver, driven from one
    /// thread by the interrupt-driven guest model: every disk completes its
    /// share and nothing waits for the stall check.
    @Test func oneGuestThreadDrivesSeveralDisks() throws {
        let harnesses = try (0..<3).map { i in
            try Harness(disk: DiskConfiguration(path: "null\(i)", backend: .null), queueSize: 128)
        }
        var targets = harnesses.map { gd_bench_target(d: $0.guest.driver, first_queue: 0, num_queues: 1) }
        var p = gd_bench_params()
        p.depth = 16
        p.type = UInt32(GD_BLK_T_IN)
        p.block_size = 4096
        p.random = true
        p.capacity_sectors = 1 << 20
        p.duration_ns = 300_000_000
        p.busy_poll = false
        p.cpu = -1
        var r = gd_bench_result()
        #expect(gd_bench_run_many(&targets, UInt32(targets.count), &p, &r) == 0)
        #expect(r.errors == 0 && r.signals > 0 && r.wakeups > 0, "\(r.errors) errors, \(r.signals) signals")
        let perDisk = [r.per_queue_ops.0, r.per_queue_ops.1, r.per_queue_ops.2]
        for (i, h) in harnesses.enumerated() {
            let disk = h.plane.statistics().disks[0]
            // No warm-up: every completion counts, in target order.
            #expect(perDisk[i] > 100 && disk.reads == perDisk[i], "disk \(i): device \(disk.reads), guest \(perDisk[i])")
            #expect(disk.inFlight == 0 && gd_in_flight(h.guest.driver, 0) == 0)
        }
        #expect(r.ops == perDisk.reduce(0, +))
    }

    /// gd_bench_run is gd_bench_run_many over one driver: its queue range
    /// still comes from the parameters.
    @Test func aTargetMustNameQueuesItsDriverHas() throws {
        let h = try Harness(disk: DiskConfiguration(path: "null0", backend: .null), queues: 2, queueSize: 64)
        var p = gd_bench_params()
        p.depth = 8
        p.type = UInt32(GD_BLK_T_IN)
        p.block_size = 4096
        p.capacity_sectors = 1 << 20
        p.duration_ns = 1_000_000
        p.cpu = -1
        var r = gd_bench_result()
        var bad = gd_bench_target(d: h.guest.driver, first_queue: 1, num_queues: 2)
        #expect(gd_bench_run_many(&bad, 1, &p, &r) == -EINVAL)
        var none = gd_bench_target(d: h.guest.driver, first_queue: 0, num_queues: 0)
        #expect(gd_bench_run_many(&none, 1, &p, &r) == -EINVAL)
        p.first_queue = 1
        p.num_queues = 1
        #expect(gd_bench_run(h.guest.driver, &p, &r) == 0)
        #expect(r.errors == 0 && r.per_queue_ops.0 > 0 && h.plane.statistics().disks[0].reads == r.per_queue_ops.0)
    }
}
