import DataPlane
import Foundation

/// The `--config FILE` of `dpctl start`: a JSON object whose keys are the
/// flag names, with the values the flags take.
///
/// ```json
/// { "iothreads": 2, "cpuset": "5,6", "poll-us": 32, "control": "/run/vm.ctl",
///   "disks": [ { "path": "/var/lib/images/a.raw", "socket": "/run/a.sock", "num-queues": 2 },
///              { "path": "b", "socket": "/run/b.sock", "backend": "null", "null-size": "4G" } ] }
/// ```
///
/// An unknown key is refused, naming it: a misspelt setting used to be
/// ignored in silence (`"readonly": true` served a writable disk, the key was
/// `readOnly`). The camelCase keys of earlier versions are still accepted as
/// aliases; a setting given under both spellings is refused.
enum ConfigFile {
    /// A setting: its key (the flag's name) and the older spelling, if any.
    struct Key {
        let name: String
        let alias: String?
        init(_ name: String, alias: String? = nil) {
            self.name = name
            self.alias = alias
        }
    }

    static let instanceKeys = [Key("iothreads"), Key("cpuset"), Key("poll-us", alias: "pollMicroseconds"),
                               Key("notify-after", alias: "notifyAfter"), Key("control"),
                               Key("disable-io-uring"), Key("socket-owner"), Key("socket-group"), Key("socket-mode"), Key("metrics-address"),
                               Key("disks")]
    static let diskKeys = [
        Key("path"), Key("socket"), Key("readonly", alias: "readOnly"), Key("num-queues", alias: "numQueues"),
        Key("queue-size", alias: "queueSize"), Key("backend"), Key("null-size", alias: "nullSize"),
        Key("null-read-zeroes", alias: "nullReadZeroes"), Key("serial"), Key("direct", alias: "directIO"),
        Key("block-size", alias: "logicalBlockSize"), Key("rerror", alias: "readErrorPolicy"),
        Key("werror", alias: "writeErrorPolicy"), Key("fault"), Key("locking"), Key("fixed-buffers"),
        Key("socket-owner"), Key("socket-group"), Key("socket-mode"), Key("write-cache", alias: "writeCache"),
    ] + IOLimitKeys.limitKeys.map { Key($0) } + [Key(IOLimitKeys.groupKey)]

    /// Reads a configuration file's contents; errors name the file and the setting.
    static func parse(_ data: Data, file: String) throws(CLIError) -> InstanceConfiguration {
        let root: JSONValue
        do {
            root = try JSONDecoder().decode(JSONValue.self, from: data)
        } catch {
            throw CLIError("config file \(file): not valid JSON: \(error)")
        }
        do {
            return try instance(root)
        } catch {
            throw CLIError("config file \(file): \(error.description)")
        }
    }

    private static func instance(_ root: JSONValue) throws(CLIError) -> InstanceConfiguration {
        let settings = try object(root, at: "the file", keys: instanceKeys)
        var config = InstanceConfiguration(disks: [])
        for (key, value) in settings.sorted(by: { $0.key < $1.key }) {
            switch key {
            case "iothreads": config.iothreads = try integer(value, key, range: 1...256)
            case "cpuset": config.cpuset = try string(value, key)
            case "poll-us": config.pollMicroseconds = UInt32(try integer(value, key, range: 0...1_000_000))
            case "notify-after":
                config.notifyAfter = UInt32(try integer(value, key, range: 0...Int(IOThreadConfiguration.maxNotifyAfter)))
            case "control": config.control = try string(value, key)
            case "metrics-address": config.metricsAddress = try MetricsAddress.parse(try string(value, key), option: key)
            case "disable-io-uring":
                switch value {
                case .string(let text): config.disabledIOURing = try StartCommand.parseIOURingFeatures(text, option: key)
                case .array(let items):
                    let names = try items.map { (item: JSONValue) throws(CLIError) -> String in try string(item, key) }
                    config.disabledIOURing = try StartCommand.parseIOURingFeatures(names.isEmpty ? "none" : names.joined(separator: ","), option: key)
                default: throw CLIError("\"disable-io-uring\" must be a list of feature names or a comma list, not \(value)")
                }
            case "socket-owner": config.socketOwner = try SocketOwnership.checkName(try string(value, key), option: key)
            case "socket-group": config.socketGroup = try SocketOwnership.checkName(try string(value, key), option: key)
            case "socket-mode": config.socketMode = try mode(value, key)
            case "disks":
                guard case .array(let entries) = value else { throw CLIError("\"disks\" must be a list of disks") }
                config.disks = try entries.enumerated().map { (i, entry) throws(CLIError) in try disk(entry, at: "disks[\(i)]") }
            default: preconditionFailure("key \(key) is listed but not handled")
            }
        }
        if config.disks.isEmpty { throw CLIError("\"disks\" lists no disk") }
        return config
    }

