import CDataPlane

/// A log2 histogram of request latencies: bucket i counts latencies in
/// [2^i, 2^(i+1)) nanoseconds.
public struct LatencyHistogram: Sendable, Equatable, Codable {
    public var buckets: [UInt64]

    public init(buckets: [UInt64] = Array(repeating: 0, count: Int(DP_LATENCY_BUCKETS))) {
        self.buckets = buckets
    }

    public var count: UInt64 { buckets.reduce(0, &+) }

    /// The latency below which `percent` of requests fall, in nanoseconds,
    /// interpolated linearly inside the bucket; nil when empty.
    public func percentile(_ percent: Double) -> Double? {
        let total = count
        guard total > 0 else { return nil }
        let rank = max(1, (percent / 100 * Double(total)).rounded(.up))
        var seen: Double = 0
        for (i, n) in buckets.enumerated() where n > 0 {
            if seen + Double(n) >= rank {
                let low = Double(UInt64(1) << UInt64(i))
                return low + low * (rank - seen) / Double(n)
            }
            seen += Double(n)
        }
        return nil
    }

    /// Counts added since `earlier`; a bucket that went backwards (a
    /// different source) counts 0.
    public func subtracting(_ earlier: LatencyHistogram) -> LatencyHistogram {
        LatencyHistogram(buckets: zip(buckets, earlier.buckets).map { counterIncrease(from: $1, to: $0) })
    }

    public func adding(_ other: LatencyHistogram) -> LatencyHistogram {
        LatencyHistogram(buckets: zip(buckets, other.buckets).map { $0 &+ $1 })
    }
}

/// Counters of one virtqueue (or a sum of several), read without locks.
public struct QueueStatistics: Sendable, Equatable, Codable {
    public var disk: String
    public var queue: Int
    public var thread: String
    public var reads: UInt64 = 0
    public var writes: UInt64 = 0
    public var flushes: UInt64 = 0
    public var getIDs: UInt64 = 0
    public var discards: UInt64 = 0
    public var writeZeroes: UInt64 = 0
    public var otherRequests: UInt64 = 0
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// Failures by kind: backend I/O errors, malformed requests, out-of-range
    /// sectors, writes to a read-only disk, unsupported requests.
    public var ioErrors: UInt64 = 0
    public var badRequests: UInt64 = 0
    public var rangeErrors: UInt64 = 0
    public var readOnlyErrors: UInt64 = 0
    public var unsupported: UInt64 = 0
    public var inFlight: UInt64 = 0
    public var batches: UInt64 = 0
    public var batchHistogram: [UInt64] = []
    /// Requests found by busy-polling versus kick wake-ups.
    public var polled: UInt64 = 0
    public var kicks: UInt64 = 0
    public var notifies: UInt64 = 0
    public var notifiesSuppressed: UInt64 = 0
    public var bounces: UInt64 = 0
    /// The most bounce-buffer memory a queue held at once (per queue; a
    /// disk's total gives its largest queue's).
    public var bouncePeakBytes: UInt64 = 0
    /// The most iovecs one request carried, header and status included (a
    /// Linux guest's largest requests carry seg_max + 2).
    public var longestChain: UInt32 = 0
    public var latency = LatencyHistogram()
    /// Set while the error policy holds failed requests (why, e.g. "No space left on device").
    public var stoppedOnError: String?
    /// Requests held for retry on resume.
    public var heldRequests: UInt64 = 0
    /// Failures completed as success under the ignore policy.
    public var ignoredErrors: UInt64 = 0
    /// Set once the guest corrupted the ring (DEVICE_NEEDS_RESET).
    public var brokenReason: String?
    public var lastAvailIndex: UInt16 = 0
    public var usedIndex: UInt16 = 0
    /// Requests a previous backend or connection left in flight that the
    /// inflight region gave back when the queue started, and that ran again.
    public var recoveredRequests: UInt64 = 0
    /// Requests that waited for an I/O limit, and their time waiting (summed).
    public var throttledRequests: UInt64 = 0
    public var throttledNanoseconds: UInt64 = 0

    public var broken: Bool { brokenReason != nil }
    public var requests: UInt64 { reads + writes + flushes + getIDs + discards + writeZeroes + otherRequests }
    public var errors: UInt64 { ioErrors + badRequests + rangeErrors + readOnlyErrors + unsupported }

    public init(disk: String, queue: Int, thread: String) {
        self.disk = disk
        self.queue = queue
        self.thread = thread
    }

