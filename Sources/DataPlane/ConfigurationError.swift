/// A configuration value that the data plane cannot accept.
///
/// Every case carries what is needed to render a one-line message, available
/// as ``description``, that says what was wrong and what is accepted.
/// User-supplied strings are quoted and escaped, so a message is always a
/// single line.
public enum ConfigurationError: Error, Equatable, CustomStringConvertible {
    /// A CPU list (taskset -c / libvirt cpuset syntax) could not be parsed.
    case invalidCPUSet(input: String, reason: String)
    /// Some CPUs of a CPU set are not online.
    case cpusNotOnline(missing: CPUSet, online: CPUSet)
    /// The set of online CPUs could not be read or parsed; the detail says why.
    case unreadableOnlineCPUs(String)
    /// A `.file` disk has an empty path.
    case missingPath
    /// A disk serial is too long or has characters other than printable ASCII.
    case invalidSerial(String, reason: String)
    /// A logical block size is not a power of two in 512...65536.
    case invalidBlockSize(UInt32)
    /// A number of virtqueues is outside 1...64.
    case invalidQueueCount(Int)
    /// A virtqueue size is not a power of two in 1...32768.
    case invalidQueueSize(Int)
    /// A null-backend capacity is zero or not a multiple of the logical block size.
    case invalidNullSize(UInt64, logicalBlockSize: UInt32)
    /// An IOThread name is empty, longer than 15 bytes, or contains a NUL byte.
    case invalidThreadName(String)
    /// A busy-poll window is above 1_000_000 microseconds.
    case invalidPollWindow(UInt32)
    /// An io_uring ring size is not a power of two in 8...32768.
    case invalidRingEntries(UInt32)
    /// ``IOThreadConfiguration/notifyAfterCompletions`` beyond ``IOThreadConfiguration/maxNotifyAfter``.
    case invalidNotifyAfter(UInt32)
    /// Some CPUs of a CPU set are online but outside the CPUs this process
    /// may run on (taskset, a cgroup cpuset, systemd AllowedCPUs=).
    case cpusNotAllowed(missing: CPUSet, allowed: CPUSet)
    /// The process's CPU affinity could not be read; the detail says why.
    case unreadableAllowedCPUs(String)

    /// The one-line message for the user.
    public var description: String {
        switch self {
        case let .invalidCPUSet(input, reason):
            return "invalid CPU set \(input.debugDescription): \(reason)"
        case let .cpusNotOnline(missing, online):
            let verb = missing.cpus.count == 1 ? "CPU \(missing) is" : "CPUs \(missing) are"
            return "\(verb) not online (online CPUs: \(online))"
        case let .unreadableOnlineCPUs(detail):
            return "cannot determine the online CPUs: \(detail)"
        case .missingPath:
            return "disk path is empty; the file backend needs the path of an image file or block device"
        case let .invalidSerial(serial, reason):
            return "invalid disk serial \(serial.debugDescription): \(reason); "
                + "a serial is at most \(DiskConfiguration.maxSerialBytes) bytes of printable ASCII"
        case let .invalidBlockSize(size):
            return "logical block size \(size) is not a power of two between 512 and 65536"
        case let .invalidQueueCount(count):
            return "queue count \(count) is not between 1 and \(DiskConfiguration.maxQueues)"
        case let .invalidQueueSize(size):
            return "queue size \(size) is not a power of two between 1 and 32768"
        case let .invalidNullSize(size, blockSize):
            if size == 0 {
                return "null backend size is 0 bytes; it must be a non-zero multiple of the "
                    + "logical block size (\(blockSize) bytes)"
            }
            return "null backend size \(size) bytes is not a multiple of the logical block size "
                + "(\(blockSize) bytes)"
        case let .invalidThreadName(name):
            let limit = IOThreadConfiguration.maxNameBytes
            if name.isEmpty {
                return "IOThread name is empty; give it a name of 1 to \(limit) bytes"
            }
            if name.utf8.contains(0) {
                return "IOThread name \(name.debugDescription) contains a NUL byte; "
                    + "a name is 1 to \(limit) bytes without NUL"
            }
            return "IOThread name \(name.debugDescription) is \(name.utf8.count) bytes; "
                + "thread names are at most \(limit) bytes"
        case let .invalidPollWindow(microseconds):
            return "poll window \(microseconds) microseconds is above the maximum of "
                + "\(IOThreadConfiguration.maxPollMicroseconds) (0 disables busy polling)"
        case let .invalidRingEntries(entries):
            return "ring entries \(entries) is not a power of two between 8 and 32768"
        case let .invalidNotifyAfter(count):
            return "notify-after \(count) is more than \(IOThreadConfiguration.maxNotifyAfter) completions (0 turns it off)"
        case let .cpusNotAllowed(missing, allowed):
            let subject = missing.cpus.count == 1 ? "CPU \(missing) is" : "CPUs \(missing) are"
            return "\(subject) outside the CPUs this process may run on (\(allowed)); taskset, systemd's "
                + "AllowedCPUs=/CPUAffinity= or the container's cpuset set those"
        case let .unreadableAllowedCPUs(detail):
            return "cannot determine the CPUs this process may run on: \(detail)"
        }
    }
}
