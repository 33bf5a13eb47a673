import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// DISCARD is advisory and WRITE_ZEROES always zeroes, whatever the file or
/// device under the disk can do.
@Suite struct DiscardTests {
    static let EOPNOTSUPP: Int32 = 95

    func range(_ g: TestGuest, sector: UInt64, sectors: UInt32, flags: UInt32 = 0) -> (UInt64, UInt32) {
        let gpa = g.alloc(16, align: 16)
        var r = gd_blk_range(sector: sector, num_sectors: sectors, flags: flags)
        g.write(gpa, withUnsafeBytes(of: &r) { Array($0) })
        return (gpa, 16)
    }

    /// A discard the file or device cannot do completes OK (as QEMU has it)
    /// and never stops a queue, even under the stop policy.
    @Test func unsupportedDiscardCompletesAndNeverStopsTheQueue() throws {
        let image = try TestImage(size: 1 << 20)
        var config = DiskConfiguration(path: image.path)
        config.writeErrorPolicy = .stop
        let h = try Harness(disk: config)
        let g = h.guest
        h.disk.injectFaults(FaultInjection(errno: Self.EOPNOTSUPP, operations: [.discard]))
        let d = try g.run(type: UInt32(GD_BLK_T_DISCARD), segments: [range(g, sector: 0, sectors: 8)])
        #expect(d.status == UInt8(GD_BLK_S_OK))
        #expect(h.stats().stoppedOnError == nil && h.stats().ioErrors == 0)
        // Other failures of a discard are still failures.
        h.disk.injectFaults(FaultInjection(errno: 5, operations: [.discard]))
        _ = try g.submit(type: UInt32(GD_BLK_T_DISCARD), segments: [range(g, sector: 0, sectors: 8)])
        #expect((try? g.complete(timeout: 0.3)) == nil)
        #expect(h.stats().stoppedOnError != nil)
    }

    /// ext2 has no FALLOC_FL_ZERO_RANGE and cannot allocate a range;
    /// ramfs has no fallocate at all. DISCARD is then skipped, WRITE_ZEROES
    /// (with or without UNMAP) takes the next way that works, down to
    /// writing the zeroes itself; before, both failed with EOPNOTSUPP.
    @Test(arguments: [("ext2", false), ("ext2", true), ("ramfs", false)])
    func fileSystemWithoutFallocateModes(fileSystem: String, directIO: Bool) throws {
        let scratch = try TestImage(size: 64 << 20)
        let mountPoint = scratch.directory + "/mnt"
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        if fileSystem == "ext2" {
            try runToolChecked("mkfs.ext2", ["-q", "-F", scratch.path])
            try runToolChecked("mount", ["-o", "loop", scratch.path, mountPoint])
        } else {
            try runToolChecked("mount", ["-t", fileSystem, fileSystem, mountPoint])
        }
        defer { _ = try? runTool("umount", [mountPoint]) }
        let image = try TestImage(size: 8 << 20, in: mountPoint)
        let ones = [UInt8](repeating: 0xA5, count: 4 << 20)
        image.write(offset: 0, ones)
        let h = try Harness(disk: DiskConfiguration(path: image.path, directIO: directIO))
        let g = h.guest

        let d = try g.run(type: UInt32(GD_BLK_T_DISCARD), segments: [range(g, sector: 0, sectors: 128)])
        #expect(d.status == UInt8(GD_BLK_S_OK))
        // 3 MiB: more than one round of the zero-writing fallback (1 MiB).
        let wz = try g.run(type: UInt32(GD_BLK_T_WRITE_ZEROES), segments: [range(g, sector: 128, sectors: 6144)])
        #expect(wz.status == UInt8(GD_BLK_S_OK))
        let wzu = try g.run(type: UInt32(GD_BLK_T_WRITE_ZEROES),
                            segments: [range(g, sector: 6272, sectors: 1024, flags: UInt32(GD_BLK_WZ_F_UNMAP))])
        #expect(wzu.status == UInt8(GD_BLK_S_OK))
        #expect(image.read(offset: 64 << 10, count: (3 << 20) + (512 << 10)) == [UInt8](repeating: 0, count: (3 << 20) + (512 << 10)))
        #expect(image.read(offset: (3 << 20) + (576 << 10), count: 64 << 10) == [UInt8](repeating: 0xA5, count: 64 << 10))
        #expect(image.size == 8 << 20)
        #expect(h.stats().errors == 0)
    }

    /// A block device gets a real discard (io_uring's discard command,
    /// BLKDISCARD), counted as one in the device's own statistics; before,
    /// fallocate(PUNCH_HOLE) asked it to write zeroes instead, which a device
    /// that discards but cannot zero refuses.
    @Test func blockDeviceGetsARealDiscard() throws {
        let backing = try TestImage(size: 16 << 20)
        backing.write(offset: 0, [UInt8](repeating: 0x3C, count: 4 << 20))
        let loop = try LoopDevice(backing: backing.path)
        let name = URL(fileURLWithPath: loop.path).lastPathComponent
        func discardsCompleted() throws -> UInt64 {
            let fields = try String(contentsOfFile: "/sys/block/\(name)/stat", encoding: .utf8).split(separator: " ")
            return UInt64(fields[11]) ?? 0 // discards completed (Documentation/block/stat.rst)
        }
        let before = try discardsCompleted()
        let h = try Harness(disk: DiskConfiguration(path: loop.path))
        let g = h.guest
        let d = try g.run(type: UInt32(GD_BLK_T_DISCARD), segments: [range(g, sector: 0, sectors: 2048)])
        #expect(d.status == UInt8(GD_BLK_S_OK))
        #expect(try discardsCompleted() > before, "the loop device saw no discard")
        #expect(backing.read(offset: 0, count: 1 << 20) == [UInt8](repeating: 0, count: 1 << 20)) // the loop punched its file
    }
}
