#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlane
import Synchronization

/// Where a virtqueue's rings are and how the guest signals (what a
/// vhost-user frontend sends with SET_VRING_*).
public struct VirtqueueConfiguration: Sendable, Equatable {
    public var size: Int
    public var descriptorTable: UInt64
    public var availRing: UInt64
    public var usedRing: UInt64
    /// Ring addresses are the frontend's virtual addresses rather than guest-physical.
    public var addressesAreUser: Bool
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    public var eventIndex: Bool
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    public var indirectDescriptors: Bool
    /// Where popping resumes (SET_VRING_BASE).
    public var lastAvailIndex: UInt16
    /// The eventfd the guest kicks; the eventfd we signal completions on; the
    /// eventfd we signal ring corruption on (-1 for none).
    public var kickFD: Int32
    public var callFD: Int32
    public var errorFD: Int32
    /// This queue's part of a vhost-user inflight region (host address), or 0.
    public var inflight: UInt = 0
    /// VIRTIO_F_RING_PACKED (virtio 1.2, 2.8): `descriptorTable` is the
    /// descriptor ring, `availRing` the driver and `usedRing` the device event
    /// suppression area, and `packedBase` where the ring resumes (vhost-user's
    /// 32-bit SET_VRING_BASE value; a fresh ring is 0x8000_8000). Buffer ids
    /// must be below `size`. With an inflight region that holds requests, the
    /// region says where the ring resumes (see `dp_queue_config.inflight`).
    public var packed = false
    public var packedBase: UInt32 = 0x8000_8000
    /// Live migration's dirty log (vhost-user SET_LOG_BASE with
    /// VHOST_F_LOG_ALL): the host address of the frontend's bitmap, one bit
    /// per 4 KiB guest page, `dirtyLogSize` bytes; 0 for none. Every page the
    /// queue writes gets its bit (see `dp_queue_config.log_bitmap`). The
    /// mapping must outlive the queue.
    public var dirtyLog: UInt = 0
    public var dirtyLogSize: UInt64 = 0

    public init(size: Int, descriptorTable: UInt64, availRing: UInt64, usedRing: UInt64,
                addressesAreUser: Bool = false, eventIndex: Bool = true, indirectDescriptors: Bool = true,
                lastAvailIndex: UInt16 = 0, kickFD: Int32, callFD: Int32, errorFD: Int32 = -1) {
        self.size = size
        self.descriptorTable = descriptorTable
        self.availRing = availRing
        self.usedRing = usedRing
        self.addressesAreUser = addressesAreUser
        self.eventIndex = eventIndex
        self.indirectDescriptors = indirectDescriptors
        self.lastAvailIndex = lastAvailIndex
        self.kickFD = kickFD
        self.callFD = callFD
        self.errorFD = errorFD
    }

    var cValue: dp_queue_config {
        var config = dp_queue_config()
        config.size = UInt32(clamping: size)
        config.desc_addr = descriptorTable
        config.avail_addr = availRing
        config.used_addr = usedRing
        config.addrs_are_user = addressesAreUser
        config.event_idx = eventIndex
        config.indirect = indirectDescriptors
        config.last_avail_idx = lastAvailIndex
        config.kick_fd = kickFD
        config.call_fd = callFD
        config.err_fd = errorFD
        config.inflight = UnsafeMutableRawPointer(bitPattern: inflight)
        config.packed = packed
        config.packed_base = packedBase
        config.log_bitmap = UnsafeMutableRawPointer(bitPattern: dirtyLog)
        config.log_size = dirtyLogSize
        return config
    }
}

/// A running virtqueue of a disk, served by one IOThread.
public final class Virtqueue: Sendable {
    /// The C queue.
    private struct Handle: @unchecked Sendable {
        // Unchecked: calls that change the queue are made holding `state` (CDataPlane.h: they must not
        // overlap) and reach its IOThread through the mailbox; its counters are for any thread.
        let pointer: OpaquePointer
    }

    /// What changes, serialising the control calls on the queue.
    private struct State {
        /// Kept alive while the queue translates through it.
        var memory: GuestMemory
        var stoppedAt: UInt32?
    }

    private let queue: Handle
    var handle: OpaquePointer { queue.pointer }
    public let disk: Disk
    public let index: Int
    /// Which of the disk's frontends it serves (``DataPlane/startQueue(disk:index:frontend:memory:configuration:)``).
    public let frontend: Int
    public let thread: IOThread
    private let state: Mutex<State>
    /// Set by `pause`, cleared by `resume`; read without `state`'s lock,
    /// which a pause holds while in-flight requests drain.
    private let paused = Atomic<Bool>(false)

