import ArgumentParser
import DataPlane
import Foundation
import Logging

/// I/O limits in dpctl: the keys of `start`'s --disk and the config file,
/// the `throttle` verb, and what the instance does with them.
enum IOLimitKeys {
    /// The limit keys (QEMU's throttling.* names without the prefix) and `group`.
    static let limitKeys = IOLimits.keys
    static let groupKey = "group"

    static func isLimitKey(_ name: String) -> Bool { name == groupKey || limitKeys.contains(name) }

    /// The limit keys in a message listing keys.
    static let summary = "I/O limits bps-total, bps-read, bps-write, iops-total, iops-read, iops-write "
        + "(each also KEY-max and KEY-max-length), iops-size, group"

    /// A limit's value: a whole number, 0 to remove it, or with a binary
    /// suffix (10M = 10 MiB/s, 4k = 4096), as QEMU takes sizes.
    static func parse(_ text: String, option: String) throws(CLIError) -> UInt64 {
        if text == "0" { return 0 }
        let n = try parseSize(text, option: option)
        guard n <= IOLimits.maxValue else {
            throw CLIError("\(option) \(text.debugDescription) is over the largest limit, \(IOLimits.maxValue)", usage: true)
        }
        return n
    }

    /// The limits a disk entry gives (keys unset are 0), checked.
    static func limits(_ given: [String: UInt64], what: String) throws(CLIError) -> IOLimits {
        do {
            let limits = try IOLimits().merging(given)
            try limits.validate()
            return limits
        } catch {
            throw CLIError("\(what): \(error.description)", usage: true)
        }
    }

    /// Puts a newly served disk under its entry's limits or group.
    static func apply(_ entry: InstanceConfiguration.DiskEntry, to disk: Disk, plane: DataPlane, logger: Logger) throws {
        guard entry.group != nil || !entry.limits.isEmpty else { return }
        let limits = try limits(entry.limits, what: "disk \(entry.path)")
        do {
            if let group = entry.group {
                try plane.join(disk, group: group, limits: entry.limits.isEmpty ? nil : limits)
            } else {
                try plane.setLimits(limits, for: disk)
            }
        } catch {
            throw CLIError("disk \(entry.path): \(error.description)")
        }
        let now = plane.limits(of: disk)
        logger.info("\(disk.name): I/O limits \(now.limits)\(now.group.map { " (group \($0))" } ?? "")",
                    metadata: ["disk": "\(disk.name)"])
    }

    /// A reload: a served disk whose limits or group changed in the file gets
    /// the new ones. True when something changed.
    static func reload(from old: InstanceConfiguration.DiskEntry, to new: InstanceConfiguration.DiskEntry, disk: Disk,
                       plane: DataPlane, logger: Logger) -> Bool {
        guard old.limits != new.limits || old.group != new.group else { return false }
        do {
            if new.group == nil && new.limits.isEmpty {
                try plane.setLimits(IOLimits(), for: disk)
                logger.info("reload: \(disk.name): no I/O limits", metadata: ["disk": "\(disk.name)"])
            } else {
                try apply(new, to: disk, plane: plane, logger: logger)
            }
            return true
        } catch {
            logger.error("reload: \(disk.name): \(error)", metadata: ["disk": "\(disk.name)"])
            return false
        }
    }

    /// The instance's side of `dpctl throttle`: nil, or the error to answer.
    static func handle(_ request: ControlRequest, plane: DataPlane, server: VhostUserServer, logger: Logger) -> String? {
        let disks = plane.disks
        let disk: Disk
        if let socket = request.socket {
            guard let found = ControlServer.disk(servedOn: socket, plane: plane, server: server) else {
                return "no disk is served on \(socket)"
            }
            disk = found
        } else if disks.count == 1, let only = disks.first {
            disk = only
        } else {
            return "say which disk: --socket PATH (this instance serves \(disks.count) disks)"
        }
        let changes = request.limits ?? [:]
        let current = plane.limits(of: disk)
        do {
            if let group = request.group, !group.isEmpty {
                // Into (or within) a group: the changes apply to the group's limits, for all its disks.
                let base = current.group == group ? current.limits : plane.throttleGroup(named: group).limits
                let limits = try base.merging(changes)
                try plane.join(disk, group: group, limits: changes.isEmpty ? nil : limits)
            } else if request.group == nil, current.group != nil, let group = current.group {
                let limits = try current.limits.merging(changes)
                try plane.join(disk, group: group, limits: limits)
            } else {
                // Its own limits (--group "" leaves the group: the disk starts from none).
                let base = current.group == nil ? current.limits : IOLimits()
                try plane.setLimits(try base.merging(changes), for: disk)
            }
        } catch {
            return "\(disk.name): \(error.description)"
        }
        let now = plane.limits(of: disk)
        logger.info("\(disk.name): I/O limits now \(now.limits)\(now.group.map { " (group \($0))" } ?? "")",
                    metadata: ["disk": "\(disk.name)"])
        return nil
    }
}

