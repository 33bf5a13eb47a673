import DataPlane
import Foundation
import Logging

/// The disks a running `dpctl start` serves, and what SIGHUP may change of
/// them. Used from the main thread only (startup, then the signal loop).
final class Instance {
    struct Served {
        var entry: InstanceConfiguration.DiskEntry
        let disk: Disk
        /// Its socket came from systemd or --fd: owner and mode are not ours to set.
        let inherited: Bool
    }

    let plane: DataPlane
    let server: VhostUserServer
    let logger: Logger
    private(set) var served: [Served] = []

    init(plane: DataPlane, server: VhostUserServer, logger: Logger) {
        self.plane = plane
        self.server = server
        self.logger = logger
    }

    /// Opens a disk and listens for its frontend (on `inherited`'s fd when
    /// given, else at its socket path with its owner, group and mode).
    func serve(_ entry: InstanceConfiguration.DiskEntry, _ configuration: DiskConfiguration,
               inherited: (fd: Int32, origin: String)?) throws {
        let disk = try plane.addDisk(configuration, logger: logger)
        do {
            if let spec = entry.fault {
                disk.injectFaults(try StartCommand.parseFault(spec))
                logger.warning("\(disk.name): injecting faults: \(spec)", metadata: ["disk": "\(disk.name)"])
            }
            let permissions = try SocketOwnership.permissions(entry)
            if let inherited {
                if !permissions.isEmpty {
                    logger.warning("\(entry.socket): socket-owner, socket-group and socket-mode do not apply to a socket from \(inherited.origin) (set SocketUser=, SocketGroup=, SocketMode= in the socket unit)")
                }
                try server.addExport(disk: disk, inheritedFD: inherited.fd, name: entry.socket)
                logger.info("\(entry.socket): listening on \(inherited.origin)", metadata: ["socket": "\(entry.socket)"])
            } else {
                try server.addExport(disk: disk, socketPath: entry.socket, permissions: permissions)
            }
            for socket in entry.extraSockets {
                try server.addExport(disk: disk, socketPath: socket, permissions: permissions)
            }
        } catch {
            plane.removeDisk(disk)
            throw error
        }
        served.append(Served(entry: entry, disk: disk, inherited: inherited != nil))
    }

    /// One line for systemd's STATUS=.
    var summary: String {
        let sockets = served.map(\.entry.socket)
        let shown = sockets.prefix(3).joined(separator: ", ") + (sockets.count > 3 ? ", ..." : "")
        return "serving \(served.count) disk(s) on \(shown)"
    }

