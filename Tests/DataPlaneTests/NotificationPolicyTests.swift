import CGuestDriver
import DataPlane
import Foundation
import Testing

/// When completions reach the guest: at the end of each queue's share of a
/// pass, and with notify-after N, once early after the pass's first N.
@Suite struct NotificationPolicyTests {
    /// Eight reads on a null disk, all in the avail ring before one kick, so
    /// that the sleeping IOThread pops them in one pass (24 descriptors, well
    /// inside a pass's budget). Without EVENT_IDX every publish signals, so
    /// the device's signal count is its publish count. Returns it.
    static func signalsForOnePass(notifyAfter: UInt32) throws -> UInt64 {
        let thread = IOThreadConfiguration(name: "notify-io", cpuset: try CPUSet(parsing: "0"), pollMaxMicroseconds: 0,
                                           notifyAfterCompletions: notifyAfter)
        let plane = try DataPlane(iothreads: [thread])
        var config = DiskConfiguration(path: "", backend: .null, nullSizeBytes: 1 << 20)
        config.nullReadZeroes = false
        let disk = try plane.addDisk(config)
        let g = try TestGuest(eventIndex: false)
        // The guest's memory must outlive the IOThread that maps it.
        defer { withExtendedLifetime(g) { plane.stop() } }
        let queue = try plane.startQueue(disk: disk, index: 0, memory: g.memory, configuration: g.queueConfiguration(0))
        let buffers = g.alloc(8 * 4096)
        for i in 0..<8 {
            try g.submit(type: UInt32(GD_BLK_T_IN), sector: UInt64(i) * 8, segments: [(buffers + UInt64(i) * 4096, 4096)],
                         kick: false)
        }
        #expect(gd_kick(g.driver, 0) == 0)
        for _ in 0..<8 {
            #expect(try g.complete().status == UInt8(GD_BLK_S_OK))
        }
        let s = queue.statistics()
        #expect(s.reads == 8 && s.batches == 1, "\(s.reads) reads in \(s.batches) batches: not one pass")
        return s.notifies
    }

    @Test func withoutNotifyAfterAPassPublishesOnceAtItsEnd() throws {
        #expect(try Self.signalsForOnePass(notifyAfter: 0) == 1)
    }

    @Test func notifyAfterSignalsTheFirstCompletionsOfAPassAtOnce() throws {
        // After 2: once early, once for the other 6 at the end of the pass.
        #expect(try Self.signalsForOnePass(notifyAfter: 2) == 2)
        // Once per pass, not every 2: the guest reaps the rest in the same wake-up.
        #expect(try Self.signalsForOnePass(notifyAfter: 1) == 2)
        // After all 8: the early publish is the only one.
        #expect(try Self.signalsForOnePass(notifyAfter: 8) == 1)
    }

    @Test func notifyAfterIsBounded() throws {
        let cpus = try CPUSet(parsing: "0")
        let limit = IOThreadConfiguration.maxNotifyAfter
        try IOThreadConfiguration(name: "t", cpuset: cpus, notifyAfterCompletions: limit).validate(online: cpus)
        #expect(throws: ConfigurationError.invalidNotifyAfter(limit + 1)) {
            try IOThreadConfiguration(name: "t", cpuset: cpus, notifyAfterCompletions: limit + 1).validate(online: cpus)
        }
    }
}
