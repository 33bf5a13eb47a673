import DataPlane
import Foundation
import Testing

@Suite("CPUSet parsing and rendering")
struct CPUSetTests {
    @Test("parses single CPUs, lists, ranges and whitespace", arguments: [
        ("5", [5]),
        ("5,6", [5, 6]),
        ("0-3,8", [0, 1, 2, 3, 8]),
        (" 1 , 3 ", [1, 3]),
        ("\t2 - 4\n", [2, 3, 4]),
        ("8,0-3", [0, 1, 2, 3, 8]),
        ("3,1,3,2-3", [1, 2, 3]),
        ("7-7", [7]),
        ("0", [0]),
        ("4095", [4095]),
        ("4094-4095", [4094, 4095]),
    ] as [(String, [Int32])])
    func parses(input: String, expected: [Int32]) throws {
        let set = try CPUSet(parsing: input)
        #expect(set.cpus == expected)
    }

    @Test("renders compact ranges", arguments: [
        ("0-3,8", "0-3,8"),
        ("8,3,2,1,0", "0-3,8"),
        ("5,6", "5,6"),
        ("5-6", "5,6"),
        ("0-1", "0,1"),
        ("7", "7"),
        ("0,2,4", "0,2,4"),
        ("0-2,4-5,7,9-4095", "0-2,4,5,7,9-4095"),
        (" 1 , 3 ", "1,3"),
    ])
    func renders(input: String, expected: String) throws {
        let set = try CPUSet(parsing: input)
        #expect(set.description == expected)
        #expect("\(set)" == expected)
    }

    @Test("rendering round-trips through parsing")
    func roundTrip() throws {
        let set = try CPUSet(parsing: "0-2,4,5,7,9-20,100")
        #expect(try CPUSet(parsing: set.description) == set)
    }

    @Test("equal sets compare equal whatever their spelling")
    func equality() throws {
        #expect(try CPUSet(parsing: "0-3") == CPUSet(parsing: "3,2,1,0"))
        #expect(try CPUSet(parsing: "0-3") != CPUSet(parsing: "0-4"))
    }

    @Test("rejects an empty set", arguments: ["", " ", "\n"])
    func rejectsEmpty(input: String) {
        let expected = ConfigurationError.invalidCPUSet(
            input: input, reason: "it is empty; expected CPU numbers and ranges such as \"0-3,8\"")
        #expect(throws: expected) { try CPUSet(parsing: input) }
    }

    @Test("rejects malformed entries", arguments: [
        ("a", "\"a\" is not a CPU number or range; expected CPU numbers and ranges such as \"0-3,8\""),
        ("1,a", "\"a\" is not a CPU number or range; expected CPU numbers and ranges such as \"0-3,8\""),
        ("3-", "range \"3-\" has no upper bound; expected CPU numbers and ranges such as \"0-3,8\""),
        ("-", "\"-\" is not a CPU number or range; expected CPU numbers and ranges such as \"0-3,8\""),
        ("2--1", "\"2--1\" is not a CPU number or range; expected CPU numbers and ranges such as \"0-3,8\""),
        ("1-2-3", "\"1-2-3\" is not a CPU number or range; expected CPU numbers and ranges such as \"0-3,8\""),
        ("1,,2", "it has an empty entry; expected CPU numbers and ranges such as \"0-3,8\""),
        ("1,", "it has an empty entry; expected CPU numbers and ranges such as \"0-3,8\""),
        ("+1", "\"+1\" is not a CPU number or range; expected CPU numbers and ranges such as \"0-3,8\""),
        ("1.5", "\"1.5\" is not a CPU number or range; expected CPU numbers and ranges such as \"0-3,8\""),
        ("a-3", "\"a-3\" is not a CPU number or range; expected CPU numbers and ranges such as \"0-3,8\""),
    ])
    func rejectsMalformed(input: String, reason: String) {
        #expect(throws: ConfigurationError.invalidCPUSet(input: input, reason: reason)) {
            try CPUSet(parsing: input)
        }
    }

    @Test("rejects negative CPU numbers", arguments: [
        ("-1", "\"-1\""),
        ("0,-1", "\"-1\""),
        (" - 3 ", "\"- 3\""),
    ])
    func rejectsNegative(input: String, entry: String) {
        let reason = "CPU numbers cannot be negative (\(entry)); "
            + "expected CPU numbers and ranges such as \"0-3,8\""
        #expect(throws: ConfigurationError.invalidCPUSet(input: input, reason: reason)) {
            try CPUSet(parsing: input)
        }
    }

    @Test("rejects a reversed range")
    func rejectsReversed() {
        let expected = ConfigurationError.invalidCPUSet(
            input: "3-1", reason: "range \"3-1\" is reversed; write it as \"1-3\"")
        #expect(throws: expected) { try CPUSet(parsing: "3-1") }
        #expect(expected.description == "invalid CPU set \"3-1\": range \"3-1\" is reversed; write it as \"1-3\"")
    }

    @Test("rejects CPUs above 4095", arguments: [
        ("4096", "4096"),
        ("0-4096", "4096"),
        ("99999999999999999999999", "99999999999999999999999"),
    ])
    func rejectsTooLarge(input: String, number: String) {
        let expected = ConfigurationError.invalidCPUSet(
            input: input, reason: "CPU \(number) is above the maximum CPU number 4095")
        #expect(throws: expected) { try CPUSet(parsing: input) }
    }

    @Test("error messages quote and escape the input on one line")
    func messageIsOneLine() {
        #expect(throws: ConfigurationError.self) { try CPUSet(parsing: "1\n,x") }
        do {
            _ = try CPUSet(parsing: "1\n,x")
        } catch {
            #expect(error.description
                == "invalid CPU set \"1\\n,x\": \"x\" is not a CPU number or range; "
                + "expected CPU numbers and ranges such as \"0-3,8\"")
            #expect(!error.description.contains("\n"))
        }
    }
}