    init(_ raw: dp_queue_stats, disk: String, queue: Int, thread: String) {
        self.init(disk: disk, queue: queue, thread: thread)
        let ops = withUnsafeBytes(of: raw.ops) { Array($0.bindMemory(to: UInt64.self)) }
        let errs = withUnsafeBytes(of: raw.errors) { Array($0.bindMemory(to: UInt64.self)) }
        reads = ops[Int(DP_OP_READ.rawValue)]
        writes = ops[Int(DP_OP_WRITE.rawValue)]
        flushes = ops[Int(DP_OP_FLUSH.rawValue)]
        getIDs = ops[Int(DP_OP_GET_ID.rawValue)]
        discards = ops[Int(DP_OP_DISCARD.rawValue)]
        writeZeroes = ops[Int(DP_OP_WRITE_ZEROES.rawValue)]
        otherRequests = ops[Int(DP_OP_OTHER.rawValue)]
        ioErrors = errs[Int(DP_ERR_IO.rawValue)]
        badRequests = errs[Int(DP_ERR_BAD_REQUEST.rawValue)]
        rangeErrors = errs[Int(DP_ERR_RANGE.rawValue)]
        readOnlyErrors = errs[Int(DP_ERR_READ_ONLY.rawValue)]
        unsupported = errs[Int(DP_ERR_UNSUPP.rawValue)]
        bytesRead = raw.bytes_read
        bytesWritten = raw.bytes_written
        inFlight = raw.in_flight
        batches = raw.batches
        batchHistogram = withUnsafeBytes(of: raw.batch_hist) { Array($0.bindMemory(to: UInt64.self)) }
        polled = raw.polls
        kicks = raw.kicks
        notifies = raw.notifies
        notifiesSuppressed = raw.notifies_suppressed
        bounces = raw.bounces
        bouncePeakBytes = raw.bounce_bytes_peak
        longestChain = raw.longest_chain
        latency = LatencyHistogram(buckets: withUnsafeBytes(of: raw.latency_hist) { Array($0.bindMemory(to: UInt64.self)) })
        if raw.error_stopped != 0 {
            stoppedOnError = DataPlaneError.message(-raw.error_stop_reason)
        }
        heldRequests = raw.error_held
        ignoredErrors = raw.errors_ignored
        if raw.broken != 0 {
            brokenReason = String(cString: dp_ring_error_string(raw.broken_reason))
        }
        lastAvailIndex = raw.last_avail_idx
        usedIndex = raw.used_idx
        recoveredRequests = raw.recovered
        throttledRequests = raw.throttled
        throttledNanoseconds = raw.throttled_ns
    }

    /// This one's counters plus `other`'s; the gauges (in flight, held,
    /// stopped or broken state, ring indices) stay this one's.
    public func addingCounters(of other: QueueStatistics) -> QueueStatistics {
        var total = self
        total.reads &+= other.reads; total.writes &+= other.writes; total.flushes &+= other.flushes
        total.getIDs &+= other.getIDs; total.discards &+= other.discards; total.writeZeroes &+= other.writeZeroes
        total.otherRequests &+= other.otherRequests
        total.bytesRead &+= other.bytesRead; total.bytesWritten &+= other.bytesWritten
        total.ioErrors &+= other.ioErrors; total.badRequests &+= other.badRequests
        total.rangeErrors &+= other.rangeErrors; total.readOnlyErrors &+= other.readOnlyErrors
        total.unsupported &+= other.unsupported
        total.batches &+= other.batches
        if total.batchHistogram.count < other.batchHistogram.count {
            total.batchHistogram += Array(repeating: 0, count: other.batchHistogram.count - total.batchHistogram.count)
        }
        for (i, n) in other.batchHistogram.enumerated() { total.batchHistogram[i] &+= n }
        total.polled &+= other.polled; total.kicks &+= other.kicks
        total.notifies &+= other.notifies; total.notifiesSuppressed &+= other.notifiesSuppressed
        total.bounces &+= other.bounces
        total.bouncePeakBytes = max(total.bouncePeakBytes, other.bouncePeakBytes)
        total.longestChain = max(total.longestChain, other.longestChain)
        total.latency = total.latency.adding(other.latency)
        total.ignoredErrors &+= other.ignoredErrors
        total.recoveredRequests &+= other.recoveredRequests
        total.throttledRequests &+= other.throttledRequests
        total.throttledNanoseconds &+= other.throttledNanoseconds
        return total
    }

    /// The counters alone, the gauges zeroed: what a stopped queue leaves behind.
    public var countersOnly: QueueStatistics {
        var counters = self
        counters.inFlight = 0
        counters.heldRequests = 0
        counters.stoppedOnError = nil
        counters.brokenReason = nil
        counters.lastAvailIndex = 0
        counters.usedIndex = 0
        return counters
    }

