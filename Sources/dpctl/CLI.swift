import DataPlane
import Foundation

/// A one-line error for the user; `usage` errors exit 2, others 1.
struct CLIError: Error, CustomStringConvertible {
    var description: String
    var usage = false

    init(_ description: String, usage: Bool = false) {
        self.description = description
        self.usage = usage
    }
}

/// A cursor over command-line words: options with values, flags, leftovers.
struct Arguments {
    private var words: [String]
    private var index = 0

    init(_ words: [String]) { self.words = words }

    var isAtEnd: Bool { index >= words.count }

    mutating func next() -> String? {
        guard index < words.count else { return nil }
        defer { index += 1 }
        return words[index]
    }

    /// The value after an option (`--opt VALUE` or `--opt=VALUE`).
    mutating func value(for option: String, inline: String?) throws(CLIError) -> String {
        if let inline { return inline }
        guard let v = next(), !v.hasPrefix("--") else { throw CLIError("\(option) needs a value", usage: true) }
        return v
    }

    /// Splits `--opt=value` into its parts.
    static func split(_ word: String) -> (String, String?) {
        guard word.hasPrefix("--"), let eq = word.firstIndex(of: "=") else { return (word, nil) }
        return (String(word[..<eq]), String(word[word.index(after: eq)...]))
    }
}

func parseInt(_ text: String, option: String, range: ClosedRange<Int>) throws(CLIError) -> Int {
    guard let n = Int(text), range.contains(n) else {
        throw CLIError("\(option) \(text.debugDescription) is not a number in \(range.lowerBound)...\(range.upperBound)", usage: true)
    }
    return n
}

/// Sizes like 512, 4k, 64K, 1M, 1G.
func parseSize(_ text: String, option: String) throws(CLIError) -> UInt64 {
    let units: [Character: UInt64] = ["k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40]
    var digits = text.lowercased()
    var scale: UInt64 = 1
    if let last = digits.last, let u = units[last] {
        scale = u
        digits.removeLast()
    }
    guard let n = UInt64(digits), n > 0, n <= UInt64.max / scale else {
        throw CLIError("\(option) \(text.debugDescription) is not a size such as 4096, 64k or 1G", usage: true)
    }
    return n * scale
}

/// Where the control socket of an instance is: --control, or SOCKET.ctl.
/// Which running instance status, stats, resume and stop talk to: --control
/// PATH, or --socket PATH (a disk's vhost-user socket; its instance listens on
/// PATH.ctl unless started with --control).
struct InstanceOptions {
    private var control: String?
    private var socket: String?

    /// Takes `option` when it is --control or --socket; false for any other.
    mutating func parse(_ option: String, inline: String?, from args: inout Arguments) throws(CLIError) -> Bool {
        switch option {
        case "--control": control = try args.value(for: option, inline: inline)
        case "--socket": socket = try args.value(for: option, inline: inline)
        default: return false
        }
        return true
    }

    func controlPath() throws(CLIError) -> String {
        if let control { return control }
        if let socket { return socket + ".ctl" }
        throw CLIError("say which instance: --control PATH or --socket PATH (its vhost-user socket)", usage: true)
    }
}

func log(_ line: String) {
    let stamp = ISO8601DateFormatter.string(from: Date(), timeZone: .current, formatOptions: [.withTime, .withColonSeparatorInTime])
    StandardError.write("[\(stamp)] \(line)\n")
}

/// The text of an errno value ("Broken pipe").
func errnoText(_ code: Int32) -> String {
    String(cString: strerror(code))
}
