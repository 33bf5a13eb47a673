import DataPlane
import Foundation
import Testing

/// dpctl's command line on swift-argument-parser: a disk as one key=value
/// option value, the grouped form of earlier versions mapping to the same
/// configuration, exit statuses, --version, --help and completions.
@Suite(.serialized) struct DpctlCommandLineTests {
    typealias JSON = [String: Any]

    static func check(_ arguments: [String]) throws -> JSON { try DpctlOptionsTests.check(arguments) }

    static func same(_ a: JSON, _ b: JSON) -> Bool { NSDictionary(dictionary: a).isEqual(to: b) }

    /// Every key, set to something other than its default, in one --disk.
    @Test func everyDiskKeyConfiguresWhatItsFlagDid() throws {
        let keyValue = try Self.check([
            "--disk", "path=nul,socket=/tmp/dp-kv.sock,readonly=on,num-queues=4,queue-size=256,backend=null,null-size=64M,"
                + "null-read-zeroes=off,serial=SER1,block-size=4096,direct=off,locking=off,fixed-buffers=on,rerror=stop,"
                + "werror=report,fault=errno=EIO,,ops=write,,after=3",
        ])
        let grouped = try Self.check([
            "--disk", "nul", "--socket", "/tmp/dp-kv.sock", "--readonly", "--num-queues", "4", "--queue-size", "256",
            "--backend", "null", "--null-size", "64M", "--null-read-zeroes", "off", "--serial", "SER1", "--block-size", "4096",
            "--no-direct", "--locking", "off", "--fixed-buffers", "on", "--rerror", "stop", "--werror", "report",
            "--fault", "errno=EIO,ops=write,after=3",
        ])
        let disk = DpctlOptionsTests.firstDisk(keyValue)
        #expect(disk["path"] as? String == "nul" && disk["socket"] as? String == "/tmp/dp-kv.sock")
        #expect(disk["readonly"] as? Bool == true && disk["num-queues"] as? Int == 4 && disk["queue-size"] as? Int == 256)
        #expect(disk["backend"] as? String == "null" && disk["null-size"] as? Int == 64 << 20)
        #expect(disk["null-read-zeroes"] as? Bool == false && disk["serial"] as? String == "SER1")
        #expect(disk["block-size"] as? Int == 4096 && disk["direct"] as? Bool == false && disk["locking"] as? String == "off")
        #expect(disk["fixed-buffers"] as? Bool == true && disk["rerror"] as? String == "stop" && disk["werror"] as? String == "report")
        #expect(disk["fault"] as? String == "errno=EIO,ops=write,after=3")
        #expect(Self.same(keyValue, grouped), "key=value: \(keyValue)\ngrouped: \(grouped)")
        // Every key the help lists was set above.
        let help = try DpctlOptionsTests.help("start")
        for key in ["path", "socket", "readonly", "num-queues", "queue-size", "backend", "null-size", "null-read-zeroes",
                    "serial", "block-size", "direct", "locking", "fixed-buffers", "rerror", "werror", "fault"] {
            #expect(help.contains("\n  \(key)="), "start --help lists \(key)=")
        }
    }

    /// The grouped form with instance options between and after the disks
    /// (bench/run puts --poll-us=0 after a --disk), --opt=value spellings, a
    /// comma in a path, and disk flags after a key=value --disk.
    @Test func theGroupedFormMapsToTheSameConfiguration() throws {
        let grouped = try Self.check([
            "--iothreads", "2", "--disk", "/tmp/a,b.raw", "--socket=/tmp/dp-a.sock", "--num-queues", "2",
            "--cpuset", "0", "--disk", "nb", "--backend", "null", "--poll-us=0", "--socket", "/tmp/dp-b.sock", "--readonly",
            "--disk", "path=nc,backend=null,socket=/tmp/dp-c.sock", "--num-queues=3", "--control", "/tmp/dp-c.ctl",
        ])
        let keyValue = try Self.check([
            "--iothreads", "2", "--cpuset", "0", "--poll-us", "0", "--control", "/tmp/dp-c.ctl",
            "--disk", "path=/tmp/a,,b.raw,socket=/tmp/dp-a.sock,num-queues=2",
            "--disk", "path=nb,backend=null,socket=/tmp/dp-b.sock,readonly",
            "--disk", "path=nc,backend=null,socket=/tmp/dp-c.sock,num-queues=3",
        ])
        #expect(Self.same(grouped, keyValue), "grouped: \(grouped)\nkey=value: \(keyValue)")
        let disks = try #require(keyValue["disks"] as? [JSON])
        #expect(disks.map { $0["path"] as? String } == ["/tmp/a,b.raw", "nb", "nc"])
        #expect(disks.map { $0["num-queues"] as? Int } == [2, 16, 3])
        #expect(keyValue["poll-us"] as? Int == 0 && keyValue["iothreads"] as? Int == 2)
    }

