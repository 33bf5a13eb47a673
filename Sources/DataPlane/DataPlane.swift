import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The data plane: IOThreads, the disks they serve and the running
/// virtqueues. Queues go to IOThreads round-robin unless a disk names its
/// threads. Safe to use from any thread; nothing here runs per request.
///
/// ```swift
/// let plane = try DataPlane(iothreads: [IOThreadConfiguration(name: "io0", cpuset: CPUSet(parsing: "1"))])
/// let disk = try plane.addDisk(DiskConfiguration(path: "/var/lib/images/vm.raw"))
/// let queue = try plane.startQueue(disk: disk, index: 0, memory: memory, configuration: rings)
/// ...
/// plane.stop()   // every in-flight request completes first
/// ```
public final class DataPlane: Sendable {
    /// This release of the library and of dpctl (`dpctl --version`).
    public static let version = "0.14.0"

    private struct DiskEntry {
        var disk: Disk
        var ordinal: Int
        var threadIndices: [Int]?
        var queues: [QueueSlot: Virtqueue] = [:]
        /// Queues being stopped: their counters still count, live, until
        /// they move into `stoppedCounters` in one step.
        var draining: [Virtqueue] = []
        /// By queue index, the final counters of every queue stopped there:
        /// a ring restart (GET_VRING_BASE, SET_VRING_ADDR, a reconnect) makes
        /// a new queue, and statistics must not start again from zero.
        var stoppedCounters: [Int: QueueStatistics] = [:]
    }

    /// A running queue's place: its index, in the rings of one of the
    /// disk's frontends (a disk served on several sockets has a frontend
    /// on each, with queues of its own).
    private struct QueueSlot: Hashable, Comparable {
        var frontend: Int
        var index: Int

        static func < (a: QueueSlot, b: QueueSlot) -> Bool { (a.index, a.frontend) < (b.index, b.frontend) }
    }

    private struct State {
        var disks: [ObjectIdentifier: DiskEntry] = [:]
        var nextOrdinal = 0
        var stopped = false
    }

    /// The IOThreads, in configuration order.
    public let threads: [IOThread]
    private let state = Mutex<State>(State())
    /// Named throttle groups (IOLimits.swift).
    let throttleGroups = ThrottleGroups()

    /// Starts one pinned IOThread per configuration.
    public init(iothreads: [IOThreadConfiguration]) throws(DataPlaneError) {
        guard !iothreads.isEmpty else {
            throw .configuration(.invalidThreadName("(no IOThreads configured; give at least one)"))
        }
        var started: [IOThread] = []
        for config in iothreads {
            do {
                started.append(try IOThread(config))
            } catch {
                started.forEach { $0.stop() }
                throw error
            }
        }
        threads = started
    }

    /// Opens a disk. `iothreads` optionally names the threads (indices into
    /// `threads`) its queues go to, queue i to `iothreads[i % count]`.
    /// `logger` hears of a wait for a killed process's requests (``Disk``).
    public func addDisk(_ configuration: DiskConfiguration, iothreads: [Int]? = nil,
                        logger: Logger? = nil) throws(DataPlaneError) -> Disk {
        if let indices = iothreads {
            if indices.isEmpty {
                throw .notFound("an empty IOThread list for disk \(configuration.path.debugDescription)")
            }
            if let bad = indices.first(where: { $0 < 0 || $0 >= threads.count }) {
                throw .notFound("IOThread \(bad) (there are \(threads.count))")
            }
        }
        let disk = try Disk(configuration, logger: logger)
        let added: Bool = state.withLock { state in
            guard !state.stopped else { return false }
            state.disks[ObjectIdentifier(disk)] = DiskEntry(disk: disk, ordinal: state.nextOrdinal, threadIndices: iothreads)
            state.nextOrdinal += 1
            return true
        }
        if !added { throw .stopped }
        return disk
    }

    /// The IOThread a disk's queue goes to.
    public func thread(for disk: Disk, queue index: Int) throws(DataPlaneError) -> IOThread {
        let entry = state.withLock { $0.disks[ObjectIdentifier(disk)] }
        guard let entry else { throw .notFound("disk \(disk.name.debugDescription)") }
        if let indices = entry.threadIndices {
            return threads[indices[index % indices.count]]
        }
        return threads[(entry.ordinal + index) % threads.count]
    }

