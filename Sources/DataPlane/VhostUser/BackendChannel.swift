#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization

/// The backend-request channel of one export's frontend (vhost-user.rst
/// "Backend communication", BACKEND_REQ): the socket the frontend handed us
/// with SET_BACKEND_REQ_FD. The export's control thread sets and closes it;
/// any thread may send on it (a resize comes from the control socket's
/// thread), one message at a time under the lock.
final class BackendChannel: Sendable {
    private let fd = Mutex<Int32>(-1)

    /// What became of a notification.
    enum Delivery: Equatable {
        case sent
        /// The frontend gave no channel (it did not negotiate BACKEND_REQ, or none is connected).
        case noChannel
        case failed(Int32)
    }

    /// Takes `new` (or -1) in place of the channel there was, which is closed.
    func replace(_ new: Int32) {
        let old = fd.withLock { fd in
            defer { fd = new }
            return fd
        }
        if old >= 0 { closeFD(old) }
    }

    var isOpen: Bool { fd.withLock { $0 >= 0 } }

    /// Sends CONFIG_CHANGE_MSG without NEED_REPLY: QEMU handles it by
    /// asking GET_CONFIG on the main channel, which the export's control
    /// thread must be free to answer; waiting here for an ack would make
    /// that thread's frontend wait on us (libvhost-user's
    /// vu_config_change_msg does not ask for one either).
    func sendConfigChange() -> Delivery {
        var message: [UInt8] = []
        message.appendLE(VhostUserBackendRequest.configChangeMsg.rawValue)
        message.appendLE(VhostUserFlags.version)
        message.appendLE(UInt32(0))
        return fd.withLock { fd in
            guard fd >= 0 else { return .noChannel }
            var sent = 0
            while sent < message.count {
                let n = message.withUnsafeBytes { send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                if n > 0 {
                    sent += n
                    continue
                }
                let err = errno
                if n < 0 && err == EINTR { continue }
                // A frontend that does not read its channel for a second is
                // not waited for longer: the resize itself is done.
                guard n < 0 && (err == EAGAIN || err == EWOULDBLOCK) else { return .failed(n < 0 ? err : EPIPE) }
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                if poll(&p, 1, 1000) <= 0 { return .failed(ETIMEDOUT) }
            }
            return .sent
        }
    }

    deinit { replace(-1) }
}
