import CDataPlane
import Synchronization

/// I/O limits of a disk or a throttle group, with QEMU's semantics and
/// names (a drive's `throttling.*` options without that prefix): bytes and
/// I/Os a second for total, reads and writes, each with a burst rate
/// (`-max`) and how long a burst may last (`-max-length`, seconds), and
/// `iops-size` (a larger request counts as size / iops-size I/Os). 0
/// means no limit. Reads count as reads, writes and write-zeroes as
/// writes; flush, discard and get-id are not limited.
public struct IOLimits: Sendable, Equatable, Codable, CustomStringConvertible {
    /// One leaky bucket.
    public struct Limit: Sendable, Equatable, Codable {
        /// Units a second (bytes or I/Os); 0: no limit.
        public var rate: UInt64
        /// Burst rate; 0: bursts of rate / 10 units.
        public var max: UInt64
        /// Seconds a burst at `max` may last; 0 or 1: one.
        public var maxLength: UInt64

        public init(rate: UInt64 = 0, max: UInt64 = 0, maxLength: UInt64 = 0) {
            self.rate = rate
            self.max = max
            self.maxLength = maxLength
        }
    }

    /// The six buckets, by QEMU's names, in QEMU's order (BucketType).
    public enum Kind: String, Sendable, CaseIterable, Codable {
        case bpsTotal = "bps-total", bpsRead = "bps-read", bpsWrite = "bps-write"
        case iopsTotal = "iops-total", iopsRead = "iops-read", iopsWrite = "iops-write"
    }

    /// QEMU's THROTTLE_VALUE_MAX: no rate or burst may be larger.
    public static let maxValue: UInt64 = DP_THROTTLE_VALUE_MAX

    public var limits: [Kind: Limit] = [:]
    /// A request larger than this counts as size / iopsSize I/Os; 0: one.
    public var iopsSize: UInt64 = 0

    public init(_ limits: [Kind: Limit] = [:], iopsSize: UInt64 = 0) {
        self.limits = limits.filter { $0.value != Limit() } // as the subscript keeps them: equal limits compare equal
        self.iopsSize = iopsSize
    }

    public subscript(kind: Kind) -> Limit {
        get { limits[kind] ?? Limit() }
        set { limits[kind] = newValue == Limit() ? nil : newValue }
    }

    /// Every key, as options and config files spell it: `iops-total`,
    /// `iops-total-max`, `iops-total-max-length`, ..., `iops-size`.
    public static let keys: [String] = Kind.allCases.flatMap { [$0.rawValue, $0.rawValue + "-max", $0.rawValue + "-max-length"] }
        + ["iops-size"]

    /// A value by key (nil: no such key).
    public subscript(key key: String) -> UInt64? {
        get {
            if key == "iops-size" { return iopsSize }
            guard let (kind, field) = Self.split(key) else { return nil }
            let limit = self[kind]
            return field == 0 ? limit.rate : field == 1 ? limit.max : limit.maxLength
        }
        set {
            let value = newValue ?? 0
            if key == "iops-size" { iopsSize = value; return }
            guard let (kind, field) = Self.split(key) else { return }
            var limit = self[kind]
            switch field {
            case 0: limit.rate = value
            case 1: limit.max = value
            default: limit.maxLength = value
            }
            self[kind] = limit
        }
    }

    private static func split(_ key: String) -> (Kind, Int)? {
        for kind in Kind.allCases {
            if key == kind.rawValue { return (kind, 0) }
            if key == kind.rawValue + "-max" { return (kind, 1) }
            if key == kind.rawValue + "-max-length" { return (kind, 2) }
        }
        return nil
    }

    /// No limit set (a max-length or iops-size alone limits nothing, and is refused).
    public var isUnlimited: Bool { limits.values.allSatisfy { $0.rate == 0 } }

    /// The keys set, `key=value` separated by spaces ("none" without any).
    public var description: String {
        let set = Self.keys.compactMap { key in self[key: key].flatMap { $0 == 0 ? nil : "\(key)=\($0)" } }
        return set.isEmpty ? "none" : set.joined(separator: " ")
    }

    /// Applies `changes` (keys with their new values; 0 removes) to these limits.
    public func merging(_ changes: [String: UInt64]) throws(IOLimitsError) -> IOLimits {
        var merged = self
        for (key, value) in changes {
            guard Self.keys.contains(key) else { throw .unknownKey(key) }
            merged[key: key] = value
        }
        return merged
    }

