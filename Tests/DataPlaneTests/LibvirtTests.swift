import Foundation
import Testing

/// libvirt, for real: libvirtd (and virtlogd) started in the foreground by
/// the test, a TCG domain whose disk and memory backing are what
/// `dpctl libvirt-xml` prints, QEMU running as libvirt's own user (so the
/// socket's owner option is what lets it in), guest I/O across a dpctl
/// killed and one stopped under it. Slow: one guest boot, about a minute.
@Suite(.serialized) struct LibvirtTests {
    static let uri = "qemu:///system"
    static let qemuUser = "libvirt-qemu"

    /// The libvirt daemons this test started (none when one already answers,
    /// e.g. under systemd). SIGKILL at the end: children of the test process
    /// inherit its blocked SIGTERM.
    final class Daemons {
        var processes: [Process] = []

        init() throws {
            if (try? runTool("virsh", ["-c", LibvirtTests.uri, "version"]))?.status == 0 { return }
            for name in ["virtlogd", "libvirtd"] {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: try toolPath(name))
                p.standardInput = FileHandle.nullDevice
                p.standardOutput = FileHandle.nullDevice
                p.standardError = FileHandle.nullDevice
                try p.run()
                processes.append(p)
            }
            let deadline = Date().addingTimeInterval(20)
            while Date() < deadline {
                if (try? runTool("virsh", ["-c", LibvirtTests.uri, "version"]))?.status == 0 { return }
                usleep(200_000)
            }
            stop()
            throw TestFailure("libvirtd did not answer on \(LibvirtTests.uri) within 20 s")
        }

        func stop() {
            for p in processes where p.isRunning {
                kill(p.processIdentifier, SIGKILL)
                p.waitUntilExit()
            }
            processes = []
        }