    private static func disk(_ value: JSONValue, at place: String) throws(CLIError) -> InstanceConfiguration.DiskEntry {
        let settings = try object(value, at: place, keys: diskKeys)
        guard let pathValue = settings["path"] else { throw CLIError("\(place) has no \"path\"") }
        guard let socketValue = settings["socket"] else { throw CLIError("\(place) has no \"socket\"") }
        // A list serves the disk on each socket, to a frontend of its own.
        var sockets: [String] = []
        if case .array(let items) = socketValue {
            for (i, item) in items.enumerated() { sockets.append(try string(item, "\(place).socket[\(i)]")) }
        } else {
            sockets = [try string(socketValue, "\(place).socket")]
        }
        guard let first = sockets.first, sockets.allSatisfy({ !$0.isEmpty }) else {
            throw CLIError("\(place).socket must be a socket path, or a list of them (each serves the disk to its own frontend)")
        }
        var d = InstanceConfiguration.DiskEntry(path: try string(pathValue, "\(place).path"), socket: first)
        d.extraSockets = Array(sockets.dropFirst())
        for (key, value) in settings.sorted(by: { $0.key < $1.key }) {
            let name = "\(place).\(key)"
            switch key {
            case "path", "socket": break
            case "readonly": d.readOnly = try bool(value, name)
            case "num-queues": d.numQueues = try integer(value, name, range: 1...64)
            case "queue-size": d.queueSize = try integer(value, name, range: 1...32768)
            case "backend":
                let text = try string(value, name)
                guard BackendKind(rawValue: text) != nil else { throw CLIError("\(name) \(text.debugDescription): use file or null") }
                d.backend = text
            case "null-size":
                switch value {
                case .string(let text): d.nullSize = try parseSize(text, option: name)
                case .integer(let n) where n > 0: d.nullSize = UInt64(n)
                default: throw CLIError("\(name) must be a size such as \"1G\" or a number of bytes, not \(value)")
                }
            case "null-read-zeroes": d.nullReadZeroes = try onOff(value, name)
            case "serial": d.serial = try string(value, name)
            case "direct": d.directIO = try bool(value, name)
            case "block-size": d.logicalBlockSize = UInt32(try integer(value, name, range: 512...65536))
            case "rerror", "werror":
                let text = try string(value, name)
                guard let policy = ErrorPolicy(rawValue: text) else {
                    throw CLIError("\(name) \(text.debugDescription): use report, ignore, enospc or stop")
                }
                if key == "rerror" { d.readErrorPolicy = policy } else { d.writeErrorPolicy = policy }
            case "fault":
                let text = try string(value, name)
                _ = try StartCommand.parseFault(text)
                d.fault = text
            case "locking":
                if case .string(let text) = value, let mode = ImageLocking(rawValue: text) {
                    d.locking = mode
                } else if case .bool(let on) = value {
                    d.locking = on ? .on : .off
                } else {
                    throw CLIError("\(name) must be \"on\", \"shared\", \"off\", true or false, not \(value)")
                }
            case "fixed-buffers": d.fixedBuffers = try onOff(value, name)
            case "socket-owner": d.socketOwner = try SocketOwnership.checkName(try string(value, name), option: name)
            case "socket-group": d.socketGroup = try SocketOwnership.checkName(try string(value, name), option: name)
            case "socket-mode": d.socketMode = try mode(value, name)
            case "write-cache": d.writeCache = try onOff(value, name)
            case IOLimitKeys.groupKey:
                let text = try string(value, name)
                guard !text.isEmpty else { throw CLIError("\(name) must name a group") }
                d.group = text
            case _ where IOLimitKeys.limitKeys.contains(key):
                switch value {
                case .string(let text): d.limits[key] = try IOLimitKeys.parse(text, option: name)
                case .integer(let n) where n >= 0: d.limits[key] = try IOLimitKeys.parse(String(n), option: name)
                default: throw CLIError("\(name) must be a number, or a string such as \"10M\", not \(value)")
                }
            default: preconditionFailure("key \(key) is listed but not handled")
            }
        }
        _ = try IOLimitKeys.limits(d.limits, what: place)
        return d
    }

