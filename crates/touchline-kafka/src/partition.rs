//! The partition of a customer: Kafka's default partitioner for keyed records (Java's
//! `Utils.murmur2` made positive, modulo the partition count; librdkafka's `murmur2_random`).
//! Ingest computes it itself, over the configured `kafka.partitions`, so that a customer's
//! partition does not move when partitions are added to the topic behind Touchline's back, and
//! every acknowledged event lands in a partition the projectors own.

/// Kafka's 32-bit murmur2 of `data` (seed `0x9747b28c`), as Java's `Utils.murmur2` returns it.
#[must_use]
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    #[allow(
        clippy::cast_possible_truncation,
        reason = "Java hashes the length as an int"
    )]
    let mut h: u32 = 0x9747_b28c ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if let Some(first) = rest.first() {
        h ^= u32::from(*first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    i32::from_ne_bytes(h.to_ne_bytes())
}

/// The partition of `key` among `partitions` (0 when there are none).
#[must_use]
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cases of Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_agrees_with_kafka() {
        for (key, hash) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key.as_bytes()), hash, "{key}");
        }
    }

    #[test]
    fn partitions_are_in_range() {
        for key in ["", "a", "cust-0007", "bench-customer-0000042"] {
            let partition = partition_for(key.as_bytes(), 6);
            assert!((0..6).contains(&partition), "{key}: {partition}");
        }
        assert_eq!(partition_for(b"x", 0), 0);
    }
}
