import CDataPlane

/// The virtio-blk configuration space (virtio 1.x 5.2.4), little-endian,
/// as GET_CONFIG returns it. Every byte is written: nothing uninitialised leaks.
struct BlkConfigSpace {
    /// Bytes up to and including the secure-erase fields (72).
    static let size = 72
    /// Where the writeback byte lies (virtio_blk_config.wce).
    static let writebackOffset: UInt32 = 32

    static func bytes(for disk: Disk, numQueues: Int, segMax: UInt32) -> [UInt8] {
        let blockSize = disk.logicalBlockSize
        // physical = logical << exp; both powers of two, physical >= logical.
        let physicalExponent = UInt8(disk.physicalBlockSize.trailingZeroBitCount - blockSize.trailingZeroBitCount)
        let sectorsPerBlock = blockSize / 512
        var b: [UInt8] = []
        b.appendLE(disk.capacityBytes / 512)          // capacity (512-byte sectors)
        b.appendLE(UInt32(DP_SIZE_MAX))               // size_max: seg_max of these fit a request
        b.appendLE(segMax)                            // seg_max
        b.appendLE(UInt16(0)); b.append(0); b.append(0) // geometry (not offered)
        b.appendLE(blockSize)                         // blk_size
        b.append(physicalExponent)                    // physical_block_exp
        b.append(0)                                   // alignment_offset
        b.appendLE(UInt16(1))                         // min_io_size (blocks)
        b.appendLE(UInt32(0))                         // opt_io_size
        precondition(b.count == Int(writebackOffset))
        b.append(disk.writeCache ? 1 : 0)             // writeback: 1, writes need FLUSH to be durable; 0, write-through
        b.append(0)                                   // unused0
        b.appendLE(UInt16(numQueues))                 // num_queues
        b.appendLE(UInt32(1 << 22))                   // max_discard_sectors (2 GiB)
        b.appendLE(UInt32(1))                         // max_discard_seg
        b.appendLE(sectorsPerBlock)                   // discard_sector_alignment
        b.appendLE(UInt32(1 << 22))                   // max_write_zeroes_sectors
        b.appendLE(UInt32(1))                         // max_write_zeroes_seg
        b.append(1)                                   // write_zeroes_may_unmap
        b += [0, 0, 0]                                // unused1
        b.appendLE(UInt32(0))                         // max_secure_erase_sectors
        b.appendLE(UInt32(0))                         // max_secure_erase_seg
        b.appendLE(UInt32(0))                         // secure_erase_sector_alignment
        precondition(b.count == size)
        return b
    }
}
