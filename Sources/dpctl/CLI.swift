import ArgumentParser
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

/// Which running instance status, stats, resume and stop talk to: --control
/// PATH, or --socket PATH (a disk's vhost-user socket; its instance listens on
/// PATH.ctl unless started with --control).
struct InstanceOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The instance's control socket", valueName: "path"), completion: .file())
    var control: String?

    @Option(help: ArgumentHelp("A disk's vhost-user socket: its instance answers on PATH.ctl (unless started with --control)",
                               valueName: "path"), completion: .file())
    var socket: String?

    func controlPath() throws(CLIError) -> String {
        if let control { return control }
        if let socket { return socket + ".ctl" }
        throw CLIError("say which instance: --control PATH or --socket PATH (its vhost-user socket)", usage: true)
    }
}

/// A number option's value checked against its range (a usage error).
func checkRange(_ value: Int?, option: String, range: ClosedRange<Int>) throws(CLIError) -> Int? {
    guard let value else { return nil }
    return try parseInt(String(value), option: option, range: range)
}

/// The text of an errno value ("Broken pipe").
func errnoText(_ code: Int32) -> String {
    String(cString: strerror(code))
}