@Suite("Online CPUs")
struct OnlineCPUTests {
    @Test("a set inside the online CPUs passes")
    func onlinePasses() throws {
        let online = try CPUSet(parsing: "0-7")
        try CPUSet(parsing: "0,3-5,7").validateOnline(online)
        try online.validateOnline(online)
    }

    @Test("names exactly the CPUs that are not online")
    func notOnlineMessage() throws {
        let online = try CPUSet(parsing: "0-1")
        let expected = ConfigurationError.cpusNotOnline(
            missing: try CPUSet(parsing: "5,6"), online: online)
        #expect(throws: expected) { try CPUSet(parsing: "1,5-6").validateOnline(online) }
        #expect(expected.description == "CPUs 5,6 are not online (online CPUs: 0,1)")
    }

    @Test("singular message and compact ranges")
    func notOnlineSingularAndRanges() throws {
        let online = try CPUSet(parsing: "0-3,8-11")
        let one = ConfigurationError.cpusNotOnline(missing: try CPUSet(parsing: "5"), online: online)
        #expect(throws: one) { try CPUSet(parsing: "2-3,5,8").validateOnline(online) }
        #expect(one.description == "CPU 5 is not online (online CPUs: 0-3,8-11)")

        let many = ConfigurationError.cpusNotOnline(missing: try CPUSet(parsing: "4-7,12"), online: online)
        #expect(throws: many) { try CPUSet(parsing: "0-12").validateOnline(online) }
        #expect(many.description == "CPUs 4-7,12 are not online (online CPUs: 0-3,8-11)")
    }

    @Test("reads a CPU list from a file")
    func readsFile() throws {
        let path = try Self.temporaryFile(contents: "0-3,6\n")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let online = try CPUSet.online(from: path)
        #expect(online.cpus == [0, 1, 2, 3, 6])
        try CPUSet(parsing: "6").validateOnline(online)
    }

