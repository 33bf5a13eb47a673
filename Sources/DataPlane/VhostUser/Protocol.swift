/// vhost-user wire format (QEMU docs/interop/vhost-user.rst), backend side.

enum VhostUserRequest: UInt32 {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    /// SET_BACKEND_REQ_FD (the spec's former SET_SLAVE_REQ_FD): the frontend's
    /// end of the backend-request channel, where we send CONFIG_CHANGE_MSG.
    case setBackendReqFD = 21
    case getConfig = 24
    case setConfig = 25
    case getInflightFD = 31
    case setInflightFD = 32
    case resetDevice = 34
    case getMaxMemSlots = 36
    case addMemReg = 37
    case remMemReg = 38
    case setStatus = 39
    case getStatus = 40
}

extension VhostUserRequest {
    /// QEMU's name of a request ("VHOST_USER_GET_VRING_BASE"), or its number.
    static func name(_ raw: UInt32) -> String {
        guard let request = VhostUserRequest(rawValue: raw) else { return "request \(raw)" }
        var name = "VHOST_USER_"
        var previous: Character = "_"
        for c in String(describing: request) {
            if c.isUppercase && previous.isLowercase { name.append("_") }
            name += c.uppercased()
            previous = c
        }
        return name
    }
}

enum VhostUserFlags {
    static let versionMask: UInt32 = 0x3
    static let version: UInt32 = 0x1
    static let reply: UInt32 = 1 << 2
    static let needReply: UInt32 = 1 << 3
}

/// Protocol feature bits (VHOST_USER_PROTOCOL_F_*).
enum ProtocolFeature: UInt64 {
    case mq = 0
    case logShmfd = 1
    case replyAck = 3
    /// BACKEND_REQ (the spec's former SLAVE_REQ): a channel for messages from us.
    case backendReq = 5
    case config = 9
    case inflightShmfd = 12
    case resetDevice = 13
    case configureMemSlots = 15
    case status = 16

    var mask: UInt64 { 1 << rawValue }
}

/// Virtio feature bits we care about.
enum VirtioFeature {
    static let blkSizeMax: UInt64 = 1 << 1
    static let blkSegMax: UInt64 = 1 << 2
    static let blkReadOnly: UInt64 = 1 << 5
    static let blkBlockSize: UInt64 = 1 << 6
    static let blkFlush: UInt64 = 1 << 9
    /// VIRTIO_BLK_F_CONFIG_WCE: the guest may change the writeback byte.
    static let blkConfigWCE: UInt64 = 1 << 11
    static let blkTopology: UInt64 = 1 << 10
    static let blkMultiQueue: UInt64 = 1 << 12
    static let blkDiscard: UInt64 = 1 << 13
    static let blkWriteZeroes: UInt64 = 1 << 14
    /// VHOST_F_LOG_ALL: dirty page logging for live migration (vhost-user.rst "Migration").
    static let logAll: UInt64 = 1 << 26
    static let ringIndirectDesc: UInt64 = 1 << 28
    static let ringEventIndex: UInt64 = 1 << 29
    static let protocolFeatures: UInt64 = 1 << 30
    static let version1: UInt64 = 1 << 32
    /// VIRTIO_F_RING_PACKED (virtio 1.2, 2.8).
    static let ringPacked: UInt64 = 1 << 34
}

/// Requests we send on the backend channel (VHOST_USER_BACKEND_*).
enum VhostUserBackendRequest: UInt32 {
    /// The config space changed: the frontend reads it again (GET_CONFIG)
    /// and tells the guest (QEMU's vhost_user_blk_handle_config_change
    /// passes a capacity change on).
    case configChangeMsg = 2
}

/// The header is 12 bytes: request, flags, payload size.
let vhostUserHeaderSize = 12
/// Larger payloads are refused: the biggest legitimate one (a memory table
/// of 8 regions, or GET_CONFIG) is far below this.
let vhostUserMaxPayload = 4096
/// VHOST_USER_VRING_NOFD_MASK in SET_VRING_KICK/CALL/ERR.
let vringNoFDFlag: UInt64 = 1 << 8
/// Regions SET_MEM_TABLE carries at most (VHOST_MEMORY_BASELINE_NREGIONS).
let memTableMaxRegions = 8
/// The largest dirty log SET_LOG_BASE may map: one bit per 4 KiB page, so
/// 1 GiB covers 32 TiB of guest memory.
let maxDirtyLogBytes: UInt64 = 1 << 30
/// Memory slots offered with CONFIGURE_MEM_SLOTS.
let maxMemorySlots = 32
/// Guest memory one frontend may map into us, all its regions together.
/// Mappings of a sparse file cost address space, not memory, but a process
/// has only 128 TiB of that: one frontend must not take it all.
let maxGuestMemoryBytes: UInt64 = 16 << 40

/// One message, its payload and the file descriptors that came with it.
/// Descriptors not taken by a handler are closed when the message is dropped.
package final class VhostUserMessage {
    var request: UInt32
    var flags: UInt32
    var payload: [UInt8]
    private(set) var fds: [Int32]

    package init(request: UInt32, flags: UInt32, payload: [UInt8], fds: [Int32]) {
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds
    }

    /// Takes ownership of the descriptors (they will not be closed here).
    func takeFDs() -> [Int32] {
        defer { fds = [] }
        return fds
    }

    deinit { fds.forEach { _ = closeFD($0) } }
}

/// Little-endian reads and writes with bounds checks; a short payload is a
/// protocol error, never a crash.
struct PayloadReader {
    let bytes: [UInt8]

    func u16(_ offset: Int) throws(VhostUserError) -> UInt16 { UInt16(truncatingIfNeeded: try read(offset, 2)) }
    func u32(_ offset: Int) throws(VhostUserError) -> UInt32 { UInt32(truncatingIfNeeded: try read(offset, 4)) }
    func u64(_ offset: Int) throws(VhostUserError) -> UInt64 { try read(offset, 8) }

    private func read(_ offset: Int, _ width: Int) throws(VhostUserError) -> UInt64 {
        guard offset >= 0, width <= bytes.count, offset <= bytes.count - width else {
            throw .malformed("payload of \(bytes.count) bytes is too short (needs \(offset + width))")
        }
        var value: UInt64 = 0
        for i in 0..<width { value |= UInt64(bytes[offset + i]) << (8 * UInt64(i)) }
        return value
    }
}

extension Array where Element == UInt8 {
    mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }
}

/// Why a message failed. Every case closes the connection except `refused`,
/// which only answers non-zero (REPLY_ACK) and carries on.
enum VhostUserError: Error, Equatable, CustomStringConvertible {
    case malformed(String)
    case outOfOrder(String)
    case invalid(String)
    case refused(String)
    case system(String, Int32)

    var closesConnection: Bool {
        if case .refused = self { return false }
        return true
    }

    var description: String {
        switch self {
        case .malformed(let s): return "malformed message: \(s)"
        case .outOfOrder(let s): return "message out of order: \(s)"
        case .invalid(let s): return "invalid request: \(s)"
        case .refused(let s): return "refused: \(s)"
        case .system(let s, let err): return "\(s): \(DataPlaneError.message(err))"
        }
    }
}
