import CDataPlane
import Synchronization

/// A data-plane thread pinned to a cpuset, with its own io_uring, serving
/// the virtqueues given to it.
public final class IOThread: Sendable {
    /// The C thread object.
    private struct Handle: @unchecked Sendable {
        // Unchecked: a dp_iothread takes requests from any thread through its mailbox and its counters are atomics.
        let pointer: OpaquePointer
    }

    private let thread: Handle
    var handle: OpaquePointer { thread.pointer }
    /// Set once `stop` succeeded: concurrent stops must not both join the C thread.
    private let stopped = Mutex<Bool>(false)
    /// The configuration it was started with.
    public let configuration: IOThreadConfiguration

    /// Validates the configuration, starts the thread and pins it.
    public init(_ configuration: IOThreadConfiguration) throws(DataPlaneError) {
        do { try configuration.validate() } catch { throw .configuration(error) }
        self.configuration = configuration
        var config = dp_iothread_config()
        config.poll_max_ns = UInt64(configuration.pollMaxMicroseconds) * 1000
        config.ring_entries = configuration.ringEntries
        config.notify_after = configuration.notifyAfterCompletions
        config.disabled_features = configuration.disabledIOURingFeatures.rawValue
        withUnsafeMutableBytes(of: &config.name) { name in
            for (i, byte) in configuration.name.utf8.prefix(15).enumerated() { name[i] = byte }
        }
        var thread: OpaquePointer?
        let cpus = configuration.cpuset.cpus
        let ret = cpus.withUnsafeBufferPointer { buffer in
            config.cpus = buffer.baseAddress
            config.cpu_count = UInt32(buffer.count)
            return dp_iothread_create(&config, &thread)
        }
        guard ret == 0, let thread else { throw .threadStart(name: configuration.name, errno: -ret) }
        self.thread = Handle(pointer: thread)
    }

    /// Drains every queue on the thread and stops it. Idempotent; a second
    /// call while one runs waits for it.
    public func stop() {
        stopped.withLock { stopped in
            // A stop that failed (the thread never got the message) may be tried again.
            if !stopped { stopped = dp_iothread_stop(handle) == 0 }
        }
    }

    /// The NUMA node its memory comes from, or nil when unknown.
    public var numaNode: Int? {
        let node = dp_iothread_numa_node(handle)
        return node >= 0 ? Int(node) : nil
    }

    /// A snapshot of its counters, including its CPU time.
    public func statistics() -> IOThreadStatistics {
        var raw = dp_iothread_stats()
        dp_iothread_get_stats(handle, &raw)
        return IOThreadStatistics(raw, name: configuration.name)
    }

    deinit {
        dp_iothread_destroy(handle)
    }
}