    /// The counters and the in-flight and held gauges of both, and the
    /// first stop or break reason either gives: two queues read as one.
    func adding(_ other: QueueStatistics) -> QueueStatistics {
        var total = addingCounters(of: other)
        total.inFlight &+= other.inFlight
        total.heldRequests &+= other.heldRequests
        total.stoppedOnError = stoppedOnError ?? other.stoppedOnError
        total.brokenReason = brokenReason ?? other.brokenReason
        return total
    }

    /// Sums counters and gauges (for a disk's or a thread's queues).
    public static func sum(_ parts: [QueueStatistics], disk: String, thread: String) -> QueueStatistics {
        var total = QueueStatistics(disk: disk, queue: -1, thread: thread)
        total.batchHistogram = Array(repeating: 0, count: Int(DP_BATCH_BUCKETS))
        for p in parts {
            var named = p
            named.stoppedOnError = p.stoppedOnError.map { "queue \(p.queue): \($0)" }
            named.brokenReason = p.brokenReason.map { "queue \(p.queue): \($0)" }
            total = total.adding(named)
        }
        return total
    }

    /// Rates between an earlier snapshot of the same queue(s) and this one.
    /// A counter lower than before (the two snapshots come from different
    /// processes) counts as no increase: a rate is never negative or huge.
    public func rates(since earlier: QueueStatistics, seconds: Double) -> Rates {
        let interval = max(seconds, 1e-9)
        let window = latency.subtracting(earlier.latency)
        return Rates(
            iops: Double(counterIncrease(from: earlier.requests, to: requests)) / interval,
            readMBps: Double(counterIncrease(from: earlier.bytesRead, to: bytesRead)) / interval / 1e6,
            writeMBps: Double(counterIncrease(from: earlier.bytesWritten, to: bytesWritten)) / interval / 1e6,
            p50Microseconds: window.percentile(50).map { $0 / 1000 },
            p99Microseconds: window.percentile(99).map { $0 / 1000 },
            polledShare: {
                let polled = Double(counterIncrease(from: earlier.polled, to: self.polled))
                let kicked = Double(counterIncrease(from: earlier.kicks, to: kicks))
                return polled + kicked > 0 ? polled / (polled + kicked) : nil
            }())
    }
}

/// How much a monotonic counter grew from `earlier` to `later`: 0 when it
/// went backwards (the two readings come from different processes or
/// queues) instead of wrapping to nearly 2^64.
public func counterIncrease(from earlier: UInt64, to later: UInt64) -> UInt64 {
    later >= earlier ? later - earlier : 0
}

/// Throughput and latency over an interval.
public struct Rates: Sendable, Equatable, Codable {
    public var iops: Double
    public var readMBps: Double
    public var writeMBps: Double
    public var p50Microseconds: Double?
    public var p99Microseconds: Double?
    /// Of the batches' requests, the share found by polling rather than after a kick.
    public var polledShare: Double?
}

/// Counters of one IOThread.
public struct IOThreadStatistics: Sendable, Equatable, Codable {
    public var name: String
    public var iterations: UInt64
    public var waits: UInt64
    public var pollHits: UInt64
    public var pollMisses: UInt64
    /// The adaptive busy-poll window right now.
    public var pollWindowNanoseconds: UInt64
    public var submits: UInt64
    /// CPU time the thread has used.
    public var cpuNanoseconds: UInt64
    public var queues: Int
    /// Set when the thread's io_uring failed it (its queues are broken): why.
    public var failure: String?
    /// Passes that found its io_uring completion queue overflowed (0 by design).
    public var completionQueueOverflows: UInt64
    /// The io_uring features its ring uses (what the kernel has, less what
    /// was disabled).
    public var ioURingFeatures: IOURingFeatures = []
    /// Disk fds in its registered file table now.
    public var registeredFiles: UInt32 = 0
    /// Guest memory registered as fixed buffers now, in pieces (a region,
    /// or 1 GiB of one).
    public var registeredBuffers: UInt32 = 0
    /// Guest memory tables that could not be registered (their I/O is
    /// plain), and why the last one could not.
    public var bufferRegistrationFailures: UInt64 = 0
    public var bufferRegistrationError: String?
    /// Disk requests that named a registered file.
    public var fixedFileRequests: UInt64 = 0
    /// Reads and writes into registered guest memory (READ_FIXED/WRITE_FIXED).
    public var fixedBufferRequests: UInt64 = 0
    /// Other one-segment reads and writes, issued as READ/WRITE.
    public var singleSegmentRequests: UInt64 = 0
    /// Multishot kick polls armed again after the kernel ended one.
    public var kickPollRearms: UInt64 = 0
    /// Where the thread's wall-clock time went since it started: passes
    /// over its queues (busy), spinning in the busy-poll window, and
    /// sleeping until a kick, a completion or a control message. Each
    /// stretch is added when it ends.
    public var busyTimeNanoseconds: UInt64 = 0
    public var pollTimeNanoseconds: UInt64 = 0
    public var sleepTimeNanoseconds: UInt64 = 0

