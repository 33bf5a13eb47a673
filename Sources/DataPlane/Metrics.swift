import CoreMetrics
import Synchronization

/// What a queue index is doing.
public enum QueueState: String, Sendable, CaseIterable, Codable {
    /// Taking requests.
    case running
    /// Paused by ``Virtqueue/pause()``: no new requests are taken.
    case paused
    /// Stopped by the error policy (rerror/werror=stop, or enospc on
    /// ENOSPC), holding the failed requests until a resume.
    case stoppedOnError = "stopped_on_error"
    /// The guest corrupted the ring: it must reset the device.
    case broken
    /// No queue runs at this index now (the ring was stopped, the frontend
    /// went away); its counters are kept.
    case stopped
}

/// Everything the metrics export, read at one moment from a ``DataPlane``:
/// what ``DataPlaneMetrics/update()`` pushed, for a backend that wants more
/// than swift-metrics carries (the latency histograms' buckets).
public struct MetricsSample: Sendable {
    public struct Queue: Sendable {
        /// The `disk` label: the disk's name as `dpctl status` shows it (its
        /// image path, or "null"); a second disk of the same name gets "#2"
        /// appended, a third "#3", in the order they were added.
        public var disk: String
        public var index: Int
        public var state: QueueState
        /// Monotonic counters of the index (a restarted ring's included).
        public var statistics: QueueStatistics
    }

    public struct DiskInfo: Sendable {
        public var disk: Disk
        /// Its `disk` label.
        public var label: String
    }

    public var disks: [DiskInfo]
    public var queues: [Queue]
    public var threads: [IOThreadStatistics]
}

/// The data plane's counters and gauges as swift-metrics metrics, for any
/// metrics backend a program bootstrapped (swift-prometheus,
/// StatsD, OpenTelemetry, ...).
///
/// Nothing is pushed per request: the core counts in its own relaxed
/// atomics, and each ``update()`` reads one snapshot and increments every
/// counter by exactly what it grew since the previous update (a new series
/// starts at its full value), sets every gauge, and removes the series of
/// disks that are gone. Call it before each export (``PrometheusExporter``
/// does, per scrape) or on a timer.
///
/// swift-metrics has no way to hand a backend a histogram's buckets, so
/// the latency histograms are not pushed; ``MetricsSample`` carries them
/// (``PrometheusExporter`` renders them).
public final class DataPlaneMetrics: Sendable {
    /// The metric families: name, Prometheus type, help text.
    public static let families: [(name: String, type: String, help: String)] = [
        ("dataplane_build_info", "gauge", "Always 1; the version label is the data plane's release"),
        ("dataplane_disk_capacity_bytes", "gauge", "Size of the disk as the guest sees it"),
        ("dataplane_disk_read_only", "gauge", "1 when the disk refuses writes"),
        ("dataplane_requests_total", "counter",
         "Requests completed (successfully or not), by virtio-blk request type"),
        ("dataplane_bytes_total", "counter", "Bytes read or written by requests that succeeded"),
        ("dataplane_errors_total", "counter",
         "Requests that failed, by cause: io (the backend failed), bad_request (malformed request or descriptor chain), "
            + "range (sectors past the capacity), read_only (a write to a read-only disk), unsupported (request type or flags)"),
        ("dataplane_errors_ignored_total", "counter", "Failures completed as success under rerror/werror=ignore"),
        ("dataplane_in_flight_requests", "gauge", "Requests taken from the ring and not completed yet"),
        ("dataplane_throttled_requests_total", "counter", "Requests that waited for the disk's I/O limits"),
        ("dataplane_throttled_seconds_total", "counter", "Time requests waited for the disk's I/O limits, summed"),
        ("dataplane_held_requests", "gauge", "Failed requests held by the error policy until 'dpctl resume'"),
        ("dataplane_queue_state", "gauge",
         "1 for the queue's state: running, paused, stopped_on_error (held by the error policy), "
            + "broken (the guest corrupted the ring), stopped (no ring running at this index)"),
        ("dataplane_request_duration_seconds", "histogram",
         "Time from taking a request off the ring to completing it (log2 buckets; _sum is estimated from the buckets, "
            + "each request at its bucket's midpoint)"),
        ("dataplane_iothread_busy_seconds_total", "counter",
         "Wall-clock time the IOThread spent on passes over its queues (popping, submitting, reaping, completing)"),
        ("dataplane_iothread_poll_seconds_total", "counter", "Wall-clock time the IOThread spent busy-polling for work"),
        ("dataplane_iothread_sleep_seconds_total", "counter",
         "Wall-clock time the IOThread slept waiting for a kick, a completion or a control message"),
        ("dataplane_iothread_cpu_seconds_total", "counter", "CPU time the IOThread used"),
        ("dataplane_iothread_wakeups_total", "counter", "Times the IOThread slept and woke up"),
        ("dataplane_iothread_queues", "gauge", "Queues the IOThread serves"),
        ("dataplane_iothread_failed", "gauge", "1 once the IOThread's io_uring failed (its queues are broken)"),
    ]

