import DataPlane
import Foundation
import Logging
import Synchronization

/// The disks a running `dpctl start` serves, and the changes made to them
/// while it runs: a reload of --config (SIGHUP, on the main thread, or
/// `dpctl reload`), `dpctl add-disk` and `dpctl remove-disk` (on the control
/// socket's thread).
///
/// Every change runs whole, one at a time, under `state`'s lock: a reload
/// and an add-disk never interleave their steps (both adding the same
/// socket, or a reload comparing the file with a list an add-disk is
/// changing). The lock is dpctl's own: no vhost-user control thread and
/// no IOThread waits for it. The control socket serves one request at a
/// time, though, so a change that takes long there (an image whose killed
/// previous owner's I/O is still in flight, a frontend's queues draining,
/// or an add-disk waiting for a SIGHUP reload) holds up the status and
/// stats requests behind it; its client gives up after 30 s, the change
/// carries on.
/// A reload runs on the thread that asked for it rather than being handed
/// to the main loop, which sleeps in sigwait and has no way to be woken with
/// a request but a signal.
final class Instance: Sendable {
    struct Served: Sendable {
        var entry: InstanceConfiguration.DiskEntry
        let disk: Disk
        /// Its socket came from systemd or --fd: owner and mode are not ours to set.
        let inherited: Bool
        /// It came from the --config file (at start or a reload), so a reload
        /// that finds it gone from the file removes it. Disks added with
        /// `dpctl add-disk` are not the file's: a reload leaves them alone.
        var fromFile: Bool
    }

    /// How a reload reads the file: start's options (which override it) and
    /// the file's path; nil when started without --config.
    struct ConfigSource: Sendable {
        let file: String
        let read: @Sendable () throws -> InstanceConfiguration
    }

    let plane: DataPlane
    let server: VhostUserServer
    let logger: Logger
    private let source: ConfigSource?
    private let notifier: SystemdNotifier?
    /// Applies to disks added with add-disk as to start's: --read-only, and
    /// the instance's socket owner, group and mode.
    private let readOnlyAll: Bool

    private struct State {
        var served: [Served] = []
        /// The configuration in effect: what a reload compares the file with
        /// (a disk that stays served keeps its old settings here).
        var current: InstanceConfiguration
    }

    private let state: Mutex<State>

    init(plane: DataPlane, server: VhostUserServer, logger: Logger, configuration: InstanceConfiguration,
         source: ConfigSource? = nil, readOnlyAll: Bool = false, notifier: SystemdNotifier? = nil) {
        self.plane = plane
        self.server = server
        self.logger = logger
        self.source = source
        self.readOnlyAll = readOnlyAll
        self.notifier = notifier
        state = Mutex(State(current: configuration))
    }

    var served: [Served] { state.withLock { $0.served } }

    /// Opens a disk and listens for its frontend at start (on `inherited`'s
    /// fd when given, else at its socket path with its owner, group and mode).
    func serve(_ entry: InstanceConfiguration.DiskEntry, _ configuration: DiskConfiguration,
               inherited: (fd: Int32, origin: String)?) throws {
        try state.withLock { state in
            try serve(entry, configuration, inherited: inherited, fromFile: source != nil, into: &state)
        }
    }

    /// Opens a disk and listens on each of its sockets; all or nothing: a
    /// socket that fails takes back those already listening, and the image.
    private func serve(_ entry: InstanceConfiguration.DiskEntry, _ configuration: DiskConfiguration,
                       inherited: (fd: Int32, origin: String)?, fromFile: Bool, into state: inout State) throws {
        let disk = try plane.addDisk(configuration, logger: logger)
        do {
            try IOLimitKeys.apply(entry, to: disk, plane: plane, logger: logger)
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
            server.removeExports(of: disk)
            plane.removeDisk(disk)
            throw error
        }
        state.served.append(Served(entry: entry, disk: disk, inherited: inherited != nil, fromFile: fromFile))
    }

    /// One line for systemd's STATUS=.
    var summary: String { state.withLock { Self.summary($0) } }

    private static func summary(_ state: State) -> String {
        let sockets = state.served.map(\.entry.socket)
        let shown = sockets.prefix(3).joined(separator: ", ") + (sockets.count > 3 ? ", ..." : "")
        return "serving \(state.served.count) disk(s) on \(shown)"
    }

    // MARK: - add-disk

