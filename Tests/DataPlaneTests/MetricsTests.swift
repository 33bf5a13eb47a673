import CGuestDriver
import CVhostFrontend
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
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

        try h.queues[0].pause()
        #expect(parseExposition(exporter.renderString())["dataplane_queue_state{disk=\"null\",queue=\"0\",state=\"paused\"}"] == 1)
        try h.queues[0].resume()
        #expect(parseExposition(exporter.renderString())["dataplane_queue_state{disk=\"null\",queue=\"0\",state=\"running\"}"] == 1)

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

    /// A removed disk's series go; a disk that takes its name starts from
    /// its own counts, not the removed one's.
    @Test func aRemovedDisksSeriesGo() throws {
        let h = try Harness(disk: DiskConfiguration(path: "a", backend: .null))
        let exporter = PrometheusExporter(plane: h.plane)
        for _ in 0..<3 { #expect(try h.guest.run(type: UInt32(GD_BLK_T_FLUSH)).status == 0) }
        let key = "dataplane_requests_total{disk=\"null\",queue=\"0\",op=\"flush\"}"
        #expect(parseExposition(exporter.renderString())[key] == 3)
        h.plane.removeDisk(h.disk)
        let gone = exporter.renderString()
        #expect(!gone.contains("disk=\"null\""), "\(gone)")
        _ = try h.plane.addDisk(DiskConfiguration(path: "b", backend: .null, nullSizeBytes: 1 << 20))
        let again = parseExposition(exporter.renderString())
        #expect(again["dataplane_disk_capacity_bytes{disk=\"null\"}"] == Double(1 << 20))
        #expect(again[key] == nil, "the new disk has no queue yet")
    }
}

/// `dpctl start --metrics-address`, scraped over HTTP as Prometheus does.
@Suite(.serialized) struct MetricsEndpointTests {
    struct Scrape {
        var status: Int
        var headers: [String: String]
        var body: String
    }

    static func scrape(_ url: String, method: String = "GET") async throws -> Scrape {
        var request = URLRequest(url: URL(string: url)!)
        request.httpMethod = method
        let (data, response) = try await URLSession.shared.data(for: request)
        let http = try #require(response as? HTTPURLResponse)
        var headers: [String: String] = [:]
        for (k, v) in http.allHeaderFields { headers[String(describing: k).lowercased()] = String(describing: v) }
        return Scrape(status: http.statusCode, headers: headers, body: String(decoding: data, as: UTF8.self))
    }

