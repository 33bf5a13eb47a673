import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// Configuration and start-up errors a user sees, with messages to act on.
@Suite struct ErrorTests {
    let anyCPU = try! CPUSet(parsing: "0")

    @Test func missingImage() throws {
        let path = "/nonexistent-dir/none.raw"
        let error = #expect(throws: DataPlaneError.self) { try Disk(DiskConfiguration(path: path)) }
        #expect(error == .cannotOpen(path: path, errno: ENOENT))
        #expect(error?.description.contains("No such file") == true)
    }

    @Test func emptyImage() throws {
        let image = try TestImage(size: 0)
        let error = #expect(throws: DataPlaneError.self) { try Disk(DiskConfiguration(path: image.path)) }
        #expect(error?.description.contains("it is empty") == true)
    }

    @Test func imageNotWholeBlocks() throws {
        let image = try TestImage(size: 4096 + 512)
        let error = #expect(throws: DataPlaneError.self) {
            try Disk(DiskConfiguration(path: image.path, logicalBlockSize: 4096))
        }
        #expect(error?.description.contains("not a multiple of the 4096-byte logical block size") == true)
    }

    @Test func directoryIsNotAnImage() throws {
        let image = try TestImage(size: 4096)
        let error = #expect(throws: DataPlaneError.self) { try Disk(DiskConfiguration(path: image.directory, readOnly: true, directIO: false)) }
        #expect(error != nil)
    }

    @Test func invalidDiskConfigurationIsRejectedBeforeOpening() throws {
        let error = #expect(throws: DataPlaneError.self) {
            try Disk(DiskConfiguration(path: "/dev/null", queueSize: 300))
        }
        #expect(error == .configuration(.invalidQueueSize(300)))
    }

    @Test func offlineCPUsAreNamed() throws {
        let online = try CPUSet.online()
        let beyond = (online.cpus.last ?? 0) + 1
        let set = try CPUSet(parsing: "\(beyond),\(beyond + 1)")
        let error = #expect(throws: DataPlaneError.self) {
            try IOThread(IOThreadConfiguration(name: "io", cpuset: set))
        }
        #expect(error?.description.contains("\(beyond),\(beyond + 1) are not online") == true)
    }

    @Test func queueIndexOutOfRange() throws {
        let plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "io", cpuset: anyCPU)])
        defer { plane.stop() }
        let disk = try plane.addDisk(DiskConfiguration(path: "", backend: .null))
        let g = try TestGuest()
        let error = #expect(throws: DataPlaneError.self) {
            try plane.startQueue(disk: disk, index: 1, memory: g.memory, configuration: g.queueConfiguration(0))
        }
        #expect(error?.description.contains("queue 1") == true)
    }

    @Test func ringsOutsideMemoryAreRefused() throws {
        let plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "io", cpuset: anyCPU)])
        defer { plane.stop() }
        let disk = try plane.addDisk(DiskConfiguration(path: "", backend: .null))
        let g = try TestGuest()
        var config = g.queueConfiguration(0)
        config.usedRing = g.memorySize - 8 // the used ring would run past the end
        let error = #expect(throws: DataPlaneError.self) {
            try plane.startQueue(disk: disk, index: 0, memory: g.memory, configuration: config)
        }
        #expect(error?.description.contains("outside guest memory") == true)
        config = g.queueConfiguration(0)
        config.descriptorTable += 8 // misaligned
        #expect(throws: DataPlaneError.self) {
            try plane.startQueue(disk: disk, index: 0, memory: g.memory, configuration: config)
        }
    }

    @Test func overlappingMemoryRegionsAreRefused() throws {
        let region = MemoryRegion(guestPhysicalAddress: 0, size: 8192, userAddress: 0x1000_0000, hostAddress: 0x7000_0000)
        var second = region
        second.guestPhysicalAddress = 4096
        second.userAddress = 0x2000_0000
        #expect(throws: DataPlaneError.self) { try GuestMemory(regions: [region, second]) }
    }

    /// Found in review: two regions that both end at 2^64 overlap, though
    /// "start + size" wraps to 0 for them.
    @Test func overlappingRegionsAtTheTopOfTheAddressSpaceAreRefused() throws {
        let top = MemoryRegion(guestPhysicalAddress: 0 &- 8192, size: 8192, userAddress: 0x1000_0000, hostAddress: 0x7000_0000)
        let inside = MemoryRegion(guestPhysicalAddress: 0 &- 4096, size: 4096, userAddress: 0x2000_0000, hostAddress: 0x7100_0000)
        #expect(throws: DataPlaneError.self) { try GuestMemory(regions: [top, inside]) }
        let below = MemoryRegion(guestPhysicalAddress: 0 &- 16384, size: 8192, userAddress: 0x2000_0000, hostAddress: 0x7100_0000)
        _ = try GuestMemory(regions: [top, below]) // adjacent, not overlapping
    }

    /// Found by fuzzing (fuzz/crashes/vring_blk-misaligned-indirect-table): a
    /// region whose host mapping is not congruent to its guest address would
    /// make aligned guest descriptors misaligned in our memory.
    @Test func incongruentRegionIsRefused() throws {
        let region = MemoryRegion(guestPhysicalAddress: 0x1001, size: 8192, userAddress: 0x1000_0000, hostAddress: 0x7000_0000)
        #expect(throws: DataPlaneError.self) { try GuestMemory(regions: [region]) }
    }

    @Test func stoppedPlaneRefusesNewDisks() throws {
        let plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "io", cpuset: anyCPU)])
        plane.stop()
        #expect(throws: DataPlaneError.stopped) { try plane.addDisk(DiskConfiguration(path: "", backend: .null)) }
    }
}
