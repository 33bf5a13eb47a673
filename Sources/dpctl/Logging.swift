import ArgumentParser
import Foundation
import Logging

extension Logger.Level: @retroactive ExpressibleByArgument {}

enum LogFormat: String, CaseIterable, ExpressibleByArgument, Sendable {
    case text, json
}

/// start's --log-level and --log-format.
struct LoggingOptions: ParsableArguments {
    @Option(name: .customLong("log-level"), help: ArgumentHelp("""
        The least severe messages logged: trace (every vhost-user message and reply as well), debug, info, \
        notice, warning, error or critical
        """, valueName: "level"))
    var level: Logger.Level = .info

    @Option(name: .customLong("log-format"), help: ArgumentHelp("""
        text: one line per message, 'TIME LEVEL: MESSAGE key=value...'; json: one JSON object per line \
        (timestamp, level, message, metadata, label, source), for log shippers
        """, valueName: "format"))
    var format: LogFormat = .text

    /// Sends every Logger of the process (the library's too) to standard error
    /// in this format and at this level.
    func bootstrap() {
        let level = self.level, format = self.format
        LoggingSystem.bootstrap { label in StandardErrorLogHandler(label: label, level: level, format: format) }
        if format == .json {
            StandardError.setDropNote { count in
                StandardErrorLogHandler.format(.json, label: "dpctl", level: .warning, timestamp: StandardErrorLogHandler.timestamp(),
                                               message: "\(count) log line(s) dropped: standard error was not writable",
                                               metadata: [:], source: "dpctl")
            }
        }
    }
}

/// Log lines on standard error, as text or JSON lines, with ISO-8601
/// timestamps carrying the zone (2025-03-01T14:05:09.123+01:00). Writing
/// never blocks the caller (see StandardError).
struct StandardErrorLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level
    let format: LogFormat
    var metadata: Logger.Metadata = [:]

    init(label: String, level: Logger.Level, format: LogFormat) {
        self.label = label
        self.logLevel = level
        self.format = format
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var all = metadata
        if let more = event.metadata { all.merge(more) { $1 } }
        if let error = event.error { all["error"] = "\(error)" }
        StandardError.write(Self.format(format, label: label, level: event.level, timestamp: Self.timestamp(),
                                        message: "\(event.message)", metadata: all, source: event.source))
    }

    static func format(_ format: LogFormat, label: String, level: Logger.Level, timestamp: String, message: String,
                       metadata: Logger.Metadata, source: String) -> String {
        switch format {
        case .text:
            var line = "\(timestamp) \(level): \(message)"
            for (key, value) in metadata.sorted(by: { $0.key < $1.key }) {
                line += " \(key)=\(textValue(value))"
            }
            return line + "\n"
        case .json:
            var line = "{\"timestamp\":\(json(timestamp)),\"level\":\(json(level.rawValue)),\"message\":\(json(message))"
            line += ",\"metadata\":\(json(.dictionary(metadata))),\"label\":\(json(label)),\"source\":\(json(source))}\n"
            return line
        }
    }

    /// A value as text: quoted when it has spaces or quotes in it.
    static func textValue(_ value: Logger.MetadataValue) -> String {
        let text = "\(value)"
        guard text.isEmpty || text.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0.isNewline }) else { return text }
        return text.debugDescription
    }

    static func json(_ value: Logger.MetadataValue) -> String {
        switch value {
        case .string(let s): return json(s)
        case .stringConvertible(let c): return json(c.description)
        case .array(let items): return "[" + items.map(json).joined(separator: ",") + "]"
        case .dictionary(let d):
            return "{" + d.sorted { $0.key < $1.key }.map { json($0.key) + ":" + json($0.value) }.joined(separator: ",") + "}"
        }
    }

    /// A JSON string literal.
    static func json(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                out += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    /// Now, local time with milliseconds and the zone: 2025-03-01T14:05:09.123+01:00.
    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var seconds = ts.tv_sec
        var parts = tm()
        localtime_r(&seconds, &parts)
        var buffer = [CChar](repeating: 0, count: 64)
        let n = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S", &parts)
        let date = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let offset = parts.tm_gmtoff
        let sign = offset < 0 ? "-" : "+"
        let minutes = abs(offset) / 60
        let ms = Int(ts.tv_nsec / 1_000_000)
        return date + "." + pad(ms, 3) + sign + pad(minutes / 60, 2) + ":" + pad(minutes % 60, 2)
    }

    private static func pad(_ n: Int, _ width: Int) -> String {
        let s = String(n)
        return String(repeating: "0", count: max(0, width - s.count)) + s
    }
}