    @Test("a missing file is reported with the OS error")
    func missingFile() {
        let expected = ConfigurationError.unreadableOnlineCPUs(
            "cannot open /nonexistent/cpu/online: No such file or directory")
        #expect(throws: expected) { try CPUSet.online(from: "/nonexistent/cpu/online") }
        #expect(expected.description
            == "cannot determine the online CPUs: cannot open /nonexistent/cpu/online: No such file or directory")
    }

    @Test("a file with a bad CPU list is reported", arguments: ["garbage\n", ""])
    func badFile(contents: String) throws {
        let path = try Self.temporaryFile(contents: contents)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let parseError: ConfigurationError
        do {
            _ = try CPUSet(parsing: contents)
            Issue.record("\(contents.debugDescription) should not parse")
            return
        } catch {
            parseError = error
        }
        #expect(throws: ConfigurationError.unreadableOnlineCPUs("\(path): \(parseError)")) {
            try CPUSet.online(from: path)
        }
    }

    @Test(
        "reads the kernel's online CPUs by default",
        .enabled(if: FileManager.default.fileExists(atPath: "/sys/devices/system/cpu/online"))
    )
    func readsSysfs() throws {
        let online = try CPUSet.online()
        #expect(online.cpus.first == 0)
        try CPUSet(parsing: "0").validateOnline()
        try online.validateOnline()
        if !online.cpus.contains(4095) {
            #expect(throws: ConfigurationError.cpusNotOnline(
                missing: try CPUSet(parsing: "4095"), online: online)
            ) {
                try CPUSet(parsing: "0,4095").validateOnline()
            }
        }
    }

    static func temporaryFile(contents: String) throws -> String {
        let path = NSTemporaryDirectory() + "cpuset-\(UUID().uuidString)"
        try contents.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }
}

@Suite("Disk configuration")
struct DiskConfigurationTests {
    @Test("defaults")
    func defaults() throws {
        let disk = DiskConfiguration(path: "/var/lib/images/vm1.qcow2")
        #expect(disk.path == "/var/lib/images/vm1.qcow2")
        #expect(disk.backend == .file)
        #expect(disk.readOnly == false)
        #expect(disk.directIO == true)
        #expect(disk.serial == "vm1.qcow2")
        #expect(disk.logicalBlockSize == nil)
        #expect(disk.locking == true)
        #expect(disk.numQueues == 1)
        #expect(disk.queueSize == 1024)
        #expect(disk.segmentsPerRequest == 128)
        #expect(disk.nullSizeBytes == 1_073_741_824)
        try disk.validate()
    }

    @Test("default serial is the file name cut to 20 bytes of printable ASCII", arguments: [
        ("/dev/nvme0n1", "nvme0n1"),
        ("disk.img", "disk.img"),
        ("/images/a-very-long-image-name-indeed.raw", "a-very-long-image-na"),
        ("/images/dir/", "dir"),
        ("/images/d\u{e9}j\u{e0}-vu.img", "dj-vu.img"),
        ("", ""),
    ])
    func defaultSerial(path: String, serial: String) throws {
        let disk = DiskConfiguration(path: path, backend: .null)
        #expect(disk.serial == serial)
        try disk.validate()
    }

    @Test("an explicit serial is kept")
    func explicitSerial() {
        #expect(DiskConfiguration(path: "/x/disk.img", serial: "SER-1").serial == "SER-1")
    }

    @Test("backend kinds have stable raw values")
    func backendRawValues() {
        #expect(BackendKind.file.rawValue == "file")
        #expect(BackendKind.null.rawValue == "null")
        #expect(BackendKind(rawValue: "null") == .null)
        #expect(BackendKind(rawValue: "nbd") == nil)
    }