    /// A mode is a string ("0660"): a JSON number would be read in decimal.
    private static func mode(_ value: JSONValue, _ name: String) throws(CLIError) -> mode_t {
        guard case .string(let text) = value else {
            throw CLIError("\(name) must be an octal mode in a string, such as \"0660\", not \(value)")
        }
        return try SocketOwnership.parseMode(text, option: name)
    }

    /// A switch, as the flag takes it ("on"/"off") or as JSON does (true/false).
    private static func onOff(_ value: JSONValue, _ name: String) throws(CLIError) -> Bool {
        switch value {
        case .bool(let on): return on
        case .string("on"): return true
        case .string("off"): return false
        default: throw CLIError("\(name) must be true, false, \"on\" or \"off\", not \(value)")
        }
    }

    /// The settings of an object, by their flag names, after refusing
    /// unknown keys and a setting given under both its spellings.
    private static func object(_ value: JSONValue, at place: String, keys: [Key]) throws(CLIError) -> [String: JSONValue] {
        guard case .object(let members) = value else { throw CLIError("\(place) must be a JSON object") }
        var settings: [String: JSONValue] = [:]
        var spelling: [String: String] = [:]
        for (given, member) in members {
            guard let key = keys.first(where: { $0.name == given || $0.alias == given }) else {
                let names = keys.map(\.name).filter { !IOLimitKeys.isLimitKey($0) }
                    + (keys.contains { IOLimitKeys.isLimitKey($0.name) } ? [IOLimitKeys.summary] : [])
                throw CLIError("unknown key \(given.debugDescription) in \(place) (keys: \(names.joined(separator: ", ")))")
            }
            if let earlier = spelling[key.name] {
                throw CLIError("\(place) gives both \(earlier.debugDescription) and \(given.debugDescription), "
                               + "the same setting: keep \(key.name.debugDescription)")
            }
            spelling[key.name] = given
            settings[key.name] = member
        }
        return settings
    }

    private static func string(_ value: JSONValue, _ name: String) throws(CLIError) -> String {
        guard case .string(let text) = value else { throw CLIError("\(name) must be a string, not \(value)") }
        return text
    }

    private static func bool(_ value: JSONValue, _ name: String) throws(CLIError) -> Bool {
        guard case .bool(let on) = value else { throw CLIError("\(name) must be true or false, not \(value)") }
        return on
    }

    private static func integer(_ value: JSONValue, _ name: String, range: ClosedRange<Int>) throws(CLIError) -> Int {
        guard case .integer(let n) = value, let small = Int(exactly: n), range.contains(small) else {
            throw CLIError("\(name) must be a whole number in \(range.lowerBound)...\(range.upperBound), not \(value)")
        }
        return small
    }
}

/// A JSON value, kept apart by kind: a number is not a boolean. An object's
/// members are sorted by key, so the first problem reported is always the same.
indirect enum JSONValue: Decodable, CustomStringConvertible {
    case null
    case bool(Bool)
    case integer(Int64)
    case fraction(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    private struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: any Decoder) throws {
        if let members = try? decoder.container(keyedBy: AnyKey.self) {
            let keys = members.allKeys.sorted { $0.stringValue < $1.stringValue }
            self = .object(try keys.map { ($0.stringValue, try members.decode(JSONValue.self, forKey: $0)) })
            return
        }
        if var elements = try? decoder.unkeyedContainer() {
            var items: [JSONValue] = []
            while !elements.isAtEnd { items.append(try elements.decode(JSONValue.self)) }
            self = .array(items)
            return
        }
        let single = try decoder.singleValueContainer()
        if single.decodeNil() {
            self = .null
        } else if let b = try? single.decode(Bool.self) {
            self = .bool(b)
        } else if let n = try? single.decode(Int64.self) {
            self = .integer(n)
        } else if let d = try? single.decode(Double.self) {
            self = .fraction(d)
        } else {
            self = .string(try single.decode(String.self))
        }
    }

    /// How the value appears in a message.
    var description: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return "\(b)"
        case .integer(let n): return "\(n)"
        case .fraction(let d): return "\(d)"
        case .string(let s): return s.debugDescription
        case .array: return "a list"
        case .object: return "an object"
        }
    }
}
