#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// close(2) without the name clash inside types that have a `close` method.
@discardableResult
func closeFD(_ fd: Int32) -> Int32 { close(fd) }

/// A shared mapping of (part of) a file, unmapped when the last user lets go.
final class SharedMapping: @unchecked Sendable {
    // Immutable after init; the mapping is only unmapped in deinit.
    let base: UnsafeMutableRawPointer
    let length: Int

    /// Maps `length` bytes of `fd` from `offset`, a multiple of the page size
    /// (read-write, shared).
    init(fd: Int32, offset: UInt64 = 0, length: UInt64) throws(VhostUserError) {
        guard length > 0, length <= UInt64(Int.max), offset <= UInt64(Int64.max) else {
            throw .invalid("mapping of \(length) bytes at offset \(offset)")
        }
        let p = mmap(nil, Int(length), PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(offset))
        guard let p, p != MAP_FAILED else { throw .system("mmap of \(length) bytes", errno) }
        base = p
        self.length = Int(length)
    }

    deinit { munmap(base, length) }
}
