import DataPlane
import Foundation
import Testing

/// Options that do what they say: config file keys are the flag names, an
/// unknown key is an error, and every default a help text claims is the
/// default the code uses.
@Suite(.serialized) struct DpctlOptionsTests {
    typealias JSON = [String: Any]

    func scratch() throws -> String {
        let dir = "/tmp/dp-opt-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// `dpctl start ARGS --check`, parsed.
    static func check(_ arguments: [String]) throws -> JSON {
        let r = try DpctlTests.dpctl(["start"] + arguments + ["--check"], timeout: 10)
        guard r.status == 0, let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? JSON else {
            throw TestFailure("start --check \(arguments): exit \(r.status): \(r.stderr)\(r.stdout)")
        }
        return json
    }

    static func firstDisk(_ json: JSON) -> JSON { (json["disks"] as? [JSON])?.first ?? [:] }

    func writeConfig(_ text: String, in dir: String) -> String {
        let path = dir + "/config-\(UUID().uuidString.prefix(6)).json"
        _ = FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
        return path
    }

    // MARK: - Config file keys

    /// `"readonly": true` used to be ignored (the key was `readOnly`) and the
    /// guest got a writable disk. Checked on a running instance.
    @Test func readonlyInAConfigFileGivesAReadOnlyDisk() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/a.sock"
        let config = writeConfig("""
            { "disks": [ { "path": "x", "backend": "null", "socket": "\(socket)", "readonly": true, "num-queues": 1 } ] }
            """, in: dir)
        let dp = try QEMUEndToEndTests.Instance(["--config", config], log: dir + "/log")
        defer { _ = dp.terminate() }
        #expect(DpctlTests.waitFor(socket + ".ctl"), "\(dp.log)")
        let status = try DpctlTests.dpctl(["status", "--socket", socket, "--json"], timeout: 10)
        let json = try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? JSON
        let disk = try #require((json?["disks"] as? [JSON])?.first, "\(status.stderr)")
        #expect(disk["readOnly"] as? Bool == true)
        #expect(disk["maxQueues"] as? Int == 1)
    }

