import CDataPlane
import Logging

/// What a resize did.
public struct ResizeOutcome: Sendable, Codable, Equatable {
    public var oldBytes: UInt64
    public var newBytes: UInt64
    /// What the image file was set to (ftruncate), when it was changed.
    public var fileBytes: UInt64?
    /// Per socket of the disk, what its frontend was told: "notified",
    /// "no frontend connected", or why the guest sees the size only later.
    /// Empty from ``DataPlane/resize(disk:toBytes:allowShrink:)``, which
    /// knows of no frontends.
    public var frontends: [String: String] = [:]
}

/// How the write cache mode is called in logs and status.
public enum WriteCacheMode {
    public static func name(_ writeBack: Bool) -> String { writeBack ? "write back" : "write through" }
}

extension DataPlane {
    /// Changes a served disk's capacity while its queues run. `bytes` nil
    /// takes the image's size now: a block device after `losetup -c` or
    /// `lvextend`, a file grown by someone else. Growing extends the file
    /// first (a regular file, not read-only), then raises the capacity.
    /// Shrinking (only with `allowShrink`: what lies past the new end is
    /// lost to the guest) lowers the capacity first, so that requests past
    /// the new end are refused from then on, waits for every request taken
    /// before that (``Virtqueue/drain()``) and only then shortens the file.
    /// The size must be whole logical blocks; a block device cannot grow
    /// past its own size. One resize at a time per disk. Nothing tells the
    /// guest: see ``VhostUserServer/resize(disk:toBytes:allowShrink:)``.
    public func resize(disk: Disk, toBytes bytes: UInt64?, allowShrink: Bool = false) throws(DataPlaneError) -> ResizeOutcome {
        try disk.resizing.withLock { _ throws(DataPlaneError) -> ResizeOutcome in
            let old = disk.capacityBytes
            let image = try disk.imageSizeBytes()
            let block = UInt64(disk.logicalBlockSize)
            let target = bytes ?? image
            func refuse(_ reason: String) -> DataPlaneError { .diskChangeRefused(disk: disk.name, reason: reason) }
            guard target > 0, target % block == 0 else {
                throw refuse(bytes == nil
                    ? "its image is now \(target) bytes, not a multiple of its \(block)-byte logical block size"
                    : "\(target) bytes is not a non-zero multiple of its \(block)-byte logical block size")
            }
            var outcome = ResizeOutcome(oldBytes: old, newBytes: target)
            if target == old { return outcome }
            if target < old && !allowShrink {
                throw refuse("shrinking from \(old) to \(target) bytes cuts off what the guest stored past the new end; "
                    + "if that is meant (the guest's filesystem was shrunk first), ask for a shrink (dpctl resize --shrink)")
            }
            let regularFile = disk.configuration.backend == .file && !disk.isBlockDevice
            if disk.isBlockDevice && target > image {
                throw refuse("a block device's size is its own (\(image) bytes): grow the device (lvextend, losetup -c), "
                    + "then resize without a size to take its new size")
            }
            if regularFile && target > image {
                if disk.configuration.readOnly {
                    throw refuse("it is served read-only, so its file is not written: grow the file (truncate -s), "
                        + "then resize without a size to take its new size")
                }
                let ret = dp_disk_truncate(disk.handle, target)
                if ret < 0 { throw .system(operation: "extending \(disk.name) to \(target) bytes", errno: -ret) }
                outcome.fileBytes = target
            }
            let ret = dp_disk_set_capacity(disk.handle, target / 512)
            if ret < 0 { throw .system(operation: "setting the capacity of \(disk.name)", errno: -ret) }
            if target < old {
                drainQueues(of: disk)
                if regularFile && !disk.configuration.readOnly && image > target {
                    let ret = dp_disk_truncate(disk.handle, target)
                    if ret < 0 {
                        // The file is whole: the old capacity holds again, and
                        // the guest, never told, sees no change.
                        _ = dp_disk_set_capacity(disk.handle, old / 512)
                        throw .system(operation: "shortening \(disk.name) to \(target) bytes", errno: -ret)
                    }
                    outcome.fileBytes = target
                }
            }
            return outcome
        }
    }

    /// Waits for every request the disk's queues have taken (see
    /// dp_disk_set_capacity's comment for why that is all a shrink needs):
    /// the running queues and those being stopped, whose last requests were
    /// checked against the old capacity too (a drain waits for their stop).
    /// A queue starts taking requests before `startQueue` lists it, so the
    /// list is read again until it shows no queue not drained yet.
    private func drainQueues(of disk: Disk) {
        var drained = Set<ObjectIdentifier>()
        while true {
            let pending = queuesTakingRequests(of: disk).filter { !drained.contains(ObjectIdentifier($0)) }
            if pending.isEmpty { return }
            for queue in pending {
                queue.drain()
                drained.insert(ObjectIdentifier(queue))
            }
        }
    }
}

extension VhostUserServer {
    /// Resizes a served disk (``DataPlane/resize(disk:toBytes:allowShrink:)``)
    /// and tells every frontend connected on its sockets: CONFIG_CHANGE_MSG
    /// on the backend-request channel, after which QEMU reads the config
    /// space again and tells the guest. A frontend that did not negotiate
    /// BACKEND_REQ is not told (logged: its guest sees the new size after a
    /// reset); with none connected, the next one's GET_CONFIG sees it.
    public func resize(disk: Disk, toBytes bytes: UInt64?, allowShrink: Bool = false) throws(DataPlaneError) -> ResizeOutcome {
        var outcome = try plane.resize(disk: disk, toBytes: bytes, allowShrink: allowShrink)
        var logger = self.logger
        logger[metadataKey: "disk"] = "\(disk.name)"
        guard outcome.oldBytes != outcome.newBytes else {
            logger.info("disk \(disk.name): resize to \(outcome.newBytes) bytes: it has that size already")
            return outcome
        }
        let file = outcome.fileBytes.map { " (image file set to \($0) bytes)" } ?? ""
        logger.notice("disk \(disk.name): resized from \(outcome.oldBytes) to \(outcome.newBytes) bytes\(file)")
        outcome.frontends = notifyConfigChange(of: disk)
        return outcome
    }

    /// Sends CONFIG_CHANGE_MSG to each frontend of `disk` that gave a
    /// backend-request channel; returns, by socket, what became of it.
    @discardableResult
    public func notifyConfigChange(of disk: Disk) -> [String: String] {
        var result: [String: String] = [:]
        for export in exportChannels(of: disk) {
            var logger = self.logger
            logger[metadataKey: "disk"] = "\(disk.name)"
            logger[metadataKey: "socket"] = "\(export.socketPath)"
            guard export.connected else {
                result[export.socketPath] = "no frontend connected (the next one reads the new config)"
                continue
            }
            switch export.channel.sendConfigChange() {
            case .sent:
                result[export.socketPath] = "notified"
                logger.info("\(export.socketPath): config change sent to the frontend (CONFIG_CHANGE_MSG)")
            case .noChannel:
                result[export.socketPath] = "frontend did not negotiate BACKEND_REQ: its guest sees the new config only after a device reset"
                logger.warning("\(export.socketPath): the frontend did not negotiate BACKEND_REQ, so it cannot be told of the config change: its guest sees it only after the device is reset (a reboot)")
            case .failed(let err):
                result[export.socketPath] = "sending CONFIG_CHANGE_MSG failed: \(DataPlaneError.message(err))"
                logger.warning("\(export.socketPath): sending CONFIG_CHANGE_MSG failed: \(DataPlaneError.message(err)); its guest sees the new config only after a device reset")
            }
        }
        return result
    }
}