    /// `dpctl add-disk`: serves the disk `spec` describes (a --disk value,
    /// checked as start checks it) from now on. Returns what it did, for the client.
    func add(spec: String) throws -> [String] {
        var entry = try DiskSpec.parse(spec)
        let lines: [String] = try state.withLock { state in
            let current = state.current
            if readOnlyAll {
                if entry.readOnly == false { throw CLIError("--read-only and readonly=off of \(entry.path) conflict", usage: true) }
                entry.readOnly = true
            }
            entry.socketOwner = entry.socketOwner ?? current.socketOwner
            entry.socketGroup = entry.socketGroup ?? current.socketGroup
            entry.socketMode = entry.socketMode ?? current.socketMode
            _ = try SocketOwnership.permissions(entry)
            try checkSockets(of: entry, against: state.served)
            let configuration = try StartCommand.diskConfiguration(entry)
            let queues = state.served.reduce(0) { $0 + $1.disk.configuration.numQueues } + configuration.numQueues
            if queues > plane.threads.count * 256 {
                throw CLIError("\(queues) queues are more than \(plane.threads.count) IOThread(s) serve (256 each): lower num-queues (IOThreads are set at start)")
            }
            do {
                try serve(entry, configuration, inherited: nil, fromFile: false, into: &state)
            } catch DataPlaneError.imageLocked(let path, let permission, let heldByOther) {
                let error = DataPlaneError.imageLocked(path: path, permission: permission, heldByOther: heldByOther)
                // The "other process" may be us: say so.
                if let other = state.served.first(where: { absolutePath($0.entry.path) == absolutePath(entry.path) }) {
                    throw CLIError("\(entry.path) is served by this instance already, on \(other.entry.socket): \(error)")
                }
                throw error
            }
            state.current.disks.append(entry)
            var lines = ["added \(Self.describe(entry, state.served[state.served.count - 1].disk))"]
            if let file = source?.file {
                lines.append("not in \(file): a reload leaves it served (remove it with dpctl remove-disk, or add it to the file)")
            }
            notifier?.status(Self.summary(state))
            return lines
        }
        for line in lines { logger.notice("add-disk: \(line)", metadata: ["socket": "\(entry.socket)"]) }
        return lines
    }

    /// What a disk is, in one phrase: "/img/a.raw (64 MiB, read-write, 4 queues) on /run/a.sock".
    private static func describe(_ entry: InstanceConfiguration.DiskEntry, _ disk: Disk) -> String {
        let sockets = ([entry.socket] + entry.extraSockets).joined(separator: ", ")
        return "\(disk.name) (\(disk.capacityBytes) bytes, \(disk.configuration.readOnly ? "read-only" : "read-write"), up to \(disk.configuration.numQueues) queue(s)) on \(sockets)"
    }

    /// Refuses a disk whose sockets repeat, or are served already: the
    /// listen would otherwise see our own live socket and blame "another process".
    private func checkSockets(of entry: InstanceConfiguration.DiskEntry, against served: [Served]) throws {
        let sockets = [entry.socket] + entry.extraSockets
        if Set(sockets).count != sockets.count {
            let twice = Dictionary(grouping: sockets, by: { $0 }).filter { $0.value.count > 1 }.keys.sorted()
            throw CLIError("socket \(twice.joined(separator: ", ")) is given twice (each socket serves one frontend)", usage: true)
        }
        for socket in sockets {
            if let other = served.first(where: { ([$0.entry.socket] + $0.entry.extraSockets).map(absolutePath).contains(absolutePath(socket)) }) {
                throw CLIError("socket \(socket) already serves disk \(other.disk.name) (remove that disk first: dpctl remove-disk --socket \(socket))")
            }
        }
    }

    // MARK: - remove-disk

    /// `dpctl remove-disk`: stops serving the disk one of whose sockets is
    /// `socket`. A disk with a frontend connected is refused unless `force`.
    func remove(socket: String, force: Bool) throws -> [String] {
        try state.withLock { state in
            let wanted = absolutePath(socket)
            guard let index = state.served.firstIndex(where: { ([$0.entry.socket] + $0.entry.extraSockets).map(absolutePath).contains(wanted) }) else {
                let sockets = state.served.map(\.entry.socket)
                throw CLIError("no disk is served on \(socket) (served: \(sockets.isEmpty ? "none" : sockets.joined(separator: ", ")))")
            }
            let fromFile = state.served[index].fromFile
            var lines = try remove(at: index, force: force, by: "remove-disk", from: &state)
            if fromFile, let file = source?.file {
                lines.append("it came from \(file): a reload serves it again unless it is removed from the file")
            }
            if state.served.isEmpty { lines.append("no disk is served now; the instance keeps running (dpctl add-disk serves one, dpctl stop ends it)") }
            notifier?.status(Self.summary(state))
            return lines
        }
    }