    @Test(arguments: [
        (#"{ "disks": [ { "path": "x", "socket": "s", "read-only": true } ] }"#,
         #"unknown key "read-only" in disks[0] (keys: path, socket, readonly, num-queues, queue-size, backend, null-size, null-read-zeroes, serial, direct, block-size, rerror, werror, fault, locking, fixed-buffers, socket-owner, socket-group, socket-mode, write-cache, I/O limits bps-total, bps-read, bps-write, iops-total, iops-read, iops-write (each also KEY-max and KEY-max-length), iops-size, group)"#),
        (#"{ "iothread": 2, "disks": [ { "path": "x", "socket": "s" } ] }"#,
         #"unknown key "iothread" in the file (keys: iothreads, cpuset, poll-us, notify-after, control, disable-io-uring, socket-owner, socket-group, socket-mode, metrics-address, disks)"#),
        (#"{ "disks": [ { "path": "x", "socket": "s", "readonly": true, "readOnly": false } ] }"#,
         #"disks[0] gives both "readOnly" and "readonly", the same setting: keep "readonly""#),
        (#"{ "poll-us": 5, "pollMicroseconds": 5, "disks": [ { "path": "x", "socket": "s" } ] }"#,
         #"the file gives both "poll-us" and "pollMicroseconds", the same setting: keep "poll-us""#),
        (#"{ "disks": [ { "path": "x", "socket": "s", "readonly": "yes" } ] }"#,
         #"disks[0].readonly must be true or false, not "yes""#),
        (#"{ "disks": [ { "path": "x", "socket": "s", "num-queues": 65 } ] }"#,
         #"disks[0].num-queues must be a whole number in 1...64, not 65"#),
        (#"{ "disks": [ { "path": "x", "socket": "s", "null-size": "lots" } ] }"#,
         #"disks[0].null-size "lots" is not a size such as 4096, 64k or 1G"#),
        (#"{ "disks": [ { "path": "x", "socket": "s", "null-read-zeroes": "maybe" } ] }"#,
         #"disks[0].null-read-zeroes must be true, false, "on" or "off", not "maybe""#),
        (#"{ "disks": [ { "path": "x" } ] }"#, #"disks[0] has no "socket""#),
        (#"{ "disks": [] }"#, #""disks" lists no disk"#),
    ] as [(String, String)])
    func aConfigFileThatSaysSomethingDpctlDoesNotKnowIsRefused(config: String, message: String) throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = writeConfig(config, in: dir)
        let r = try DpctlTests.dpctl(["start", "--config", path], timeout: 10)
        #expect(!r.timedOut, "dpctl started serving from \(config)")
        #expect(r.status == 1)
        #expect(r.stderr == "dpctl: error: config file \(path): \(message)\n")
    }

    /// The same settings as flags, as flag-named keys and as the old
    /// camelCase keys configure the same thing.
    @Test func configKeysAreTheFlagNamesAndTakeWhatTheFlagsTake() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let s = dir + "/a.sock"
        let flags = try Self.check([
            "--iothreads", "2", "--cpuset", "0", "--poll-us", "5", "--notify-after", "4", "--control", dir + "/c.ctl",
            "--disk", "nul", "--socket", s, "--readonly", "--num-queues", "4", "--queue-size", "256", "--backend", "null",
            "--null-size", "64M", "--null-read-zeroes", "off", "--serial", "SER1", "--no-direct", "--block-size", "4096",
            "--rerror", "stop", "--werror", "report", "--fault", "errno=EIO,ops=write",
        ])
        let flagNamed = try Self.check(["--config", writeConfig("""
            { "iothreads": 2, "cpuset": "0", "poll-us": 5, "notify-after": 4, "control": "\(dir)/c.ctl",
              "disks": [ { "path": "nul", "socket": "\(s)", "readonly": true, "num-queues": 4, "queue-size": 256,
                           "backend": "null", "null-size": "64M", "null-read-zeroes": "off", "serial": "SER1",
                           "direct": false, "block-size": 4096, "rerror": "stop", "werror": "report",
                           "fault": "errno=EIO,ops=write" } ] }
            """, in: dir)])
        let camelCase = try Self.check(["--config", writeConfig("""
            { "iothreads": 2, "cpuset": "0", "pollMicroseconds": 5, "notifyAfter": 4, "control": "\(dir)/c.ctl",
              "disks": [ { "path": "nul", "socket": "\(s)", "readOnly": true, "numQueues": 4, "queueSize": 256,
                           "backend": "null", "nullSize": 67108864, "nullReadZeroes": false, "serial": "SER1",
                           "directIO": false, "logicalBlockSize": 4096, "readErrorPolicy": "stop",
                           "writeErrorPolicy": "report", "fault": "errno=EIO,ops=write" } ] }
            """, in: dir)])
        let disk = Self.firstDisk(flags)
        #expect(flags["iothreads"] as? Int == 2 && flags["poll-us"] as? Int == 5 && flags["cpuset"] as? String == "0")
        #expect(flags["notify-after"] as? Int == 4)
        #expect(disk["readonly"] as? Bool == true && disk["num-queues"] as? Int == 4 && disk["queue-size"] as? Int == 256)
        #expect(disk["null-size"] as? Int == 64 << 20 && disk["null-read-zeroes"] as? Bool == false)
        #expect(disk["direct"] as? Bool == false && disk["block-size"] as? Int == 4096 && disk["serial"] as? String == "SER1")
        #expect(disk["rerror"] as? String == "stop" && disk["werror"] as? String == "report")
        #expect(NSDictionary(dictionary: flagNamed).isEqual(to: flags), "flag-named keys: \(flagNamed) vs flags: \(flags)")
        #expect(NSDictionary(dictionary: camelCase).isEqual(to: flags), "camelCase keys: \(camelCase) vs flags: \(flags)")
    }

    /// What --check prints is a config file that configures the same again.
    @Test func theCheckedConfigurationReadsBackUnchanged() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try DpctlTests.dpctl(["start", "--disk", dir + "/img.raw", "--socket", dir + "/a.sock",
                                          "--disk", "n", "--backend", "null", "--socket", dir + "/b.sock", "--check"], timeout: 10)
        #expect(first.status == 0, "\(first.stderr)")
        let again = try DpctlTests.dpctl(["start", "--config", writeConfig(first.stdout, in: dir), "--check"], timeout: 10)
        #expect(again.status == 0 && again.stdout == first.stdout, "\(again.stderr)")
    }

    // MARK: - Help texts hold to the behaviour

    /// The "(default X)" each option's paragraph of a help text claims,
    /// by option; paragraph lines are joined, so a wrapped default counts.
    /// Paragraphs start at an indent of 2 with an option (`--poll-us`) or a
    /// disk key (`num-queues=N`, named without the `=`).
    static func claimedDefaults(_ help: String) -> [String: String] {
        var paragraphs: [(String, String)] = []
        var open = false
        for line in help.split(separator: "\n", omittingEmptySubsequences: false) {
            let trimmed = line.drop { $0 == " " }
            let indent = line.count - trimmed.count
            let first = String(trimmed.prefix { $0 != " " })
            if indent == 2 {
                open = true
                if first.hasPrefix("--") {
                    paragraphs.append((first, String(trimmed.dropFirst(first.count))))
                } else if let eq = first.firstIndex(of: "="), first[..<eq].allSatisfy({ $0.isLowercase || $0 == "-" }) {
                    paragraphs.append((String(first[..<eq]), String(trimmed.dropFirst(first.count))))
                } else {
                    open = false
                }
            } else if indent > 2, open, !paragraphs.isEmpty {
                paragraphs[paragraphs.count - 1].1 += " " + trimmed
            } else {
                open = false
            }
        }
        var defaults: [String: String] = [:]
        for (option, text) in paragraphs {
            let words = text.split(whereSeparator: \.isWhitespace).map(String.init)
            guard let at = words.firstIndex(where: { $0 == "(default" || $0 == "(default:" }), at + 1 < words.count else { continue }
            defaults[option] = words[at + 1].trimmingCharacters(in: CharacterSet(charactersIn: "),;:"))
        }
        return defaults
    }

    static func help(_ verb: String) throws -> String {
        let r = try DpctlTests.dpctl([verb, "--help"], timeout: 10)
        guard r.status == 0 else { throw TestFailure("\(verb) --help: \(r.stderr)") }
        return r.stdout
    }

    @Test func everyDefaultStartsHelpClaimsIsTheDefault() throws {
        let claimed = Self.claimedDefaults(try Self.help("start"))
        let image = "/nonexistent/dir/vm.raw", socket = "/tmp/dp-never.sock"
        let json = try Self.check(["--disk", image, "--socket", socket])
        let disk = Self.firstDisk(json)
        let null = Self.firstDisk(try Self.check(["--disk", "n", "--backend", "null", "--socket", socket]))
        let allowed = try CPUSet.allowed().description
        // What each claim must match, by option. A default the help claims
        // that is not here fails the test: add how to check it.
        let checks: [String: (String) -> Bool] = [
            "--iothreads": { json["iothreads"] as? Int == Int($0) },
            "--cpuset": { $0 == "every" && json["cpuset"] as? String == allowed },
            "--poll-us": { json["poll-us"] as? Int == Int($0) },
            "--notify-after": { json["notify-after"] as? Int == Int($0) },
            "--control": { $0 == "FIRST-SOCKET.ctl" && json["control"] as? String == socket + ".ctl" },
            // The disk keys.
            "readonly": { disk["readonly"] as? Bool == ($0 == "on") },
            "num-queues": { disk["num-queues"] as? Int == Int($0) },
            "queue-size": { disk["queue-size"] as? Int == Int($0) },
            "backend": { disk["backend"] as? String == $0 },
            "null-size": { $0 == "1G" && null["null-size"] as? Int == 1 << 30 },
            "null-read-zeroes": { null["null-read-zeroes"] as? Bool == ($0 == "on") },
            "serial": { $0 == "the" && disk["serial"] as? String == "vm.raw" },
            // Not known before the image is opened: --check leaves it out.
            "block-size": { $0 == "what" && disk["block-size"] == nil },
            "locking": { disk["locking"] as? String == $0 },
            "fixed-buffers": { disk["fixed-buffers"] as? Bool == ($0 == "on") },
            "direct": { disk["direct"] as? Bool == ($0 == "on") },
            "rerror": { disk["rerror"] as? String == $0 },
            "werror": { disk["werror"] as? String == $0 },
            "write-cache": { disk["write-cache"] as? Bool == ($0 == "on") },
            "--disable-io-uring": { $0 == "none" && (json["disable-io-uring"] as? [String]) == [] },
            "--metrics-address": { $0 == "not" && json["metrics-address"] == nil },
        ]
        #expect(Set(claimed.keys) == Set(checks.keys), "defaults claimed by the help: \(claimed)")
        for (option, value) in claimed.sorted(by: { $0.key < $1.key }) {
            #expect(checks[option]?(value) == true, "help says \(option) defaults to \(value.debugDescription); --check: \(json)")
        }
        #expect(claimed["queue-size"] == "1024")
    }

    @Test func everyDefaultQemuArgsHelpClaimsIsTheDefault() throws {
        let claimed = Self.claimedDefaults(try Self.help("qemu-args"))
            .merging(Self.claimedDefaults(try Self.help("libvirt-xml"))) { a, b in a == b ? a : a + " vs " + b }
        let noQEMU = ["PATH": "/nonexistent"]
        let q = try DpctlTests.dpctl(["qemu-args", "--socket", "/run/x.sock"], timeout: 10, environment: noQEMU)
        let x = try DpctlTests.dpctl(["libvirt-xml", "--socket", "/run/x.sock"], timeout: 10, environment: noQEMU)
        #expect(q.status == 0 && x.status == 0)
        let checks: [String: (String) -> Bool] = [
            "--num-queues": { q.stdout.contains("num-queues=\($0)\n") && x.stdout.contains("queues='\($0)'") },
            "--memory": { q.stdout.contains("size=\($0),share=on") && q.stdout.contains("-m \($0) ") },
            "--id": { q.stdout.contains("-chardev socket,id=\($0),") },
            "--target": { x.stdout.contains("<target dev='\($0)' bus='virtio'/>") },
            // "what qemu-system-x86_64 --version says ... else 7.x/8.x": none here.
            "--qemu-version": { $0 == "what" && q.stdout.contains(",reconnect=1 ") },
        ]
        #expect(Set(claimed.keys) == Set(checks.keys), "defaults claimed by the help: \(claimed)")
        for (option, value) in claimed.sorted(by: { $0.key < $1.key }) {
            #expect(checks[option]?(value) == true, "help says \(option) defaults to \(value.debugDescription):\n\(q.stdout)\(x.stdout)")
        }
    }

    @Test func resumeHelpSaysWhatResumeDoes() throws {
        let help = try Self.help("resume")
        #expect(help.contains("Restarts the queues the error policy stopped"))
        #expect(!help.contains("paused"), "dpctl has no way to pause a queue: \(help)")
    }

    // MARK: - qemu-args and the QEMU version

    @Test(arguments: [("9.2", "reconnect-ms=1000"), ("10.0", "reconnect-ms=1000"), ("9.2.3", "reconnect-ms=1000"),
                      ("9.1", "reconnect=1"), ("8.2", "reconnect=1"), ("7.2.22", "reconnect=1")])
    func qemuArgsReconnectFollowsTheQEMUVersion(version: String, option: String) throws {
        let q = try DpctlTests.dpctl(["qemu-args", "--socket", "/run/x.sock", "--qemu-version", version], timeout: 10)
        #expect(q.status == 0)
        #expect(q.stdout.contains("-chardev socket,id=dp0,path=/run/x.sock,\(option) \\"), "\(q.stdout)")
    }

    @Test(arguments: [("QEMU emulator version 9.2.0 (v9.2.0)", "reconnect-ms=1000"),
                      ("QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)", "reconnect=1"),
                      ("something else", "reconnect=1")])
    func qemuArgsAsksTheQEMUOnPath(versionLine: String, option: String) throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fake = dir + "/qemu-system-x86_64"
        _ = FileManager.default.createFile(atPath: fake, contents: Data("#!/bin/sh\necho '\(versionLine)'\n".utf8),
                                           attributes: [.posixPermissions: 0o755])
        let q = try DpctlTests.dpctl(["qemu-args", "--socket", "/run/x.sock"], timeout: 10, environment: ["PATH": dir])
        #expect(q.status == 0, "\(q.stderr)")
        #expect(q.stdout.contains(",\(option) \\"), "\(q.stdout)")
    }

    @Test func aBadQEMUVersionIsAUsageError() throws {
        let q = try DpctlTests.dpctl(["qemu-args", "--socket", "/run/x.sock", "--qemu-version", "nine"], timeout: 10)
        #expect(q.status == 2)
        #expect(q.stderr == "dpctl: error: --qemu-version \"nine\" is not a version such as 8.2 or 9.2\n")
    }
}
