#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlane
import CDataPlaneSys
import Logging

/// The backend side of one vhost-user-blk device: feature negotiation,
/// memory table, vrings, config space, inflight region. It turns messages
/// into DataPlane calls; it never touches a request. One frontend at a time;
/// `reset` returns it to its initial state for the next one.
package final class VhostUserBlkDevice {
    package struct Reply {
        package var payload: [UInt8]
        package var fds: [Int32] = []
    }

    private struct Vring {
        var num = 0
        var desc: UInt64 = 0
        var used: UInt64 = 0
        var avail: UInt64 = 0
        var addressSet = false
        /// SET_VRING_BASE: a split ring's next avail index, or a packed
        /// ring's 32-bit value (`VirtqueueConfiguration.packedBase`).
        var base: UInt32 = 0
        /// Whether `base` came from SET_VRING_BASE or a stop: a packed ring
        /// started without one begins at both wrap counters 1 (0x8000_8000),
        /// where a fresh driver begins, not at 0 (both 0).
        var baseSet = false
        var kick: Int32 = -1
        var call: Int32 = -1
        var err: Int32 = -1
        var enabled = false
        var queue: Virtqueue?
    }

    private struct Region {
        var region: MemoryRegion
        var mapping: SharedMapping
    }

    private struct Inflight {
        var mapping: SharedMapping
        var numQueues: Int
        var queueSize: Int
        var perQueue: UInt64
        /// Laid out for packed rings (QueueRegionPacked): VIRTIO_F_RING_PACKED
        /// was negotiated when the region was sized.
        var packed: Bool
    }

    let disk: Disk
    let plane: DataPlane
    let frontend: Int
    let numQueues: Int
    /// Metadata: the disk and socket, and the frontend connected (the server sets it).
    package var logger: Logger

    private var features: UInt64 = 0
    private var featuresAcked = false
    private var protocolFeatures: UInt64 = 0
    private var status: UInt64 = 0
    private var regions: [Region] = []
    private var memory: GuestMemory?
    private var vrings: [Vring]
    private var inflight: Inflight?
    /// SET_LOG_BASE's bitmap; the rings log into it while VHOST_F_LOG_ALL is negotiated.
    private var dirtyLog: SharedMapping?
    /// SET_BACKEND_REQ_FD's channel: shared with the server, which sends
    /// CONFIG_CHANGE_MSG on it from whichever thread resizes the disk.
    let backendChannel: BackendChannel

    /// Whether the rings mark the pages they write (live migration).
    var loggingDirtyPages: Bool { features & VirtioFeature.logAll != 0 && dirtyLog != nil }
    /// The dirty log's size in bytes, when one is mapped.
    var dirtyLogBytes: Int? { dirtyLog?.length }

    /// `frontend` numbers this device among the disk's sockets: each runs
    /// queues of its own (``DataPlane/startQueue(disk:index:frontend:memory:configuration:)``).
    package convenience init(disk: Disk, plane: DataPlane, frontend: Int = 0, logger: Logger) {
        self.init(disk: disk, plane: plane, frontend: frontend, backendChannel: BackendChannel(), logger: logger)
    }

    init(disk: Disk, plane: DataPlane, frontend: Int, backendChannel: BackendChannel, logger: Logger) {
        self.backendChannel = backendChannel
        self.disk = disk
        self.plane = plane
        self.frontend = frontend
        self.numQueues = disk.configuration.numQueues
        self.logger = logger
        self.vrings = Array(repeating: Vring(), count: disk.configuration.numQueues)
    }

    deinit { reset() }

    // MARK: - What we offer

    var offeredFeatures: UInt64 {
        var f = VirtioFeature.version1 | VirtioFeature.protocolFeatures | VirtioFeature.ringIndirectDesc
            | VirtioFeature.ringEventIndex | VirtioFeature.ringPacked | VirtioFeature.blkSizeMax | VirtioFeature.blkSegMax | VirtioFeature.blkBlockSize
            | VirtioFeature.blkFlush | VirtioFeature.blkTopology | VirtioFeature.blkMultiQueue | VirtioFeature.logAll
        if disk.configuration.readOnly {
            f |= VirtioFeature.blkReadOnly
        } else {
            f |= VirtioFeature.blkDiscard | VirtioFeature.blkWriteZeroes | VirtioFeature.blkConfigWCE
        }
        return f
    }

    static let offeredProtocolFeatures: UInt64 = [
        ProtocolFeature.mq, .logShmfd, .replyAck, .config, .inflightShmfd, .resetDevice, .configureMemSlots, .status,
        .backendReq,
    ].reduce(0) { $0 | $1.mask }

    /// seg_max: the data segments a request may carry. The data plane
    /// refuses a chain of more than seg_max + 2 descriptors, so this is
    /// exactly what it accepts (DiskConfiguration.segmentsPerRequest).
    var segMax: UInt32 { UInt32(disk.configuration.segmentsPerRequest) }

    func hasProtocolFeature(_ f: ProtocolFeature) -> Bool { protocolFeatures & f.mask != 0 }

    /// Packed rings were negotiated (SET_FEATURES): ring bases are 32-bit
    /// values, ring addresses name the descriptor ring and the two event
    /// suppression areas, the inflight region is QueueRegionPacked.
    var packedNegotiated: Bool { features & VirtioFeature.ringPacked != 0 }

    /// Whether a failed message gets a non-zero REPLY_ACK.
    var replyAckNegotiated: Bool { hasProtocolFeature(.replyAck) }

    /// Requests that answer with their own payload (REPLY_ACK does not apply).
    static func hasReply(_ request: VhostUserRequest) -> Bool {
        switch request {
        case .getFeatures, .getProtocolFeatures, .getVringBase, .getQueueNum, .getConfig, .getInflightFD,
             .getMaxMemSlots, .getStatus, .setLogBase:
            return true
        default:
            return false
        }
    }

    /// The number of file descriptors a message must carry.
    static func expectedFDs(_ request: VhostUserRequest, payload: PayloadReader) throws(VhostUserError) -> ClosedRange<Int> {
        switch request {
        case .setMemTable:
            let n = Int(try payload.u32(0))
            return n...n
        case .addMemReg, .setInflightFD, .setLogBase, .setLogFD, .setBackendReqFD:
            return 1...1
        case .remMemReg:
            return 0...1 // QEMU sends the region's fd along; it is not needed
        case .setVringKick, .setVringCall, .setVringErr:
            return try payload.u64(0) & vringNoFDFlag != 0 ? 0...0 : 1...1
        default:
            return 0...0
        }
    }

    // MARK: - Messages

    /// What one message led to: a reply (or REPLY_ACK) to send, a line to
    /// log, and whether the connection must close.
    package struct Outcome {
        package var reply: Reply?
        package var logLine: String?
        package var closeReason: String?
    }

    /// Checks and handles one message as it came off the socket. Shared by
    /// the server and the fuzz target, so both exercise the same path.
    package func process(_ message: VhostUserMessage) -> Outcome {
        guard let request = VhostUserRequest(rawValue: message.request) else {
            return Outcome(closeReason: "unknown request \(message.request)")
        }
        let needReply = message.flags & VhostUserFlags.needReply != 0
        let ackable = needReply && replyAckNegotiated && !Self.hasReply(request)
        do throws(VhostUserError) {
            let allowed = try Self.expectedFDs(request, payload: PayloadReader(bytes: message.payload))
            guard allowed.contains(message.fds.count) else {
                let expected = allowed.lowerBound == allowed.upperBound ? "\(allowed.lowerBound)" : "\(allowed)"
                throw VhostUserError.malformed("\(request) carries \(message.fds.count) file descriptors (expects \(expected))")
            }
            if let reply = try handle(request, message) { return Outcome(reply: reply) }
            return Outcome(reply: ackable ? Reply(payload: le64(0)) : nil)
        } catch {
            // REPLY_ACK tells the truth: non-zero for a message that failed.
            return Outcome(reply: ackable ? Reply(payload: le64(1)) : nil, logLine: "\(request): \(error)",
                           closeReason: error.closesConnection ? "\(request): \(error)" : nil)
        }
    }

    func handle(_ request: VhostUserRequest, _ message: VhostUserMessage) throws(VhostUserError) -> Reply? {
        let p = PayloadReader(bytes: message.payload)
        switch request {
        case .getFeatures:
            return Reply(payload: le64(offeredFeatures))
        case .setFeatures:
            try expectSize(message, 8)
            let requested = try p.u64(0)
            let unknown = requested & ~offeredFeatures
            guard unknown == 0 else { throw .invalid("features 0x\(String(unknown, radix: 16)) were not offered") }
            let loggingChanged = (features ^ requested) & VirtioFeature.logAll != 0
            features = requested
            featuresAcked = true
            // Without PROTOCOL_FEATURES, rings start enabled (vhost-user.rst "Ring states").
            if features & VirtioFeature.protocolFeatures == 0 {
                for i in vrings.indices { vrings[i].enabled = true }
            }
            // QEMU turns LOG_ALL on and off with the rings running: they
            // restart (draining their requests) to log, or to stop logging.
            if loggingChanged { try restartRunningRings() } else { try startReadyQueues() }
            return nil
        case .getProtocolFeatures:
            return Reply(payload: le64(Self.offeredProtocolFeatures))
        case .setProtocolFeatures:
            try expectSize(message, 8)
            let requested = try p.u64(0)
            guard requested & ~Self.offeredProtocolFeatures == 0 else {
                throw .invalid("protocol features 0x\(String(requested & ~Self.offeredProtocolFeatures, radix: 16)) were not offered")
            }
            protocolFeatures = requested
            return nil
        case .setOwner:
            try expectSize(message, 0)
            return nil
        case .resetOwner, .resetDevice:
            try expectSize(message, 0)
            resetRings()
            // A reset device starts afresh: requests marked in the old
            // region belong to the driver that was reset, and their saved
            // descriptors point at memory it no longer owns. A frontend that
            // tracks inflight I/O hands a region again (QEMU does at every start).
            inflight = nil
            dirtyLog = nil
            features = 0
            featuresAcked = false
            status = 0
            return nil
        case .getQueueNum:
            return Reply(payload: le64(UInt64(numQueues)))
        case .getMaxMemSlots:
            return Reply(payload: le64(UInt64(maxMemorySlots)))
        case .setMemTable:
            try setMemTable(message, p)
            return nil
        case .addMemReg:
            guard hasProtocolFeature(.configureMemSlots) else { throw .outOfOrder("ADD_MEM_REG without CONFIGURE_MEM_SLOTS") }
            try expectSize(message, 40)
            let fds = message.takeFDs()
            try addRegion(try readRegion(p, at: 8), fd: fds[0])
            try memoryChanged()
            return nil
        case .remMemReg:
            guard hasProtocolFeature(.configureMemSlots) else { throw .outOfOrder("REM_MEM_REG without CONFIGURE_MEM_SLOTS") }
            try expectSize(message, 40)
            let r = try readRegion(p, at: 8)
            guard let i = regions.firstIndex(where: {
                $0.region.guestPhysicalAddress == r.gpa && $0.region.size == r.size && $0.region.userAddress == r.uaddr
            }) else { throw .invalid("REM_MEM_REG names no mapped region (gpa 0x\(String(r.gpa, radix: 16)))") }
            regions.remove(at: i)
            try memoryChanged()
            return nil
        case .setVringNum:
            try expectSize(message, 8)
            let i = try vringIndex(p.u32(0))
            let num = Int(try p.u32(4))
            guard num > 0, num <= Int(DP_QUEUE_MAX_SIZE), num & (num - 1) == 0 else {
                throw .invalid("ring size \(num) is not a power of two between 1 and \(DP_QUEUE_MAX_SIZE)")
            }
            // What the config space announced (seg_max) was worked out for
            // rings up to this size.
            guard num <= disk.configuration.queueSize else {
                throw .invalid("ring size \(num) is larger than the disk's queue size \(disk.configuration.queueSize) (dpctl --queue-size)")
            }
            guard vrings[i].queue == nil else { throw .outOfOrder("SET_VRING_NUM on running ring \(i)") }
            vrings[i].num = num
            return nil
        case .setVringAddr:
            try expectSize(message, 40)
            let i = try vringIndex(p.u32(0))
            vrings[i].desc = try p.u64(8)
            vrings[i].used = try p.u64(16)
            vrings[i].avail = try p.u64(24)
            vrings[i].addressSet = true
            if vrings[i].queue != nil { vrings[i].base = stopRing(i) } // restarted on the new addresses
            try startReadyQueues()
            return nil
        case .setVringBase:
            try expectSize(message, 8)
            let i = try vringIndex(p.u32(0))
            let base = try p.u32(4)
            guard vrings[i].queue == nil else { throw .outOfOrder("SET_VRING_BASE on running ring \(i)") }
            try checkBase(base, ring: i)
            vrings[i].base = base
            vrings[i].baseSet = true
            return nil
        case .getVringBase:
            try expectSize(message, 8)
            let i = try vringIndex(p.u32(0))
            // While migrating, this is the switch-over: the destination's
            // frontend brings an inflight region of its own, so requests
            // the error policy holds would never run again there.
            let last = frontendStopsRing(i, by: "GET_VRING_BASE")
            // The ring is stopped: its notifiers are the frontend's to replace.
            closeNotifiers(i)
            var out: [UInt8] = []
            out.appendLE(UInt32(i))
            out.appendLE(last)
            return Reply(payload: out)
        case .setVringKick, .setVringCall, .setVringErr:
            try expectSize(message, 8)
            let value = try p.u64(0)
            guard value & ~(vringNoFDFlag | 0xFF) == 0 else { throw .invalid("reserved bits set in 0x\(String(value, radix: 16))") }
            let i = try vringIndex(UInt32(value & 0xFF))
            let fd = message.takeFDs().first ?? -1
            if request == .setVringKick && fd < 0 {
                throw .invalid("ring \(i): polling without a kick eventfd is not supported")
            }
            try setNotifier(request, ring: i, fd: fd)
            return nil
        case .setVringEnable:
            try expectSize(message, 8)
            let i = try vringIndex(p.u32(0))
            let enable = try p.u32(4)
            guard enable <= 1 else { throw .invalid("SET_VRING_ENABLE \(enable)") }
            vrings[i].enabled = enable == 1
            if enable == 0 {
                // A disabled ring keeps its place; popping resumes there when enabled.
                _ = frontendStopsRing(i, by: "SET_VRING_ENABLE 0")
            } else {
                try startReadyQueues()
            }
            return nil
        case .getConfig:
            return getConfig(message, p)
        case .setConfig:
            try setConfig(message, p)
            return nil
        case .setBackendReqFD:
            guard hasProtocolFeature(.backendReq) else { throw .outOfOrder("SET_BACKEND_REQ_FD without BACKEND_REQ") }
            backendChannel.replace(message.takeFDs()[0])
            return nil
        case .getInflightFD:
            return try getInflightFD(p)
        case .setInflightFD:
            try setInflightFD(message, p)
            return nil
        case .setStatus:
            try expectSize(message, 8)
            status = try p.u64(0)
            return nil
        case .getStatus:
            return Reply(payload: le64(status))
        case .setLogBase:
            try setLogBase(message, p)
            return Reply(payload: le64(0))
        case .setLogFD:
            // An eventfd to tell the frontend the log changed; QEMU neither
            // sends nor reads one, and the bitmap is all a migration needs.
            guard hasProtocolFeature(.logShmfd) else { throw .outOfOrder("SET_LOG_FD without LOG_SHMFD") }
            closeFD(message.takeFDs()[0])
            return nil
        }
    }

    // MARK: - Config space

    /// GET_CONFIG. A request we cannot answer (offset or size beyond the
    /// config space, a payload that disagrees with its size) gets an empty
    /// reply, as libvhost-user gives: the frontend sees the failure, and the
    /// connection and the disk's other state stay.
    private func getConfig(_ message: VhostUserMessage, _ p: PayloadReader) -> Reply {
        let header = Array(message.payload.prefix(12))
        guard header.count == 12, let offset = try? Int(p.u32(0)), let size = try? Int(p.u32(4)),
              message.payload.count == 12 + size, offset <= Self.configSpaceLimit, size <= Self.configSpaceLimit - offset
        else {
            logger.warning("disk \(disk.name): GET_CONFIG of \(message.payload.count) bytes asks for what the config space does not hold; answered empty")
            return Reply(payload: [])
        }
        // Newer frontends know longer layouts (zoned fields): what we do
        // not offer reads as zero, up to the largest config vhost-user carries.
        var config = BlkConfigSpace.bytes(for: disk, numQueues: numQueues, segMax: segMax)
        config += [UInt8](repeating: 0, count: max(0, offset + size - config.count))
        return Reply(payload: header + config[offset..<offset + size])
    }

    /// SET_CONFIG: only the writeback byte, and only with
    /// VIRTIO_BLK_F_CONFIG_WCE negotiated (QEMU's vhost_user_blk_set_config
    /// sends that one byte when the guest writes it). Anything else is
    /// refused with the connection kept: the REPLY_ACK says so.
    private func setConfig(_ message: VhostUserMessage, _ p: PayloadReader) throws(VhostUserError) {
        let offset = try p.u32(0), size = try p.u32(4), flags = try p.u32(8)
        guard message.payload.count == 12 + Int(size) else {
            throw .refused("SET_CONFIG announces \(size) bytes and carries \(message.payload.count - 12)")
        }
        guard offset == BlkConfigSpace.writebackOffset, size == 1 else {
            throw .refused("SET_CONFIG of \(size) byte(s) at offset \(offset): only the writeback byte (offset \(BlkConfigSpace.writebackOffset), 1 byte) may be written")
        }
        // VHOST_SET_CONFIG_TYPE_FRONTEND (0) or _MIGRATION (1).
        guard flags <= 1 else { throw .refused("SET_CONFIG flags 0x\(String(flags, radix: 16))") }
        guard features & VirtioFeature.blkConfigWCE != 0 else {
            throw .refused("SET_CONFIG of the writeback byte without VIRTIO_BLK_F_CONFIG_WCE negotiated")
        }
        let value = message.payload[12]
        guard value <= 1 else { throw .refused("SET_CONFIG writeback \(value) (0 or 1)") }
        let writeBack = value == 1
        let old: Bool
        do { old = try disk.setWriteCache(writeBack) } catch { throw .refused(error.description) }
        if old != writeBack {
            logger.notice("disk \(disk.name): write cache \(WriteCacheMode.name(old)) -> \(WriteCacheMode.name(writeBack)) (set by the guest)")
        }
    }

    /// The largest config space a vhost-user message carries.
    static let configSpaceLimit = 256

    // MARK: - Memory

    private func readRegion(_ p: PayloadReader, at offset: Int) throws(VhostUserError)
        -> (gpa: UInt64, size: UInt64, uaddr: UInt64, mmapOffset: UInt64) {
        (try p.u64(offset), try p.u64(offset + 8), try p.u64(offset + 16), try p.u64(offset + 24))
    }

    private func setMemTable(_ message: VhostUserMessage, _ p: PayloadReader) throws(VhostUserError) {
        let count = Int(try p.u32(0))
        guard count <= memTableMaxRegions else { throw .invalid("\(count) memory regions (at most \(memTableMaxRegions))") }
        try expectSize(message, 8 + 32 * count)
        let fds = message.takeFDs()
        var fresh: [Region] = []
        var failure: VhostUserError?
        do throws(VhostUserError) {
            var sizes: [UInt64] = []
            for i in 0..<count { sizes.append(try readRegion(p, at: 8 + 32 * i).size) }
            try checkGuestMemoryTotal(sizes)
        } catch {
            failure = error
        }
        for i in 0..<count {
            if failure == nil {
                do {
                    fresh.append(try mapRegion(try readRegion(p, at: 8 + 32 * i), fd: fds[i]))
                } catch {
                    failure = error
                }
            }
            closeFD(fds[i])
        }
        if let failure { throw failure }
        let old = regions
        regions = fresh
        do {
            try memoryChanged()
        } catch {
            regions = old
            throw error
        }
    }

    private func addRegion(_ r: (gpa: UInt64, size: UInt64, uaddr: UInt64, mmapOffset: UInt64), fd: Int32) throws(VhostUserError) {
        defer { closeFD(fd) }
        guard regions.count < maxMemorySlots else { throw .invalid("more than \(maxMemorySlots) memory regions") }
        try checkGuestMemoryTotal(regions.map(\.region.size) + [r.size])
        regions.append(try mapRegion(r, fd: fd))
    }

    private func checkGuestMemoryTotal(_ sizes: [UInt64]) throws(VhostUserError) {
        var total: UInt64 = 0
        for size in sizes {
            let (sum, overflow) = total.addingReportingOverflow(size)
            guard !overflow, sum <= maxGuestMemoryBytes else {
                throw .invalid("guest memory of more than \(maxGuestMemoryBytes >> 40) TiB in all")
            }
            total = sum
        }
    }

    /// Maps a region, checking its sizes against the file first.
    private func mapRegion(_ r: (gpa: UInt64, size: UInt64, uaddr: UInt64, mmapOffset: UInt64), fd: Int32) throws(VhostUserError) -> Region {
        guard r.size > 0 else { throw .invalid("memory region of size 0") }
        let (end, overflow) = r.mmapOffset.addingReportingOverflow(r.size)
        guard !overflow else { throw .invalid("memory region offset 0x\(String(r.mmapOffset, radix: 16)) + size overflows") }
        var fileSize: UInt64 = 0
        let ret = dps_fd_size(fd, &fileSize)
        guard ret == 0 else { throw .system("fstat of a memory region fd", -ret) }
        guard end <= fileSize else {
            throw .invalid("memory region [0x\(String(r.mmapOffset, radix: 16)), +0x\(String(r.size, radix: 16))) runs past its file (\(fileSize) bytes)")
        }
        // From the page holding the region's start (a huge page on
        // hugetlbfs), not from the file's: an offset of terabytes into a
        // sparse file must not cost that much address space.
        // Whole units at both ends: munmap of a hugetlbfs mapping fails
        // (and it stays) unless its length is huge pages.
        let unit = dps_fd_map_alignment(fd)
        let start = r.mmapOffset & ~(unit - 1)
        let (rounded, tooLong) = (end - start).addingReportingOverflow(unit - 1)
        guard !tooLong else { throw .invalid("memory region [0x\(String(r.mmapOffset, radix: 16)), +0x\(String(r.size, radix: 16))) is too large") }
        let mapping = try SharedMapping(fd: fd, offset: start, length: rounded & ~(unit - 1))
        let host = UInt(bitPattern: mapping.base) + UInt(r.mmapOffset - start)
        return Region(region: MemoryRegion(guestPhysicalAddress: r.gpa, size: r.size, userAddress: r.uaddr, hostAddress: host),
                      mapping: mapping)
    }

    /// Builds a new table and points running queues at it. The old mappings
    /// go when the last queue lets go of the old table.
    private func memoryChanged() throws(VhostUserError) {
        let mappings = regions.map(\.mapping)
        let table: GuestMemory
        do {
            table = try GuestMemory(regions: regions.map(\.region), release: { withExtendedLifetime(mappings) {} })
        } catch {
            throw .invalid("memory table rejected: \(error.description) (overlapping or wrapping regions)")
        }
        for i in vrings.indices {
            guard let queue = vrings[i].queue else { continue }
            do {
                try queue.setMemory(table)
            } catch {
                throw .invalid("ring \(i) lies outside the new memory table")
            }
        }
        memory = table
        try startReadyQueues()
    }

    // MARK: - Rings

    private func vringIndex(_ raw: UInt32) throws(VhostUserError) -> Int {
        guard raw < UInt32(numQueues) else { throw .invalid("queue index \(raw) out of range (the disk has \(numQueues))") }
        return Int(raw)
    }

    /// An old fd is closed only once no running queue uses it: its number
    /// could otherwise be reused by the next open, and get our writes.
    private func setNotifier(_ request: VhostUserRequest, ring i: Int, fd: Int32) throws(VhostUserError) {
        if fd >= 0 {
            // Call and err fds are written by the IOThread: never let a write block.
            let ret = dps_notifier_check(fd, request != .setVringKick)
            if ret != 0 {
                closeFD(fd)
                throw .invalid("ring \(i): the fd of \(request) is not a usable eventfd"
                               + (ret == -EINVAL ? "" : " (\(DataPlaneError.message(-ret)))"))
            }
        }
        let old: Int32
        if request == .setVringKick {
            old = vrings[i].kick
            vrings[i].kick = fd
            // The IOThread waits on the kick fd: stop the ring (its requests
            // complete) before the old one goes, then start on the new one.
            if vrings[i].queue != nil { vrings[i].base = stopRing(i) }
        } else {
            if request == .setVringCall {
                old = vrings[i].call
                vrings[i].call = fd
            } else {
                old = vrings[i].err
                vrings[i].err = fd
            }
            // Swapped in place (QEMU does this when the guest masks a vector):
            // a restart would fail requests the error policy holds.
            if let queue = vrings[i].queue {
                do {
                    try queue.setNotifiers(callFD: vrings[i].call, errorFD: vrings[i].err)
                } catch {
                    vrings[i].base = stopRing(i)
                }
            }
        }
        if old >= 0 { closeFD(old) }
        try startReadyQueues()
    }

    /// The frontend stops a ring (QEMU's vhost_dev_stop: SET_VRING_ENABLE 0,
    /// then GET_VRING_BASE). While logging, that is a migration's
    /// switch-over: the destination's frontend brings an inflight region of
    /// its own, so requests the error policy holds would never run again
    /// there; they fail instead. Logs when and how long the drain took.
    private func frontendStopsRing(_ i: Int, by request: String) -> UInt32 {
        guard vrings[i].queue != nil else { return vrings[i].base }
        let clock = ContinuousClock(), began = clock.now
        let last = stopRing(i, failingHeld: loggingDirtyPages)
        let drained = (clock.now - began).components
        let place = packedNegotiated ? "base 0x\(String(last, radix: 16))" : "avail index \(last)"
        logger.info("disk \(disk.name): queue \(i) stopped by \(request) at \(place), its requests drained in \(drained.seconds * 1_000_000 + drained.attoseconds / 1_000_000_000_000) us",
                    metadata: ["queue": "\(i)"])
        return last
    }

    /// Stops a ring (its in-flight requests complete) and returns where it
    /// stopped: GET_VRING_BASE's value for the ring's layout.
    private func stopRing(_ i: Int, failingHeld: Bool = false) -> UInt32 {
        guard let queue = vrings[i].queue else { return vrings[i].base }
        vrings[i].queue = nil
        let held = failingHeld ? queue.statistics().heldRequests : 0
        let last = plane.stopQueueBase(disk: disk, index: i, frontend: frontend, failingHeld: failingHeld)
            ?? queue.stopBase(failingHeld: failingHeld)
        if held > 0 {
            logger.error("ring \(i): \(held) request(s) held by the error policy failed with an I/O error: the guest migrates, and its destination cannot run them",
                         metadata: ["queue": "\(i)"])
        }
        vrings[i].base = last
        vrings[i].baseSet = true
        return last
    }

    /// SET_VRING_BASE's value for the negotiated layout. Split: a 16-bit
    /// avail index. Packed (vhost-user.rst "Vring descriptor indices for
    /// packed virtqueues"): both 15-bit positions below the ring size (the
    /// spec's 2.8 ring indices; checked here when the size is known, and
    /// again when the ring starts), at most a ring's worth in flight.
    private func checkBase(_ base: UInt32, ring i: Int) throws(VhostUserError) {
        guard packedNegotiated else {
            guard base <= UInt32(UInt16.max) else {
                throw .invalid("ring \(i): base 0x\(String(base, radix: 16)) is not a split-ring avail index (VIRTIO_F_RING_PACKED was not negotiated)")
            }
            return
        }
        let num = vrings[i].num
        guard num > 0 else { return }
        let avail = Int(base & 0x7fff), used = Int(base >> 16 & 0x7fff)
        guard avail < num, used < num else {
            throw .invalid("ring \(i): packed base 0x\(String(base, radix: 16)) names avail position \(avail) and used position \(used), not both below the ring size \(num)")
        }
        let availPos = avail + (base & 0x8000 != 0 ? 0 : num), usedPos = used + (base & 0x8000_0000 != 0 ? 0 : num)
        guard (availPos - usedPos + 2 * num) % (2 * num) <= num else {
            throw .invalid("ring \(i): packed base 0x\(String(base, radix: 16)) puts more than the ring's \(num) descriptors between its used and avail positions")
        }
    }

    private func closeNotifiers(_ i: Int) {
        for fd in [vrings[i].kick, vrings[i].call] where fd >= 0 { closeFD(fd) }
        vrings[i].kick = -1
        vrings[i].call = -1
    }

    private func startReadyQueues() throws(VhostUserError) {
        guard featuresAcked, let memory else { return }
        // LOG_ALL without a log yet: QEMU starts a device during a
        // migration (a reconnect) with LOG_ALL in SET_FEATURES and the log
        // after the rings. A ring started now would write pages no log
        // marks (requests the inflight region hands back run at once).
        if features & VirtioFeature.logAll != 0 && dirtyLog == nil {
            if vrings.contains(where: { $0.queue == nil && $0.enabled && $0.kick >= 0 }) {
                logger.info("disk \(disk.name): rings wait for the dirty log (LOG_ALL is negotiated, SET_LOG_BASE has not come yet)")
            }
            return
        }
        for i in vrings.indices {
            let v = vrings[i]
            guard v.queue == nil, v.enabled, v.num > 0, v.addressSet, v.kick >= 0 else { continue }
            var config = VirtqueueConfiguration(
                size: v.num, descriptorTable: v.desc, availRing: v.avail, usedRing: v.used, addressesAreUser: true,
                eventIndex: features & VirtioFeature.ringEventIndex != 0,
                indirectDescriptors: features & VirtioFeature.ringIndirectDesc != 0,
                lastAvailIndex: UInt16(truncatingIfNeeded: v.base), kickFD: v.kick, callFD: v.call, errorFD: v.err)
            // SET_VRING_BASE may have come before SET_FEATURES or SET_VRING_NUM.
            let base = packedNegotiated && !v.baseSet ? 0x8000_8000 : v.base
            try checkBase(base, ring: i)
            if packedNegotiated {
                config.packed = true
                config.packedBase = base
            }
            if loggingDirtyPages, let log = dirtyLog {
                config.dirtyLog = UInt(bitPattern: log.base)
                config.dirtyLogSize = UInt64(log.length)
            }
            if let inflight {
                guard i < inflight.numQueues, v.num <= inflight.queueSize else {
                    throw .invalid("ring \(i) of size \(v.num) does not fit the inflight region (\(inflight.numQueues) queues of \(inflight.queueSize))")
                }
                guard inflight.packed == packedNegotiated else {
                    throw .invalid("ring \(i): the inflight region was laid out for \(inflight.packed ? "packed" : "split") rings and \(packedNegotiated ? "packed" : "split") rings were negotiated (SET_FEATURES must come before GET_INFLIGHT_FD / SET_INFLIGHT_FD)")
                }
                config.inflight = UInt(bitPattern: inflight.mapping.base) + UInt(UInt64(i) * inflight.perQueue)
            }
            do {
                vrings[i].queue = try plane.startQueue(disk: disk, index: i, frontend: frontend, memory: memory, configuration: config)
            } catch {
                throw .invalid(error.description)
            }
            let thread = vrings[i].queue?.thread.configuration.name ?? "?"
            var place = packedNegotiated ? "packed ring, base 0x\(String(v.base, radix: 16))" : "avail index \(v.base)"
            if let started = vrings[i].queue?.statistics(), started.recoveredRequests > 0 {
                let n = started.recoveredRequests
                place += ", \(n) request\(n == 1 ? "" : "s") from the inflight region run again, resumed at avail "
                    + "\(started.lastAvailIndex) used \(started.usedIndex)"
            }
            if config.dirtyLog != 0 { place += ", logging dirty pages" }
            logger.info("disk \(disk.name): queue \(i) started (size \(v.num), \(place), \(thread))",
                        metadata: ["queue": "\(i)", "iothread": "\(thread)"])
        }
    }

    /// Restarts the running rings on what they should use now (the dirty
    /// log, on or off): a stop drains their requests, which log as they go.
    private func restartRunningRings() throws(VhostUserError) {
        for i in vrings.indices where vrings[i].queue != nil { _ = stopRing(i) }
        try startReadyQueues()
    }

    // MARK: - Dirty log

    /// SET_LOG_BASE (LOG_SHMFD): the bitmap's memfd, mmap_size and
    /// mmap_offset. A new log replaces the old one under running rings,
    /// which restart on it.
    private func setLogBase(_ message: VhostUserMessage, _ p: PayloadReader) throws(VhostUserError) {
        guard hasProtocolFeature(.logShmfd) else { throw .outOfOrder("SET_LOG_BASE without LOG_SHMFD") }
        try expectSize(message, 16)
        let fd = message.takeFDs()[0]
        defer { closeFD(fd) }
        let size = try p.u64(0)
        let offset = try p.u64(8)
        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        guard size > 0, size <= maxDirtyLogBytes, offset % page == 0, offset <= UInt64(Int64.max) - size else {
            throw .invalid("dirty log of \(size) bytes at offset \(offset) (at most \(maxDirtyLogBytes) bytes, at a page boundary)")
        }
        var fileSize: UInt64 = 0
        guard dps_fd_size(fd, &fileSize) == 0, fileSize >= offset + size else {
            throw .invalid("dirty log fd is smaller than the \(offset + size) bytes announced")
        }
        let mapping = try SharedMapping(fd: fd, offset: offset, length: size)
        let logging = features & VirtioFeature.logAll != 0
        if logging { for i in vrings.indices where vrings[i].queue != nil { _ = stopRing(i) } }
        dirtyLog = mapping
        logger.info("disk \(disk.name): dirty log of \(size) bytes mapped (guest memory up to \((size * 8 * 4096) >> 20) MiB)")
        if logging { try startReadyQueues() }
    }

    private func resetRings() {
        for i in vrings.indices {
            _ = stopRing(i)
            closeNotifiers(i)
            if vrings[i].err >= 0 { closeFD(vrings[i].err) }
        }
        vrings = Array(repeating: Vring(), count: numQueues)
    }

    /// Back to the state a new frontend expects: rings stopped (in-flight
    /// requests complete first), fds closed, memory unmapped.
    package func reset() {
        resetRings()
        memory = nil
        regions = []
        inflight = nil
        dirtyLog = nil
        features = 0
        featuresAcked = false
        protocolFeatures = 0
        status = 0
        backendChannel.replace(-1)
    }

    /// Queue statistics of the running rings.
    var runningQueues: [Virtqueue] { vrings.compactMap(\.queue) }

    /// The frontend handed an inflight region: a stop leaves requests the
    /// error policy holds marked there rather than failing them.
    var tracksInflight: Bool { inflight != nil }

    // MARK: - Inflight region

    private func getInflightFD(_ p: PayloadReader) throws(VhostUserError) -> Reply {
        guard hasProtocolFeature(.inflightShmfd) else { throw .outOfOrder("GET_INFLIGHT_FD without INFLIGHT_SHMFD") }
        // A running ring marks requests in the current region: replacing it
        // would unmap memory the IOThread writes (a fuzzer finding).
        guard vrings.allSatisfy({ $0.queue == nil }) else { throw .outOfOrder("GET_INFLIGHT_FD while rings run") }
        let queues = Int(try p.u16(16))
        let queueSize = Int(try p.u16(18))
        guard queues > 0, queues <= numQueues, queueSize > 0, queueSize <= Int(DP_QUEUE_MAX_SIZE) else {
            throw .invalid("inflight region for \(queues) queues of \(queueSize)")
        }
        // The layout follows the features negotiated (QEMU sends SET_FEATURES
        // first: vhost_dev_prepare_inflight), the same for every queue.
        let perQueue = dp_inflight_queue_size(UInt32(queueSize), packedNegotiated)
        let size = perQueue * UInt64(queues)
        let fd = dps_memfd("dataplane-inflight", size)
        guard fd >= 0 else { throw .system("memfd for the inflight region", -fd) }
        do {
            inflight = Inflight(mapping: try SharedMapping(fd: fd, length: size), numQueues: queues,
                                queueSize: queueSize, perQueue: perQueue, packed: packedNegotiated)
        } catch {
            closeFD(fd)
            throw error
        }
        var out: [UInt8] = []
        out.appendLE(size)
        out.appendLE(UInt64(0))
        out.appendLE(UInt16(queues))
        out.appendLE(UInt16(queueSize))
        out += [0, 0, 0, 0]
        return Reply(payload: out, fds: [fd])
    }

    private func setInflightFD(_ message: VhostUserMessage, _ p: PayloadReader) throws(VhostUserError) {
        guard hasProtocolFeature(.inflightShmfd) else { throw .outOfOrder("SET_INFLIGHT_FD without INFLIGHT_SHMFD") }
        guard message.payload.count >= 20 else { throw .malformed("SET_INFLIGHT_FD payload of \(message.payload.count) bytes") }
        let fd = message.takeFDs()[0]
        defer { closeFD(fd) }
        let size = try p.u64(0)
        let offset = try p.u64(8)
        let queues = Int(try p.u16(16))
        let queueSize = Int(try p.u16(18))
        guard queues > 0, queues <= numQueues, queueSize > 0, queueSize <= Int(DP_QUEUE_MAX_SIZE) else {
            throw .invalid("inflight region for \(queues) queues of \(queueSize)")
        }
        let perQueue = dp_inflight_queue_size(UInt32(queueSize), packedNegotiated)
        guard offset == 0, size >= perQueue * UInt64(queues) else {
            throw .invalid("inflight region of \(size) bytes at offset \(offset) is too small for \(queues) queues of \(queueSize)")
        }
        var fileSize: UInt64 = 0
        guard dps_fd_size(fd, &fileSize) == 0, fileSize >= size else {
            throw .invalid("inflight fd is smaller than the \(size) bytes announced")
        }
        guard vrings.allSatisfy({ $0.queue == nil }) else { throw .outOfOrder("SET_INFLIGHT_FD while rings run") }
        // Only what we use of it: the size announced may be far larger.
        inflight = Inflight(mapping: try SharedMapping(fd: fd, length: perQueue * UInt64(queues)), numQueues: queues,
                            queueSize: queueSize, perQueue: perQueue, packed: packedNegotiated)
    }

    // MARK: - Helpers

    private func expectSize(_ message: VhostUserMessage, _ size: Int) throws(VhostUserError) {
        guard message.payload.count == size else {
            throw .malformed("payload of \(message.payload.count) bytes where \(size) are expected")
        }
    }

    private func le64(_ v: UInt64) -> [UInt8] {
        var b: [UInt8] = []
        b.appendLE(v)
        return b
    }
}
