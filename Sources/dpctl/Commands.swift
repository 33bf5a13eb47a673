import ArgumentParser
import DataPlane
import Foundation

/// dpctl's exit statuses, as --help and README state them.
enum ExitStatus {
    static let ok: Int32 = 0
    static let failure: Int32 = 1
    static let usage: Int32 = 2
}

struct Dpctl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dpctl",
        abstract: "A vhost-user-blk data plane: serves raw images (or a null backend) to QEMU guests from IOThreads pinned to CPUs, with io_uring.",
        discussion: """
        EXIT STATUS:
          0  success
          1  runtime failure (an image that cannot be opened, a socket in use,
             an instance that cannot be reached, ...)
          2  usage error (an unknown option, a bad value)
          3  'dpctl status' only: something needs an operator (see its --help)

        VHOST-USER BACKEND (QEMU docs/interop/vhost-user.rst, "Backend program
        conventions"): dpctl --print-capabilities prints the block backend's
        capabilities as JSON and exits; dpctl --socket-path PATH (or --fd N)
        --blk-file IMAGE [--read-only] with no command is 'dpctl start'.

        Shell completions: dpctl --generate-completion-script bash|zsh|fish
        """,
        version: DataPlane.version,
        subcommands: [Start.self, Status.self, Stats.self, Top.self, Resume.self, Stop.self, QemuArgs.self, LibvirtXML.self,
                      AddDisk.self, RemoveDisk.self, Reload.self, Throttle.self, Resize.self]
    )
}

