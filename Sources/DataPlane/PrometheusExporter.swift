import CoreMetrics
import Prometheus

/// A data plane's metrics in Prometheus' text exposition format (0.0.4),
/// for an HTTP endpoint to serve (`dpctl start --metrics-address` does).
///
/// The counters and gauges are ``DataPlaneMetrics`` over swift-prometheus'
/// registry; each ``render()`` updates them from one snapshot of the core's
/// counters and appends the latency histograms of the same snapshot, which
/// swift-metrics cannot carry. Rendering reads counters and takes the data
/// plane's control lock briefly, as `dpctl stats` does: it never waits for
/// an IOThread.
///
/// ```swift
/// let exporter = PrometheusExporter(plane: plane)
/// let body = exporter.render()   // serve with PrometheusExporter.contentType
/// ```
public final class PrometheusExporter: Sendable {
    /// The Content-Type of ``render()``'s text.
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    /// The registry the metrics live in; a program may add its own.
    public let registry: PrometheusCollectorRegistry
    /// The swift-metrics side, updated by each render.
    public let metrics: DataPlaneMetrics

    public init(plane: DataPlane, registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        metrics = DataPlaneMetrics(plane: plane, factory: PrometheusMetricsFactory(registry: registry))
    }

    /// The exposition text, every value read now.
    public func render() -> [UInt8] {
        metrics.withUpdate { sample in
            var emitted: [UInt8] = []
            registry.emit(into: &emitted)
            var out = Self.addingHelp(to: emitted)
            Self.appendLatencyHistograms(sample, to: &out)
            return out
        }
    }

    public func renderString() -> String {
        String(decoding: render(), as: UTF8.self)
    }

    /// Help lines for the families swift-metrics made (it has no help
    /// text), before their TYPE lines.
    static func addingHelp(to text: [UInt8]) -> [UInt8] {
        let help = Dictionary(DataPlaneMetrics.families.map { ($0.name, $0.help) }, uniquingKeysWith: { a, _ in a })
        var out: [UInt8] = []
        out.reserveCapacity(text.count + 4096)
        var previous: ArraySlice<UInt8> = []
        for line in text.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            if line.starts(with: "# TYPE ".utf8) {
                let name = String(decoding: line.dropFirst(7).prefix { $0 != UInt8(ascii: " ") }, as: UTF8.self)
                if let text = help[name], !previous.starts(with: "# HELP \(name) ".utf8) {
                    out.append(contentsOf: "# HELP \(name) \(text)\n".utf8)
                }
            }
            out.append(contentsOf: line)
            out.append(UInt8(ascii: "\n"))
            previous = line
        }
        if text.last == UInt8(ascii: "\n") || text.isEmpty { out.removeLast() } // split added one line too many
        return out
    }

    /// The upper bounds exported, as powers of two of nanoseconds: 2^10 ns
    /// (about 1 us) to 2^36 ns (about 69 s). The core's bucket i counts
    /// latencies in [2^i, 2^(i+1)) ns, whole nanoseconds, so the cumulative
    /// count of buckets below 2^b is exactly the count of latencies <= 2^b - 1
    /// ns: that is the `le` bound. Buckets below the first bound are in it
    /// (cumulative), those past the last only in +Inf.
    static let latencyBoundExponents = 10...36

    static func appendLatencyHistograms(_ sample: MetricsSample, to out: inout [UInt8]) {
        let name = "dataplane_request_duration_seconds"
        guard let family = DataPlaneMetrics.families.first(where: { $0.name == name }) else { return }
        if !out.isEmpty && out.last != UInt8(ascii: "\n") { out.append(UInt8(ascii: "\n")) }
        out.append(contentsOf: "# HELP \(name) \(family.help)\n# TYPE \(name) histogram\n".utf8)
        for q in sample.queues {
            let labels = "disk=\"\(escapeLabelValue(q.disk))\",queue=\"\(q.index)\""
            let buckets = q.statistics.latency.buckets
            var cumulative: UInt64 = 0
            var next = 0
            for b in latencyBoundExponents {
                while next < b && next < buckets.count {
                    cumulative &+= buckets[next]
                    next += 1
                }
                let le = Double((UInt64(1) << UInt64(b)) - 1) / 1e9
                out.append(contentsOf: "\(name)_bucket{\(labels),le=\"\(le)\"} \(cumulative)\n".utf8)
            }
            let count = q.statistics.latency.count
            out.append(contentsOf: "\(name)_bucket{\(labels),le=\"+Inf\"} \(count)\n".utf8)
            out.append(contentsOf: "\(name)_sum{\(labels)} \(estimatedSumSeconds(buckets))\n".utf8)
            out.append(contentsOf: "\(name)_count{\(labels)} \(count)\n".utf8)
        }
    }

    /// The core keeps no sum of latencies, only the log2 buckets: each
    /// request is counted at its bucket's midpoint, 1.5 * 2^i ns (1 ns for
    /// bucket 0, [0, 2) ns). A request's estimate is within -25% and +50% of
    /// its latency, and so is the sum.
    static func estimatedSumSeconds(_ buckets: [UInt64]) -> Double {
        var sum = 0.0
        for (i, n) in buckets.enumerated() where n > 0 {
            let mid = i == 0 ? 1.0 : 1.5 * Double(UInt64(1) << UInt64(i))
            sum += Double(n) * mid
        }
        return sum / 1e9
    }

    /// A label value as the exposition format writes it.
    static func escapeLabelValue(_ value: String) -> String {
        var out = ""
        for c in value.unicodeScalars {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }
}