    /// Starts serving a virtqueue of a disk. A queue already running at that
    /// index (of that frontend) is stopped first. `frontend` tells apart
    /// the frontends of a disk served on several sockets (a migrating
    /// guest's source and destination QEMU): each has its own queues.
    @discardableResult
    public func startQueue(disk: Disk, index: Int, frontend: Int = 0, memory: GuestMemory,
                           configuration: VirtqueueConfiguration) throws(DataPlaneError) -> Virtqueue {
        guard index >= 0 && index < disk.configuration.numQueues else {
            throw .notFound("queue \(index) of disk \(disk.name.debugDescription) (it has \(disk.configuration.numQueues))")
        }
        _ = stopQueue(disk: disk, index: index, frontend: frontend)
        let thread = try thread(for: disk, queue: index)
        let queue = try Virtqueue(disk: disk, index: index, frontend: frontend, thread: thread, memory: memory,
                                  configuration: configuration)
        let kept: Bool = state.withLock { state in
            guard !state.stopped, state.disks[ObjectIdentifier(disk)] != nil else { return false }
            state.disks[ObjectIdentifier(disk)]?.queues[QueueSlot(frontend: frontend, index: index)] = queue
            return true
        }
        if !kept {
            queue.stop()
            throw .stopped
        }
        return queue
    }

    /// Stops a queue after its in-flight requests complete; returns the avail
    /// index where it stopped, or nil when no such queue runs. Its counters
    /// stay in the disk's and the queue index's statistics.
    @discardableResult
    public func stopQueue(disk: Disk, index: Int, frontend: Int = 0) -> UInt16? {
        stopQueueBase(disk: disk, index: index, frontend: frontend).map { UInt16(truncatingIfNeeded: $0) }
    }

    /// `stopQueue`, answering GET_VRING_BASE for either layout: a split
    /// ring's avail index, or a packed ring's 32-bit value
    /// (`VirtqueueConfiguration.packedBase`). `failingHeld`: see
    /// ``Virtqueue/stopBase(failingHeld:)``.
    @discardableResult
    public func stopQueueBase(disk: Disk, index: Int, frontend: Int = 0, failingHeld: Bool = false) -> UInt32? {
        let id = ObjectIdentifier(disk)
        let queue: Virtqueue? = state.withLock { state in
            guard let queue = state.disks[id]?.queues.removeValue(forKey: QueueSlot(frontend: frontend, index: index)) else { return nil }
            state.disks[id]?.draining.append(queue)
            return queue
        }
        guard let queue else { return nil }
        let last = queue.stopBase(failingHeld: failingHeld)
        let final = queue.statistics().countersOnly
        state.withLock { state in
            guard var entry = state.disks[id] else { return }
            entry.draining.removeAll { $0 === queue }
            entry.stoppedCounters[index] = entry.stoppedCounters[index].map { $0.addingCounters(of: final) } ?? final
            state.disks[id] = entry
        }
        return last
    }

    /// Removes a disk, stopping its queues first (outside the lock that
    /// other disks' calls take). The image closes, and its locks go, once
    /// nothing refers to the ``Disk`` any more: remove its sockets first
    /// (``VhostUserServer/removeExports(of:)``) and drop the caller's
    /// reference.
    public func removeDisk(_ disk: Disk) {
        // Not while a resize runs: a shrink must see these queues (they
        // leave `state` here) until their last requests are done.
        disk.resizing.withLock { _ in
            let entry = state.withLock { $0.disks.removeValue(forKey: ObjectIdentifier(disk)) }
            entry?.queues.values.forEach { $0.stop() }
        }
    }

    /// Pauses every queue of a disk: no new requests are taken, in-flight ones complete.
    public func pause(disk: Disk) throws(DataPlaneError) {
        for queue in queues(of: disk) { try queue.pause() }
    }

    /// Resumes a paused disk.
    public func resume(disk: Disk) throws(DataPlaneError) {
        for queue in queues(of: disk) { try queue.resume() }
    }

    /// The running queues of a disk, by index (and, at one index, by frontend).
    public func queues(of disk: Disk) -> [Virtqueue] {
        state.withLock { state in
            (state.disks[ObjectIdentifier(disk)]?.queues ?? [:]).sorted { $0.key < $1.key }.map(\.value)
        }
    }

    /// The disk's running queues and those being stopped.
    func queuesTakingRequests(of disk: Disk) -> [Virtqueue] {
        state.withLock { state in
            guard let entry = state.disks[ObjectIdentifier(disk)] else { return [] }
            return Array(entry.queues.values) + entry.draining
        }
    }

    /// The disks, in the order they were added.
    public var disks: [Disk] {
        state.withLock { state in state.disks.values.sorted { $0.ordinal < $1.ordinal }.map(\.disk) }
    }

    /// Counters of every thread, queue and disk at one moment. Counters
    /// are monotonic per disk and per queue index: those of stopped queues
    /// are added to the running queue's at that index (or reported in
    /// ``Snapshot/stoppedQueues`` while none runs there). Gauges come from
    /// the running queue only.
    public func statistics() -> Snapshot {
        let readings = diskReadings()
        return Snapshot(
            monotonicNanoseconds: Self.monotonicNanoseconds(),
            threads: threads.map { $0.statistics() },
            queues: readings.flatMap { $0.running.map(\.statistics) },
            stoppedQueues: readings.flatMap(\.stopped),
            disks: readings.map(\.total))
    }

