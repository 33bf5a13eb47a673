import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// Every request type against a real file, data checked in the file itself.
@Suite struct RequestTests {
    static let imageSize = 16 << 20

    func makeHarness(eventIndex: Bool = true, readOnly: Bool = false, directIO: Bool = true,
                     image: TestImage) throws -> Harness {
        try Harness(disk: DiskConfiguration(path: image.path, readOnly: readOnly, directIO: directIO, serial: "dp-serial-0001"),
                    eventIndex: eventIndex)
    }

    @Test(arguments: [true, false])
    func writeThenReadRoundTrips(eventIndex: Bool) throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try makeHarness(eventIndex: eventIndex, image: image)
        let g = h.guest
        let data = pattern(8192, seed: 1)
        let buf = g.alloc(8192)
        g.write(buf, data)
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: 16, segments: [(buf, 8192)])
        #expect(w.status == UInt8(GD_BLK_S_OK))
        #expect(w.length == 1)
        #expect(image.read(offset: 16 * 512, count: 8192) == data)

        image.write(offset: 64 * 512, pattern(4096, seed: 2))
        let rbuf = g.alloc(4096)
        let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: 64, segments: [(rbuf, 4096)])
        #expect(r.status == UInt8(GD_BLK_S_OK))
        #expect(r.length == 4096 + 1)
        #expect(g.read(rbuf, 4096) == pattern(4096, seed: 2))

        let s = h.stats()
        #expect(s.writes == 1 && s.reads == 1)
        #expect(s.bytesWritten == 8192 && s.bytesRead == 4096)
        #expect(s.errors == 0 && s.inFlight == 0)
        #expect(s.notifies >= 1)
    }

    @Test func multiSegmentAndIndirect() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try makeHarness(image: image)
        let g = h.guest
        // Three segments of different sizes, direct then indirect.
        for indirect in [false, true] {
            let sizes: [UInt32] = [512, 4096, 1536]
            let bufs = sizes.map { g.alloc(UInt64($0), align: 512) }
            let data = pattern(Int(sizes.reduce(0, +)), seed: indirect ? 3 : 4)
            var offset = 0
            for (b, s) in zip(bufs, sizes) {
                g.write(b, Array(data[offset..<offset + Int(s)]))
                offset += Int(s)
            }
            let sector: UInt64 = indirect ? 200 : 100
            let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: sector, segments: Array(zip(bufs, sizes)), indirect: indirect)
            #expect(w.status == UInt8(GD_BLK_S_OK))
            #expect(image.read(offset: Int(sector) * 512, count: data.count) == data)

            let rbufs = sizes.map { g.alloc(UInt64($0), align: 512) }
            let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: sector, segments: Array(zip(rbufs, sizes)), indirect: indirect)
            #expect(r.status == UInt8(GD_BLK_S_OK))
            #expect(r.length == UInt32(data.count) + 1)
            #expect(zip(rbufs, sizes).flatMap { g.read($0, Int($1)) } == data)
        }
    }

    @Test func bufferAcrossRegionsIsSplit() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try makeHarness(image: image)
        let g = h.guest
        // 8 KiB that start 4 KiB below the boundary between the two regions,
        // whose host mappings are not adjacent.
        let buf = g.allocAt(g.boundary - 4096, 8192)
        let data = pattern(8192, seed: 5)
        g.write(buf, data)
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: 8, segments: [(buf, 8192)])
        #expect(w.status == UInt8(GD_BLK_S_OK))
        #expect(image.read(offset: 8 * 512, count: 8192) == data)

        g.write(buf, [UInt8](repeating: 0, count: 8192))
        let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: 8, segments: [(buf, 8192)])
        #expect(r.status == UInt8(GD_BLK_S_OK))
        #expect(g.read(buf, 8192) == data)
    }

    @Test func misalignedBuffersBounceUnderDirectIO() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try makeHarness(image: image)
        let g = h.guest
        let base = g.alloc(8192 + 4096)
        let buf = base + 3 // O_DIRECT refuses this address
        let data = pattern(4096, seed: 6)
        g.write(buf, data)
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: 0, segments: [(buf, 4096)])
        #expect(w.status == UInt8(GD_BLK_S_OK))
        #expect(image.read(offset: 0, count: 4096) == data)
        let rbuf = base + 4096 + 7
        let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(rbuf, 4096)])
        #expect(r.status == UInt8(GD_BLK_S_OK))
        #expect(g.read(rbuf, 4096) == data)
        #expect(h.disk.usesDirectIO)
        #expect(h.stats().bounces == 2)
    }

    /// Review finding: each misaligned request got its own bounce buffer, so a
    /// guest could make us allocate gigabytes. Past the queue's budget (16 MiB)
    /// they wait for a buffer to be freed: twelve misaligned 3 MiB writes in
    /// one batch (36 MiB) all complete once and land.
    @Test func misalignedRequestsBeyondTheBounceBudgetWaitAndAllLand() throws {
        let image = try TestImage(size: 48 << 20)
        let h = try makeHarness(image: image)
        let g = h.guest
        let size = 3 << 20
        var heads: [UInt16: Int] = [:]
        for i in 0..<12 {
            let buf = g.alloc(UInt64(size) + 4096) + 3 // O_DIRECT refuses this address
            g.write(buf, pattern(size, seed: UInt8(i)))
            heads[try g.submit(type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * size / 512), segments: [(buf, UInt32(size))],
                               kick: i == 11)] = i
        }
        for _ in 0..<12 {
            let c = try g.complete(timeout: 20)
            #expect(c.status == UInt8(GD_BLK_S_OK))
            #expect(heads.removeValue(forKey: c.head) != nil)
        }
        for i in 0..<12 {
            #expect(image.read(offset: i * size, count: size) == pattern(size, seed: UInt8(i)))
        }
        #expect(h.stats().bounces == 12)
        #expect(h.stats().bouncePeakBytes <= 16 << 20)
    }

    /// Review finding: one bounce buffer spanned its whole request, so a 1 GiB
    /// request pointing 256 times at one misaligned buffer cost 1 GiB of ours.
    /// A request now moves through a window of at most 4 MiB: a 120 MiB write
    /// whose 40 segments all point at one misaligned 3 MiB buffer holds no
    /// more, and every window (they straddle segments) lands where it belongs;
    /// a 15 MiB read through such windows fills five buffers right.
    @Test func largeMisalignedRequestsMoveThroughOneWindow() throws {
        let segment = 3 << 20, count = 40
        let image = try TestImage(size: segment * count)
        let h = try makeHarness(image: image)
        let g = h.guest
        let buf = g.alloc(UInt64(segment) + 4096) + 3 // O_DIRECT refuses this address
        let data = pattern(segment, seed: 21)
        g.write(buf, data)
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), segments: Array(repeating: (buf, UInt32(segment)), count: count))
        #expect(w.status == UInt8(GD_BLK_S_OK))
        for i in 0..<count {
            #expect(image.read(offset: i * segment, count: segment) == data)
        }

        let contents = pattern(5 * segment, seed: 22)
        image.write(offset: 0, contents)
        let buffers = (0..<5).map { _ in g.alloc(UInt64(segment) + 4096) + 5 }
        let r = try g.run(type: UInt32(GD_BLK_T_IN), segments: buffers.map { ($0, UInt32(segment)) })
        #expect(r.status == UInt8(GD_BLK_S_OK))
        for (i, b) in buffers.enumerated() {
            #expect(g.read(b, segment) == Array(contents[i * segment..<(i + 1) * segment]))
        }
        #expect(h.stats().bounces == 2)
        #expect(h.stats().bouncePeakBytes == 4 << 20)
    }

    /// Signals go out with RWF_NOWAIT, which a blocking eventfd always
    /// refuses: the call and err fds a queue starts with are made non-blocking.
    @Test func callAndErrFDsAreMadeNonBlocking() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try makeHarness(image: image)
        var config = h.guest.queueConfiguration(0)
        let errorFD = gd_eventfd()
        defer { close(errorFD) }
        config.errorFD = errorFD
        for fd in [config.callFD, errorFD] {
            #expect(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) == 0)
        }
        h.queues[0] = try h.plane.startQueue(disk: h.disk, index: 0, memory: h.guest.memory, configuration: config)
        #expect(fcntl(config.callFD, F_GETFL) & O_NONBLOCK != 0)
        #expect(fcntl(errorFD, F_GETFL) & O_NONBLOCK != 0)
        let buf = h.guest.alloc(4096)
        let head = try h.guest.submit(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)])
        var p = pollfd(fd: config.callFD, events: Int16(POLLIN), revents: 0)
        #expect(poll(&p, 1, 5000) == 1) // the completion was signalled
        #expect(try h.guest.complete().head == head)
    }

    @Test func flushGetIDAndUnsupported() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try makeHarness(image: image)
        let g = h.guest
        let f = try g.run(type: UInt32(GD_BLK_T_FLUSH))
        #expect(f.status == UInt8(GD_BLK_S_OK))

        let idbuf = g.alloc(20)
        g.write(idbuf, [UInt8](repeating: 0xAA, count: 20))
        let id = try g.run(type: UInt32(GD_BLK_T_GET_ID), segments: [(idbuf, 20)])
        #expect(id.status == UInt8(GD_BLK_S_OK))
        #expect(id.length == 21)
        var expected = Array("dp-serial-0001".utf8)
        expected += [UInt8](repeating: 0, count: 20 - expected.count)
        #expect(g.read(idbuf, 20) == expected)

        let u = try g.run(type: 42)
        #expect(u.status == UInt8(GD_BLK_S_UNSUPP))
        let s = h.stats()
        #expect(s.flushes == 1 && s.getIDs == 1 && s.otherRequests == 1 && s.unsupported == 1)
    }

    func range(_ g: TestGuest, sector: UInt64, sectors: UInt32, flags: UInt32) -> UInt64 {
        let gpa = g.alloc(16, align: 16)
        var r = gd_blk_range(sector: sector, num_sectors: sectors, flags: flags)
        let bytes = withUnsafeBytes(of: &r) { Array($0) }
        g.write(gpa, bytes)
        return gpa
    }

    @Test func discardAndWriteZeroes() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try makeHarness(image: image)
        let g = h.guest
        let ones = [UInt8](repeating: 0xFF, count: 3 * 65536)
        image.write(offset: 0, ones)

        // WRITE_ZEROES without UNMAP over the first 64 KiB.
        let wz = try g.run(type: UInt32(GD_BLK_T_WRITE_ZEROES), segments: [(range(g, sector: 0, sectors: 128, flags: 0), 16)])
        #expect(wz.status == UInt8(GD_BLK_S_OK))
        #expect(image.read(offset: 0, count: 65536) == [UInt8](repeating: 0, count: 65536))
        // WRITE_ZEROES with UNMAP over the second.
        let wzu = try g.run(type: UInt32(GD_BLK_T_WRITE_ZEROES),
                            segments: [(range(g, sector: 128, sectors: 128, flags: UInt32(GD_BLK_WZ_F_UNMAP)), 16)])
        #expect(wzu.status == UInt8(GD_BLK_S_OK))
        #expect(image.read(offset: 65536, count: 65536) == [UInt8](repeating: 0, count: 65536))
        // DISCARD over the third: the range is deallocated (reads back zero on ext4/tmpfs).
        let d = try g.run(type: UInt32(GD_BLK_T_DISCARD), segments: [(range(g, sector: 256, sectors: 128, flags: 0), 16)])
        #expect(d.status == UInt8(GD_BLK_S_OK))
        #expect(image.read(offset: 131072, count: 65536) == [UInt8](repeating: 0, count: 65536))
        // The bytes after the ranges are untouched, and the image did not grow.
        #expect(image.read(offset: 196608, count: 512) == [UInt8](repeating: 0, count: 512))
        #expect(image.size == Self.imageSize)

        // DISCARD with the UNMAP flag, or reserved flags, is unsupported (5.2.6.2).
        let bad = try g.run(type: UInt32(GD_BLK_T_DISCARD), segments: [(range(g, sector: 0, sectors: 8, flags: 1), 16)])
        #expect(bad.status == UInt8(GD_BLK_S_UNSUPP))
        let reserved = try g.run(type: UInt32(GD_BLK_T_WRITE_ZEROES), segments: [(range(g, sector: 0, sectors: 8, flags: 2), 16)])
        #expect(reserved.status == UInt8(GD_BLK_S_UNSUPP))
        // Past capacity.
        let past = try g.run(type: UInt32(GD_BLK_T_DISCARD),
                             segments: [(range(g, sector: UInt64(Self.imageSize / 512) - 4, sectors: 8, flags: 0), 16)])
        #expect(past.status == UInt8(GD_BLK_S_IOERR))
        #expect(image.size == Self.imageSize)
        let s = h.stats()
        #expect(s.discards == 3 && s.writeZeroes == 3)
    }

    @Test func writeZeroesOnTmpfsFallsBack() throws {
        // tmpfs has no FALLOC_FL_ZERO_RANGE: punch then allocate instead.
        let image = try TestImage(size: 1 << 20, in: "/dev/shm")
        let h = try makeHarness(directIO: false, image: image)
        let g = h.guest
        image.write(offset: 0, [UInt8](repeating: 0x5A, count: 8192))
        let wz = try g.run(type: UInt32(GD_BLK_T_WRITE_ZEROES), segments: [(range(g, sector: 0, sectors: 16, flags: 0), 16)])
        #expect(wz.status == UInt8(GD_BLK_S_OK))
        #expect(image.read(offset: 0, count: 8192) == [UInt8](repeating: 0, count: 8192))
    }

    @Test func readOnlyDiskRefusesWrites() throws {
        let image = try TestImage(size: Self.imageSize)
        image.write(offset: 0, pattern(4096, seed: 9))
        let h = try makeHarness(readOnly: true, image: image)
        let g = h.guest
        let buf = g.alloc(4096)
        g.write(buf, [UInt8](repeating: 1, count: 4096))
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), segments: [(buf, 4096)])
        #expect(w.status == UInt8(GD_BLK_S_IOERR))
        let z = try g.run(type: UInt32(GD_BLK_T_WRITE_ZEROES), segments: [(range(g, sector: 0, sectors: 8, flags: 0), 16)])
        #expect(z.status == UInt8(GD_BLK_S_IOERR))
        let d = try g.run(type: UInt32(GD_BLK_T_DISCARD), segments: [(range(g, sector: 0, sectors: 8, flags: 0), 16)])
        #expect(d.status == UInt8(GD_BLK_S_IOERR))
        #expect(image.read(offset: 0, count: 4096) == pattern(4096, seed: 9))
        let r = try g.run(type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)])
        #expect(r.status == UInt8(GD_BLK_S_OK))
        #expect(g.read(buf, 4096) == pattern(4096, seed: 9))
        let f = try g.run(type: UInt32(GD_BLK_T_FLUSH))
        #expect(f.status == UInt8(GD_BLK_S_OK))
        #expect(h.stats().readOnlyErrors == 3)
    }

    /// A null disk serving one queue; the guest's buffer holds 0xEE before each test reads into it.
    private func nullDisk(readZeroes: Bool) throws -> (plane: DataPlane, guest: TestGuest, buffer: UInt64) {
        let plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "null-io", cpuset: CPUSet(parsing: "0"))])
        var config = DiskConfiguration(path: "", backend: .null, nullSizeBytes: 1 << 20)
        config.nullReadZeroes = readZeroes
        let disk = try plane.addDisk(config)
        let g = try TestGuest()
        try plane.startQueue(disk: disk, index: 0, memory: g.memory, configuration: g.queueConfiguration(0))
        let buf = g.alloc(4096)
        g.write(buf, [UInt8](repeating: 0xEE, count: 4096))
        return (plane, g, buf)
    }

    @Test func nullBackendReadsZeroes() throws {
        let (plane, g, buf) = try nullDisk(readZeroes: true)
        defer { plane.stop() }
        let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: 8, segments: [(buf, 4096)])
        #expect(r.status == UInt8(GD_BLK_S_OK))
        #expect(g.read(buf, 4096) == [UInt8](repeating: 0, count: 4096))
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: 8, segments: [(buf, 4096)])
        #expect(w.status == UInt8(GD_BLK_S_OK))
        let past = try g.run(type: UInt32(GD_BLK_T_IN), sector: 2047, segments: [(buf, 4096)])
        #expect(past.status == UInt8(GD_BLK_S_IOERR))
    }

    @Test func nullBackendCanLeaveReadBuffersAlone() throws {
        let (plane, g, buf) = try nullDisk(readZeroes: false)
        defer { plane.stop() }
        let r = try g.run(type: UInt32(GD_BLK_T_IN), sector: 8, segments: [(buf, 4096)])
        #expect(r.status == UInt8(GD_BLK_S_OK))
        #expect(g.read(buf, 4096) == [UInt8](repeating: 0xEE, count: 4096))
    }

    @Test func bufferedIOWorksToo() throws {
        let image = try TestImage(size: Self.imageSize)
        let h = try makeHarness(directIO: false, image: image)
        let g = h.guest
        let buf = g.alloc(1024) + 1
        let data = pattern(1024, seed: 11)
        g.write(buf, data)
        let w = try g.run(type: UInt32(GD_BLK_T_OUT), sector: 3, segments: [(buf, 1024)])
        #expect(w.status == UInt8(GD_BLK_S_OK))
        #expect(try g.run(type: UInt32(GD_BLK_T_FLUSH)).status == UInt8(GD_BLK_S_OK))
        #expect(image.read(offset: 3 * 512, count: 1024) == data)
        #expect(h.stats().bounces == 0)
    }
}
