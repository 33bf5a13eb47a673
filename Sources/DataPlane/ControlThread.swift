#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDataPlaneSys
import SystemPackage

/// A thread for a control-path loop: a vhost-user export's, dpctl's control
/// socket's, its standard-error writer's. The one way the Swift code starts
/// threads (IOThreads are started by the C data plane). A plain pthread, so
/// that whoever started it can join it.
package struct ControlThread: Sendable {
    private let id: pthread_t

    /// What the new thread runs, handed to it through pthread_create's argument.
    private final class Start: Sendable {
        let name: String?
        let body: @Sendable () -> Void
        init(name: String?, body: @escaping @Sendable () -> Void) {
            self.name = name
            self.body = body
        }
    }

    /// Starts `body` on a new thread, named `name` (its first 15 bytes) when given.
    package init(name: String? = nil, _ body: @escaping @Sendable () -> Void) throws(Errno) {
        let start = Unmanaged.passRetained(Start(name: name, body: body))
        var id = pthread_t()
        let ret = pthread_create(&id, nil, { argument in
            guard let argument else { return nil }
            let start = Unmanaged<Start>.fromOpaque(argument).takeRetainedValue()
            if let name = start.name { _ = dps_thread_set_name(name) }
            start.body()
            return nil
        }, start.toOpaque())
        guard ret == 0 else {
            start.release()
            throw Errno(rawValue: ret)
        }
        self.id = id
    }

    /// Waits for the thread to end. Call it once (or never, for a thread
    /// that lives as long as the process).
    package func join() {
        pthread_join(id, nil)
    }
}
