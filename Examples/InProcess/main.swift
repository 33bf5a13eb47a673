// A program that links DataPlane and serves a disk to an in-process guest
// driver: the README's example, built and run by the test command.
import CGuestDriver
import DataPlane
import Foundation

@main
struct InProcessExample {
    static func main() throws {
        let imagePath = CommandLine.arguments.dropFirst().first ?? "/tmp/dataplane-example.raw"
        if !FileManager.default.fileExists(atPath: imagePath) {
            guard FileManager.default.createFile(atPath: imagePath, contents: Data(count: 64 << 20)) else {
                throw ExampleError("cannot create \(imagePath)")
            }
        }

        // One IOThread pinned to CPU 0, busy-polling up to 32 us before sleeping.
        let plane = try DataPlane(iothreads: [
            IOThreadConfiguration(name: "iothread0", cpuset: CPUSet(parsing: "0"), pollMaxMicroseconds: 32)
        ])
        defer { plane.stop() }
        let disk = try plane.addDisk(DiskConfiguration(path: imagePath, serial: "example"))

        // The guest's side: rings and buffers in a memfd, as a VMM would share them.
        var config = gd_config(mem_size: 16 << 20, num_queues: 1, queue_size: 128, event_idx: true, packed: false)
        var driverPointer: OpaquePointer?
        guard gd_create(&config, &driverPointer) == 0, let driver = driverPointer else {
            throw ExampleError("cannot set up the guest driver")
        }
        defer { gd_destroy(driver) }
        var regions = [dp_mem_region](repeating: dp_mem_region(), count: 2)
        let count = Int(gd_mem_regions(driver, &regions))
        let memory = try GuestMemory(regions: regions.prefix(count).map {
            MemoryRegion(guestPhysicalAddress: $0.guest_phys_addr, size: $0.size,
                         userAddress: $0.user_addr, hostAddress: UInt(bitPattern: $0.host_addr))
        })
        var ring = dp_queue_config()
        gd_queue_config(driver, 0, &ring)
        let queue = try plane.startQueue(
            disk: disk, index: 0, memory: memory,
            configuration: VirtqueueConfiguration(
                size: Int(ring.size), descriptorTable: ring.desc_addr, availRing: ring.avail_addr,
                usedRing: ring.used_addr, eventIndex: ring.event_idx, kickFD: ring.kick_fd, callFD: ring.call_fd))
        // Defers run last first: the queue stops before gd_destroy unmaps the
        // rings it polls (plane.stop() alone would come after the unmap).
        defer { _ = plane.stopQueue(disk: disk, index: 0) }

        // Write 4 KiB at sector 8, read it back.
        let buffer = gd_alloc(driver, 4096, 4096)
        let message = Array("hello from the guest".utf8)
        gd_ptr(driver, buffer)!.copyMemory(from: message, byteCount: message.count)
        for type in [UInt32(GD_BLK_T_OUT), UInt32(GD_BLK_T_IN)] {
            var segment = gd_seg(gpa: buffer, len: 4096)
            var head: UInt16 = 0
            let submitted = withUnsafePointer(to: &segment) { segments in
                var request = gd_req(type: type, sector: 8, segs: segments, nsegs: 1, indirect: false)
                return gd_submit(driver, 0, &request, &head)
            }
            guard submitted == 0 else { throw ExampleError("submit failed: \(submitted)") }
            gd_kick_if_needed(driver, 0)
            var length: UInt32 = 0, status: UInt8 = 0xFF
            while gd_complete(driver, 0, &head, &length, &status) == 0 { _ = gd_wait_call(driver, 0, 1000) }
            guard status == 0 else { throw ExampleError("request failed with status \(status)") }
        }
        let stats = queue.statistics()
        print("served \(stats.requests) requests (\(stats.writes) write, \(stats.reads) read) on \(disk.name);",
              "direct I/O: \(disk.usesDirectIO); p50 latency \(stats.latency.percentile(50).map { Int($0 / 1000) } ?? 0) us")
    }
}

struct ExampleError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