    /// Removes `state.served[index]`: its sockets (each frontend's queues
    /// drain first), then the disk (its image closes). Logs and returns what
    /// happened to its frontends and their requests.
    private func remove(at index: Int, force: Bool, by who: String, from state: inout State) throws -> [String] {
        let served = state.served[index]
        let name = served.disk.name
        let connected = server.exportStatus(of: served.disk).filter(\.connected)
        if !connected.isEmpty && !force {
            throw CLIError("disk \(name) is in use: a frontend is connected to \(connected.map(\.socketPath).joined(separator: ", ")). "
                           + "Detach it from the guest first (QEMU: device_del, then chardev-remove once the guest has let it go; "
                           + "libvirt: virsh detach-device), or give --force to disconnect it now (the guest loses the disk "
                           + "under its feet: its requests in flight complete, those held by the error policy fail)")
        }
        let reports = server.removeExports(of: served.disk)
        plane.removeDisk(served.disk)
        state.served.remove(at: index)
        state.current.disks.removeAll { $0.socket == served.entry.socket }
        var lines: [String] = []
        for report in reports {
            var line = "\(report.socketPath): "
            if report.frontendWasConnected {
                line += "frontend\(report.frontendPID.map { " (pid \($0))" } ?? "") disconnected; "
                line += "\(report.inFlight) request(s) in flight completed, "
                line += "\(report.heldFailed) held by the error policy failed with an I/O error, "
                line += "\(report.heldLeftInInflightRegion) held left in the frontend's inflight region for its next backend"
            } else {
                line += "no frontend was connected"
            }
            lines.append(line + "; socket removed")
        }
        lines.append("removed \(name)\(served.inherited ? " (its inherited socket is closed, its file left to systemd)" : ""); image closed")
        for line in lines { logger.notice("\(who): \(line)", metadata: ["disk": "\(name)"]) }
        return lines
    }

    // MARK: - reload

    /// Re-reads --config and applies it (see ``apply(_:file:to:)``). Throws,
    /// changing nothing, when there is no --config or it cannot be read.
    func reload(by who: String) throws -> [String] {
        guard let source else {
            throw CLIError("this instance was started without --config: there is nothing to reload (dpctl add-disk and remove-disk change its disks)")
        }
        // systemd hears of a reload whoever asked for it (Type=notify-reload).
        notifier?.reloading(status: "reloading \(source.file)")
        logger.info("\(who): reloading \(source.file)")
        do {
            let lines = try state.withLock { state in
                let new: InstanceConfiguration
                do {
                    new = try source.read()
                } catch {
                    logger.error("reload of \(source.file) failed, the running configuration is unchanged: \(error)")
                    throw CLIError("reload of \(source.file) failed, the running configuration is unchanged: \(error)")
                }
                return try apply(new, file: source.file, to: &state)
            }
            notifier?.ready(status: summary)
            return lines
        } catch {
            notifier?.ready(status: "reload of \(source.file) failed (see the log); " + summary)
            throw error
        }
    }