    @Test(arguments: [
        (["--disk", "path=x,socket=/tmp/s,read-only=on"],
         #"--disk "path=x,socket=/tmp/s,read-only=on": unknown key "read-only" (keys: path, socket, readonly, num-queues, queue-size, backend, null-size, null-read-zeroes, serial, block-size, direct, locking, fixed-buffers, rerror, werror, fault, socket-owner, socket-group, socket-mode, write-cache, I/O limits bps-total, bps-read, bps-write, iops-total, iops-read, iops-write (each also KEY-max and KEY-max-length), iops-size, group)"#),
        (["--disk", "path=x,socket=/tmp/s,num-queues=65"], #"--disk "path=x,socket=/tmp/s,num-queues=65": num-queues "65" is not a number in 1...64"#),
        (["--disk", "path=x,socket=/tmp/s,readonly=maybe"], #"--disk "path=x,socket=/tmp/s,readonly=maybe": readonly="maybe": use on or off"#),
        (["--disk", "path=x,backend=null"], #"--disk "path=x,backend=null" has no socket: add socket=PATH (the vhost-user socket to listen on)"#),
        (["--disk", "socket=/tmp/s"], #"--disk "socket=/tmp/s" has no path: add path=PATH (the image, or a name with backend=null)"#),
        (["--disk", "path=x,socket=/tmp/s,path=y"], #"--disk "path=x,socket=/tmp/s,path=y": path is given twice"#),
        (["--disk", "path=x,socket=/tmp/s,serial"], #"--disk "path=x,socket=/tmp/s,serial": serial needs a value: serial=TEXT"#),
        (["--disk", "path=x,socket=/tmp/s,no-direct"], #"--disk "path=x,socket=/tmp/s,no-direct": unknown key "no-direct" (write direct=off) (keys: path, socket, readonly, num-queues, queue-size, backend, null-size, null-read-zeroes, serial, block-size, direct, locking, fixed-buffers, rerror, werror, fault, socket-owner, socket-group, socket-mode, write-cache, I/O limits bps-total, bps-read, bps-write, iops-total, iops-read, iops-write (each also KEY-max and KEY-max-length), iops-size, group)"#),
        (["--disk", "path=x,socket=/tmp/s,fault=errno=EIO,ops=write"],
         #"--disk "path=x,socket=/tmp/s,fault=errno=EIO,ops=write": unknown key "ops" (commas inside fault's value are written twice: fault=errno=EIO,,ops=write) (keys: path, socket, readonly, num-queues, queue-size, backend, null-size, null-read-zeroes, serial, block-size, direct, locking, fixed-buffers, rerror, werror, fault, socket-owner, socket-group, socket-mode, write-cache, I/O limits bps-total, bps-read, bps-write, iops-total, iops-read, iops-write (each also KEY-max and KEY-max-length), iops-size, group)"#),
        (["--disk", "path=x,socket=/tmp/s,backend=nvme"], #"--disk "path=x,socket=/tmp/s,backend=nvme": backend "nvme": use file or null"#),
        (["--disk", "path=x,socket=/tmp/s,werror=panic"], #"--disk "path=x,socket=/tmp/s,werror=panic": werror "panic": use report, ignore, enospc or stop"#),
        (["--disk", "path=x,socket=/tmp/s,null-size=lots"], #"--disk "path=x,socket=/tmp/s,null-size=lots": null-size "lots" is not a size such as 4096, 64k or 1G"#),
        (["--disk", "/img/a,b.raw", "--readonly"], "--disk /img/a,b.raw has no socket: put --socket PATH after it, or write --disk path=/img/a,,b.raw,socket=PATH"),
        (["--num-queues", "4", "--disk", "path=x,socket=/tmp/s"],
         "--num-queues must follow a --disk (or write it as a key: --disk path=PATH,socket=PATH,num-queues=N)"),
        (["--disk", "x", "--socket"], "--socket needs a value"),
        (["--disk", "path=x,socket=/tmp/s", "--iothreads", "0"], #"--iothreads "0" is not a number in 1...256"#),
        (["--disk", "path=x,socket=/tmp/s", "--iothreads", "two"], "The value 'two' is invalid for '--iothreads <n>' (see 'dpctl start --help')"),
        (["--disk", "path=x,socket=/tmp/s", "--frobnicate"], "Unknown option '--frobnicate' (see 'dpctl start --help')"),
        ([], "nothing to serve: give --disk path=PATH,socket=PATH (or --config FILE)"),
    ] as [([String], String)])
    func aBadDiskOrOptionIsAUsageErrorThatSaysWhatToDo(arguments: [String], message: String) throws {
        let r = try DpctlTests.dpctl(["start"] + arguments, timeout: 10)
        #expect(!r.timedOut, "dpctl started serving from \(arguments)")
        #expect(r.status == 2, "\(arguments): \(r.stderr)")
        #expect(r.stderr == "dpctl: error: \(message)\n")
    }

    @Test(arguments: [
        ["status"], ["status", "--socket"], ["stats", "--socket", "/tmp/x", "--interval", "0"], ["stop", "--control", "/x", "--timeout", "0"],
        ["qemu-args"], ["qemu-args", "--socket", "/s", "--num-queues", "99"], ["libvirt-xml", "--socket", "/s", "--memory", "1G"],
        ["frobnicate"], [], ["status", "--bogus", "--socket", "/tmp/x"],
    ])
    func usageErrorsOfEveryVerbExit2OnOneLine(arguments: [String]) throws {
        let r = try DpctlTests.dpctl(arguments, timeout: 10)
        #expect(r.status == 2, "\(arguments): \(r.stderr)")
        if !arguments.isEmpty { // no verb at all prints the help
            #expect(r.stderr.hasPrefix("dpctl: error: ") && r.stderr.split(separator: "\n").count == 1, "\(arguments): \(r.stderr)")
        }
    }

    @Test func aRuntimeFailureExits1() throws {
        let r = try DpctlTests.dpctl(["start", "--disk", "path=/nonexistent/x.raw,socket=/tmp/dp-never.sock"], timeout: 10)
        #expect(r.status == 1 && r.stderr.contains("cannot open image"), "\(r.stderr)")
        let s = try DpctlTests.dpctl(["status", "--socket", "/tmp/nothing-here.sock"], timeout: 10)
        #expect(s.status == 1 && s.stderr.contains("no dpctl is running there"), "\(s.stderr)")
    }

    @Test func versionIsTheLibrarysVersion() throws {
        for arguments in [["--version"], ["start", "--version"]] {
            let r = try DpctlTests.dpctl(arguments, timeout: 10)
            #expect(r.status == 0 && r.stdout == DataPlane.version + "\n", "\(arguments): \(r.stdout)\(r.stderr)")
        }
    }

    @Test func helpListsEveryVerbAndStatesTheExitStatuses() throws {
        let verbs = ["start", "status", "stats", "resume", "stop", "qemu-args", "libvirt-xml"]
        for arguments in [["--help"], ["-h"], ["help"]] {
            let r = try DpctlTests.dpctl(arguments, timeout: 10)
            #expect(r.status == 0, "\(arguments)")
            for verb in verbs { #expect(r.stdout.contains("\n  \(verb) "), "\(arguments) lists \(verb): \(r.stdout)") }
            #expect(r.stdout.contains("EXIT STATUS") && r.stdout.contains("2  usage error"), "\(r.stdout)")
        }
        for verb in verbs {
            for arguments in [[verb, "--help"], ["help", verb]] {
                let r = try DpctlTests.dpctl(arguments, timeout: 10)
                #expect(r.status == 0 && r.stdout.contains("USAGE: dpctl \(verb)"), "\(arguments): \(r.stdout)\(r.stderr)")
            }
        }
        let start = try DpctlOptionsTests.help("start")
        #expect(start.contains("EXIT STATUS") && start.contains("2 on a usage error"))
        #expect(try DpctlOptionsTests.help("status").contains("3  a queue is broken"))
    }

    @Test(arguments: ["bash", "zsh", "fish"])
    func completionScripts(shell: String) throws {
        let r = try DpctlTests.dpctl(["--generate-completion-script", shell], timeout: 10)
        #expect(r.status == 0, "\(r.stderr)")
        for word in ["start", "status", "qemu-args", "--disk", "--poll-us"] {
            #expect(r.stdout.contains(word), "the \(shell) script knows \(word)")
        }
    }
}
