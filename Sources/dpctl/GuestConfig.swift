import Foundation

/// qemu-args and libvirt-xml: how to connect a guest to a socket.
enum GuestConfigCommand {
    enum Kind { case qemu, libvirt }

    static let help = """
    USAGE: dpctl qemu-args --socket PATH [--num-queues N] [--memory SIZE] [--id NAME]
           dpctl libvirt-xml --socket PATH [--num-queues N] [--target vdX]

    Prints what connects a guest to a dpctl socket. vhost-user needs the guest's
    RAM in shared memory (memfd, share=on); the chardev reconnects when dpctl
    restarts. --num-queues must not exceed the disk's --num-queues (default 16
    on both sides would be rejected by QEMU only above that).
    """

    static func run(_ words: [String], kind: Kind) throws -> Int32 {
        var args = Arguments(words)
        var socket: String?
        var queues = 1
        var memory = "1G"
        var id = "dp0"
        var target = "vda"
        while let word = args.next() {
            let (option, inline) = Arguments.split(word)
            switch option {
            case "-h", "--help":
                print(help)
                return 0
            case "--socket": socket = try args.value(for: option, inline: inline)
            case "--num-queues": queues = try parseInt(try args.value(for: option, inline: inline), option: option, range: 1...64)
            case "--memory" where kind == .qemu:
                let m = try args.value(for: option, inline: inline)
                _ = try parseSize(m, option: option)
                memory = m
            case "--id" where kind == .qemu: id = try args.value(for: option, inline: inline)
            case "--target" where kind == .libvirt: target = try args.value(for: option, inline: inline)
            default: throw CLIError("unknown option \(word.debugDescription)", usage: true)
            }
        }
        guard let socket else { throw CLIError("--socket PATH is required", usage: true) }
        switch kind {
        case .qemu:
            print("""
            -object memory-backend-memfd,id=mem,size=\(memory),share=on -machine memory-backend=mem -m \(memory) \\
              -chardev socket,id=\(id),path=\(socket),reconnect=1 \\
              -device vhost-user-blk-pci,chardev=\(id),num-queues=\(queues)
            """)
        case .libvirt:
            print("""
            <!-- in <domain>: guest RAM must be shared memory for vhost-user -->
            <memoryBacking>
              <source type='memfd'/>
              <access mode='shared'/>
            </memoryBacking>
            <!-- in <devices>: -->
            <disk type='vhostuser' device='disk'>
              <driver name='qemu' type='raw' queues='\(queues)'/>
              <source type='unix' path='\(socket)'>
                <reconnect enabled='yes' timeout='1'/>
              </source>
              <target dev='\(target)' bus='virtio'/>
            </disk>
            """)
        }
        return 0
    }
}