struct Start: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve disks in the foreground (logs on stderr; SIGINT/SIGTERM drain and exit, SIGHUP reloads --config).",
        usage: """
        dpctl start [<instance options>] --disk path=PATH,socket=PATH[,KEY=VALUE...] [--disk ...]
        dpctl start [<instance options>] --config FILE
        dpctl start [<instance options>] --socket-path PATH|--fd N --blk-file IMAGE [--read-only]
        dpctl start ... --check
        dpctl --print-capabilities
        """,
        discussion: """
        Serves each disk as a vhost-user-blk device on its unix socket, in the
        foreground. SIGINT or SIGTERM (or 'dpctl stop') drain in-flight I/O and exit.
        A disk is one --disk value in QEMU's key=value style:

          dpctl start --cpuset 5,6 --iothreads 2 \\
              --disk path=/var/lib/images/a.raw,socket=/run/a.sock,num-queues=4 \\
              --disk path=b,backend=null,null-size=4G,socket=/run/b.sock,readonly=on

        DISK KEYS (path and socket are required; a comma inside a value is
        written twice, as in QEMU: path=/img/a,,b.raw; a switch alone is on):
          path=PATH           Raw image file or block device (a name, with
                              backend=null)
          socket=PATH         vhost-user socket to listen on. A socket nobody
                              listens on is replaced; a live one, or anything
                              else (a file), is refused and left as it is.
                              Given again (socket=A,socket=B, or --socket
                              twice after --disk), the disk is served on each
                              socket to a frontend of its own, with queues of
                              its own: a migrating guest's destination QEMU
                              connects to the second while the source runs
          readonly=on|off     Refuse writes (the guest sees a read-only disk)
                              (default off)
          num-queues=N        Queues offered to the frontend, 1-64 (default \(StartCommand.defaultNumQueues):
                              QEMU asks one per vCPU and refuses to start when
                              offered fewer)
          queue-size=N        Largest ring a frontend may set, a power of two
                              1-32768 (default \(StartCommand.defaultQueueSize), QEMU's maximum); a larger
                              SET_VRING_NUM is refused. The guest is told
                              seg_max = min(128, N-2) segments per request
          backend=file|null   file: I/O on the image with io_uring (default
                              file); null: complete without I/O (a null disk)
          null-size=SIZE      Capacity of a null disk, e.g. 64M (default 1G)
          null-read-zeroes=on|off
                              Whether null-disk reads fill the buffers with
                              zeroes (default on; off leaves the guest's
                              buffers as they are, like QEMU null-co's default)
          serial=TEXT         Serial number the guest sees, at most 20 bytes
                              (default the image's file name)
          block-size=N        Logical block size, a power of two 512-65536
                              (default what the image takes: its device's
                              sector size, or with O_DIRECT its filesystem's
                              direct-I/O alignment; 512 for most images, 4096
                              on 4K-sector storage)
          direct=on|off       off: use the page cache instead of O_DIRECT
                              (default on: O_DIRECT)
          locking=on|shared|off
                              Lock the image as QEMU does (default on): on,
                              two writers, or a writer and a read-only user,
                              exclude each other, whether QEMU, qemu-img,
                              qemu-storage-daemon or dpctl; shared, writers
                              that also say shared may share it (QEMU's
                              share-rw=on), for two dpctl serving a migrating
                              guest's source and destination (users that
                              share no writer are still refused); off, no
                              locks, only for storage shared on purpose
          fixed-buffers=on|off
                              Register the guest's memory with io_uring, so
                              that one-segment reads and writes need no page
                              pinning each (default off): it pins all of the
                              guest's RAM while the frontend is connected
                              (RLIMIT_MEMLOCK, not as root), and the guest must
                              not give RAM back to the host (no balloon, free
                              page reporting or virtio-mem unplug). Where
                              registering fails, plain I/O is used
          rerror=POLICY       A failed read: report (the guest gets an I/O
                              error), ignore, enospc, or stop (hold it; 'dpctl
                              resume' retries it) (default report)
          werror=POLICY       A failed write/flush/discard: enospc (stop only
                              when the host is out of space, else report),
                              report, ignore, or stop (default enospc)
          fault=SPEC          Inject failures, e.g. errno=EIO,,ops=write,,after=10
                              (its own keys errno=EIO|ENOSPC|number,
                              ops=read+write+flush+discard+write-zeroes,
                              sectors=START-END, after=N, every=N; their
                              commas doubled)
          write-cache=on|off  on: write back, a write completes once the host
                              has it and the guest's FLUSH makes it durable;
                              off: write through, each write is durable
                              (RWF_DSYNC) before it completes (default on);
                              the guest may switch it (virtio-blk's writeback
                              byte: in Linux, /sys/block/vdX/cache_type)
          socket-owner=USER   The socket's owner, a name or number (chown
                              to another user needs root or CAP_CHOWN)
          socket-group=GROUP  The socket's group, a name or number
          socket-mode=MODE    The socket's permission bits in octal, e.g.
                              0660: connecting needs write permission, so
                              socket-group=kvm,socket-mode=0660 lets a QEMU
                              in group kvm in (unset: what the umask leaves)
          iops-total=N, iops-read=N, iops-write=N, bps-total=N, bps-read=N,
          bps-write=N         I/O limits with QEMU's semantics and names
                              (throttling.* without the prefix): requests or
                              bytes a second (binary suffixes: 10M); total
                              excludes read/write of its kind. Each also
                              takes KEY-max=N (burst rate) and
                              KEY-max-length=SECONDS (how long a burst at
                              max may last, default 1); without max a burst
                              is a tenth of a second's worth. Default: none.
                              See 'dpctl throttle --help'
          iops-size=BYTES     A larger request counts as size / iops-size
                              requests
          group=NAME          Throttle group: the disks of a group share one
                              set of limits (the group's: the last disk that
                              gives keys sets them)
          Set before the socket listens; --socket-owner, --socket-group and
          --socket-mode set them for every disk that does not. They do not
          apply to sockets systemd passes (set SocketUser=, SocketGroup=,
          SocketMode= there) nor to the control socket.

        SYSTEMD: with NOTIFY_SOCKET set (Type=notify), dpctl sends READY=1
        once every socket listens, STATUS= lines, RELOADING=1 on SIGHUP and
        STOPPING=1 when it drains. Sockets passed by socket activation
        (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES) serve the disk whose socket=
        path equals the socket's FileDescriptorName=, or else the path it is
        bound to (ListenStream=); one that matches the control socket's path
        becomes the control socket; one that matches nothing is an error.
        dpctl leaves passed sockets' files in place when it exits. See
        contrib/systemd/ and the README.

        SIGHUP (or 'dpctl reload') re-reads --config: disks added to the
        file are served, disks removed from it are removed (not one whose
        frontend is connected, nor disks added with 'dpctl add-disk'); fault=,
        I/O limit and group, and socket-owner/-group/-mode changes are
        applied; other changes wait for a restart (each is logged as such).
        Without --config, SIGHUP changes nothing. 'dpctl add-disk' and
        'dpctl remove-disk' change the disks of a running instance.

        VHOST-USER BACKEND CONVENTIONS: --socket-path PATH is --socket PATH
        for the one disk; --fd N serves the one disk on the listening unix
        socket inherited as fd N; --blk-file IMAGE is --disk IMAGE;
        --read-only makes every disk read-only; --print-capabilities prints
        {"type": "block", "features": ["read-only", "blk-file"]} and exits.

        The form of earlier versions works as well: --disk PATH --socket PATH
        [--readonly] [--num-queues N] [--no-direct] [--locking on|shared|off] ...: each
        key as a flag (--no-direct for direct=off), applying to the --disk
        before it.

        EXIT STATUS: 0 after a drain on SIGINT, SIGTERM or 'dpctl stop' (or a
        --check that passed); 1 on a runtime failure (an image that cannot be
        opened, a socket or metrics port in use, CPUs not allowed);
        2 on a usage error.
        """
    )

    @Option(help: ArgumentHelp("""
        IOThreads to run, 1-256 (default \(StartCommand.defaultIOThreads)); queues are spread over them round-robin \
        (more IOThreads than CPUs in the cpuset share CPUs: logged as a warning)
        """, valueName: "n"))
    var iothreads: Int?

    @Option(help: ArgumentHelp("""
        CPUs the IOThreads are pinned to, like taskset: 5,6 or 0-3,8; IOThread i gets the i-th CPU \
        (round-robin). (default: every CPU this process may run on, what taskset, systemd AllowedCPUs= \
        or the container's cpuset leave it; CPUs outside those are refused)
        """, valueName: "list"))
    var cpuset: String?

    @Option(name: .customLong("poll-us"), help: ArgumentHelp("""
        Busy-poll window upper bound in microseconds, adaptive, 0-1000000 (default \(StartCommand.defaultPollMicroseconds); \
        0 = never poll)
        """, valueName: "n"))
    var pollUs: Int?

    @Option(name: .customLong("notify-after"), help: ArgumentHelp("""
        Completions after which a queue's pass publishes them and signals the guest at once, before \
        finishing the pass (once per pass), 0-\(IOThreadConfiguration.maxNotifyAfter) (default \
        \(IOThreadConfiguration.defaultNotifyAfter); 0 = at the end of each pass only)
        """, valueName: "n"))
    var notifyAfter: Int?

    @Option(help: ArgumentHelp("""
        Control socket for status, stats, resume, stop, add-disk, remove-disk and reload (default \
        FIRST-SOCKET.ctl); like a disk's socket, it replaces only a stale socket
        """, valueName: "path"), completion: .file())
    var control: String?

    @Option(name: .customLong("disable-io-uring"), help: ArgumentHelp("""
        io_uring features to leave unused even where the kernel has them, to measure what each brings: a \
        comma list of defer-taskrun, registered-files, fixed-buffers, single-rw, multishot-kicks, or all \
        (default none: each is used where the kernel has it; 'dpctl status' lists them)
        """, valueName: "list"))
    var disableIOURing: String?

    @Option(name: .customLong("metrics-address"), help: ArgumentHelp("""
        Serve Prometheus metrics (per disk and queue: requests, bytes and errors by type, in flight, \
        latency histogram, queue state; per IOThread: busy, poll and sleep seconds) as GET /metrics on \
        HOST:PORT, e.g. 127.0.0.1:9100 or [::1]:9100; port 0 takes a free port (logged). Plain HTTP, \
        no authentication: listen on a trusted address. (default: not served)
        """, valueName: "host:port"))
    var metricsAddress: String?

    @Option(name: .customLong("disk"), help: ArgumentHelp("""
        A disk to serve: path=PATH,socket=PATH[,KEY=VALUE...], the keys below (repeatable)
        """, valueName: "keys"))
    var disks: [String] = []

    @Option(help: ArgumentHelp("""
        Read the instance and its disks from a JSON file. Its keys are the names of these options \
        without the dashes, with the values they take: "iothreads", "cpuset", "poll-us", \
        "notify-after", "control", "disable-io-uring" (a list of names, or the comma list), \
        "metrics-address", and "disks", a list of objects with the disk keys ("null-size": "1G" or \
        bytes, switches true/false or "on"/"off"). An unknown key is an error. --iothreads, --cpuset, \
        --poll-us, --notify-after, --control, --disable-io-uring and --metrics-address override the \
        file; --disk cannot be combined with it.
        """, valueName: "file"), completion: .file(extensions: ["json"]))
    var config: String?

    @Option(name: .customLong("socket-owner"), help: ArgumentHelp("""
        Owner of every disk's socket that sets no socket-owner=, a user name or number
        """, valueName: "user"))
    var socketOwner: String?

    @Option(name: .customLong("socket-group"), help: ArgumentHelp("""
        Group of every disk's socket that sets no socket-group=, a name or number
        """, valueName: "group"))
    var socketGroup: String?

    @Option(name: .customLong("socket-mode"), help: ArgumentHelp("""
        Permission bits of every disk's socket that sets no socket-mode=, in octal: 0660 lets the \
        socket's group connect
        """, valueName: "mode"))
    var socketMode: String?

    @Option(name: .customLong("socket-path"), help: ArgumentHelp("""
        The vhost-user socket of the one disk (vhost-user.rst's name for socket=); not with --fd or --config
        """, valueName: "path"), completion: .file())
    var socketPath: String?

    @Option(help: ArgumentHelp("""
        Serve the one disk on the listening unix stream socket inherited as this file descriptor \
        (vhost-user.rst's --fd); not with --socket-path or --config
        """, valueName: "n"))
    var fd: Int32?

    // Never set: start's arguments are rewritten before parsing, --blk-file
    // IMAGE into --disk IMAGE (the grouped form). Declared for --help.
    @Option(name: .customLong("blk-file"), help: ArgumentHelp("""
        The image of a disk (vhost-user.rst's --blk-file): the same as --disk IMAGE
        """, valueName: "image"), completion: .file())
    var blkFile: [String] = []

    @Flag(name: .customLong("read-only"), help: """
        Every disk read-only (vhost-user.rst's --read-only; per disk: readonly=on)
        """)
    var readOnly = false

    @Flag(name: .customLong("print-capabilities"), help: """
        Print the vhost-user backend capabilities as JSON and exit; every other option is ignored
        """)
    var printCapabilities = false

    @Flag(help: """
        Check the options (no image is opened, no socket made), print the configuration with every \
        default filled in, as a --config file, and exit
        """)
    var check = false

    @OptionGroup(title: "Logging")
    var logging: LoggingOptions

    func run() throws {
        try StartCommand.run(self)
    }
}
