//! A frame's CRC32 built from the CRC32s of the pages it carries.
//!
//! Both ends hash every page anyway: the memory digest is made of the pages' CRCs.
//! CRC32 is linear, so the CRC of `A ‖ P` follows from the CRC of `A` and that of
//! `P`: for a page of 4096 bytes, `crc(A ‖ P) = shift(crc(A)) ^ crc(P)`, where
//! `shift` multiplies by x^(8·4096) modulo the CRC polynomial, a fixed linear map
//! applied here with four table lookups. So a page batch's frame CRC costs one hash
//! of each page (the one the digest needs) and not a second pass over the frame.

use std::sync::LazyLock;

use crate::guest::abi::PAGE_SIZE;

/// `shift` for one page, as four byte-indexed tables.
static PAGE_SHIFT: LazyLock<[[u32; 256]; 4]> = LazyLock::new(|| {
    // The image of each bit: combining with the CRC of a page of zeros' worth of
    // length, whose own CRC is taken out again (combine(a, b, n) = shift(a) ^ b).
    let column = |bit: u32| {
        let mut h = crc32fast::Hasher::new_with_initial_len(1 << bit, 0);
        h.combine(&crc32fast::Hasher::new_with_initial_len(0, PAGE_SIZE));
        h.finalize()
    };
    let columns: [u32; 32] = std::array::from_fn(|b| column(b as u32));
    let mut tables = [[0u32; 256]; 4];
    for (t, table) in tables.iter_mut().enumerate() {
        for (byte, slot) in table.iter_mut().enumerate() {
            *slot = (0..8)
                .filter(|k| byte & (1 << k) != 0)
                .fold(0, |acc, k| acc ^ columns[8 * t + k]);
        }
    }
    tables
});

/// The CRC32 of a frame's bytes so far, fed with bytes or with whole pages' CRCs.
#[derive(Clone, Copy, Debug)]
pub struct FrameCrc(u32);

impl FrameCrc {
    pub fn new() -> Self {
        Self(0)
    }

    /// Appends `bytes`.
    pub fn bytes(&mut self, bytes: &[u8]) {
        let mut h = crc32fast::Hasher::new_with_initial(self.0);
        h.update(bytes);
        self.0 = h.finalize();
    }

    /// Appends a page (4096 bytes) whose own CRC32 is `page_crc`.
    pub fn page(&mut self, page_crc: u32) {
        let t = &*PAGE_SHIFT;
        let c = self.0;
        self.0 = t[0][(c & 0xff) as usize]
            ^ t[1][(c >> 8 & 0xff) as usize]
            ^ t[2][(c >> 16 & 0xff) as usize]
            ^ t[3][(c >> 24) as usize]
            ^ page_crc;
    }

    pub fn value(self) -> u32 {
        self.0
    }
}

impl Default for FrameCrc {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pages_joined_by_their_crcs_hash_as_the_bytes_do(
            head in proptest::collection::vec(any::<u8>(), 0..64),
            seeds in proptest::collection::vec(any::<u64>(), 1..5),
            mid in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let page = |seed: u64| -> Vec<u8> {
                let mut s = seed | 1;
                (0..PAGE_SIZE).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s as u8 }).collect()
            };
            let mut whole = head.clone();
            let mut joined = FrameCrc::new();
            joined.bytes(&head);
            for (i, &seed) in seeds.iter().enumerate() {
                let p = page(seed);
                whole.extend_from_slice(&p);
                joined.page(crc32fast::hash(&p));
                if i == 0 {
                    whole.extend_from_slice(&mid);
                    joined.bytes(&mid);
                }
            }
            prop_assert_eq!(joined.value(), crc32fast::hash(&whole));
        }
    }

    #[test]
    fn a_changed_page_changes_the_frame_crc() {
        let mut a = FrameCrc::new();
        a.bytes(b"FRYM");
        let mut b = a;
        a.page(crc32fast::hash(&[0u8; PAGE_SIZE as usize]));
        let mut p = [0u8; PAGE_SIZE as usize];
        p[4095] = 1;
        b.page(crc32fast::hash(&p));
        assert_ne!(a.value(), b.value());
    }
}