        deinit { stop() }
    }

    /// `dpctl libvirt-xml`'s two parts: what goes in <domain>, what goes in <devices>.
    static func snippets(socket: String) throws -> (domain: String, devices: String) {
        let xml = try runToolChecked(QEMUEndToEndTests.dpctl, ["libvirt-xml", "--socket", socket, "--num-queues", "1"])
        let parts = xml.components(separatedBy: "<!-- in <devices>: -->")
        guard parts.count == 2, let domainPart = parts[0].components(separatedBy: "-->").last else {
            throw TestFailure("dpctl libvirt-xml printed no <domain> and <devices> parts: \(xml)")
        }
        return (domainPart.trimmingCharacters(in: .whitespacesAndNewlines),
                parts[1].trimmingCharacters(in: .whitespacesAndNewlines))
    }

    static func domainState(_ name: String) -> String {
        ((try? runTool("virsh", ["-c", uri, "domstate", name]))?.stdout ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The uid a frontend process runs as, from dpctl's "frontend-pid=" log metadata.
    static func frontendUID(_ log: String) -> uid_t? {
        guard let range = log.range(of: "frontend-pid=") else { return nil }
        let pid = log[range.upperBound...].prefix { $0.isNumber }
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Uid:") }),
              let uid = line.split(whereSeparator: { $0 == "\t" || $0 == " " }).dropFirst().first
        else { return nil }
        return uid_t(uid)
    }

    @Test(.enabled(if: runningAsRoot, "libvirtd's system instance needs root"))
    func aDomainCarriesOnWhileDpctlIsKilledAndRestartedUnderIt() throws {
        guard let user = getpwnam(Self.qemuUser) else {
            throw TestFailure("no user \(Self.qemuUser), which libvirt runs QEMU as (scripts/setup creates it)")
        }
        let qemuUID = user.pointee.pw_uid
        let daemons = try Daemons()
        defer { daemons.stop() }

        // QEMU runs as libvirt-qemu: its kernel, initrd and socket directory
        // must be reachable for it (libvirt chowns the kernel and initrd).
        let dir = NSTemporaryDirectory() + "/dataplane-libvirt-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o755])
        var passed = false
        defer { if passed { try? FileManager.default.removeItem(atPath: dir) } }
        let paths = try runToolChecked("/bin/bash", [QEMUEndToEndTests.root.appendingPathComponent("Tests/e2e/prepare.sh").path, "--quiet"])
        func path(_ key: String) -> String? {
            paths.split(separator: "\n").first { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)) }
        }
        guard let kernel = path("KERNEL"), let initrd = path("INITRD") else { throw TestFailure("prepare.sh: \(paths)") }
        try FileManager.default.copyItem(atPath: kernel, toPath: dir + "/vmlinuz")
        try FileManager.default.copyItem(atPath: initrd, toPath: dir + "/initrd.gz")
        let image = dir + "/disk.raw"
        guard FileManager.default.createFile(atPath: image, contents: nil), truncate(image, 128 << 20) == 0 else {
            throw TestFailure("cannot create \(image)")
        }
        let socket = dir + "/vhost.sock"
        let args = ["--disk", "path=\(image),socket=\(socket),socket-owner=\(Self.qemuUser)", "--num-queues", "1"]
        var dp = try QEMUEndToEndTests.Instance(args, log: dir + "/dpctl1.log")
        var logs: [String] = []
        defer { _ = dp.terminate() }

        let (memoryBacking, disk) = try Self.snippets(socket: socket)
        let name = "dataplane-test-\(getpid())"
        let console = dir + "/console.log"
        let domain = """
            <domain type='qemu'>
              <name>\(name)</name>
              <memory unit='MiB'>512</memory>
              <vcpu>2</vcpu>
              \(memoryBacking)
              <os>
                <type arch='x86_64' machine='q35'>hvm</type>
                <kernel>\(dir)/vmlinuz</kernel>
                <initrd>\(dir)/initrd.gz</initrd>
                <cmdline>console=ttyS0 panic=-1 workload=long-io seed=\(UInt32.random(in: 1...UInt32.max >> 1)) queues=1 seconds=24</cmdline>
              </os>
              <on_poweroff>destroy</on_poweroff>
              <on_reboot>destroy</on_reboot>
              <on_crash>destroy</on_crash>
              <devices>
                <emulator>/usr/bin/qemu-system-x86_64</emulator>
                \(disk)
                <serial type='file'><source path='\(console)'/><target port='0'/></serial>
                <memballoon model='none'/>
              </devices>
            </domain>
            """
        try domain.write(toFile: dir + "/domain.xml", atomically: true, encoding: .utf8)
        try runToolChecked("virsh", ["-c", Self.uri, "define", dir + "/domain.xml"])
        defer {
            _ = try? runTool("virsh", ["-c", Self.uri, "destroy", name])
            _ = try? runTool("virsh", ["-c", Self.uri, "undefine", name])
        }
        try runToolChecked("virsh", ["-c", Self.uri, "start", name])
        func consoleText() -> String { (try? String(contentsOfFile: console, encoding: .utf8)) ?? "" }
        func waitFor(_ text: String, seconds: Double) {
            let deadline = Date().addingTimeInterval(seconds)
            while !consoleText().contains(text) && Self.domainState(name) == "running" && Date() < deadline { usleep(200_000) }
        }

        waitFor("E2E-PROGRESS", seconds: 240)
        #expect(Self.frontendUID(dp.log) == qemuUID, "QEMU connected as \(Self.qemuUser): \(dp.log)")
        // Killed mid-I/O, then stopped in order: each time a new dpctl takes
        // the socket and libvirt's <reconnect> brings QEMU back to it.
        sleep(2)
        dp.kill9()
        logs.append(dp.log)
        usleep(500_000)
        dp = try QEMUEndToEndTests.Instance(args, log: dir + "/dpctl2.log")
        sleep(8)
        #expect(dp.terminate() == 0, "\(dp.log)")
        logs.append(dp.log)
        dp = try QEMUEndToEndTests.Instance(args, log: dir + "/dpctl3.log")

        let deadline = Date().addingTimeInterval(240)
        while Self.domainState(name) == "running" && Date() < deadline { usleep(500_000) }
        let output = consoleText()
        logs.append(dp.log)
        let qemuLog = (try? String(contentsOfFile: "/var/log/libvirt/qemu/\(name).log", encoding: .utf8)) ?? ""
        let context = "console: \(output.suffix(3000))\nQEMU (libvirt's log): \(qemuLog.suffix(2000))\ndpctl: \(logs.joined(separator: "\n---\n"))\nkept in \(dir)"
        #expect(output.contains("E2E-RESULT: PASS"), "\(context)")
        for (i, log) in logs.enumerated().dropFirst() {
            #expect(log.contains("frontend connected"), "dpctl \(i + 1) was not reconnected to: \(context)")
        }
        let verify = try runTool("/bin/bash", [QEMUEndToEndTests.root.appendingPathComponent("Tests/e2e/pattern.sh").path,
                                               "verify-log", image, console])
        #expect(verify.status == 0, "the image after the guest: \(verify.output)\n\(context)")
        passed = output.contains("E2E-RESULT: PASS") && verify.status == 0
    }
}
