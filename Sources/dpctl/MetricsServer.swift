import DataPlane
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// `--metrics-address HOST:PORT`: an IPv4 address or host name and a port,
/// or `[IPv6]:PORT`. Port 0 takes a free port (logged).
struct MetricsAddress: Equatable, CustomStringConvertible {
    var host: String
    var port: Int

    static func parse(_ text: String, option: String) throws(CLIError) -> MetricsAddress {
        let usage = "\(option) \(text.debugDescription): use HOST:PORT, e.g. 127.0.0.1:9100 or [::1]:9100"
        var host: Substring
        var portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                throw CLIError(usage, usage: true)
            }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else { throw CLIError(usage, usage: true) }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            if host.contains(":") {
                throw CLIError("\(option) \(text.debugDescription): put an IPv6 address in brackets, e.g. [::1]:9100", usage: true)
            }
        }
        guard !host.isEmpty, !host.contains(where: { $0 == " " || $0 == "/" }) else { throw CLIError(usage, usage: true) }
        guard let port = Int(portText), (0...65535).contains(port) else {
            throw CLIError("\(option) \(text.debugDescription): the port must be a number in 0...65535", usage: true)
        }
        return MetricsAddress(host: String(host), port: port)
    }

    var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// GET /metrics over HTTP/1.1 on an event-loop thread of its own: a
/// scrape never runs on an IOThread or a control thread, and waits for
/// nothing but the data plane's control lock (as `dpctl stats` does).
///
/// Memory stays bounded whatever clients do: each connection gets one
/// answer and is closed once it is written (so at most one response is
/// buffered per connection, for a client that does not read); what it
/// sends after its first request is dropped unread; request headers are
/// limited to NIO's 80 KiB; at most `maxConnections` are open at once (more
/// are closed at once), and each is closed `deadline` after it opened (5 s:
/// a scraper sends its request at once, and idle connections must not
/// hold the slots long).
final class MetricsServer: Sendable {
    static let maxConnections = 16
    static let deadline = TimeAmount.seconds(5)

    private let group: MultiThreadedEventLoopGroup
    private let channel: any Channel
    /// Where it listens (the port chosen when 0 was asked).
    let boundAddress: String

    init(address: MetricsAddress, exporter: PrometheusExporter) throws(CLIError) {
        let socketAddress: SocketAddress
        do {
            socketAddress = try SocketAddress.makeAddressResolvingHost(address.host, port: address.port)
        } catch {
            throw CLIError("--metrics-address \(address): cannot resolve \(address.host.debugDescription): \(error)")
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let open = Connections()
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                guard open.count.wrappingAdd(1, ordering: .relaxed).newValue <= Self.maxConnections else {
                    open.count.wrappingSubtract(1, ordering: .relaxed)
                    return channel.close()
                }
                // The deadline task is cancelled with the connection: a
                // closed channel must not stay alive until it fires.
                let deadline = channel.eventLoop.scheduleTask(in: Self.deadline) { channel.close(promise: nil) }
                channel.closeFuture.whenComplete { _ in
                    deadline.cancel()
                    open.count.wrappingSubtract(1, ordering: .relaxed)
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withPipeliningAssistance: false)
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(exporter: exporter))
                }
            }
        do {
            channel = try bootstrap.bind(to: socketAddress).wait()
        } catch {
            try? group.syncShutdownGracefully()
            let reason = (error as? IOError).map { errnoText($0.errnoCode) } ?? "\(error)"
            throw CLIError("--metrics-address \(address): cannot listen: \(reason)")
        }
        self.group = group
        let local = channel.localAddress
        boundAddress = local.map { a in
            let port = a.port ?? address.port
            if case .v6 = a { return "[\(a.ipAddress ?? address.host)]:\(port)" }
            return "\(a.ipAddress ?? address.host):\(port)"
        } ?? address.description
    }

    /// Closes the listener and every connection, and ends the thread.
    func stop() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}

private final class Connections: Sendable {
    let count = Atomic<Int>(0)
}

/// Answers a connection's first request and closes it.
private final class MetricsHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let exporter: PrometheusExporter
    private var head: HTTPRequestHead?
    private var answered = false

    init(exporter: PrometheusExporter) {
        self.exporter = exporter
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let request):
            if head == nil { head = request }
        case .body:
            break // no request here has a body: dropped
        case .end:
            guard !answered, let head else { return }
            answered = true
            respond(context: context, to: head)
        }
    }

    private func respond(context: ChannelHandlerContext, to request: HTTPRequestHead) {
        let path = request.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        var headers = HTTPHeaders()
        let status: HTTPResponseStatus
        let body: [UInt8]
        if path != "/metrics" {
            status = .notFound
            body = Array("not found: the metrics are at /metrics\n".utf8)
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        } else if request.method != .GET && request.method != .HEAD {
            status = .methodNotAllowed
            body = Array("method not allowed: use GET\n".utf8)
            headers.add(name: "Allow", value: "GET, HEAD")
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        } else {
            status = .ok
            body = exporter.render()
            headers.add(name: "Content-Type", value: PrometheusExporter.contentType)
        }
        headers.add(name: "Content-Length", value: String(body.count))
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        if request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        }
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
