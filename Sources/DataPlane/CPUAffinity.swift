#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlaneSys

// The CPUs a process may run on, as opposed to the CPUs that are online:
// taskset, systemd's AllowedCPUs= and CPUAffinity=, and a container's cgroup
// cpuset narrow the first and leave the second alone.
extension CPUSet {
    /// The CPUs this process may run on: its main thread's affinity mask.
    ///
    /// This is what `taskset`, systemd's `AllowedCPUs=`/`CPUAffinity=` and a
    /// container's cpuset leave it, always a subset of the online CPUs.
    ///
    /// - Throws: ``ConfigurationError/unreadableAllowedCPUs(_:)`` if the mask
    ///   cannot be read.
    public static func allowed() throws(ConfigurationError) -> CPUSet {
        let capacity = Int(maxCPU) + 1
        var cpus = [Int32](repeating: 0, count: capacity)
        let count = cpus.withUnsafeMutableBufferPointer { buffer -> Int32 in
            guard let base = buffer.baseAddress else { return -EINVAL }
            return dps_allowed_cpus(base, Int32(buffer.count))
        }
        guard count > 0 else {
            throw .unreadableAllowedCPUs(count < 0 ? "sched_getaffinity: \(DataPlaneError.message(-count))"
                                                   : "the affinity mask names no CPU up to \(maxCPU)")
        }
        return CPUSet(sortedUnique: Array(cpus.prefix(Int(count))))
    }

    /// Checks that the process may run on every CPU of this set.
    ///
    /// - Parameter allowed: The allowed CPUs; when `nil`, read with ``allowed()``.
    /// - Throws: ``ConfigurationError/cpusNotAllowed(missing:allowed:)`` naming
    ///   exactly the CPUs outside `allowed`.
    public func validateAllowed(_ allowed: CPUSet? = nil) throws(ConfigurationError) {
        let allowedSet: CPUSet
        if let allowed {
            allowedSet = allowed
        } else {
            allowedSet = try CPUSet.allowed()
        }
        let permitted = Set(allowedSet.cpus)
        let missing = cpus.filter { !permitted.contains($0) }
        if !missing.isEmpty {
            throw .cpusNotAllowed(missing: CPUSet(sortedUnique: missing), allowed: allowedSet)
        }
    }
}
