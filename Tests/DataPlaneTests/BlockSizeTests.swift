import CGuestDriver
import CVhostFrontend
import Foundation
import Testing

@testable import DataPlane

/// The block size a disk serves follows what its image takes with O_DIRECT,
/// and the physical block size it announces is the image's: on loop devices
/// with 4096- and 512-byte sectors, raw and carrying ext4.
@Suite(.enabled(if: runningAsRoot, "loop devices and mounts need root (CI runs as root)"))
struct BlockSizeTests {
    let read = UInt32(GD_BLK_T_IN), write = UInt32(GD_BLK_T_OUT)
    let ok = UInt8(GD_BLK_S_OK), ioError = UInt8(GD_BLK_S_IOERR)

    /// Writes and reads back 8 KiB at 4 KiB, then sends a 512-byte read of
    /// that data, which the announced block size forbids: it must fail as a
    /// malformed request, before it reaches the image (where O_DIRECT fails
    /// it with EINVAL; a read of a hole would not even fail).
    func exerciseIn4KBlocks(_ h: Harness, image: String) throws {
        let g = h.guest
        let data = pattern(8192, seed: 7)
        let out = g.alloc(8192), back = g.alloc(8192)
        g.write(out, data)
        #expect(try g.run(type: write, sector: 8, segments: [(out, 8192)]).status == ok)
        #expect(try g.run(type: read, sector: 8, segments: [(back, 8192)]).status == ok)
        #expect(g.read(back, 8192) == data)
        #expect(try readFile(image, offset: 4096, count: 8192) == data)

        let small = g.alloc(4096)
        #expect(try g.run(type: read, sector: 9, segments: [(small, 512)]).status == ioError)
        let stats = h.stats()
        #expect(stats.badRequests == 1, "a 512-byte read must be refused as not whole blocks")
        #expect(stats.ioErrors == 0, "a 512-byte read reached the image")
    }

    @Test func aFileOnA4KSectorFilesystemIsServedIn4KBlocks() throws {
        let fs = try ScratchFilesystem(sectorSize: 4096)
        let image = try fs.makeImage(size: 16 << 20)
        try withExtendedLifetime(fs) {
            let h = try Harness(disk: DiskConfiguration(path: image))
            #expect(h.disk.logicalBlockSize == 4096)
            #expect(h.disk.physicalBlockSize == 4096)
            #expect(AnnouncedTopology(h.disk) == AnnouncedTopology(blockSize: 4096, physicalBlockExponent: 0))
            try exerciseIn4KBlocks(h, image: image)
        }
    }

    @Test func aBlockSizeBelowWhatTheFilesystemTakesIsRefused() throws {
        let fs = try ScratchFilesystem(sectorSize: 4096)
        let image = try fs.makeImage(size: 16 << 20)
        try withExtendedLifetime(fs) {
            let error = #expect(throws: DataPlaneError.self) {
                try Disk(DiskConfiguration(path: image, logicalBlockSize: 512))
            }
            #expect(error?.description.contains("direct I/O only in 4096-byte blocks") == true, "\(String(describing: error))")
            #expect(error?.description.contains("block-size=4096") == true, "\(String(describing: error))")
            do {
                // A larger size than the image needs is kept.
                let disk = try Disk(DiskConfiguration(path: image, logicalBlockSize: 8192))
                #expect(AnnouncedTopology(disk) == AnnouncedTopology(blockSize: 8192, physicalBlockExponent: 0))
            }
            do {
                // Through the page cache the file takes 512-byte I/O.
                let disk = try Disk(DiskConfiguration(path: image, directIO: false))
                #expect(AnnouncedTopology(disk) == AnnouncedTopology(blockSize: 512, physicalBlockExponent: 3))
            }
        }
    }

    /// ext4 with 4 KiB blocks on 512-byte sectors: the file takes 512-byte
    /// direct I/O, and its physical block is the filesystem's 4 KiB block.
    @Test func aFilesPhysicalBlockIsItsFilesystemBlock() throws {
        let fs = try ScratchFilesystem(sectorSize: 512, filesystemBlockSize: 4096)
        let image = try fs.makeImage(size: 16 << 20)
        try withExtendedLifetime(fs) {
            do {
                let disk = try Disk(DiskConfiguration(path: image))
                #expect(disk.logicalBlockSize == 512 && disk.physicalBlockSize == 4096)
                #expect(AnnouncedTopology(disk) == AnnouncedTopology(blockSize: 512, physicalBlockExponent: 3))
            }
            do {
                let disk = try Disk(DiskConfiguration(path: image, logicalBlockSize: 1024))
                #expect(AnnouncedTopology(disk) == AnnouncedTopology(blockSize: 1024, physicalBlockExponent: 2))
            }
        }
    }

    @Test func a4KSectorDeviceIsServedIn4KBlocks() throws {
        let loop = try LoopDevice(sizeBytes: 16 << 20, sectorSize: 4096)
        try withExtendedLifetime(loop) {
            do {
                let h = try Harness(disk: DiskConfiguration(path: loop.path))
                #expect(h.disk.logicalBlockSize == 4096)
                #expect(AnnouncedTopology(h.disk) == AnnouncedTopology(blockSize: 4096, physicalBlockExponent: 0))
                try exerciseIn4KBlocks(h, image: loop.path)
            }
            let error = #expect(throws: DataPlaneError.self) {
                try Disk(DiskConfiguration(path: loop.path, logicalBlockSize: 512))
            }
            #expect(error?.description.contains("block-size=4096") == true, "\(String(describing: error))")
        }
    }

    /// dpctl's default follows the image too; an explicit smaller size is
    /// refused naming the one to use. Real I/O over vhost-user.
    @Test func dpctlServesA4KFilesystemImageIn4KBlocks() throws {
        let fs = try ScratchFilesystem(sectorSize: 4096)
        let image = try fs.makeImage(size: 16 << 20)
        let dir = "/tmp/dp-bs-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try withExtendedLifetime(fs) {
            let refused = try runTool(QEMUEndToEndTests.dpctl, ["start", "--disk", image, "--socket", dir + "/small.sock",
                                                                "--block-size", "512"], timeout: 10)
            #expect(!refused.timedOut && refused.result.status != 0, "dpctl served 512-byte blocks")
            #expect(refused.result.stderr.contains("block-size=4096"), "\(refused.result.stderr)")

            let socket = dir + "/vu.sock"
            let dp = try QEMUEndToEndTests.Instance(["--disk", image, "--socket", socket, "--num-queues", "1"],
                                                    log: dir + "/dpctl.log")
            defer { _ = dp.terminate() }
            let g = try TestGuest(queues: 1, queueSize: 64)
            var info = vuf_info()
            let conn = try g.connectFrontend(socket, info: &info)
            defer { vuf_close(conn) }
            #expect(info.has_config)
            #expect(AnnouncedTopology(info.config) == AnnouncedTopology(blockSize: 4096, physicalBlockExponent: 0))
            let data = pattern(4096, seed: 9)
            let out = g.alloc(4096), back = g.alloc(4096)
            g.write(out, data)
            #expect(try g.run(type: write, sector: 16, segments: [(out, 4096)]).status == ok)
            #expect(try g.run(type: read, sector: 16, segments: [(back, 4096)]).status == ok)
            #expect(g.read(back, 4096) == data)
            #expect(dp.log.contains("4096-byte blocks"), "\(dp.log)")
            #expect(dp.terminate() == 0, "\(dp.log)")
        }
    }
}