    @Test("a file backend needs a path; the null backend does not")
    func path() throws {
        #expect(throws: ConfigurationError.missingPath) {
            try DiskConfiguration(path: "").validate()
        }
        #expect(ConfigurationError.missingPath.description
            == "disk path is empty; the file backend needs the path of an image file or block device")
        try DiskConfiguration(path: "", backend: .null).validate()
    }

    @Test("serial length")
    func serialLength() throws {
        try DiskConfiguration(path: "d", serial: String(repeating: "s", count: 20)).validate()
        try DiskConfiguration(path: "d", serial: "").validate()
        let long = String(repeating: "s", count: 21)
        let expected = ConfigurationError.invalidSerial(long, reason: "it is 21 bytes long")
        #expect(throws: expected) { try DiskConfiguration(path: "d", serial: long).validate() }
        #expect(expected.description
            == "invalid disk serial \"sssssssssssssssssssss\": it is 21 bytes long; "
            + "a serial is at most 20 bytes of printable ASCII")
    }

    @Test("serial characters", arguments: ["caf\u{e9}", "tab\there", "nul\u{0}", "del\u{7f}"])
    func serialCharacters(serial: String) {
        let expected = ConfigurationError.invalidSerial(
            serial, reason: "it contains a non-printable or non-ASCII character")
        #expect(throws: expected) { try DiskConfiguration(path: "d", serial: serial).validate() }
    }

    @Test("UTF-8 bytes, not characters, count toward the serial limit")
    func serialCountsBytes() {
        let serial = String(repeating: "\u{e9}", count: 11)  // 11 characters, 22 bytes
        #expect(throws: ConfigurationError.invalidSerial(serial, reason: "it is 22 bytes long")) {
            try DiskConfiguration(path: "d", serial: serial).validate()
        }
    }

    @Test("accepted block sizes", arguments: [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536] as [UInt32])
    func goodBlockSize(size: UInt32) throws {
        try DiskConfiguration(path: "d", logicalBlockSize: size).validate()
    }

    @Test("rejected block sizes", arguments: [0, 1, 256, 511, 1000, 4097, 131072, UInt32.max] as [UInt32])
    func badBlockSize(size: UInt32) {
        #expect(throws: ConfigurationError.invalidBlockSize(size)) {
            try DiskConfiguration(path: "d", logicalBlockSize: size).validate()
        }
        #expect(ConfigurationError.invalidBlockSize(size).description
            == "logical block size \(size) is not a power of two between 512 and 65536")
    }

    @Test("accepted queue counts", arguments: [1, 2, 3, 63, 64])
    func goodQueueCount(count: Int) throws {
        try DiskConfiguration(path: "d", numQueues: count).validate()
    }

    @Test("rejected queue counts", arguments: [0, -1, 65, Int.max])
    func badQueueCount(count: Int) {
        #expect(throws: ConfigurationError.invalidQueueCount(count)) {
            try DiskConfiguration(path: "d", numQueues: count).validate()
        }
        #expect(ConfigurationError.invalidQueueCount(count).description
            == "queue count \(count) is not between 1 and 64")
    }

    @Test("accepted queue sizes", arguments: [1, 2, 128, 256, 1024, 32768])
    func goodQueueSize(size: Int) throws {
        try DiskConfiguration(path: "d", queueSize: size).validate()
    }

    @Test("rejected queue sizes", arguments: [0, -256, 3, 300, 65536, Int.min])
    func badQueueSize(size: Int) {
        #expect(throws: ConfigurationError.invalidQueueSize(size)) {
            try DiskConfiguration(path: "d", queueSize: size).validate()
        }
    }

    @Test("queue size message")
    func queueSizeMessage() {
        #expect(ConfigurationError.invalidQueueSize(300).description
            == "queue size 300 is not a power of two between 1 and 32768")
    }

    @Test("null size must be a non-zero multiple of the block size")
    func nullSize() throws {
        try DiskConfiguration(path: "", backend: .null, nullSizeBytes: 4096).validate()
        try DiskConfiguration(path: "", backend: .null, logicalBlockSize: 4096, nullSizeBytes: 8192).validate()

        let zero = ConfigurationError.invalidNullSize(0, logicalBlockSize: 512)
        #expect(throws: zero) {
            try DiskConfiguration(path: "", backend: .null, nullSizeBytes: 0).validate()
        }
        #expect(zero.description
            == "null backend size is 0 bytes; it must be a non-zero multiple of the logical block size (512 bytes)")

        let odd = ConfigurationError.invalidNullSize(6144, logicalBlockSize: 4096)
        #expect(throws: odd) {
            try DiskConfiguration(path: "", backend: .null, logicalBlockSize: 4096, nullSizeBytes: 6144)
                .validate()
        }
        #expect(odd.description
            == "null backend size 6144 bytes is not a multiple of the logical block size (4096 bytes)")
    }

    @Test("the file backend ignores the null size")
    func fileIgnoresNullSize() throws {
        try DiskConfiguration(path: "/dev/vdb", nullSizeBytes: 0).validate()
    }

    @Test("the first problem is reported")
    func firstProblemWins() {
        #expect(throws: ConfigurationError.missingPath) {
            try DiskConfiguration(path: "", logicalBlockSize: 3, queueSize: 3).validate()
        }
        #expect(throws: ConfigurationError.invalidBlockSize(3)) {
            try DiskConfiguration(path: "d", logicalBlockSize: 3, queueSize: 3).validate()
        }
    }
}

