import CGuestDriver
import CVhostFrontend
import Foundation
import Testing

@testable import DataPlane

/// Image locking as QEMU's (block/file-posix.c, locking=on), checked against
/// the real qemu-io, qemu-img, qemu-storage-daemon and a paused QEMU guest:
/// each side refuses what the other does not share, both ways.
@Suite(.serialized) struct ImageLockingTests {
    /// QEMU programs that hold a raw image, and what they hold (bytes seen
    /// in /proc/locks with QEMU 7.2).
    enum QEMUUser: String, CaseIterable, CustomTestStringConvertible {
        /// qemu-io, interactive: read and write, sharing everything (bytes 100-101).
        case qemuIO
        /// qemu-storage-daemon with a writable vhost-user-blk export: the same.
        case storageDaemon
        /// A paused guest's virtio-blk drive: read and write, sharing no writer (100-101, 201).
        case guest
        /// The same drive with readonly=on: read, sharing no writer (100, 201).
        case readOnlyGuest

        var testDescription: String { rawValue }

        /// Whether it holds write access itself (else it only refuses others').
        var writes: Bool { self != .readOnlyGuest }

        func hold(_ image: TestImage) throws -> QEMUHolder {
            let log = image.directory + "/\(rawValue).log"
            switch self {
            case .qemuIO:
                return try QEMUHolder("qemu-io", ["-f", "raw", image.path], image: image.path, lockedByte: 101, log: log)
            case .storageDaemon:
                return try QEMUHolder("qemu-storage-daemon", Self.storageDaemonArguments(image), image: image.path,
                                      lockedByte: 101, log: log)
            case .guest, .readOnlyGuest:
                let drive = "file=\(image.path),format=raw,if=virtio" + (self == .readOnlyGuest ? ",readonly=on" : "")
                return try QEMUHolder("qemu-system-x86_64", ["-M", "pc", "-S", "-display", "none", "-nodefaults",
                                                             "-drive", drive],
                                      image: image.path, lockedByte: 201, log: log)
            }
        }

        static func storageDaemonArguments(_ image: TestImage) -> [String] {
            ["--blockdev", "driver=file,node-name=disk,filename=\(image.path)",
             "--export", "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,"
                + "addr.path=\(image.directory)/qsd.sock,writable=on"]
        }
    }

    func qemuIOWrite(_ image: TestImage) throws -> ToolResult {
        try runTool("qemu-io", ["-f", "raw", "-c", "write 0 4k", image.path])
    }

    /// A disk, writable or read-only, keeps QEMU writers out (qemu-io and a
    /// writable qemu-storage-daemon export fail as against a QEMU guest),
    /// lets in the readers QEMU lets in, and its locks go with it.
    @Test(arguments: [false, true])
    func aDiskKeepsQEMUWritersOutUntilItIsGone(readOnly: Bool) throws {
        let image = try TestImage(size: 1 << 20)
        do {
            let disk = try Disk(DiskConfiguration(path: image.path, readOnly: readOnly))
            try withExtendedLifetime(disk) {
                let write = try qemuIOWrite(image)
                #expect(write.status != 0 && write.output.contains("Failed to get \"write\" lock"), "\(write.output)")
                let daemon = try runTool("qemu-storage-daemon", QEMUUser.storageDaemonArguments(image), timeout: 20)
                #expect(!daemon.timedOut, "qemu-storage-daemon exported an image a disk holds")
                #expect(daemon.result.output.contains("Failed to get \"write\" lock"), "\(daemon.result.output)")
                // Readers that share writes, as QEMU lets them in beside its own guests.
                let info = try runTool("qemu-img", ["info", "-U", image.path])
                #expect(info.status == 0, "\(info.output)")
                let read = try runTool("qemu-io", ["-f", "raw", "-r", "-U", "-c", "read 0 4k", image.path])
                #expect(read.status == 0, "\(read.output)")
            }
        }
        let write = try qemuIOWrite(image)
        #expect(write.status == 0, "the disk's locks outlived it: \(write.output)")
    }

    @Test(arguments: QEMUUser.allCases)
    func aQEMUUserKeepsOutWhatItDoesNotShare(user: QEMUUser) throws {
        let image = try TestImage(size: 1 << 20)
        let holder = try user.hold(image)
        defer { holder.stop() }

        // A writer: refused by one that writes (we share no writer), and by
        // one that shares no writer (QEMU's guest drives).
        let writerError = #expect(throws: DataPlaneError.self) { try Disk(DiskConfiguration(path: image.path)) }
        let heldByOther = user == .qemuIO || user == .storageDaemon
        #expect(writerError == .imageLocked(path: image.path, permission: .write, heldByOther: heldByOther))
        let message = writerError?.description ?? ""
        #expect(message.contains("\"write\" lock") && message.contains(image.path.debugDescription)
                && message.contains("locking=off"), "\(message)")

