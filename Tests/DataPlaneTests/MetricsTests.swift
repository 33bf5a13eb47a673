import CGuestDriver
import Foundation
import Testing

@testable import DataPlane

/// The exposition text as samples: "name{labels}" to value.
func parseExposition(_ text: String) -> [String: Double] {
    var samples: [String: Double] = [:]
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
        samples[String(line[..<space])] = value
    }
    return samples
}

/// The in-process exporter over a running data plane.
@Suite struct PrometheusExporterTests {
    @Test func theExpositionIsWellFormedAndCountsWhatTheQueueDid() throws {
        let image = try TestImage(size: 1 << 20)
        let h = try Harness(disk: DiskConfiguration(path: image.path), queues: 2)
        let exporter = PrometheusExporter(plane: h.plane)
        let buf = h.guest.alloc(4096)
        for _ in 0..<3 { #expect(try h.guest.run(0, type: UInt32(GD_BLK_T_IN), segments: [(buf, 4096)]).status == 0) }
        #expect(try h.guest.run(1, type: UInt32(GD_BLK_T_OUT), segments: [(buf, 512)]).status == 0)
        let text = exporter.renderString()
        let samples = parseExposition(text)
        let disk = PrometheusExporter.escapeLabelValue(image.path)
        #expect(samples["dataplane_requests_total{disk=\"\(disk)\",queue=\"0\",op=\"read\"}"] == 3, "\(text)")
        #expect(samples["dataplane_requests_total{disk=\"\(disk)\",queue=\"1\",op=\"write\"}"] == 1)
        #expect(samples["dataplane_bytes_total{disk=\"\(disk)\",queue=\"0\",op=\"read\"}"] == 12288)
        #expect(samples["dataplane_bytes_total{disk=\"\(disk)\",queue=\"1\",op=\"write\"}"] == 512)
        #expect(samples["dataplane_queue_state{disk=\"\(disk)\",queue=\"0\",state=\"running\"}"] == 1)
        #expect(samples["dataplane_queue_state{disk=\"\(disk)\",queue=\"0\",state=\"broken\"}"] == 0)
        #expect(samples["dataplane_build_info{version=\"\(DataPlane.version)\"}"] == 1)

        // Every family has one TYPE line, and one HELP line before it.
        let lines = text.split(separator: "\n")
        let types = lines.filter { $0.hasPrefix("# TYPE ") }.map { $0.split(separator: " ")[2] }
        #expect(Set(types).count == types.count, "a family typed twice: \(types)")
        for family in DataPlaneMetrics.families {
            #expect(lines.filter { $0 == "# TYPE \(family.name) \(family.type)" }.count == 1, "\(family.name)")
            #expect(lines.filter { $0.hasPrefix("# HELP \(family.name) ") }.count == 1, "\(family.name)")
        }

        // The histogram: cumulative, bounds rising, +Inf = _count = requests.
        let labels = "disk=\"\(disk)\",queue=\"0\""
        let buckets = lines.filter { $0.hasPrefix("dataplane_request_duration_seconds_bucket{\(labels),") }
        var last = -1.0, lastBound = 0.0
        for line in buckets.dropLast() {
            let bound = Double(line.split(separator: "\"")[5])!
            let count = Double(line.split(separator: " ").last!)!
            #expect(bound > lastBound && count >= last, "\(line)")
            lastBound = bound
            last = count
        }
        #expect(buckets.last?.hasSuffix("le=\"+Inf\"} 3") == true, "\(buckets)")
        #expect(last == 3, "the last finite bucket (69 s) holds every request")
        #expect(samples["dataplane_request_duration_seconds_count{\(labels)}"] == 3)
        let sum = try #require(samples["dataplane_request_duration_seconds_sum{\(labels)}"])
        #expect(sum > 0 && sum < 3)
    }

    /// Counters are pushed as deltas: a scrape after no I/O shows the same
    /// values, and new I/O adds exactly itself.
    @Test func repeatedRendersAddOnlyWhatHappenedBetween() throws {
        let h = try Harness(disk: DiskConfiguration(path: "n", backend: .null))
        let exporter = PrometheusExporter(plane: h.plane)
        let key = "dataplane_requests_total{disk=\"null\",queue=\"0\",op=\"flush\"}"
        #expect(parseExposition(exporter.renderString())[key] == 0)
        for _ in 0..<4 { #expect(try h.guest.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0) }
        #expect(parseExposition(exporter.renderString())[key] == 4)
        #expect(parseExposition(exporter.renderString())[key] == 4)
        #expect(try h.guest.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0)
        #expect(parseExposition(exporter.renderString())[key] == 5)

        // A stopped ring keeps its counts, with state "stopped".
        h.plane.stopQueue(disk: h.disk, index: 0)
        let samples = parseExposition(exporter.renderString())
        #expect(samples[key] == 5)
        #expect(samples["dataplane_queue_state{disk=\"null\",queue=\"0\",state=\"stopped\"}"] == 1)
        #expect(samples["dataplane_queue_state{disk=\"null\",queue=\"0\",state=\"running\"}"] == 0)
    }

    @Test func twoDisksOfOneNameGetDistinctLabels() throws {
        let h = try Harness(disk: DiskConfiguration(path: "a", backend: .null))
        _ = try h.plane.addDisk(DiskConfiguration(path: "b", backend: .null))
        let text = PrometheusExporter(plane: h.plane).renderString()
        #expect(text.contains("dataplane_disk_capacity_bytes{disk=\"null\"}"))
        #expect(text.contains("dataplane_disk_capacity_bytes{disk=\"null#2\"}"), "\(text)")
    }
}
