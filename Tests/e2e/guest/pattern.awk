# Deterministic disk pattern shared by the guest (busybox awk) and the host
# (mawk/gawk). Prints the bytes the pattern has in the absolute disk byte range
# [off, off+len) for a given seed. off and len must be multiples of 512.
#
#   awk -v seed=N -v off=BYTES -v len=BYTES -f pattern.awk
#
# Each 512-byte sector at absolute byte offset o is 8 text lines of 64 bytes:
#   "dpe2e s=<seed> o=<o> r=<hash(seed, o)> k=<0..7>" + "..........." + "\n"
# (seed and hash 10 digits, o 14 digits, zero padded). The hash depends only
# on (seed, o), so any sub-range can be generated on its own, and data written
# to the wrong sector, or stale data from another seed, never matches. All
# arithmetic stays below 2^53, so every awk computes it exactly in doubles.
# One sprintf per sector: busybox awk under TCG makes ~2 MiB/s this way.
BEGIN {
    if (seed == "" || off == "" || len == "") { print "pattern.awk: need -v seed= off= len=" > "/dev/stderr"; exit 2 }
    seed += 0; off += 0; len += 0
    if (off % 512 != 0 || len % 512 != 0) { print "pattern.awk: off and len must be multiples of 512" > "/dev/stderr"; exit 2 }
    M = 2147483647
    s = seed % 2147483646
    end = off + len
    for (o = off; o < end; o += 512) {
        i = o / 512
        x = (s + (i % 2147483646) * 7919) % 2147483646 + 1
        x = (x * 48271) % M
        x = (x * 48271) % M
        b = sprintf("dpe2e s=%010.0f o=%014.0f r=%010.0f k=", seed, o, x)
        printf "%s0...........\n%s1...........\n%s2...........\n%s3...........\n%s4...........\n%s5...........\n%s6...........\n%s7...........\n", b, b, b, b, b, b, b, b
    }
}