    /// Starts dpctl with the metrics on a free port; returns it and the base URL.
    static func start(_ arguments: [String], dir: String) throws -> (QEMUEndToEndTests.Instance, String) {
        let dp = try QEMUEndToEndTests.Instance(arguments + ["--metrics-address", "127.0.0.1:0"], log: dir + "/dpctl.log")
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if let range = dp.log.range(of: #"metrics on http://127\.0\.0\.1:[0-9]+/metrics"#, options: .regularExpression) {
                return (dp, String(dp.log[range].dropFirst("metrics on ".count)))
            }
            usleep(20_000)
        }
        _ = dp.terminate()
        throw TestFailure("dpctl did not log its metrics address: \(dp.log)")
    }

    func scratch() throws -> String {
        let dir = "/tmp/dp-metrics-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    @Test func countersMoveByExactlyTheIODone() async throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = try TestImage(size: 16 << 20, in: dir)
        let socket = dir + "/vu.sock"
        let (dp, url) = try Self.start(["--disk", image.path, "--socket", socket, "--num-queues", "2",
                                        "--control", dir + "/ctl", "--poll-us", "0"], dir: dir)
        defer { _ = dp.terminate() }
        let guest = try TestGuest(queues: 2, queueSize: 64)
        let conn = try guest.connectFrontend(socket)
        defer { vuf_close(conn) }
        let buf = guest.alloc(1 << 16)
        #expect(try guest.run(0, type: UInt32(GD_BLK_T_OUT), sector: 0, segments: [(buf, 4096)]).status == 0)

        let before = try await Self.scrape(url)
        #expect(before.status == 200)
        #expect(before.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8", "\(before.headers)")
        let a = parseExposition(before.body)

        let reads = 7, writes = 5
        for i in 0..<reads {
            #expect(try guest.run(i % 2, type: UInt32(GD_BLK_T_IN), sector: UInt64(i * 8), segments: [(buf, 4096)]).status == 0)
        }
        for i in 0..<writes {
            #expect(try guest.run(1, type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * 16), segments: [(buf, 8192)]).status == 0)
        }
        #expect(try guest.run(0, type: UInt32(GD_BLK_T_FLUSH)).status == 0)

        let after = try await Self.scrape(url)
        let b = parseExposition(after.body)
        let disk = PrometheusExporter.escapeLabelValue(image.path)
        func delta(_ series: String) -> Double? {
            guard let x = b[series] else { return nil }
            return x - (a[series] ?? 0)
        }
        func q(_ n: Int) -> String { "disk=\"\(disk)\",queue=\"\(n)\"" }
        #expect(delta("dataplane_requests_total{\(q(0)),op=\"read\"}") == 4, "\(after.body)")
        #expect(delta("dataplane_requests_total{\(q(1)),op=\"read\"}") == 3)
        #expect(delta("dataplane_requests_total{\(q(1)),op=\"write\"}") == Double(writes))
        #expect(delta("dataplane_requests_total{\(q(0)),op=\"write\"}") == 0)
        #expect(delta("dataplane_requests_total{\(q(0)),op=\"flush\"}") == 1)
        #expect(delta("dataplane_bytes_total{\(q(0)),op=\"read\"}")! + delta("dataplane_bytes_total{\(q(1)),op=\"read\"}")!
                == Double(reads * 4096))
        #expect(delta("dataplane_bytes_total{\(q(1)),op=\"write\"}") == Double(writes * 8192))
        #expect(delta("dataplane_request_duration_seconds_count{\(q(0))}")! + delta("dataplane_request_duration_seconds_count{\(q(1))}")!
                == Double(reads + writes + 1))
        #expect(delta("dataplane_request_duration_seconds_bucket{\(q(1)),le=\"+Inf\"}") == Double(3 + writes))
        for type in ["io", "bad_request", "range", "read_only", "unsupported"] {
            #expect(delta("dataplane_errors_total{\(q(0)),type=\"\(type)\"}") == 0)
        }
        #expect(b["dataplane_in_flight_requests{\(q(0))}"] == 0)
        #expect(b["dataplane_in_flight_requests{\(q(1))}"] == 0)
        #expect(b["dataplane_queue_state{\(q(1)),state=\"running\"}"] == 1)
        #expect((delta("dataplane_iothread_sleep_seconds_total{iothread=\"iothread0\"}") ?? 0) > 0)
        #expect(b["dataplane_iothread_busy_seconds_total{iothread=\"iothread0\"}"] != nil)
        #expect(b["dataplane_iothread_poll_seconds_total{iothread=\"iothread0\"}"] == 0, "--poll-us 0 never polls")

        // An error by type: a write past the end.
        let capacitySectors = UInt64(16 << 20) / 512
        #expect(try guest.run(0, type: UInt32(GD_BLK_T_OUT), sector: capacitySectors, segments: [(buf, 512)]).status != 0)
        let c = parseExposition(try await Self.scrape(url).body)
        #expect(c["dataplane_errors_total{\(q(0)),type=\"range\"}"] == (b["dataplane_errors_total{\(q(0)),type=\"range\"}"] ?? 0) + 1)
    }

    @Test func otherPathsAre404AndOtherMethods405() async throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (dp, url) = try Self.start(["--disk", "x", "--backend", "null", "--socket", dir + "/vu.sock",
                                        "--control", dir + "/ctl"], dir: dir)
        defer { _ = dp.terminate() }
        let base = String(url.dropLast("/metrics".count))
        #expect(try await Self.scrape(base + "/").status == 404)
        #expect(try await Self.scrape(base + "/metricsx").status == 404)
        let post = try await Self.scrape(url, method: "POST")
        #expect(post.status == 405)
        #expect(post.headers["allow"] == "GET, HEAD")
        #expect(try await Self.scrape(url, method: "DELETE").status == 405)
        let head = try await Self.scrape(url, method: "HEAD")
        #expect(head.status == 200 && head.body.isEmpty)
        #expect(try await Self.scrape(url + "?x=1").status == 200)
        #expect(dp.terminate() == 0, "\(dp.log)")
    }

    /// A client that sends a request and never reads the answer, and one
    /// that sends nothing: neither holds up the next scrape.
    @Test func stuckClientsDoNotHoldUpAScrape() async throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (dp, url) = try Self.start(["--disk", "x", "--backend", "null", "--socket", dir + "/vu.sock",
                                        "--control", dir + "/ctl"], dir: dir)
        defer { _ = dp.terminate() }
        let port = UInt16(url.split(separator: ":").last!.split(separator: "/").first!)!
        var fds: [Int32] = []
        defer { fds.forEach { close($0) } }
        for i in 0..<8 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = port.bigEndian
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            #expect(rc == 0)
            var small: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
            if i % 2 == 0 {
                let request = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" + String(repeating: "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", count: 100)
                _ = request.withCString { send(fd, $0, strlen($0), 0) }
            }
            fds.append(fd)
        }
        let scrape = try await Self.scrape(url)
        #expect(scrape.status == 200 && scrape.body.contains("dataplane_build_info"))
    }

    @Test func aPortInUseOrABadAddressIsAClearError() async throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (dp, url) = try Self.start(["--disk", "x", "--backend", "null", "--socket", dir + "/a.sock",
                                        "--control", dir + "/a.ctl"], dir: dir)
        defer { _ = dp.terminate() }
        let address = String(url.dropFirst("http://".count).dropLast("/metrics".count))
        let busy = try DpctlTests.dpctl(["start", "--disk", "y", "--backend", "null", "--socket", dir + "/b.sock",
                                         "--control", dir + "/b.ctl", "--metrics-address", address], timeout: 20)
        #expect(busy.status == 1, "\(busy)")
        #expect(busy.stderr.contains("dpctl: error: --metrics-address \(address): cannot listen: Address already in use"), "\(busy.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/b.sock"), "a refused start leaves no socket behind")
        for (bad, message) in [("9100", "use HOST:PORT"), ("127.0.0.1:99999", "the port must be a number"),
                               ("::1:9100", "put an IPv6 address in brackets"), ("[::1]9100", "use HOST:PORT")] {
            let r = try DpctlTests.dpctl(["start", "--disk", "y", "--backend", "null", "--socket", dir + "/c.sock",
                                          "--metrics-address", bad], timeout: 20)
            #expect(r.status == 2, "\(bad): \(r)")
            #expect(r.stderr.contains(message), "\(bad): \(r.stderr)")
        }
        let check = try DpctlTests.dpctl(["start", "--disk", "y", "--backend", "null", "--socket", dir + "/c.sock",
                                          "--metrics-address", "[::1]:9100", "--check"], timeout: 20)
        #expect(check.status == 0 && check.stdout.contains("\"metrics-address\" : \"[::1]:9100\""), "\(check)")
    }

    @Test func theConfigFileTakesTheMetricsAddress() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = dir + "/c.json"
        try #"{"metrics-address": "127.0.0.1:9100", "disks": [{"path": "x", "backend": "null", "socket": "/tmp/x.sock"}]}"#
            .write(toFile: config, atomically: true, encoding: .utf8)
        let r = try DpctlTests.dpctl(["start", "--config", config, "--check"], timeout: 20)
        #expect(r.status == 0 && r.stdout.contains("\"metrics-address\" : \"127.0.0.1:9100\""), "\(r)")
        let overridden = try DpctlTests.dpctl(["start", "--config", config, "--metrics-address", "[::1]:0", "--check"], timeout: 20)
        #expect(overridden.stdout.contains("\"metrics-address\" : \"[::1]:0\""), "\(overridden)")
        try #"{"metrics-address": "nowhere", "disks": [{"path": "x", "backend": "null", "socket": "/tmp/x.sock"}]}"#
            .write(toFile: config, atomically: true, encoding: .utf8)
        let bad = try DpctlTests.dpctl(["start", "--config", config, "--check"], timeout: 20)
        #expect(bad.status != 0 && bad.stderr.contains("metrics-address \"nowhere\""), "\(bad)")
    }
}