struct Throttle: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Change a served disk's I/O limits (QEMU's throttling) while it runs.",
        usage: "dpctl throttle (--socket PATH | --control PATH --socket PATH) [--KEY N ...] [--group NAME] [--json]",
        discussion: """
        Sets the limits of the disk served on --socket, at once, on all its
        queues; keys not given keep their values, 0 removes one. The keys and
        their meaning are QEMU's (throttling.* of -drive/-blockdev, without
        the prefix): a leaky bucket per limit, for bytes (bps) and requests
        (iops) a second, of reads, writes, or both (total; total and
        read/write of the same kind exclude each other). Each limit lets bursts
        of a tenth of a second through; -max sets a burst rate and
        -max-length (seconds, default 1) how long a burst at that rate may
        last. --iops-size counts a larger request as size / iops-size
        requests. Values take binary suffixes (10M = 10485760). Reads count
        as reads, writes and write-zeroes as writes; flush, discard and get-id
        are not limited. A request over its limit waits, and its queue's
        later requests wait behind it; other disks are not held up.

        --group NAME puts the disk in a throttle group: all the disks of a
        group share one set of buckets (the limit is for their sum), and keys
        given set the group's limits. A disk in a group that is given keys
        without --group changes its group's limits. --group "" takes the disk
        out of its group, with no limits but the keys given.

        Prints the status afterwards ('dpctl status' shows each disk's
        limits). The same keys work in 'dpctl start --disk ...,iops-total=N'
        and in a config file.
        """)

    @OptionGroup var instance: InstanceOptions

    @Option(name: .customLong("bps-total"), help: ArgumentHelp("Bytes a second, reads and writes together", valueName: "n"))
    var bpsTotal: String?
    @Option(name: .customLong("bps-total-max"), help: ArgumentHelp("Burst rate of bps-total", valueName: "n"))
    var bpsTotalMax: String?
    @Option(name: .customLong("bps-total-max-length"), help: ArgumentHelp("Seconds a bps-total burst may last", valueName: "s"))
    var bpsTotalMaxLength: String?
    @Option(name: .customLong("bps-read"), help: ArgumentHelp("Bytes a second read", valueName: "n"))
    var bpsRead: String?
    @Option(name: .customLong("bps-read-max"), help: ArgumentHelp("Burst rate of bps-read", valueName: "n"))
    var bpsReadMax: String?
    @Option(name: .customLong("bps-read-max-length"), help: ArgumentHelp("Seconds a bps-read burst may last", valueName: "s"))
    var bpsReadMaxLength: String?
    @Option(name: .customLong("bps-write"), help: ArgumentHelp("Bytes a second written", valueName: "n"))
    var bpsWrite: String?
    @Option(name: .customLong("bps-write-max"), help: ArgumentHelp("Burst rate of bps-write", valueName: "n"))
    var bpsWriteMax: String?
    @Option(name: .customLong("bps-write-max-length"), help: ArgumentHelp("Seconds a bps-write burst may last", valueName: "s"))
    var bpsWriteMaxLength: String?
    @Option(name: .customLong("iops-total"), help: ArgumentHelp("Requests a second, reads and writes together", valueName: "n"))
    var iopsTotal: String?
    @Option(name: .customLong("iops-total-max"), help: ArgumentHelp("Burst rate of iops-total", valueName: "n"))
    var iopsTotalMax: String?
    @Option(name: .customLong("iops-total-max-length"), help: ArgumentHelp("Seconds an iops-total burst may last", valueName: "s"))
    var iopsTotalMaxLength: String?
    @Option(name: .customLong("iops-read"), help: ArgumentHelp("Reads a second", valueName: "n"))
    var iopsRead: String?
    @Option(name: .customLong("iops-read-max"), help: ArgumentHelp("Burst rate of iops-read", valueName: "n"))
    var iopsReadMax: String?
    @Option(name: .customLong("iops-read-max-length"), help: ArgumentHelp("Seconds an iops-read burst may last", valueName: "s"))
    var iopsReadMaxLength: String?
    @Option(name: .customLong("iops-write"), help: ArgumentHelp("Writes a second", valueName: "n"))
    var iopsWrite: String?
    @Option(name: .customLong("iops-write-max"), help: ArgumentHelp("Burst rate of iops-write", valueName: "n"))
    var iopsWriteMax: String?
    @Option(name: .customLong("iops-write-max-length"), help: ArgumentHelp("Seconds an iops-write burst may last", valueName: "s"))
    var iopsWriteMaxLength: String?
    @Option(name: .customLong("iops-size"), help: ArgumentHelp("A larger request counts as size / iops-size requests", valueName: "bytes"))
    var iopsSize: String?
    @Option(help: ArgumentHelp("Put the disk in this throttle group (\"\": out of its group)", valueName: "name"))
    var group: String?
    @Flag(help: "Print the status as JSON") var json = false

    /// The keys given, by their names.
    var given: [(String, String?)] {
        [("bps-total", bpsTotal), ("bps-total-max", bpsTotalMax), ("bps-total-max-length", bpsTotalMaxLength),
         ("bps-read", bpsRead), ("bps-read-max", bpsReadMax), ("bps-read-max-length", bpsReadMaxLength),
         ("bps-write", bpsWrite), ("bps-write-max", bpsWriteMax), ("bps-write-max-length", bpsWriteMaxLength),
         ("iops-total", iopsTotal), ("iops-total-max", iopsTotalMax), ("iops-total-max-length", iopsTotalMaxLength),
         ("iops-read", iopsRead), ("iops-read-max", iopsReadMax), ("iops-read-max-length", iopsReadMaxLength),
         ("iops-write", iopsWrite), ("iops-write-max", iopsWriteMax), ("iops-write-max-length", iopsWriteMaxLength),
         ("iops-size", iopsSize)]
    }

    func run() throws {
        var limits: [String: UInt64] = [:]
        for case let (key, text?) in given { limits[key] = try IOLimitKeys.parse(text, option: "--" + key) }
        guard !limits.isEmpty || group != nil else {
            throw CLIError("give a limit to change (--iops-total N, --bps-read N, ...; 0 removes one) or --group NAME", usage: true)
        }
        var request = ControlRequest(command: "throttle", socket: instance.socket.map(socketArgument))
        request.limits = limits
        request.group = group
        let response = try controlCall(try instance.controlPath(), request)
        guard response.ok else { throw CLIError(response.error ?? "the instance refused") }
        if json {
            StatusCommand.printJSON(response)
        } else {
            StatusCommand.printStatus(response)
        }
    }
}