    /// QEMU's checks (util/throttle.c, throttle_is_valid), each error naming its key.
    public func validate() throws(IOLimitsError) {
        for (total, read, write) in [(Kind.bpsTotal, Kind.bpsRead, Kind.bpsWrite), (.iopsTotal, .iopsRead, .iopsWrite)] {
            for other in [read, write] {
                if self[total].rate != 0 && self[other].rate != 0 {
                    throw .totalWithDirection(total: total.rawValue, direction: other.rawValue)
                }
                if self[total].max != 0 && self[other].max != 0 {
                    throw .totalWithDirection(total: total.rawValue + "-max", direction: other.rawValue + "-max")
                }
            }
        }
        if iopsSize != 0 && self[.iopsTotal].rate == 0 && self[.iopsRead].rate == 0 && self[.iopsWrite].rate == 0 {
            throw .iopsSizeWithoutIOPS
        }
        for kind in Kind.allCases {
            let limit = self[kind], key = kind.rawValue
            if limit.rate > DP_THROTTLE_VALUE_MAX { throw .tooLarge(key: key, value: limit.rate) }
            if limit.max > DP_THROTTLE_VALUE_MAX { throw .tooLarge(key: key + "-max", value: limit.max) }
            if limit.maxLength > 1 && limit.max == 0 { throw .lengthWithoutMax(key: key) }
            if limit.max != 0 && limit.rate == 0 { throw .maxWithoutRate(key: key) }
            if limit.max != 0 && limit.max < limit.rate {
                throw .maxBelowRate(key: key, rate: limit.rate, max: limit.max)
            }
            if limit.max != 0 && limit.maxLength > DP_THROTTLE_VALUE_MAX / limit.max {
                throw .burstTooLong(key: key)
            }
        }
    }

    var cValue: dp_throttle_config {
        var c = dp_throttle_config()
        withUnsafeMutableBytes(of: &c.limits) { raw in
            let buckets = raw.bindMemory(to: dp_throttle_limit.self)
            for (i, kind) in Kind.allCases.enumerated() {
                let limit = self[kind]
                buckets[i] = dp_throttle_limit(avg: limit.rate, max: limit.max, max_length: limit.maxLength)
            }
        }
        c.iops_size = iopsSize
        return c
    }

    // Codable as flat QEMU keys ({"iops-total": 1000, "bps-read-max": ...}): what
    // status prints and a config file takes.
    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Key.self)
        var changes: [String: UInt64] = [:]
        for key in c.allKeys {
            guard Self.keys.contains(key.stringValue) else {
                throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: IOLimitsError.unknownKey(key.stringValue).description)
            }
            changes[key.stringValue] = try c.decode(UInt64.self, forKey: key)
        }
        self = try IOLimits().merging(changes)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: Key.self)
        for key in Self.keys { if let v = self[key: key], v != 0 { try c.encode(v, forKey: Key(stringValue: key)) } }
    }
}

/// Why limits were refused; each names the key to change.
public enum IOLimitsError: Error, Equatable, CustomStringConvertible {
    case unknownKey(String)
    case totalWithDirection(total: String, direction: String)
    case iopsSizeWithoutIOPS
    case tooLarge(key: String, value: UInt64)
    case lengthWithoutMax(key: String)
    case maxWithoutRate(key: String)
    case maxBelowRate(key: String, rate: UInt64, max: UInt64)
    case burstTooLong(key: String)
    case unknownDisk

    public var description: String {
        switch self {
        case let .unknownKey(key):
            return "unknown I/O limit \(key.debugDescription) (known: \(IOLimits.keys.joined(separator: ", ")))"
        case let .totalWithDirection(total, direction):
            return "\(total) and \(direction) cannot both be set (as in QEMU): set \(total)=0 to limit reads and writes apart, or \(direction)=0"
        case .iopsSizeWithoutIOPS:
            return "iops-size needs an iops limit (iops-total, iops-read or iops-write)"
        case let .tooLarge(key, value):
            return "\(key)=\(value) is over the largest limit, \(DP_THROTTLE_VALUE_MAX)"
        case let .lengthWithoutMax(key):
            return "\(key)-max-length needs \(key)-max (the burst rate it lasts at)"
        case let .maxWithoutRate(key):
            return "\(key)-max needs \(key) (the rate a burst returns to)"
        case let .maxBelowRate(key, rate, max):
            return "\(key)-max=\(max) is below \(key)=\(rate): a burst rate must be at least the rate"
        case let .burstTooLong(key):
            return "\(key)-max times \(key)-max-length is over \(DP_THROTTLE_VALUE_MAX): shorten the burst"
        case .unknownDisk:
            return "the disk is not served by this data plane"
        }
    }
}

/// A set of buckets (a C dp_throttle): one disk's own, or a named group's
/// that several disks share (QEMU's throttle groups). Requests of all its
/// disks, on any IOThreads, count against the same buckets.
public final class ThrottleGroup: Sendable {
    private struct Handle: @unchecked Sendable {
        // Unchecked: its buckets are atomics; dp_throttle_set takes one setter at a time (the mutex below).
        let pointer: OpaquePointer
    }

