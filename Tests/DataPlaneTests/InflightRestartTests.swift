import CDataPlane
import CGuestDriver
import CVhostFrontend
import Foundation
import Testing

/// A backend that dies with requests in flight: the next one resubmits them
/// from the frontend's inflight region, in order, and none is lost or
/// completed twice (vhost-user.rst "Inflight I/O tracking").
@Suite(.serialized) struct InflightRestartTests {
    /// SIGKILL leaves requests in the region; a graceful stop (SIGTERM,
    /// `dpctl stop`) leaves those the error policy holds there too, rather
    /// than turning them into guest I/O errors. Split rings, and packed ones
    /// (VIRTIO_F_RING_PACKED: QueueRegionPacked, and the ring's place taken
    /// from the region; the reads completing first wrote their used
    /// descriptors over the held writes' ring slots).
    @Test(arguments: [(true, false), (false, false), (true, true), (false, true)])
    func backendsRequestsAreResubmittedOnce(killed: Bool, packed: Bool) throws {
        let image = try TestImage(size: 4 << 20)
        do {
            try run(image, killed: killed, packed: packed)
        } catch {
            let logs = ["dpctl1.log", "dpctl2.log"].map { (try? String(contentsOfFile: image.directory + "/" + $0, encoding: .utf8)) ?? "" }
            Issue.record("\(error)\nfirst dpctl:\n\(logs[0])\nsecond dpctl:\n\(logs[1])")
        }
    }

    func run(_ image: TestImage, killed: Bool, packed: Bool) throws {
        let socket = image.directory + "/vu.sock"
        // Writes fail and, under the stop policy, are held: in flight when we kill.
        var first = try QEMUEndToEndTests.Instance(
            ["--disk", image.path, "--socket", socket, "--num-queues", "1", "--werror", "stop",
             "--fault", "errno=EIO,ops=write", "--control", image.directory + "/1.ctl"],
            log: image.directory + "/dpctl1.log")
        defer { _ = first.terminate() }
        let g = try TestGuest(queues: 1, queueSize: 64, packed: packed)

        var options = vuf_options()
        options.inflight = true
        var info = vuf_info()
        let conn = try g.connectFrontend(socket, options: options, info: &info)
        #expect((info.features >> 34) & 1 == (packed ? 1 : 0), "RING_PACKED negotiated iff the driver is packed")
        // One batch, W R W R W R W R: the writes fail and are held (stop
        // policy), the reads between them complete: completions out of pop
        // order, which a restart from the used index alone would get wrong.
        var writes: [UInt16: Int] = [:]
        var reads: Set<UInt16> = []
        for i in 0..<8 {
            let last = i == 7
            let buf = g.alloc(4096)
            if i % 2 == 0 {
                g.write(buf, pattern(4096, seed: UInt8(i)))
                writes[try g.submit(type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * 8), segments: [(buf, 4096)],
                                    indirect: true, kick: last)] = i
            } else {
                reads.insert(try g.submit(type: UInt32(GD_BLK_T_IN), sector: UInt64(i * 8), segments: [(buf, 4096)],
                                          indirect: true, kick: last))
            }
        }
        var readsDone: Set<UInt16> = []
        while readsDone.count < reads.count {
            let c = try g.complete(timeout: 10)
            #expect(reads.contains(c.head) && c.status == 0)
            readsDone.insert(c.head)
        }
        #expect((try? g.complete(timeout: 0.3)) == nil, "writes are held")

        var size: UInt64 = 0
        let inflightFD = vuf_inflight_dup(conn, &size)
        try #require(inflightFD >= 0)
        defer { close(inflightFD) }
        if killed {
            first.kill9()
        } else {
            #expect(first.terminate() == 0)
        }
        vuf_close(conn)
        #expect((try? g.complete(timeout: 0.3)) == nil, "nothing was answered by the stop")

        // A new backend, no faults; the frontend hands back the region as QEMU does.
        first = try QEMUEndToEndTests.Instance(["--disk", image.path, "--socket", socket, "--num-queues", "1",
                                                "--control", image.directory + "/2.ctl"],
                                               log: image.directory + "/dpctl2.log")
        options.reuse_inflight = true
        options.inflight_fd = inflightFD
        options.inflight_size = size
        let again = try g.connectFrontend(socket, options: options)
        defer { vuf_close(again) }
        var written: Set<UInt16> = []
        while written.count < writes.count {
            let c = try g.complete(timeout: 10) // an id completed twice fails here (not in flight)
            #expect(writes[c.head] != nil && c.status == 0, "head \(c.head) status \(c.status)")
            written.insert(c.head)
        }
        #expect((try? g.complete(timeout: 0.3)) == nil, "nothing completes twice")
        for i in stride(from: 0, to: 8, by: 2) {
            #expect(image.read(offset: i * 8 * 512, count: 4096) == pattern(4096, seed: UInt8(i)), "write \(i)")
        }
        // And the ring carries on where it should.
        let buf = g.alloc(4096)
        #expect(try g.run(type: UInt32(GD_BLK_T_IN), sector: 0, segments: [(buf, 4096)]).status == 0)
        #expect(g.read(buf, 4096) == pattern(4096, seed: 0))
        #expect(first.log.contains("queue 0 started"), "\(first.log)")
        #expect(first.log.contains("packed ring") == packed, "\(first.log)")
    }
}