    /// The `op` label values of `dataplane_requests_total`, with their counters.
    static let operations: [(name: String, count: @Sendable (QueueStatistics) -> UInt64)] = [
        ("read", { $0.reads }), ("write", { $0.writes }), ("flush", { $0.flushes }), ("get_id", { $0.getIDs }),
        ("discard", { $0.discards }), ("write_zeroes", { $0.writeZeroes }), ("other", { $0.otherRequests }),
    ]

    /// The `type` label values of `dataplane_errors_total`.
    static let errorTypes: [(name: String, count: @Sendable (QueueStatistics) -> UInt64)] = [
        ("io", { $0.ioErrors }), ("bad_request", { $0.badRequests }), ("range", { $0.rangeErrors }),
        ("read_only", { $0.readOnlyErrors }), ("unsupported", { $0.unsupported }),
    ]

    private enum Kind {
        /// A counter of a whole number.
        case counter
        /// A counter of seconds, read in nanoseconds.
        case nanoseconds
        case gauge
    }

    private enum Handle {
        case counter(CoreMetrics.Counter)
        case seconds(FloatingPointCounter)
        case gauge(Meter)

        func destroy() {
            switch self {
            case .counter(let c): c.destroy()
            case .seconds(let c): c.destroy()
            case .gauge(let g): g.destroy()
            }
        }
    }

    private struct Key: Hashable {
        var name: String
        var labels: [String]
        /// The disk the series belongs to (a disk removed and another added
        /// under the same name gets new series, starting from zero).
        var owner: ObjectIdentifier?
    }

    private struct Series {
        var handle: Handle
        /// The value pushed so far (nanoseconds for `.nanoseconds`).
        var pushed: UInt64
    }

    private struct State {
        var series: [Key: Series] = [:]
        /// The disks that own series: kept so that their identities are not
        /// reused while their series exist.
        var owners: [ObjectIdentifier: Disk] = [:]
    }

    private let plane: DataPlane
    private let factory: any MetricsFactory
    private let state = Mutex(State())

    /// Metrics of `plane`, made by `factory` (by default the one the
    /// program bootstrapped `MetricsSystem` with).
    public init(plane: DataPlane, factory: any MetricsFactory = MetricsSystem.factory) {
        self.plane = plane
        self.factory = factory
    }

    /// Reads the data plane and brings every metric up to date; returns what it read.
    @discardableResult
    public func update() -> MetricsSample {
        withUpdate { $0 }
    }

    /// Runs `body` with a fresh sample while no other update runs: what it
    /// exports from the metrics matches the sample.
    func withUpdate<T>(_ body: (MetricsSample) -> T) -> T {
        state.withLock { state in
            let sample = Self.read(plane)
            push(sample, into: &state)
            return body(sample)
        }
    }

    static func read(_ plane: DataPlane) -> MetricsSample {
        var disks: [MetricsSample.DiskInfo] = []
        var queues: [MetricsSample.Queue] = []
        var seen: [String: Int] = [:]
        for reading in plane.diskReadings() {
            let name = reading.disk.name
            seen[name, default: 0] += 1
            let label = seen[name] == 1 ? name : "\(name)#\(seen[name]!)"
            disks.append(.init(disk: reading.disk, label: label))
            for (statistics, paused) in reading.running {
                let state: QueueState = statistics.broken ? .broken
                    : statistics.stoppedOnError != nil ? .stoppedOnError
                    : paused ? .paused : .running
                queues.append(.init(disk: label, index: statistics.queue, state: state, statistics: statistics))
            }
            for statistics in reading.stopped {
                queues.append(.init(disk: label, index: statistics.queue, state: .stopped, statistics: statistics))
            }
        }
        queues.sort { ($0.disk, $0.index) < ($1.disk, $1.index) }
        return MetricsSample(disks: disks, queues: queues, threads: plane.threads.map { $0.statistics() })
    }

    private struct Reading {
        var key: Key
        var kind: Kind
        var value: UInt64
        var gauge: Double = 0
    }

