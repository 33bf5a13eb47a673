import DataPlane

/// A disk as one option value, in QEMU's key=value style:
/// `--disk path=/img/a.raw,socket=/run/a.sock,readonly=on,num-queues=4`.
///
/// The keys are the names of the per-disk flags of earlier versions without
/// their dashes (and the config file's keys). As in QEMU, a comma inside a
/// value is written twice (`path=/img/a,,b.raw` is `/img/a,b.raw`), and a
/// switch given alone (`readonly`) is on.
enum DiskSpec {
    /// A key, what its value looks like in messages and help, and its legacy flag.
    struct Key {
        let name: String
        /// "on|off" keys are switches: on, off, true, false, or the key alone.
        let value: String
        /// The flag of the grouped form that sets it (`--readonly`), and the
        /// value that flag stands for when it takes none.
        let flag: String
        let flagValue: String?

        init(_ name: String, _ value: String, flag: String? = nil, flagValue: String? = nil) {
            self.name = name
            self.value = value
            self.flag = flag ?? "--" + name
            self.flagValue = flagValue
        }

        var isSwitch: Bool { value == "on|off" }
    }

    static let keys: [Key] = [
        Key("path", "PATH", flag: "--disk"), Key("socket", "PATH"), Key("readonly", "on|off", flagValue: "on"),
        Key("num-queues", "N"), Key("queue-size", "N"), Key("backend", "file|null"), Key("null-size", "SIZE"),
        Key("null-read-zeroes", "on|off"), Key("serial", "TEXT"), Key("block-size", "N"),
        Key("direct", "on|off", flag: "--no-direct", flagValue: "off"), Key("locking", "on|shared|off"),
        Key("fixed-buffers", "on|off"), Key("rerror", "POLICY"), Key("werror", "POLICY"), Key("fault", "SPEC"),
        Key("socket-owner", "USER"), Key("socket-group", "GROUP"), Key("socket-mode", "MODE"),
        Key("write-cache", "on|off"),
    ] + IOLimitKeys.limitKeys.map { Key($0, "N") } + [Key(IOLimitKeys.groupKey, "NAME")]

    static var keyNames: String {
        keys.map(\.name).filter { !IOLimitKeys.isLimitKey($0) }.joined(separator: ", ") + ", " + IOLimitKeys.summary
    }

    static func key(named name: String) -> Key? { keys.first { $0.name == name } }

    /// The items of a key=value list; `,,` is a comma inside a value.
    static func items(_ text: String) -> [String] {
        var items: [String] = []
        var current = ""
        var chars = Array(text)[...]
        while let c = chars.popFirst() {
            if c == "," {
                if chars.first == "," {
                    chars.removeFirst()
                    current.append(",")
                } else {
                    items.append(current)
                    current = ""
                }
            } else {
                current.append(c)
            }
        }
        items.append(current)
        return items
    }

    /// A value with its commas doubled, to stand in a key=value list.
    static func escape(_ value: String) -> String { value.replacingOccurrences(of: ",", with: ",,") }

    /// Whether a --disk value is in key=value form rather than a bare image
    /// path (the grouped form): its first item is `KEY=` with a key's spelling
    /// (lower-case letters and dashes: a path has a slash or a dot), or some
    /// item names a known key.
    static func isKeyValue(_ text: String) -> Bool {
        let items = items(text)
        if let first = items.first, let eq = first.firstIndex(of: "="),
           !first[..<eq].isEmpty, first[..<eq].allSatisfy({ $0.isLowercase || $0 == "-" }) {
            return true
        }
        return items.contains { item in
            let name = item.split(separator: "=", maxSplits: 1).first.map(String.init) ?? item
            return item.contains("=") && key(named: name) != nil
        }
    }