    /// Applies what can change while serving, from the configuration in
    /// effect to the file's: disks new to the file are served; disks that
    /// came from the file and are gone from it are removed (unless a
    /// frontend is connected: that waits for the guest to let go, as
    /// remove-disk without --force); disks added with add-disk are kept;
    /// fault= and the socket's owner, group and mode are applied; the rest
    /// is logged as needing a restart. Returns each change as a line.
    private func apply(_ new: InstanceConfiguration, file: String, to state: inout State) throws -> [String] {
        let old = state.current
        var effective = old
        var restart: [String] = []
        /// Changes the file asks for that could not be made now.
        var refused: [String] = []
        var done: [String] = []
        var changes = 0
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
        // Removals first: a disk moved to another socket frees its image for its new entry.
        var kept: [String] = []
        for running in state.served where !new.disks.contains(where: { $0.socket == running.entry.socket }) {
            guard running.fromFile else {
                kept.append("\(running.entry.socket): not in the file, kept (added with dpctl add-disk; dpctl remove-disk removes it)")
                continue
            }
            guard let index = state.served.firstIndex(where: { $0.disk === running.disk }) else { continue }
            let connected = server.exportStatus(of: running.disk).filter(\.connected).map(\.socketPath)
            guard connected.isEmpty else {
                refused.append("\(running.entry.socket): removed from the file, still served: a frontend is connected to "
                               + "\(connected.joined(separator: ", ")) (unplug the disk from the guest, then reload again; "
                               + "or dpctl remove-disk --force)")
                continue
            }
            do {
                done += try remove(at: index, force: false, by: "reload", from: &state)
                effective.disks.removeAll { $0.socket == running.entry.socket }
                changes += 1
            } catch {
                refused.append("\(running.entry.socket): removed from the file, still served: \(error)")
            }
        }
        for entry in new.disks {
            guard let index = state.served.firstIndex(where: { $0.entry.socket == entry.socket }) else {
                // A disk new to the file (or removed with remove-disk since): served from now on.
                do {
                    try checkSockets(of: entry, against: state.served)
                    try serve(entry, try StartCommand.diskConfiguration(entry), inherited: nil, fromFile: true, into: &state)
                    effective.disks.append(entry)
                    changes += 1
                    done.append("added \(Self.describe(entry, state.served[state.served.count - 1].disk))")
                    logger.notice("reload: added \(entry.path) on \(([entry.socket] + entry.extraSockets).joined(separator: ", "))",
                                  metadata: ["socket": "\(entry.socket)"])
                } catch {
                    refused.append("\(entry.socket): cannot serve \(entry.path): \(error)")
                }
                continue
            }
            let running = state.served[index]
            var updated = running.entry
            if !running.fromFile {
                state.served[index].fromFile = true
                changes += 1
                let line = "\(entry.socket): added with dpctl add-disk, now in the file (a reload that no longer finds it there removes it)"
                done.append(line)
                logger.notice("reload: \(line)", metadata: ["socket": "\(entry.socket)"])
            }
            if entry.fault != running.entry.fault {
                running.disk.injectFaults(try entry.fault.map { (spec: String) throws(CLIError) in try StartCommand.parseFault(spec) })
                updated.fault = entry.fault
                changes += 1
                done.append("\(running.disk.name): \(entry.fault.map { "injecting faults: \($0)" } ?? "no longer injecting faults")")
                logger.warning("reload: \(running.disk.name): \(entry.fault.map { "injecting faults: \($0)" } ?? "no longer injecting faults")",
                               metadata: ["disk": "\(running.disk.name)"])
            }
            if IOLimitKeys.reload(from: running.entry, to: entry, disk: running.disk, plane: plane, logger: logger) {
                updated.limits = entry.limits
                updated.group = entry.group
                changes += 1
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
                        done.append("\(entry.socket): now \(after.isEmpty ? "unchanged (no owner, group or mode set)" : after.description)")
                        logger.info("reload: \(entry.socket): now \(after.isEmpty ? "unchanged (no owner, group or mode set)" : after.description)",
                                    metadata: ["socket": "\(entry.socket)"])
                    } catch {
                        logger.error("reload: \(entry.socket): \(error)", metadata: ["socket": "\(entry.socket)"])
                    }
                }
            }
            let keys = Self.restartKeys(running.entry, entry)
            if !keys.isEmpty {
                restart.append("\(entry.socket): \(keys.joined(separator: ", ")) (or dpctl remove-disk, then add-disk)")
            }
            state.served[index].entry = updated
            if let i = effective.disks.firstIndex(where: { $0.socket == entry.socket }) {
                effective.disks[i] = updated
            } else {
                effective.disks.append(updated)
            }
        }
        for item in kept { logger.info("reload: \(item)") }
        for item in refused { logger.warning("reload: not applied: \(item)") }
        for item in restart {
            logger.warning("reload: needs a restart to take effect: \(item)")
        }
        let summary = "reload of \(file) done: \(changes) change(s) applied, \(refused.count) not applied, "
            + "\(restart.count) waiting for a restart"
        logger.notice("\(summary)")
        state.current = effective
        return done + kept + refused.map { "not applied: \($0)" } + restart.map { "needs a restart: \($0)" } + [summary]
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