    init(disk: Disk, index: Int, frontend: Int = 0, thread: IOThread, memory: GuestMemory,
         configuration: VirtqueueConfiguration) throws(DataPlaneError) {
        var config = configuration.cValue
        // The disk announced what a request may carry for rings up to its queue size.
        if config.size == 0 || config.size > UInt32(DP_QUEUE_MAX_SIZE) || Int(config.size) > disk.configuration.queueSize {
            throw .queue(disk: disk.name, index: index, errno: EINVAL)
        }
        var queue: OpaquePointer?
        let ret = dp_queue_create(thread.handle, &config, disk.handle, memory.handle, &queue)
        guard ret == 0, let queue else { throw .queue(disk: disk.name, index: index, errno: -ret) }
        self.queue = Handle(pointer: queue)
        self.disk = disk
        self.index = index
        self.frontend = frontend
        self.thread = thread
        self.state = Mutex(State(memory: memory))
    }

    /// Stops popping, lets every in-flight request complete, and returns the
    /// avail index where popping stopped (GET_VRING_BASE). Idempotent.
    @discardableResult
    public func stop() -> UInt16 {
        UInt16(truncatingIfNeeded: stopBase())
    }

    /// `stop`, answering GET_VRING_BASE for either layout: a split ring's
    /// avail index, or a packed ring's 32-bit value (see `packedBase`).
    /// With `failingHeld`, requests the error policy holds complete with an
    /// I/O error rather than stay in the inflight region for the ring's
    /// next owner: for a migration's source, whose destination starts with
    /// a region of its own.
    @discardableResult
    public func stopBase(failingHeld: Bool = false) -> UInt32 {
        state.withLock { state in
            if let stoppedAt = state.stoppedAt { return stoppedAt }
            var base: UInt32 = 0
            if failingHeld { dp_queue_stop_failing_held(handle, &base) } else { dp_queue_stop_base(handle, &base) }
            state.stoppedAt = base
            return base
        }
    }

    /// Stops taking new requests; returns when in-flight ones have completed.
    public func pause() throws(DataPlaneError) {
        let ret = state.withLock { state in
            let ret = state.stoppedAt == nil ? dp_queue_pause(handle) : -ESHUTDOWN
            if ret == 0 { paused.store(true, ordering: .relaxed) }
            return ret
        }
        if ret != 0 { throw .system(operation: "pausing queue \(index)", errno: -ret) }
    }

    /// Takes requests again after `pause`.
    public func resume() throws(DataPlaneError) {
        let ret = state.withLock { state in
            let ret = state.stoppedAt == nil ? dp_queue_resume(handle) : -ESHUTDOWN
            if ret == 0 { paused.store(false, ordering: .relaxed) }
            return ret
        }
        if ret != 0 { throw .system(operation: "resuming queue \(index)", errno: -ret) }
    }

    /// Returns once the requests the queue had taken when called have
    /// completed (not those the error policy holds: retried, they are
    /// checked against the capacity again). The queue takes no new requests
    /// until then, and goes on afterwards. A queue being stopped is waited
    /// for; a stopped one has nothing in flight.
    func drain() {
        while true {
            let ret = state.withLock { state in state.stoppedAt == nil ? dp_queue_drain(handle) : 0 }
            // -EBUSY: a stop or memory swap drains it now; ask again after it.
            guard ret == -EBUSY else { return }
            usleep(1000)
        }
    }

    /// Paused by `pause` and not resumed since.
    public var isPaused: Bool { paused.load(ordering: .relaxed) }

    /// Swaps the guest memory table (after draining in-flight requests).
    public func setMemory(_ newMemory: GuestMemory) throws(DataPlaneError) {
        let ret = state.withLock { state in
            let ret = state.stoppedAt == nil ? dp_queue_set_mem(handle, newMemory.handle) : -ESHUTDOWN
            if ret == 0 { state.memory = newMemory }
            return ret
        }
        if ret != 0 { throw .queue(disk: disk.name, index: index, errno: -ret) }
    }

    /// Swaps the call and error eventfds of the running queue without draining
    /// it: requests in flight, or held by the error policy, stay. The queue no
    /// longer uses the old fds when this returns (the caller may close them);
    /// the new call fd is signalled once.
    public func setNotifiers(callFD: Int32, errorFD: Int32) throws(DataPlaneError) {
        let ret = state.withLock { state in
            state.stoppedAt == nil ? dp_queue_set_notifiers(handle, callFD, errorFD) : -ESHUTDOWN
        }
        if ret != 0 { throw .queue(disk: disk.name, index: index, errno: -ret) }
    }

    /// A snapshot of the queue's counters.
    public func statistics() -> QueueStatistics {
        var raw = dp_queue_stats()
        dp_queue_get_stats(handle, &raw)
        return QueueStatistics(raw, disk: disk.name, queue: index, thread: thread.configuration.name)
    }

    deinit {
        dp_queue_destroy(handle)
    }
}