    /// A --disk value as a disk: key=value form, or a bare path (which then
    /// has no socket and is refused).
    ///
    /// With `socketElsewhere` (--socket-path or --fd given), a disk may lack
    /// socket= (its `socket` is then empty, for the caller to fill).
    static func parse(_ text: String, socketElsewhere: Bool = false) throws(CLIError) -> InstanceConfiguration.DiskEntry {
        let shown = "--disk \(text.debugDescription)"
        guard isKeyValue(text) || socketElsewhere else {
            throw CLIError("\(shown) has no socket: write --disk path=\(escape(text)),socket=PATH "
                           + "(or put --socket PATH after --disk \(text))", usage: true)
        }
        var settings: [String: String] = [:]
        var order: [String] = []
        var extraSockets: [String] = []
        for item in isKeyValue(text) ? items(text) : ["path=" + text] {
            if item.isEmpty { throw CLIError("\(shown): an empty item (two commas in a value are written ,,,, ; one comma ends an item)", usage: true) }
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            let name = parts[0]
            guard let key = key(named: name) else {
                let hint = name == "no-direct" ? " (write direct=off)"
                    : name.hasPrefix("--") ? " (keys have no dashes)"
                    : ["errno", "ops", "sectors", "after", "every"].contains(name)
                    ? " (commas inside fault's value are written twice: fault=errno=EIO,,ops=write)" : ""
                throw CLIError("\(shown): unknown key \(name.debugDescription)\(hint) (keys: \(keyNames))", usage: true)
            }
            var value: String
            if parts.count == 2 {
                value = parts[1]
            } else if key.isSwitch {
                value = "on"
            } else {
                throw CLIError("\(shown): \(name) needs a value: \(name)=\(key.value)", usage: true)
            }
            if name == "socket", settings[name] != nil {
                // Each further socket serves the disk to another frontend (a migration's destination).
                guard !value.isEmpty else { throw CLIError("\(shown): socket needs a value: socket=PATH", usage: true) }
                extraSockets.append(value)
                continue
            }
            if settings[name] != nil {
                throw CLIError("\(shown): \(name) is given twice", usage: true)
            }
            if key.isSwitch {
                switch value {
                case "on", "true", "yes": value = "on"
                case "off", "false", "no": value = "off"
                default: throw CLIError("\(shown): \(name)=\(value.debugDescription): use on or off", usage: true)
                }
            }
            settings[name] = value
            order.append(name)
        }
        guard let path = settings["path"], !path.isEmpty else {
            throw CLIError("\(shown) has no path: add path=PATH (the image, or a name with backend=null)", usage: true)
        }
        let socket = settings["socket"] ?? ""
        guard !socket.isEmpty || (socketElsewhere && settings["socket"] == nil) else {
            throw CLIError("\(shown) has no socket: add socket=PATH (the vhost-user socket to listen on)", usage: true)
        }
        var d = InstanceConfiguration.DiskEntry(path: path, socket: socket)
        d.extraSockets = extraSockets
        for name in order {
            let value = settings[name]!
            let option = "\(shown): \(name)"
            switch name {
            case "path", "socket": break
            case "readonly": d.readOnly = value == "on"
            case "num-queues": d.numQueues = try parseInt(value, option: option, range: 1...64)
            case "queue-size": d.queueSize = try parseInt(value, option: option, range: 1...32768)
            case "backend":
                guard BackendKind(rawValue: value) != nil else { throw CLIError("\(option) \(value.debugDescription): use file or null", usage: true) }
                d.backend = value
            case "null-size": d.nullSize = try parseSize(value, option: option)
            case "null-read-zeroes": d.nullReadZeroes = value == "on"
            case "serial": d.serial = value
            case "block-size": d.logicalBlockSize = UInt32(try parseInt(value, option: option, range: 512...65536))
            case "direct": d.directIO = value == "on"
            case "locking":
                // The switch spellings it took when it was on|off.
                let switches = ["true": "on", "yes": "on", "false": "off", "no": "off"]
                guard let mode = ImageLocking(rawValue: switches[value] ?? value) else {
                    throw CLIError("\(option)=\(value.debugDescription): use on, shared or off", usage: true)
                }
                d.locking = mode
            case "fixed-buffers": d.fixedBuffers = value == "on"
            case "rerror", "werror":
                guard let policy = ErrorPolicy(rawValue: value) else {
                    throw CLIError("\(option) \(value.debugDescription): use report, ignore, enospc or stop", usage: true)
                }
                if name == "rerror" { d.readErrorPolicy = policy } else { d.writeErrorPolicy = policy }
            case "fault":
                _ = try StartCommand.parseFault(value)
                d.fault = value
            case "socket-owner": d.socketOwner = try SocketOwnership.checkName(value, option: option)
            case "socket-group": d.socketGroup = try SocketOwnership.checkName(value, option: option)
            case "socket-mode": d.socketMode = try SocketOwnership.parseMode(value, option: option)
            case "write-cache": d.writeCache = value == "on"
            case IOLimitKeys.groupKey:
                guard !value.isEmpty else { throw CLIError("\(option) needs a name", usage: true) }
                d.group = value
            case _ where IOLimitKeys.limitKeys.contains(name): d.limits[name] = try IOLimitKeys.parse(value, option: option)
            default: preconditionFailure("key \(name) is listed but not handled")
            }
        }
        _ = try IOLimitKeys.limits(d.limits, what: shown)
        return d
    }
}

