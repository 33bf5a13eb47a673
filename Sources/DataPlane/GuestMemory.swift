import CDataPlane

/// One region of guest memory, as a frontend describes it.
public struct MemoryRegion: Sendable, Equatable {
    /// Guest-physical address of the first byte.
    public var guestPhysicalAddress: UInt64
    /// Length in bytes.
    public var size: UInt64
    /// The frontend's own virtual address of the first byte (vhost-user gives
    /// ring addresses in it).
    public var userAddress: UInt64
    /// Where the region is mapped in this process.
    public var hostAddress: UInt

    public init(guestPhysicalAddress: UInt64, size: UInt64, userAddress: UInt64, hostAddress: UInt) {
        self.guestPhysicalAddress = guestPhysicalAddress
        self.size = size
        self.userAddress = userAddress
        self.hostAddress = hostAddress
    }
}

/// A guest memory table the data plane translates addresses with.
///
/// The mappings themselves belong to whoever created them; `release` runs
/// when the table is freed (a vhost-user server passes one that unmaps).
public final class GuestMemory: Sendable {
    /// The C table.
    private struct Handle: @unchecked Sendable {
        // Unchecked: a dp_mem is immutable once created, read by any thread.
        let pointer: OpaquePointer
    }

    private let table: Handle
    var handle: OpaquePointer { table.pointer }
    /// The regions, sorted by guest-physical address.
    public let regions: [MemoryRegion]
    private let release: (@Sendable () -> Void)?

    public init(regions: [MemoryRegion], release: (@Sendable () -> Void)? = nil) throws(DataPlaneError) {
        var cRegions = regions.map {
            dp_mem_region(guest_phys_addr: $0.guestPhysicalAddress, size: $0.size,
                          user_addr: $0.userAddress, host_addr: UnsafeMutableRawPointer(bitPattern: $0.hostAddress))
        }
        var table: OpaquePointer?
        let ret = dp_mem_create(&cRegions, UInt32(cRegions.count), &table)
        guard ret == 0, let table else {
            throw .system(operation: "guest memory table (\(regions.count) regions)", errno: -ret)
        }
        self.table = Handle(pointer: table)
        self.regions = regions.sorted { $0.guestPhysicalAddress < $1.guestPhysicalAddress }
        self.release = release
    }

    deinit {
        dp_mem_destroy(handle)
        release?()
    }
}
