import DataPlane
import Dispatch
import Foundation
import Synchronization

/// Standard error, written by a thread of its own: log lines and error
/// messages are queued and the caller goes on at once, whatever the reader
/// does. Nothing that logs ever waits on standard error.
///
/// FileHandle.write traps on EPIPE and ENOSPC: a log reader that went away
/// or a full disk killed a dpctl serving guests. Here the writer drops a line
/// that cannot be written (and counts it, and says so once writing works
/// again); it waits at most `patience` for a reader that stopped reading. A
/// queue that grows past `capacity` bytes (a reader that stopped for good)
/// drops new lines the same way, so memory stays bounded.
enum StandardError {
    private struct State {
        var queue: [[UInt8]] = []
        var queuedBytes = 0
        /// Lines dropped and not yet reported.
        var dropped = 0
        /// The writer holds lines taken off the queue.
        var writing = false
        var writerStarted = false
        /// How the note of dropped lines is written (JSON when the log is).
        var dropNote: @Sendable (Int) -> String = { "[\($0) line(s) dropped: standard error was not writable]\n" }
    }

    private static let state = Mutex(State())
    private static let wake = DispatchSemaphore(value: 0)
    /// The longest a line waits for room in a pipe before it is dropped.
    private static let patience: Int32 = 250 // ms
    private static let capacity = 4 << 20

    /// Queues `text`; never blocks.
    static func write(_ text: String) {
        let bytes = Array(text.utf8)
        let startWriter: Bool = state.withLock { s in
            if s.queuedBytes + bytes.count > capacity {
                s.dropped += 1
            } else {
                s.queue.append(bytes)
                s.queuedBytes += bytes.count
            }
            defer { s.writerStarted = true }
            return !s.writerStarted
        }
        // A thread that lives as long as the process: never joined. Should it
        // not start, lines queue (up to `capacity`) until a later write starts it.
        if startWriter, (try? ControlThread(name: "dpctl-stderr", { writerLoop() })) == nil {
            state.withLock { $0.writerStarted = false }
        }
        wake.signal()
    }

    /// How a note of dropped lines reads (the log format's own).
    static func setDropNote(_ note: @escaping @Sendable (Int) -> String) {
        state.withLock { $0.dropNote = note }
    }

    /// Waits until what was queued is written (or dropped), at most `seconds`:
    /// before exit, so the last lines are not lost.
    static func flush(seconds: Double = 2) {
        let deadline = monotonicMilliseconds() + Int64(seconds * 1000)
        while state.withLock({ !$0.queue.isEmpty || $0.writing }) && monotonicMilliseconds() < deadline {
            usleep(1000)
        }
    }

    private static func writerLoop() {
        while true {
            wake.wait()
            while true {
                let (lines, dropped, note): ([[UInt8]], Int, @Sendable (Int) -> String) = state.withLock { s in
                    let taken = s.queue
                    s.queue = []
                    s.queuedBytes = 0
                    s.writing = !taken.isEmpty
                    return (taken, s.dropped, s.dropNote)
                }
                if lines.isEmpty { break }
                var lost = 0
                var reported = 0
                if dropped > 0 {
                    if writeAll(Array(note(dropped).utf8)) { reported = dropped } else { lost += 1 }
                }
                for line in lines where !writeAll(line) { lost += 1 }
                state.withLock { s in
                    s.dropped += lost - reported
                    s.writing = false
                }
            }
        }
    }

    /// Writes every byte or gives up (false) on an error or a stalled reader.
    /// Chunks of at most PIPE_BUF bytes into a pipe that poll calls writable
    /// cannot block.
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

    static func monotonicMilliseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }
}