    /// Each disk with its queues' counters summed (as ``Snapshot/disks``),
    /// read at one moment, in the order the disks were added.
    public func diskTotals() -> [(disk: Disk, total: QueueStatistics)] {
        diskReadings().map { ($0.disk, $0.total) }
    }

    /// One disk's queue indices at one moment: what ``statistics()`` and
    /// the metrics read.
    struct DiskReading {
        var disk: Disk
        /// The running queues by index, each with the counters of the
        /// queues stopped before it there, and whether it is paused.
        var running: [(statistics: QueueStatistics, paused: Bool)]
        /// The counters of indices where no queue runs now.
        var stopped: [QueueStatistics]
        /// The sum of both.
        var total: QueueStatistics
    }

    /// Every disk's reading, in the order the disks were added.
    func diskReadings() -> [DiskReading] {
        // One copy under the lock: a queue moving from running to stopped
        // is counted exactly once, before or after.
        let entries = state.withLock { state in state.disks.values.sorted { $0.ordinal < $1.ordinal } }
        return entries.map { entry in
            var history = entry.stoppedCounters
            for queue in entry.draining {
                let counters = queue.statistics().countersOnly
                history[queue.index] = history[queue.index].map { $0.addingCounters(of: counters) } ?? counters
            }
            var running: [(statistics: QueueStatistics, paused: Bool)] = []
            for (slot, queue) in entry.queues.sorted(by: { $0.key < $1.key }) {
                let paused = queue.isPaused
                let live = queue.statistics()
                // Two frontends of the disk (a migration on one host) running
                // the same index read as one queue: a queue index's counters
                // and gauges stay one series.
                if let last = running.last, last.statistics.queue == slot.index {
                    running[running.count - 1] = (last.statistics.adding(live), last.paused && paused)
                    continue
                }
                running.append((history.removeValue(forKey: slot.index).map { live.addingCounters(of: $0) } ?? live, paused))
            }
            let stopped = history.sorted { $0.key < $1.key }.map(\.value)
            return DiskReading(disk: entry.disk, running: running, stopped: stopped,
                               total: QueueStatistics.sum(running.map(\.statistics) + stopped, disk: entry.disk.name, thread: "*"))
        }
    }

    /// Stops every queue (each drains its in-flight requests) and every thread.
    public func stop() {
        let entries: [DiskEntry] = state.withLock { state in
            state.stopped = true
            defer { state.disks.removeAll() }
            return Array(state.disks.values)
        }
        for entry in entries { entry.queues.values.forEach { $0.stop() } }
        threads.forEach { $0.stop() }
    }

    /// All counters at one moment; subtract two snapshots for rates.
    public struct Snapshot: Sendable, Codable {
        public var monotonicNanoseconds: UInt64
        public var threads: [IOThreadStatistics]
        /// The running queues, each with the counters of the queues stopped
        /// before it at its index.
        public var queues: [QueueStatistics]
        /// The counters of queue indices where no queue runs now (the ring
        /// stopped, the frontend went away): kept so that sums stay monotonic.
        public var stoppedQueues: [QueueStatistics]
        /// One entry per disk: the sum of its queues, running and stopped.
        public var disks: [QueueStatistics]

        public init(monotonicNanoseconds: UInt64, threads: [IOThreadStatistics], queues: [QueueStatistics],
                    stoppedQueues: [QueueStatistics] = [], disks: [QueueStatistics]) {
            self.monotonicNanoseconds = monotonicNanoseconds
            self.threads = threads
            self.queues = queues
            self.stoppedQueues = stoppedQueues
            self.disks = disks
        }

        private enum CodingKeys: String, CodingKey {
            case monotonicNanoseconds, threads, queues, stoppedQueues, disks
        }

        /// Decodes what older versions sent too (without `stoppedQueues`).
        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            monotonicNanoseconds = try c.decode(UInt64.self, forKey: .monotonicNanoseconds)
            threads = try c.decode([IOThreadStatistics].self, forKey: .threads)
            queues = try c.decode([QueueStatistics].self, forKey: .queues)
            stoppedQueues = try c.decodeIfPresent([QueueStatistics].self, forKey: .stoppedQueues) ?? []
            disks = try c.decode([QueueStatistics].self, forKey: .disks)
        }

        /// The queues an IOThread serves and served, summed.
        public func thread(_ name: String) -> QueueStatistics {
            QueueStatistics.sum((queues + stoppedQueues).filter { $0.thread == name }, disk: "*", thread: name)
        }
    }

    static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