    /// The group's name; nil for a disk's own limits.
    public let name: String?
    private let throttle: Handle
    private let current = Mutex<IOLimits>(IOLimits())
    var handle: OpaquePointer { throttle.pointer }

    init(name: String?) {
        var t: OpaquePointer?
        // Only -ENOMEM (a 1 KiB allocation) fails: no way on from there.
        guard dp_throttle_create(&t) == 0, let t else { fatalError("dp_throttle_create: out of memory") }
        self.name = name
        throttle = Handle(pointer: t)
    }

    /// The limits in force.
    public var limits: IOLimits { current.withLock { $0 } }

    /// Checks and applies limits at once to every disk of the group; the
    /// buckets start empty (QEMU's throttle_config). Requests waiting see
    /// the change within 20 ms.
    public func setLimits(_ limits: IOLimits) throws(IOLimitsError) {
        try limits.validate()
        try current.withLock { (current: inout IOLimits) throws(IOLimitsError) in
            var c = limits.cValue
            let ret = dp_throttle_set(handle, &c)
            // validate() refuses all that dp_throttle_check does.
            guard ret == 0 else { throw .unknownKey("(refused by the core: \(DataPlaneError.message(-ret)))") }
            current = limits
        }
    }

    deinit {
        dp_throttle_destroy(handle)
    }
}

/// Where a disk's requests are limited: its own buckets, or a group's.
public struct DiskLimits: Sendable, Equatable, Codable {
    /// The group the disk is in; nil: its own limits.
    public var group: String?
    public var limits: IOLimits
}

/// A disk's limits on the Swift side: its own buckets (made on first use),
/// the group it is in, and what its C disk points at.
final class DiskThrottle: Sendable {
    private struct State {
        var own: ThrottleGroup?
        var group: ThrottleGroup?
    }

    private let state = Mutex<State>(State())

    /// The buckets a disk uses now (nil: unlimited) and the group, if any.
    var current: (ThrottleGroup?, String?) {
        state.withLock { s in (s.group ?? s.own, s.group?.name) }
    }

    /// Sets the disk's own limits and leaves its group; points the C disk
    /// at them (or at nothing when they limit nothing: one branch a request).
    func setOwn(_ limits: IOLimits, disk: OpaquePointer) throws(IOLimitsError) {
        try state.withLock { (s: inout State) throws(IOLimitsError) in
            let own = s.own ?? ThrottleGroup(name: nil)
            try own.setLimits(limits)
            s.own = own
            s.group = nil
            dp_disk_set_throttle(disk, limits.isUnlimited ? nil : own.handle)
        }
    }

    /// Joins a group (its limits from now on).
    func join(_ group: ThrottleGroup, disk: OpaquePointer) {
        state.withLock { s in
            s.group = group
            dp_disk_set_throttle(disk, group.handle)
        }
    }
}

/// Named throttle groups of a data plane. A group, once made, lives as long
/// as the data plane (and any disk in it): a queue may still be looking at
/// buckets a disk has just left.
final class ThrottleGroups: Sendable {
    private let groups = Mutex<[String: ThrottleGroup]>([:])

    func named(_ name: String) -> ThrottleGroup {
        groups.withLock { groups in
            if let g = groups[name] { return g }
            let g = ThrottleGroup(name: name)
            groups[name] = g
            return g
        }
    }

    func existing(_ name: String) -> ThrottleGroup? { groups.withLock { $0[name] } }
}

extension DataPlane {
    /// The throttle group by that name, made (unlimited) if there is none.
    public func throttleGroup(named name: String) -> ThrottleGroup { throttleGroups.named(name) }

    /// Sets a disk's own limits (it leaves any group), at once on all its
    /// queues. Unlimited limits cost each request one predictable branch.
    public func setLimits(_ limits: IOLimits, for disk: Disk) throws(IOLimitsError) {
        try disk.throttle.setOwn(limits, disk: disk.handle)
    }

    /// Puts a disk in a group: its requests count against the group's
    /// buckets, with the group's limits. `limits`, when given, become the
    /// group's (for all its disks). A disk leaves a group when its own
    /// limits are set (``setLimits(_:for:)``).
    public func join(_ disk: Disk, group name: String, limits: IOLimits? = nil) throws(IOLimitsError) {
        let group = throttleGroups.named(name)
        if let limits { try group.setLimits(limits) }
        disk.throttle.join(group, disk: disk.handle)
    }

    /// A disk's limits and group.
    public func limits(of disk: Disk) -> DiskLimits {
        let (buckets, group) = disk.throttle.current
        return DiskLimits(group: group, limits: buckets?.limits ?? IOLimits())
    }
}