    /// Applies what can change while serving, from the configuration in
    /// effect to one just read, and logs the rest as needing a restart.
    /// Returns the configuration now in effect (a disk that stays served
    /// keeps its old settings there, so that a later reload compares with
    /// what really runs).
    func reload(from old: InstanceConfiguration, to new: InstanceConfiguration, file: String) throws
        -> InstanceConfiguration {
        var effective = old
        var restart: [String] = []
        let instanceSettings: [(String, (InstanceConfiguration) -> String)] = [
            ("iothreads", { "\($0.iothreads.map(String.init) ?? "default")" }),
            ("cpuset", { $0.cpuset ?? "default" }),
            ("poll-us", { "\($0.pollMicroseconds.map(String.init) ?? "default")" }),
            ("notify-after", { "\($0.notifyAfter.map(String.init) ?? "default")" }),
            ("control", { $0.control ?? "default" }),
            ("disable-io-uring", { ($0.disabledIOURing ?? []).names.joined(separator: ",") }),
            ("metrics-address", { $0.metricsAddress?.description ?? "off" }),
        ]
        for (key, value) in instanceSettings where value(old) != value(new) {
            restart.append("\(key) (\(value(old)) -> \(value(new)))")
        }
        var changes = 0
        for entry in new.disks {
            guard let index = served.firstIndex(where: { $0.entry.socket == entry.socket }) else {
                // A disk new to the file: served from now on.
                do {
                    try serve(entry, try StartCommand.diskConfiguration(entry), inherited: nil)
                    effective.disks.append(entry)
                    changes += 1
                    logger.info("reload: added \(entry.path) on \(entry.socket)", metadata: ["socket": "\(entry.socket)"])
                } catch {
                    logger.error("reload: cannot serve \(entry.path) on \(entry.socket): \(error)", metadata: ["socket": "\(entry.socket)"])
                }
                continue
            }
            let running = served[index]
            var updated = running.entry
            if entry.fault != running.entry.fault {
                running.disk.injectFaults(try entry.fault.map { (spec: String) throws(CLIError) in try StartCommand.parseFault(spec) })
                updated.fault = entry.fault
                changes += 1
                logger.warning("reload: \(running.disk.name): \(entry.fault.map { "injecting faults: \($0)" } ?? "no longer injecting faults")",
                               metadata: ["disk": "\(running.disk.name)"])
            }
            let before = try SocketOwnership.permissions(running.entry), after = try SocketOwnership.permissions(entry)
            if before != after {
                if running.inherited {
                    logger.warning("reload: \(entry.socket): socket-owner, socket-group and socket-mode do not apply to an inherited socket (set SocketUser=, SocketGroup=, SocketMode= in the socket unit)",
                                   metadata: ["socket": "\(entry.socket)"])
                } else {
                    // Only what is set changes: a key removed from the file leaves the file as it is.
                    do {
                        for socket in [entry.socket] + entry.extraSockets { try UnixSocket.setPermissions(after, of: socket) }
                        updated.socketOwner = entry.socketOwner
                        updated.socketGroup = entry.socketGroup
                        updated.socketMode = entry.socketMode
                        changes += 1
                        logger.info("reload: \(entry.socket): now \(after.isEmpty ? "unchanged (no owner, group or mode set)" : after.description)",
                                    metadata: ["socket": "\(entry.socket)"])
                    } catch {
                        logger.error("reload: \(entry.socket): \(error)", metadata: ["socket": "\(entry.socket)"])
                    }
                }
            }
            let keys = Self.restartKeys(running.entry, entry)
            if !keys.isEmpty { restart.append("\(entry.socket): \(keys.joined(separator: ", "))") }
            served[index].entry = updated
            if let i = effective.disks.firstIndex(where: { $0.socket == entry.socket }) { effective.disks[i] = updated }
        }
        for running in served where !new.disks.contains(where: { $0.socket == running.entry.socket }) {
            restart.append("\(running.entry.socket): removed from the file, still served (a disk cannot be removed while dpctl runs)")
        }
        for item in restart {
            logger.warning("reload: needs a restart to take effect: \(item)")
        }
        logger.notice("reload of \(file) done: \(changes) change(s) applied, \(restart.count) waiting for a restart")
        return effective
    }

    /// The disk keys that differ and that only a restart applies (all but
    /// fault and the socket's owner, group and mode).
    static func restartKeys(_ a: InstanceConfiguration.DiskEntry, _ b: InstanceConfiguration.DiskEntry) -> [String] {
        let keys: [(String, (InstanceConfiguration.DiskEntry) -> String)] = [
            ("path", { $0.path }), ("socket", { ([$0.socket] + $0.extraSockets).joined(separator: ", ") }), ("readonly", { "\(String(describing: $0.readOnly))" }),
            ("num-queues", { "\(String(describing: $0.numQueues))" }), ("queue-size", { "\(String(describing: $0.queueSize))" }),
            ("backend", { "\(String(describing: $0.backend))" }), ("null-size", { "\(String(describing: $0.nullSize))" }),
            ("null-read-zeroes", { "\(String(describing: $0.nullReadZeroes))" }), ("serial", { "\(String(describing: $0.serial))" }),
            ("block-size", { "\(String(describing: $0.logicalBlockSize))" }), ("direct", { "\(String(describing: $0.directIO))" }),
            ("locking", { "\(String(describing: $0.locking))" }), ("fixed-buffers", { "\(String(describing: $0.fixedBuffers))" }),
            ("rerror", { "\(String(describing: $0.readErrorPolicy))" }), ("werror", { "\(String(describing: $0.writeErrorPolicy))" }),
            ("write-cache", { "\(String(describing: $0.writeCache))" }),
        ]
        return keys.filter { $0.1(a) != $0.1(b) }.map(\.0)
    }
}
