import CDataPlaneSys
import Foundation
import Testing

@testable import DataPlane

/// The one stale-socket takeover rule that the vhost-user exports and
/// dpctl's control socket share.
@Suite(.timeLimit(.minutes(1))) struct UnixSocketTests {
    func scratch() throws -> String {
        let dir = NSTemporaryDirectory() + "/dp-sock-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    @Test func aStaleSocketIsTakenOver() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/stale.sock"
        let old = dps_unix_listen(path, 1)
        #expect(old >= 0)
        close(old) // a listener that died: the file stays, nobody listens
        let fd = try UnixSocket.listen(at: path, backlog: 1)
        defer { close(fd) }
        let client = dps_unix_connect(path)
        #expect(client >= 0, "the new listener answers")
        if client >= 0 { close(client) }
    }

    /// A live listener whose backlog is full is still live: the probe must
    /// neither hang (a blocking connect would) nor take the path over.
    @Test func aLiveSocketIsRefusedEvenWithItsBacklogFull() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/live.sock"
        let live = dps_unix_listen(path, 0)
        #expect(live >= 0)
        defer { close(live) }
        var clients: [Int32] = []
        defer { clients.forEach { close($0) } }
        while clients.count < 64 {
            let c = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { raw in
                for (i, b) in path.utf8.enumerated() { raw[i] = b }
            }
            let r = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(c, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            let full = r != 0 && errno == EAGAIN
            clients.append(c)
            if full { break }
        }
        #expect(clients.count < 64, "the backlog never filled: the test proves nothing")
        #expect(throws: DataPlaneError.socketPath(path: path, reason: "another process serves it (stop that process or choose another path)")) {
            _ = try UnixSocket.listen(at: path, backlog: 1)
        }
    }

    @Test func somethingThatIsNotASocketIsRefusedAndLeftAlone() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/file"
        #expect(FileManager.default.createFile(atPath: file, contents: Data("keep".utf8)))
        #expect(throws: DataPlaneError.self) { _ = try UnixSocket.listen(at: file, backlog: 1) }
        #expect(FileManager.default.contents(atPath: file) == Data("keep".utf8))
        let link = dir + "/link"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: file)
        do {
            _ = try UnixSocket.listen(at: link, backlog: 1)
            Issue.record("a symbolic link was taken over")
        } catch {
            #expect(error.description.contains("it is a symbolic link, not a socket"), "\(error)")
        }
        #expect(FileManager.default.contents(atPath: file) == Data("keep".utf8))
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: link)) == file)
    }
}
