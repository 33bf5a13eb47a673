import Foundation
import Testing

@testable import DataPlane

@Suite("Allowed CPUs (the process's affinity)")
struct CPUAffinityTests {
    /// The kernel's own account of the process's (main thread's) mask.
    static func cpusAllowedList() throws -> CPUSet {
        let status = try String(contentsOfFile: "/proc/\(getpid())/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") })
        return try CPUSet(parsing: String(line.dropFirst("Cpus_allowed_list:".count)))
    }

    @Test("reads the process's affinity mask, a subset of the online CPUs")
    func readsTheMask() throws {
        let allowed = try CPUSet.allowed()
        #expect(allowed == (try Self.cpusAllowedList()))
        try allowed.validateOnline()
    }

    @Test("names exactly the CPUs outside the allowed set")
    func namesTheCPUsOutside() throws {
        let allowed = try CPUSet(parsing: "1,3")
        #expect(throws: ConfigurationError.cpusNotAllowed(missing: try CPUSet(parsing: "0,2"), allowed: allowed)) {
            try CPUSet(parsing: "0-3").validateAllowed(allowed)
        }
        try CPUSet(parsing: "3").validateAllowed(allowed)
        let message = ConfigurationError.cpusNotAllowed(missing: try CPUSet(parsing: "0"), allowed: allowed).description
        #expect(message == "CPU 0 is outside the CPUs this process may run on (1,3); taskset, systemd's "
            + "AllowedCPUs=/CPUAffinity= or the container's cpuset set those")
    }
}
