// swift-tools-version:6.0
import PackageDescription

#if canImport(Glibc)
import Glibc
#endif

let package = Package(
    name: "DataPlane",
    products: [
        .library(name: "DataPlane", targets: ["DataPlane"]),
        .executable(name: "dpctl", targets: ["dpctl"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.0"),
        // FileDescriptor and Errno for the control path's own fds (already in the graph through swift-nio).
        .package(url: "https://github.com/apple/swift-system", from: "1.8.0"),
    ],
    targets: [
        // The hot path: guest memory, split rings, virtio-blk, io_uring, the IOThread loop.
        .target(
            name: "CDataPlane",
            cSettings: [.define("_GNU_SOURCE")],
            linkerSettings: [.linkedLibrary("uring"), .linkedLibrary("numa"), .linkedLibrary("pthread")]
        ),
        // The guest's side of the ring (tests and the in-process benchmark). Its loop is C for speed.
        .target(
            name: "CGuestDriver",
            dependencies: ["CDataPlane"],
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // System calls the Swift control path needs but cannot import (CMSG_*, sockaddr_un).
        .target(name: "CDataPlaneSys", cSettings: [.define("_GNU_SOURCE")]),
        .target(name: "DataPlane", dependencies: ["CDataPlane", "CDataPlaneSys", .product(name: "Logging", package: "swift-log"),
                                                  .product(name: "CoreMetrics", package: "swift-metrics"),
                                                  .product(name: "Prometheus", package: "swift-prometheus"),
                                                  .product(name: "SystemPackage", package: "swift-system")]),
        // A vhost-user-blk frontend (QEMU's side) over the guest driver: tests and the load generator.
        .target(name: "CVhostFrontend", dependencies: ["CGuestDriver", "CDataPlane"], cSettings: [.define("_GNU_SOURCE")]),
        .executableTarget(name: "dp-loadgen", dependencies: ["CVhostFrontend", "CGuestDriver"], path: "bench/loadgen",
                          cSettings: [.define("_GNU_SOURCE")]),
        // Data-integrity soak: random I/O with checksums while dpctl is killed and restarted.
        .executableTarget(name: "dp-soak", dependencies: ["CVhostFrontend", "CGuestDriver"], path: "bench/soak",
                          exclude: ["run"], cSettings: [.define("_GNU_SOURCE")]),
        .executableTarget(name: "dpctl", dependencies: ["DataPlane", "CDataPlaneSys",
                                                       .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                                       .product(name: "Logging", package: "swift-log"),
                                                       // The --metrics-address HTTP endpoint.
                                                       .product(name: "NIOCore", package: "swift-nio"),
                                                       .product(name: "NIOPosix", package: "swift-nio"),
                                                       .product(name: "NIOHTTP1", package: "swift-nio")]),
        .executableTarget(name: "dataplane-example", dependencies: ["DataPlane", "CGuestDriver"], path: "Examples/InProcess"),
        .executableTarget(name: "dp-bench", dependencies: ["DataPlane", "CDataPlane", "CGuestDriver"], path: "bench/dp-bench"),
        .testTarget(name: "DataPlaneTests", dependencies: ["DataPlane", "CDataPlane", "CDataPlaneSys", "CGuestDriver", "CVhostFrontend",
                                                         .product(name: "Logging", package: "swift-log")]),
    ],
    swiftLanguageModes: [.v6],
    cLanguageStandard: .c11
)

// The libFuzzer target over vhost-user message handling exists only for
// fuzz/build.sh, which builds it with -sanitize=fuzzer (its entry point is
// libFuzzer's, not a main).
if getenv("DATAPLANE_FUZZ") != nil {
    package.targets.append(.executableTarget(name: "vhost-user-fuzz", dependencies: ["DataPlane", "CDataPlaneSys",
                                                                                 .product(name: "Logging", package: "swift-log")],
                                             path: "fuzz/vhost_user"))
}
