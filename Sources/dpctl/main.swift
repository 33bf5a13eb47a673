import ArgumentParser
import DataPlane
import Foundation

/// Parses the command line (start's grouped disk options rewritten into
/// key=value form first), runs the verb, and returns the exit status:
/// 0 ok, 1 runtime failure, 2 usage; `dpctl status` 3 when unhealthy.
func run(_ arguments: [String]) -> Int32 {
    // A control client or log reader that hangs up must cost us a failed
    // write (EPIPE), not the process and the guests it serves.
    signal(SIGPIPE, SIG_IGN)
    var words = arguments
    let verbs = Dpctl.configuration.subcommands.map { $0._commandName }
    // vhost-user.rst's backend conventions: --print-capabilities ignores
    // every other option; --socket-path, --fd or --blk-file with no command
    // is start (how a management layer runs a backend).
    if words.first == "start" || words.first?.hasPrefix("-") == true {
        if BackendCapabilities.mentions("--print-capabilities", in: words) {
            print(BackendCapabilities.json)
            return ExitStatus.ok
        }
        if words.first != "start", BackendCapabilities.startOptions.contains(where: { BackendCapabilities.mentions($0, in: words) }) {
            words.insert("start", at: 0)
        }
    }
    if let verb = words.first, !verb.hasPrefix("-"), verb != "help", !verbs.contains(verb) {
        return report(CLIError("unknown command \(verb.debugDescription); commands: \(verbs.joined(separator: ", "))", usage: true))
    }
    if let verb = words.first, verb == "start" || verb == "add-disk" {
        do {
            words = try [verb] + GroupedDiskArguments.rewrite(Array(words.dropFirst()))
        } catch {
            return report(error)
        }
    }
    if words.isEmpty {
        StandardError.write(Dpctl.helpMessage() + "\n")
        return ExitStatus.usage
    }
    var command: any ParsableCommand
    do {
        command = try Dpctl.parseAsRoot(words)
    } catch {
        return report(error, verb: words.first.flatMap { verbs.contains($0) ? $0 : nil })
    }
    do {
        try command.run()
        return ExitStatus.ok
    } catch {
        return report(error, verb: words.first.flatMap { verbs.contains($0) ? $0 : nil })
    }
}

/// Writes an error as one line (or help, version and completion scripts,
/// which the argument parser throws, to standard output) and returns the
/// exit status.
func report(_ error: any Error, verb: String? = nil) -> Int32 {
    switch error {
    case let error as CLIError:
        StandardError.write("dpctl: error: \(error.description)\n")
        return error.usage ? ExitStatus.usage : ExitStatus.failure
    case let error as DataPlaneError:
        StandardError.write("dpctl: error: \(error.description)\n")
        return ExitStatus.failure
    case let error as ExitCode:
        return error.rawValue
    case let error as ValidationError:
        StandardError.write("dpctl: error: \(error.message)\n")
        return ExitStatus.usage
    default:
        let code = Dpctl.exitCode(for: error)
        if code == .success { // --help, --version, completion scripts
            print(Dpctl.fullMessage(for: error))
            return ExitStatus.ok
        }
        let message = Dpctl.message(for: error).split(separator: "\n").joined(separator: " ")
        if code == .validationFailure { // the parser's: a usage error, on one line as ours are
            StandardError.write("dpctl: error: \(message) (see 'dpctl\(verb.map { " " + $0 } ?? "") --help')\n")
            return ExitStatus.usage
        }
        StandardError.write("dpctl: error: \(message.isEmpty ? "\(error)" : message)\n")
        return code.rawValue == 0 ? ExitStatus.failure : code.rawValue
    }
}

let status = run(Array(CommandLine.arguments.dropFirst()))
StandardError.flush()
exit(status)
