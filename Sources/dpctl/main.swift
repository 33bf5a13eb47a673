import DataPlane
import Foundation

let usage = """
USAGE: dpctl <command> [options]

A vhost-user-blk data plane: serves raw images (or a null backend) to QEMU
guests from IOThreads pinned to CPUs, with io_uring.

COMMANDS:
  start         Serve disks in the foreground (logs on stderr; SIGINT/SIGTERM drain and exit)
  status        Show a running instance's disks, frontends, queues and IOThreads
  stats         Show IOPS, MB/s and latency per IOThread, disk and queue
  resume        Resume queues stopped by the error policy (retrying held requests)
  stop          Ask a running instance to drain and exit
  qemu-args     Print the QEMU options that connect a guest to a socket
  libvirt-xml   Print the libvirt <disk> and <memoryBacking> snippet for a socket

Run 'dpctl <command> --help' for a command's options.
"""

func run() -> Int32 {
    // A control client or log reader that hangs up must cost us a failed
    // write (EPIPE), not the process and the guests it serves.
    signal(SIGPIPE, SIG_IGN)
    var words = Array(CommandLine.arguments.dropFirst())
    guard let command = words.first else {
        print(usage)
        return 2
    }
    words.removeFirst()
    do {
        switch command {
        case "start": return try StartCommand.run(words)
        case "status": return try StatusCommand.run(words, stats: false)
        case "stats": return try StatusCommand.run(words, stats: true)
        case "stop": return try StopCommand.run(words)
        case "resume": return try ResumeCommand.run(words)
        case "qemu-args": return try GuestConfigCommand.run(words, kind: .qemu)
        case "libvirt-xml": return try GuestConfigCommand.run(words, kind: .libvirt)
        case "-h", "--help", "help":
            print(usage)
            return 0
        default:
            throw CLIError("unknown command \(command.debugDescription); commands: start, status, stats, resume, stop, qemu-args, libvirt-xml", usage: true)
        }
    } catch let error as CLIError {
        StandardError.write("dpctl: error: \(error.description)\n")
        return error.usage ? 2 : 1
    } catch let error as DataPlaneError {
        StandardError.write("dpctl: error: \(error.description)\n")
        return 1
    } catch {
        StandardError.write("dpctl: error: \(error)\n")
        return 1
    }
}

exit(run())