@Suite("IOThread configuration")
struct IOThreadConfigurationTests {
    let online: CPUSet

    init() throws {
        online = try CPUSet(parsing: "0-3")
    }

    @Test("defaults")
    func defaults() throws {
        let thread = IOThreadConfiguration(name: "iothread0", cpuset: try CPUSet(parsing: "2"))
        #expect(thread.name == "iothread0")
        #expect(thread.cpuset.cpus == [2])
        #expect(thread.pollMaxMicroseconds == 32)
        #expect(thread.ringEntries == 256)
        try thread.validate(online: online)
    }

    @Test("accepted names", arguments: ["a", "iothread0", String(repeating: "n", count: 15)])
    func goodName(name: String) throws {
        try IOThreadConfiguration(name: name, cpuset: online).validate(online: online)
    }

    @Test("rejected names", arguments: [
        ("", "IOThread name is empty; give it a name of 1 to 15 bytes"),
        ("iothread-number-1", "IOThread name \"iothread-number-1\" is 17 bytes; thread names are at most 15 bytes"),
        ("io\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
         "IOThread name \"io\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\" is 16 bytes; thread names are at most 15 bytes"),
        ("io\u{0}1", "IOThread name \"io\\01\" contains a NUL byte; a name is 1 to 15 bytes without NUL"),
    ])
    func badName(name: String, message: String) {
        #expect(throws: ConfigurationError.invalidThreadName(name)) {
            try IOThreadConfiguration(name: name, cpuset: online).validate(online: online)
        }
        #expect(ConfigurationError.invalidThreadName(name).description == message)
    }

    @Test("poll window", arguments: [0, 1, 32, 1_000_000] as [UInt32])
    func goodPollWindow(microseconds: UInt32) throws {
        try IOThreadConfiguration(name: "t", cpuset: online, pollMaxMicroseconds: microseconds)
            .validate(online: online)
    }

    @Test("rejected poll window", arguments: [1_000_001, UInt32.max] as [UInt32])
    func badPollWindow(microseconds: UInt32) {
        #expect(throws: ConfigurationError.invalidPollWindow(microseconds)) {
            try IOThreadConfiguration(name: "t", cpuset: online, pollMaxMicroseconds: microseconds)
                .validate(online: online)
        }
        #expect(ConfigurationError.invalidPollWindow(microseconds).description
            == "poll window \(microseconds) microseconds is above the maximum of 1000000 (0 disables busy polling)")
    }

    @Test("accepted ring entries", arguments: [8, 16, 256, 4096, 32768] as [UInt32])
    func goodRing(entries: UInt32) throws {
        try IOThreadConfiguration(name: "t", cpuset: online, ringEntries: entries).validate(online: online)
    }

    @Test("rejected ring entries", arguments: [0, 1, 4, 100, 255, 65536] as [UInt32])
    func badRing(entries: UInt32) {
        #expect(throws: ConfigurationError.invalidRingEntries(entries)) {
            try IOThreadConfiguration(name: "t", cpuset: online, ringEntries: entries).validate(online: online)
        }
        #expect(ConfigurationError.invalidRingEntries(entries).description
            == "ring entries \(entries) is not a power of two between 8 and 32768")
    }

    @Test("the CPU set must be online")
    func cpusetOnline() throws {
        let thread = IOThreadConfiguration(name: "iot1", cpuset: try CPUSet(parsing: "3-5"))
        let expected = ConfigurationError.cpusNotOnline(missing: try CPUSet(parsing: "4,5"), online: online)
        #expect(throws: expected) { try thread.validate(online: online) }
        #expect(expected.description == "CPUs 4,5 are not online (online CPUs: 0-3)")
    }

    @Test("local problems are reported before the CPU set is checked")
    func localBeforeOnline() throws {
        let thread = IOThreadConfiguration(name: "", cpuset: try CPUSet(parsing: "100"))
        #expect(throws: ConfigurationError.invalidThreadName("")) { try thread.validate(online: online) }
    }

    @Test(
        "validates against the kernel's online CPUs by default",
        .enabled(if: FileManager.default.fileExists(atPath: "/sys/devices/system/cpu/online"))
    )
    func validatesAgainstSysfs() throws {
        try IOThreadConfiguration(name: "iot0", cpuset: try CPUSet(parsing: "0")).validate()
    }
}
