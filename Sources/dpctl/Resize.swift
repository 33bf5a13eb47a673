import ArgumentParser
import DataPlane
import Foundation

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Grow (or, with --shrink, shrink) a served disk while its guest runs.",
        usage: "dpctl resize --socket PATH [SIZE] [--shrink] [--control PATH]",
        discussion: """
        Changes the capacity of the disk served on --socket, and tells its
        frontends (QEMU reads the new size and tells the guest, which sees it
        without a reboot: /sys/block/vdX/size). SIZE is bytes or a size like
        20G (a multiple of the disk's logical block size).

        A file image is extended first, then the guest may use the new space.
        Without SIZE the image's size now is taken: a block device after
        'losetup -c' or 'lvextend', or a file grown by other means (the only
        way to grow a readonly=on disk, whose file dpctl never writes).

        Shrinking cuts off what lies past the new end: it is refused without
        --shrink. The guest's I/O past the new end is refused from the moment
        the capacity drops; requests already under way finish before the file
        is shortened (a request held by werror=stop/rerror=stop fails when
        'dpctl resume' retries it past the new end). Shrink the guest's
        filesystem and partitions first.

        A frontend that did not negotiate BACKEND_REQ (the backend-request
        channel) cannot be told: its guest sees the new size after a reset
        (logged). Prints the status afterwards.
        """)

    @Option(help: ArgumentHelp("The disk's vhost-user socket (its instance answers on PATH.ctl unless --control is given)",
                               valueName: "path"), completion: .file())
    var socket: String

    @Option(help: ArgumentHelp("The instance's control socket", valueName: "path"), completion: .file())
    var control: String?

    @Flag(help: "Allow the disk to become smaller (what lies past the new end is lost to the guest)")
    var shrink = false

    @Argument(help: ArgumentHelp("The new size: bytes, or with a K, M, G or T suffix (default: the image's size now)",
                                 valueName: "size"))
    var size: String?

    func run() throws {
        let bytes = try size.map { text throws(CLIError) in try parseSize(text, option: "SIZE") }
        var request = ControlRequest(command: "resize", socket: socketArgument(socket))
        request.sizeBytes = bytes
        request.shrink = shrink
        let response = try controlCall(control ?? socket + ".ctl", request)
        if let outcome = response.resize {
            if outcome.oldBytes == outcome.newBytes {
                print("\(socket): already \(binarySize(outcome.newBytes)) (\(outcome.newBytes) bytes)")
            } else {
                print("\(socket): resized from \(binarySize(outcome.oldBytes)) to \(binarySize(outcome.newBytes)) (\(outcome.newBytes) bytes)")
            }
            for (path, what) in outcome.frontends.sorted(by: { $0.key < $1.key }) { print("  \(path): \(what)") }
        }
        StatusCommand.printStatus(response)
    }
}
