//! Which partition a key belongs to, computed the way Java clients and librdkafka's `murmur2`
//! partitioner compute it, so that Keel and any other producer of a topic agree.
//!
//! Keel computes the partition itself and produces to it explicitly: a command service must know
//! the partition of an aggregate before it appends (to route the command to the partition's
//! owner), and correctness must not hang on a client setting.

/// The partition of `key` among `partitions` (Java's `Utils.toPositive(murmur2(key)) % n`).
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    ((murmur2(key) & 0x7fff_ffff) % partitions as u32) as i32
}

/// Kafka's 32-bit murmur2 (seed `0x9747b28c`), bit for bit.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut hash = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        hash = hash.wrapping_mul(M);
        hash ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if tail.len() == 3 {
            hash ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            hash ^= u32::from(tail[1]) << 8;
        }
        hash ^= u32::from(tail[0]);
        hash = hash.wrapping_mul(M);
    }
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(M);
    hash ^= hash >> 15;
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_the_java_client() {
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()) as i32, expected, "{key}");
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for key in ["", "a", "user-1", "0196f0c4-0000-7000-8000-000000000000"] {
            let partition = partition_of(key.as_bytes(), 8);
            assert!((0..8).contains(&partition));
            assert_eq!(partition, partition_of(key.as_bytes(), 8));
        }
    }
}
