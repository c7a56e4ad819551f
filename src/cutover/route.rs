//! The routing function: which share of the aggregates a service owns. A published contract,
//! so any application, in any language, can tell who owns a key:
//!
//! 1. take the routing key as a UTF-8 string: text as it is, an ObjectId as its 24-character
//!    lowercase hex, an integer in decimal (anything else as canonical Extended JSON);
//! 2. SHA-256 it;
//! 3. read the first 8 bytes of the digest as a big-endian unsigned 64-bit integer;
//! 4. take it modulo 100: that is the key's **bucket**, 0 to 99.
//!
//! A service at P% owns the keys whose bucket is below P.

use bson::Bson;
use sha2::{Digest, Sha256};

use crate::event::render_key;

/// The bucket of a routing key given as its string form.
pub fn bucket(key: &str) -> u8 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % 100) as u8
}

/// The bucket of a routing key value (rendered as the contract says).
pub fn bucket_of(key: &Bson) -> u8 {
    bucket(&render_key(key))
}

/// Whether a service at `percent` owns a key in `bucket`.
pub fn owns(percent: u8, bucket: u8) -> bool {
    bucket < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's worked examples.
    #[test]
    fn the_published_examples() {
        // sha256("U4af4980629c1e3f2b7d5a8e9c0f1d2e3") begins 3b b4 6d 8e d2 0b 33 82:
        // 4302184004222399362 mod 100 = 62.
        assert_eq!(bucket("U4af4980629c1e3f2b7d5a8e9c0f1d2e3"), 62);
        // An ObjectId as its hex: sha256("65a1b2c3d4e5f60718293a4b") begins b5 14 a6 86 c5 5d 06 3b:
        // 13048237118166206011 mod 100 = 11.
        let oid = bson::oid::ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        assert_eq!(bucket_of(&Bson::ObjectId(oid)), 11);
        // A number in decimal.
        assert_eq!(bucket_of(&Bson::Int64(42)), 37);
        assert_eq!(bucket_of(&Bson::Int32(42)), bucket("42"));
        // Owned below the percentage: at 50% bucket 11 is the service's, bucket 62 the monolith's.
        assert!(owns(50, 11) && !owns(50, 62) && !owns(0, 0) && owns(100, 99));
    }

    #[test]
    fn buckets_spread_evenly() {
        let mut counts = [0u32; 100];
        for i in 0..100_000 {
            counts[bucket(&format!("U{i:05}")) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "{min}..{max}");
    }
}
