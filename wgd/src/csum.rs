//! Internet checksums (RFC 1071) for the segments the daemon builds or splits.

/// Ones' complement sum of `data` added to `initial`, not folded, not inverted.
///
/// Summed in native (little-endian) order over 64-bit loads, then byte-swapped: the ones'
/// complement sum does not depend on byte order (RFC 1071, 2.B).
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        let w = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().unwrap_or([0; 8]));
        let (a, b, d, e) = (w(0), w(8), w(16), w(24));
        acc += (a & 0xffff_ffff) + (a >> 32) + (b & 0xffff_ffff) + (b >> 32);
        acc += (d & 0xffff_ffff) + (d >> 32) + (e & 0xffff_ffff) + (e >> 32);
    }
    let rest = chunks.remainder();
    let mut words = rest.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut tail = words.remainder();
    if tail.len() >= 2 {
        acc += u64::from(u16::from_le_bytes([tail[0], tail[1]]));
        tail = &tail[2..];
    }
    if let [last] = tail {
        acc += u64::from(*last);
    }
    initial + u64::from(fold(acc).swap_bytes())
}

/// Fold a sum to 16 bits (not inverted).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of TCP/UDP over IPv4 or IPv6 (addresses taken from the IP header).
pub fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    let acc = sum(src, 0);
    let acc = sum(dst, acc);
    acc + u64::from(proto) + len as u64
}

/// IPv4 header checksum: recomputed in place over `header` (its checksum field at 10..12).
pub fn ipv4_header(header: &mut [u8]) {
    header[10] = 0;
    header[11] = 0;
    let c = !fold(sum(header, 0));
    header[10..12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for w in data.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            let lo = w.get(1).map(|b| u32::from(*b)).unwrap_or(0);
            acc += hi | lo;
        }
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn matches_naive_sum() {
        let data: Vec<u8> = (0..1501u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in [0, 1, 2, 7, 8, 9, 15, 16, 17, 64, 1000, 1501] {
            assert_eq!(fold(sum(&data[..len], 0)), naive(&data[..len]), "len {len}");
        }
        let ff = vec![0xffu8; 4096];
        assert_eq!(fold(sum(&ff, 0)), naive(&ff));
    }

    #[test]
    fn ipv4_header_checksum_verifies() {
        let mut h = [
            0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0, 1, 0xc0, 0xa8, 0,
            0xc7,
        ];
        ipv4_header(&mut h);
        assert_eq!(&h[10..12], &[0xb8, 0x61]);
        assert_eq!(fold(sum(&h, 0)), 0xffff);
    }
}