        // A reader: refused by any writer, welcome beside a read-only guest.
        let readOnly = DiskConfiguration(path: image.path, readOnly: true)
        if user.writes {
            let readerError = #expect(throws: DataPlaneError.self) { try Disk(readOnly) }
            #expect(readerError == .imageLocked(path: image.path, permission: .write, heldByOther: true))
        } else {
            #expect(throws: Never.self) { _ = try Disk(readOnly) }
        }

        var unlocked = DiskConfiguration(path: image.path)
        unlocked.locking = false
        #expect(throws: Never.self) { _ = try Disk(unlocked) }
    }

    @Test func readOnlyDisksShareAnImageAndExcludeWriters() throws {
        let image = try TestImage(size: 1 << 20)
        let readOnly = DiskConfiguration(path: image.path, readOnly: true)
        let writable = DiskConfiguration(path: image.path)
        do {
            let first = try Disk(readOnly), second = try Disk(readOnly)
            withExtendedLifetime((first, second)) {
                let error = #expect(throws: DataPlaneError.self) { try Disk(writable) }
                #expect(error == .imageLocked(path: image.path, permission: .write, heldByOther: false))
            }
        }
        let writer = try Disk(writable)
        withExtendedLifetime(writer) {
            let reader = #expect(throws: DataPlaneError.self) { try Disk(readOnly) }
            #expect(reader == .imageLocked(path: image.path, permission: .write, heldByOther: true))
            let second = #expect(throws: DataPlaneError.self) { try Disk(writable) }
            #expect(second == .imageLocked(path: image.path, permission: .write, heldByOther: false))
        }
    }

    /// locking=shared: writers that say shared share an image (a migrating
    /// guest's source and destination) as QEMU users that share writers do
    /// (qemu-io); a writer that does not (locking=on, a QEMU guest's drive)
    /// and a read-only disk (which shares no writer) stay out, and a shared
    /// writer stays out of an image such a user holds.
    @Test func sharedWritersShareAnImageAndKeepOthersOut() throws {
        let image = try TestImage(size: 1 << 20)
        var shared = DiskConfiguration(path: image.path)
        shared.imageLocking = .shared
        do {
            let first = try Disk(shared), second = try Disk(shared)
            try withExtendedLifetime((first, second)) {
                let exclusive = #expect(throws: DataPlaneError.self) { try Disk(DiskConfiguration(path: image.path)) }
                #expect(exclusive == .imageLocked(path: image.path, permission: .write, heldByOther: true))
                let reader = #expect(throws: DataPlaneError.self) { try Disk(DiskConfiguration(path: image.path, readOnly: true)) }
                #expect(reader == .imageLocked(path: image.path, permission: .write, heldByOther: true))
                // A QEMU guest's drive shares no writer; qemu-io shares them, as we do.
                let guest = #expect(throws: TestFailure.self) { try QEMUUser.guest.hold(image) }
                #expect(guest?.description.contains("Failed to get shared \"write\" lock") == true, "\(guest?.description ?? "")")
                let write = try qemuIOWrite(image)
                #expect(write.status == 0, "\(write.output)")
            }
        }
        let exclusive = try Disk(DiskConfiguration(path: image.path))
        withExtendedLifetime(exclusive) {
            let refused = #expect(throws: DataPlaneError.self) { try Disk(shared) }
            #expect(refused == .imageLocked(path: image.path, permission: .write, heldByOther: false))
            #expect(refused?.description.contains("locking=shared") == true, "\(refused?.description ?? "")")
        }
    }

    func waitForReady(_ dp: QEMUEndToEndTests.Instance) {
        let deadline = Date().addingTimeInterval(10)
        while !dp.log.contains("ready") && dp.process.isRunning && Date() < deadline { usleep(20_000) }
    }

    @Test func dpctlRefusesAnImageInUseUnlessLockingIsOff() throws {
        let image = try TestImage(size: 1 << 20)
        let socket = image.directory + "/vu.sock"
        do {
            let holder = try QEMUUser.qemuIO.hold(image)
            defer { holder.stop() }
            let (refused, ranOn) = try runTool(QEMUEndToEndTests.dpctl, ["start", "--disk", image.path, "--socket", socket],
                                               timeout: 10)
            #expect(!ranOn && refused.status != 0, "dpctl served an image qemu-io writes")
            #expect(refused.stderr.contains("\"write\" lock") && refused.stderr.contains(image.path)
                    && refused.stderr.contains("locking=off"), "\(refused.stderr)")
            #expect(refused.stderr.split(separator: "\n").count == 1, "one line: \(refused.stderr)")

            let unlocked = try QEMUEndToEndTests.Instance(["--disk", image.path, "--socket", socket, "--locking", "off"],
                                                          log: image.directory + "/unlocked.log")
            waitForReady(unlocked)
            #expect(unlocked.log.contains("ready"), "\(unlocked.log)")
            #expect(unlocked.terminate() == 0, "\(unlocked.log)")
        }

        let dp = try QEMUEndToEndTests.Instance(["--disk", image.path, "--socket", socket],
                                                log: image.directory + "/locked.log")
        waitForReady(dp)
        #expect(dp.log.contains("ready"), "\(dp.log)")
        let write = try qemuIOWrite(image)
        #expect(write.status != 0 && write.output.contains("Failed to get \"write\" lock"), "\(write.output)")
        #expect(dp.terminate() == 0, "\(dp.log)")
        #expect(try qemuIOWrite(image).status == 0)

        let bad = try DpctlTests.dpctl(["start", "--disk", "x", "--backend", "null", "--socket", socket, "--locking", "maybe"])
        #expect(bad.status == 2 && bad.stderr.contains("locking=\"maybe\": use on, shared or off"), "\(bad.stderr)")
    }

    /// Found by the soak: a dpctl killed with I/O in flight left its image
    /// locks behind for a moment (the kernel tears a dead process's
    /// io_uring down after it is gone, and the ring held the locked file),
    /// so the dpctl restarted in its place was refused. The locks now sit
    /// on a file description the ring never sees. Several rounds: the
    /// teardown races the restart.
    @Test func aKilledInstancesLocksGoWithIt() throws {
        let image = try TestImage(size: 8 << 20)
        let socket = image.directory + "/vu.sock"
        for round in 0..<5 {
            let dp = try QEMUEndToEndTests.Instance(["--disk", image.path, "--socket", socket, "--num-queues", "1"],
                                                    log: image.directory + "/dp\(round).log")
            let g = try TestGuest(queues: 1, queueSize: 64)
            let conn = try g.connectFrontend(socket)
            for i in 0..<32 { // reads and writes in flight when it dies
                let buf = g.alloc(65536)
                try g.submit(type: UInt32(i % 2 == 0 ? GD_BLK_T_IN : GD_BLK_T_OUT), sector: UInt64(i * 128),
                             segments: [(buf, 65536)], indirect: true)
            }
            dp.kill9()
            vuf_close(conn)
            let next = try QEMUEndToEndTests.Instance(["--disk", image.path, "--socket", socket, "--num-queues", "1"],
                                                      log: image.directory + "/next\(round).log")
            waitForReady(next)
            #expect(next.log.contains("ready"), "round \(round): \(next.log)")
            #expect(next.terminate() == 0, "round \(round): \(next.log)")
        }
    }

    /// The kernel completes a SIGKILLed process's io_uring requests after
    /// the process is gone: a write of the dead dpctl's could land after the
    /// same sectors were written again through its successor (and a read
    /// fill guest memory the guest has reused: a CI guest's slab was
    /// corrupted, likely that way). The image is a loop device over a file
    /// on a frozen filesystem: the dead one's writes are bios the loop
    /// driver holds, and the process is reaped at once. The next dpctl must
    /// wait until they land, and only then listen.
    @Test(.enabled(if: runningAsRoot, "loop devices and fsfreeze need root"))
    func theNextInstanceWaitsForAKilledOnesRequests() throws {
        let fs = try ScratchFilesystem(sectorSize: 512)
        let loop = try LoopDevice(backing: try fs.makeImage(size: 8 << 20))
        let image = try TestImage(size: 4096) // its directory, for the socket and logs
        let socket = image.directory + "/vu.sock"
        let args = ["--disk", loop.path, "--socket", socket, "--num-queues", "1"]
        let dp = try QEMUEndToEndTests.Instance(args, log: image.directory + "/first.log")
        waitForReady(dp)
        let g = try TestGuest(queues: 1, queueSize: 64)
        let conn = try g.connectFrontend(socket)
        defer { vuf_close(conn) }
        try runToolChecked("fsfreeze", ["-f", fs.mountPoint])
        var frozen = true
        defer { if frozen { _ = try? runTool("fsfreeze", ["-u", fs.mountPoint]) } }
        for i in 0..<8 {
            let buf = g.alloc(65536)
            g.write(buf, [UInt8](repeating: 0xA5, count: 65536))
            try g.submit(type: UInt32(GD_BLK_T_OUT), sector: UInt64(i * 128), segments: [(buf, 65536)], indirect: true)
        }
        usleep(300_000) // popped and submitted: held by the loop driver behind the freeze
        dp.kill9()
        let next = try QEMUEndToEndTests.Instance(args, log: image.directory + "/next.log")
        defer { _ = next.terminate() }
        let deadline = Date().addingTimeInterval(10)
        while !next.log.contains("waiting for the requests") && next.process.isRunning && Date() < deadline { usleep(20_000) }
        usleep(500_000)
        #expect(next.log.contains("waiting for the requests"), "\(next.log)")
        #expect(!next.log.contains("ready"), "listening while the killed dpctl's writes were in flight: \(next.log)")
        try runToolChecked("fsfreeze", ["-u", fs.mountPoint])
        frozen = false
        waitForReady(next)
        #expect(next.log.contains("ready"), "\(next.log)")
        // The killed one's writes landed before the next one opened the image.
        let fd = open(loop.path, O_RDONLY)
        try #require(fd >= 0)
        defer { close(fd) }
        var data = [UInt8](repeating: 0, count: 8 * 65536)
        #expect(pread(fd, &data, data.count, 0) == data.count)
        #expect(data.allSatisfy { $0 == 0xA5 }, "the killed dpctl's writes are not on the device")
    }
}
