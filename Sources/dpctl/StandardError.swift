import Foundation
import Synchronization

/// Standard error written with write(2), for log lines and error messages.
///
/// FileHandle.write traps on EPIPE and ENOSPC: a log reader that went away
/// or a full disk killed a dpctl serving guests. Here a line that cannot be
/// written is dropped (and counted, and the count reported once writing
/// works again); nothing waits longer than `patience` for a reader that
/// stopped reading. Writers take turns, so each write of at most PIPE_BUF
/// bytes into a pipe that poll calls writable cannot block.
enum StandardError {
    private struct State {
        var dropped = 0
    }

    private static let state = Mutex(State())
    /// The longest a line waits for room in a pipe before it is dropped.
    private static let patience: Int32 = 250 // ms

    static func write(_ text: String) {
        state.withLock { state in
            if state.dropped > 0 {
                let note = "[\(state.dropped) line(s) dropped: standard error was not writable]\n"
                guard writeAll(Array(note.utf8)) else {
                    state.dropped += 1
                    return
                }
                state.dropped = 0
            }
            if !writeAll(Array(text.utf8)) { state.dropped += 1 }
        }
    }

    /// Writes every byte or gives up (false) on an error or a stalled reader.
    private static func writeAll(_ bytes: [UInt8]) -> Bool {
        let deadline = monotonicMilliseconds() + Int64(patience)
        var offset = 0
        while offset < bytes.count {
            let remaining = deadline - monotonicMilliseconds()
            guard remaining > 0 else { return false }
            var p = pollfd(fd: STDERR_FILENO, events: Int16(POLLOUT), revents: 0)
            let ready = poll(&p, 1, Int32(remaining))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0, p.revents & Int16(POLLOUT) != 0 else { return false }
            let chunk = min(bytes.count - offset, Int(PIPE_BUF))
            let n = bytes.withUnsafeBytes { raw -> Int in
                guard let base = raw.baseAddress else { return 0 }
                return Glibc.write(STDERR_FILENO, base + offset, chunk)
            }
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue } // until the deadline
                return false
            }
            offset += n
        }
        return true
    }

    private static func monotonicMilliseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }
}