/// The grouped form of earlier versions, `--disk PATH --socket PATH
/// --readonly --num-queues 4 ...` (each disk option applies to the --disk
/// before it), rewritten into one `--disk path=PATH,socket=PATH,...` per disk
/// before the argument parser sees it. Instance options may stand anywhere,
/// as before. Disk options may also follow a key=value --disk.
enum GroupedDiskArguments {
    /// start's options that take a value and are not disk options: their
    /// values pass through untouched.
    static let instanceOptionsWithValues: Set<String> = [
        "--iothreads", "--cpuset", "--poll-us", "--notify-after", "--control", "--disable-io-uring", "--config",
        "--log-level", "--log-format", "--socket-path", "--fd", "--socket-owner", "--socket-group", "--socket-mode",
    ]

    static func rewrite(_ words: [String]) throws(CLIError) -> [String] {
        // --socket-path or --fd gives the one disk its socket: a bare --disk PATH needs no --socket.
        let socketElsewhere = BackendCapabilities.mentions("--socket-path", in: words)
            || BackendCapabilities.mentions("--fd", in: words)
        var out: [String] = []
        var disk: [String]? // the items of the disk being grouped
        var barePath: String? // its --disk PATH, in the grouped form
        func finish() throws(CLIError) {
            guard let items = disk else { return }
            if let path = barePath, !socketElsewhere, !items.contains(where: { $0.hasPrefix("socket=") }) {
                throw CLIError("--disk \(path) has no socket: put --socket PATH after it, "
                               + "or write --disk path=\(DiskSpec.escape(path)),socket=PATH", usage: true)
            }
            out += ["--disk", items.joined(separator: ",")]
            disk = nil
        }
        var index = 0
        func value(_ option: String, _ inline: String?) throws(CLIError) -> String {
            if let inline { return inline }
            guard index < words.count, !words[index].hasPrefix("--") else { throw CLIError("\(option) needs a value", usage: true) }
            defer { index += 1 }
            return words[index]
        }
        while index < words.count {
            let word = words[index]
            index += 1
            if word == "--" {
                try finish()
                out += words[(index - 1)...]
                return out
            }
            var option = word, inline: String?
            if word.hasPrefix("--"), let eq = word.firstIndex(of: "=") {
                option = String(word[..<eq])
                inline = String(word[word.index(after: eq)...])
            }
            if instanceOptionsWithValues.contains(option) {
                out.append(word)
                if inline == nil && index < words.count {
                    out.append(words[index])
                    index += 1
                }
                continue
            }
            // vhost-user.rst's name for the image (--blk-file=PATH): the grouped form's --disk PATH.
            if option == "--disk" || option == "--blk-file" {
                try finish()
                let text = try value(option, inline)
                barePath = DiskSpec.isKeyValue(text) ? nil : text
                disk = barePath == nil ? [text] : ["path=" + DiskSpec.escape(text)]
                continue
            }
            guard let key = DiskSpec.keys.first(where: { $0.flag == option }) else {
                out.append(word) // an instance flag, or something the parser will refuse
                continue
            }
            guard disk != nil else {
                throw CLIError("\(option) must follow a --disk (or write it as a key: --disk path=PATH,socket=PATH,\(key.name)=\(key.value))", usage: true)
            }
            let v: String
            if let fixed = key.flagValue { v = fixed } else { v = try value(option, inline) }
            disk?.append(key.name + "=" + DiskSpec.escape(v))
        }
        try finish()
        return out
    }
}