    private static func readings(_ sample: MetricsSample) -> [Reading] {
        var out: [Reading] = []
        func gauge(_ name: String, _ labels: [String], _ value: Double, owner: ObjectIdentifier? = nil) {
            out.append(Reading(key: Key(name: name, labels: labels, owner: owner), kind: .gauge, value: 0, gauge: value))
        }
        func counter(_ name: String, _ labels: [String], _ value: UInt64, _ kind: Kind = .counter, owner: ObjectIdentifier? = nil) {
            out.append(Reading(key: Key(name: name, labels: labels, owner: owner), kind: kind, value: value))
        }
        gauge("dataplane_build_info", ["version", DataPlane.version], 1)
        var ownerOf: [String: ObjectIdentifier] = [:]
        for d in sample.disks {
            let owner = ObjectIdentifier(d.disk)
            ownerOf[d.label] = owner
            gauge("dataplane_disk_capacity_bytes", ["disk", d.label], Double(d.disk.capacityBytes), owner: owner)
            gauge("dataplane_disk_read_only", ["disk", d.label], d.disk.configuration.readOnly ? 1 : 0, owner: owner)
        }
        for q in sample.queues {
            let owner = ownerOf[q.disk]
            let labels = ["disk", q.disk, "queue", String(q.index)]
            let s = q.statistics
            for (op, count) in operations {
                counter("dataplane_requests_total", labels + ["op", op], count(s), owner: owner)
            }
            counter("dataplane_bytes_total", labels + ["op", "read"], s.bytesRead, owner: owner)
            counter("dataplane_bytes_total", labels + ["op", "write"], s.bytesWritten, owner: owner)
            for (type, count) in errorTypes {
                counter("dataplane_errors_total", labels + ["type", type], count(s), owner: owner)
            }
            counter("dataplane_errors_ignored_total", labels, s.ignoredErrors, owner: owner)
            gauge("dataplane_in_flight_requests", labels, Double(s.inFlight), owner: owner)
            counter("dataplane_throttled_requests_total", labels, s.throttledRequests, owner: owner)
            counter("dataplane_throttled_seconds_total", labels, s.throttledNanoseconds, .nanoseconds, owner: owner)
            gauge("dataplane_held_requests", labels, Double(s.heldRequests), owner: owner)
            for state in QueueState.allCases {
                gauge("dataplane_queue_state", labels + ["state", state.rawValue], state == q.state ? 1 : 0, owner: owner)
            }
        }
        for t in sample.threads {
            let labels = ["iothread", t.name]
            counter("dataplane_iothread_busy_seconds_total", labels, t.busyTimeNanoseconds, .nanoseconds)
            counter("dataplane_iothread_poll_seconds_total", labels, t.pollTimeNanoseconds, .nanoseconds)
            counter("dataplane_iothread_sleep_seconds_total", labels, t.sleepTimeNanoseconds, .nanoseconds)
            counter("dataplane_iothread_cpu_seconds_total", labels, t.cpuNanoseconds, .nanoseconds)
            counter("dataplane_iothread_wakeups_total", labels, t.waits)
            gauge("dataplane_iothread_queues", labels, Double(t.queues))
            gauge("dataplane_iothread_failed", labels, t.failure == nil ? 0 : 1)
        }
        return out
    }

    private func push(_ sample: MetricsSample, into state: inout State) {
        let readings = Self.readings(sample)
        // Series that are gone go first: a disk added under a removed one's
        // name must not find the old series still registered.
        let wanted = Set(readings.map(\.key))
        for (key, series) in state.series where !wanted.contains(key) {
            series.handle.destroy()
            state.series[key] = nil
        }
        state.owners = Dictionary(sample.disks.map { (ObjectIdentifier($0.disk), $0.disk) }, uniquingKeysWith: { a, _ in a })
        for r in readings {
            var series = state.series[r.key] ?? Series(handle: makeHandle(r.key, r.kind), pushed: 0)
            switch series.handle {
            case .counter(let c):
                // Counters only grow (DataPlane keeps a restarted ring's
                // counts); one that went back pushes nothing until it is past.
                if r.value > series.pushed {
                    c.increment(by: Int64(clamping: r.value - series.pushed))
                    series.pushed = r.value
                }
            case .seconds(let c):
                if r.value > series.pushed {
                    c.increment(by: Double(r.value - series.pushed) / 1e9)
                    series.pushed = r.value
                }
            case .gauge(let g):
                g.set(r.gauge)
            }
            state.series[r.key] = series
        }
    }

    private func makeHandle(_ key: Key, _ kind: Kind) -> Handle {
        var dimensions: [(String, String)] = []
        for i in stride(from: 0, to: key.labels.count - 1, by: 2) { dimensions.append((key.labels[i], key.labels[i + 1])) }
        switch kind {
        case .counter: return .counter(CoreMetrics.Counter(label: key.name, dimensions: dimensions, factory: factory))
        case .nanoseconds: return .seconds(FloatingPointCounter(label: key.name, dimensions: dimensions, factory: factory))
        case .gauge: return .gauge(Meter(label: key.name, dimensions: dimensions, factory: factory))
        }
    }
}