    init(_ raw: dp_iothread_stats, name: String) {
        self.name = name
        iterations = raw.iterations
        waits = raw.waits
        pollHits = raw.poll_hits
        pollMisses = raw.poll_misses
        pollWindowNanoseconds = raw.poll_ns
        submits = raw.submits
        cpuNanoseconds = raw.cpu_ns
        queues = Int(raw.queues)
        failure = raw.failed != 0 ? DataPlaneError.message(-raw.failed) : nil
        completionQueueOverflows = raw.cq_overflows
        ioURingFeatures = IOURingFeatures(rawValue: raw.uring_features)
        registeredFiles = raw.registered_files
        registeredBuffers = raw.registered_buffers
        bufferRegistrationFailures = raw.buffer_register_failures
        bufferRegistrationError = raw.buffer_register_error != 0 ? DataPlaneError.message(-raw.buffer_register_error) : nil
        fixedFileRequests = raw.fixed_file_ios
        fixedBufferRequests = raw.fixed_buffer_ios
        singleSegmentRequests = raw.single_rw_ios
        kickPollRearms = raw.kick_rearms
        busyTimeNanoseconds = raw.busy_time_ns
        pollTimeNanoseconds = raw.poll_time_ns
        sleepTimeNanoseconds = raw.sleep_time_ns
    }

    private enum CodingKeys: String, CodingKey {
        case name, iterations, waits, pollHits, pollMisses, pollWindowNanoseconds, submits, cpuNanoseconds, queues
        case failure, completionQueueOverflows, ioURingFeatures, registeredFiles, registeredBuffers
        case bufferRegistrationFailures, bufferRegistrationError, fixedFileRequests, fixedBufferRequests
        case singleSegmentRequests, kickPollRearms, busyTimeNanoseconds, pollTimeNanoseconds, sleepTimeNanoseconds
    }

    /// Decodes what older versions sent too (without the io_uring counters).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        iterations = try c.decode(UInt64.self, forKey: .iterations)
        waits = try c.decode(UInt64.self, forKey: .waits)
        pollHits = try c.decode(UInt64.self, forKey: .pollHits)
        pollMisses = try c.decode(UInt64.self, forKey: .pollMisses)
        pollWindowNanoseconds = try c.decode(UInt64.self, forKey: .pollWindowNanoseconds)
        submits = try c.decode(UInt64.self, forKey: .submits)
        cpuNanoseconds = try c.decode(UInt64.self, forKey: .cpuNanoseconds)
        queues = try c.decode(Int.self, forKey: .queues)
        failure = try c.decodeIfPresent(String.self, forKey: .failure)
        completionQueueOverflows = try c.decode(UInt64.self, forKey: .completionQueueOverflows)
        ioURingFeatures = try c.decodeIfPresent(IOURingFeatures.self, forKey: .ioURingFeatures) ?? []
        registeredFiles = try c.decodeIfPresent(UInt32.self, forKey: .registeredFiles) ?? 0
        registeredBuffers = try c.decodeIfPresent(UInt32.self, forKey: .registeredBuffers) ?? 0
        bufferRegistrationFailures = try c.decodeIfPresent(UInt64.self, forKey: .bufferRegistrationFailures) ?? 0
        bufferRegistrationError = try c.decodeIfPresent(String.self, forKey: .bufferRegistrationError)
        fixedFileRequests = try c.decodeIfPresent(UInt64.self, forKey: .fixedFileRequests) ?? 0
        fixedBufferRequests = try c.decodeIfPresent(UInt64.self, forKey: .fixedBufferRequests) ?? 0
        singleSegmentRequests = try c.decodeIfPresent(UInt64.self, forKey: .singleSegmentRequests) ?? 0
        kickPollRearms = try c.decodeIfPresent(UInt64.self, forKey: .kickPollRearms) ?? 0
        busyTimeNanoseconds = try c.decodeIfPresent(UInt64.self, forKey: .busyTimeNanoseconds) ?? 0
        pollTimeNanoseconds = try c.decodeIfPresent(UInt64.self, forKey: .pollTimeNanoseconds) ?? 0
        sleepTimeNanoseconds = try c.decodeIfPresent(UInt64.self, forKey: .sleepTimeNanoseconds) ?? 0
    }
}
