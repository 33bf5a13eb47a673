import DataPlane
import Foundation

/// socket-owner, socket-group and socket-mode: who may connect to a disk's
/// vhost-user socket (connecting takes write permission on the socket file),
/// e.g. `socket-group=kvm,socket-mode=0660` for libvirt's QEMU.
enum SocketOwnership {
    /// A user or group as given: a name or a number, checked for its form
    /// here and looked up when the configuration is resolved.
    static func checkName(_ text: String, option: String) throws(CLIError) -> String {
        guard !text.isEmpty, !text.contains(where: { $0.isWhitespace || $0 == ":" }) else {
            throw CLIError("\(option) \(text.debugDescription) is not a user or group name or number", usage: true)
        }
        return text
    }

    /// An octal mode such as 0660 or 660, at most 0777.
    static func parseMode(_ text: String, option: String) throws(CLIError) -> mode_t {
        var digits = Substring(text)
        if digits.hasPrefix("0o") { digits = digits.dropFirst(2) }
        guard !digits.isEmpty, digits.count <= 4, let mode = mode_t(digits, radix: 8), mode <= 0o777 else {
            throw CLIError("\(option) \(text.debugDescription) is not an octal mode such as 0660 (0 to 0777)", usage: true)
        }
        return mode
    }

    static func format(_ mode: mode_t) -> String {
        let octal = String(mode, radix: 8)
        return String(repeating: "0", count: max(0, 4 - octal.count)) + octal
    }

    static func uid(_ text: String, option: String) throws(CLIError) -> uid_t {
        if let n = UInt32(text) { return n }
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16384)
        var r = getpwnam_r(text, &entry, &buffer, buffer.count, &result)
        while r == ERANGE && buffer.count < 1 << 24 { // a large entry: a larger buffer
            buffer = [CChar](repeating: 0, count: buffer.count * 4)
            r = getpwnam_r(text, &entry, &buffer, buffer.count, &result)
        }
        guard r == 0, result != nil else {
            throw CLIError("\(option): no user named \(text.debugDescription)\(r == 0 ? "" : ": \(errnoText(r))")", usage: true)
        }
        return entry.pw_uid
    }

    static func gid(_ text: String, option: String) throws(CLIError) -> gid_t {
        if let n = UInt32(text) { return n }
        var entry = group()
        var result: UnsafeMutablePointer<group>?
        var buffer = [CChar](repeating: 0, count: 16384)
        var r = getgrnam_r(text, &entry, &buffer, buffer.count, &result)
        while r == ERANGE && buffer.count < 1 << 24 { // a group of many members (LDAP): a larger buffer
            buffer = [CChar](repeating: 0, count: buffer.count * 4)
            r = getgrnam_r(text, &entry, &buffer, buffer.count, &result)
        }
        guard r == 0, result != nil else {
            throw CLIError("\(option): no group named \(text.debugDescription)\(r == 0 ? "" : ": \(errnoText(r))")", usage: true)
        }
        return entry.gr_gid
    }

    /// A disk's permissions: its own keys, else the instance's; names looked up.
    static func permissions(_ disk: InstanceConfiguration.DiskEntry) throws(CLIError) -> SocketPermissions {
        SocketPermissions(owner: try disk.socketOwner.map { (t: String) throws(CLIError) in try uid(t, option: "socket-owner") },
                          group: try disk.socketGroup.map { (t: String) throws(CLIError) in try gid(t, option: "socket-group") },
                          mode: disk.socketMode)
    }
}
