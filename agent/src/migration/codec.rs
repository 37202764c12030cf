//! Page codecs: none, lz4 and zstd at a level. Every page batch names its codec, so a
//! sender may change codec from one batch to the next (the policy engine will).
//!
//! Contexts are reused: a fresh zstd context per page is several times slower.

use crate::guest::abi::PAGE_SIZE;
pub use ferry_api::codec::{Codec, CodecParseError, ZSTD_MAX_LEVEL};

const PAGE: usize = PAGE_SIZE as usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error(transparent)]
    Parse(#[from] CodecParseError),
    #[error("unknown codec id {0} in a page batch")]
    UnknownId(u8),
    #[error("compressing a page with {codec}: {message}")]
    Compress { codec: Codec, message: String },
    #[error("data compressed with {codec} does not decompress to its length: {message}")]
    Decompress { codec: Codec, message: String },
}

/// Wire id: the low byte of the codec field of a page batch.
pub fn wire_id(codec: Codec) -> u8 {
    match codec {
        Codec::None => 0,
        Codec::Lz4 => 1,
        Codec::Zstd(_) => 2,
    }
}

/// The codec a batch names (the level only matters to the sender).
pub fn from_wire_id(id: u8) -> Result<Codec, CodecError> {
    match id {
        0 => Ok(Codec::None),
        1 => Ok(Codec::Lz4),
        2 => Ok(Codec::Zstd(1)),
        other => Err(CodecError::UnknownId(other)),
    }
}

/// Compresses pages; one per pipeline worker (it owns the reusable contexts).
pub struct Compressor {
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

impl Default for Compressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Compressor {
    pub fn new() -> Self {
        Self { zstd: None }
    }

    /// Appends `page` encoded with `codec` to `out`; returns the encoded length. A page
    /// that does not shrink is stored as is — the batch entry then says so — so a
    /// codec never costs more than a few bytes on incompressible memory.
    pub fn compress(
        &mut self,
        codec: Codec,
        page: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Stored, CodecError> {
        let start = out.len();
        let encoded = match codec {
            Codec::None => None,
            Codec::Lz4 => {
                out.resize(
                    start + lz4_flex::block::get_maximum_output_size(page.len()),
                    0,
                );
                let n = lz4_flex::block::compress_into(page, &mut out[start..]).map_err(|e| {
                    CodecError::Compress {
                        codec,
                        message: e.to_string(),
                    }
                })?;
                Some(n)
            }
            Codec::Zstd(level) => {
                let ctx = match &mut self.zstd {
                    Some((l, ctx)) if *l == level => ctx,
                    slot => {
                        let ctx = zstd::bulk::Compressor::new(level).map_err(|e| {
                            CodecError::Compress {
                                codec,
                                message: e.to_string(),
                            }
                        })?;
                        &mut slot.insert((level, ctx)).1
                    }
                };
                out.resize(start + zstd::zstd_safe::compress_bound(page.len()), 0);
                let n = ctx
                    .compress_to_buffer(page, &mut out[start..])
                    .map_err(|e| CodecError::Compress {
                        codec,
                        message: e.to_string(),
                    })?;
                Some(n)
            }
        };
        match encoded {
            Some(n) if n < page.len() => {
                out.truncate(start + n);
                Ok(Stored::Compressed(n))
            }
            _ => {
                out.truncate(start);
                out.extend_from_slice(page);
                Ok(Stored::Raw)
            }
        }
    }
}

/// How one page went into a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Raw,
    Compressed(usize),
}

/// Decompresses pages; one per receiving worker.
pub struct Decompressor {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Default for Decompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Decompressor {
    pub fn new() -> Self {
        Self { zstd: None }
    }

    /// Decodes `data` into exactly one page `out`; anything else is an error, never a
    /// panic and never a short page.
    pub fn decompress(
        &mut self,
        codec: Codec,
        data: &[u8],
        out: &mut [u8; PAGE],
    ) -> Result<(), CodecError> {
        self.decompress_exact(codec, data, out)
    }

    /// Decodes `data` into exactly `out.len()` bytes (a page, or a run of disk blocks).
    pub fn decompress_exact(
        &mut self,
        codec: Codec,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<(), CodecError> {
        let want = out.len();
        let bad = |message: String| CodecError::Decompress { codec, message };
        match codec {
            Codec::None => {
                if data.len() != want {
                    return Err(bad(format!("{} bytes", data.len())));
                }
                out.copy_from_slice(data);
            }
            Codec::Lz4 => {
                let n =
                    lz4_flex::block::decompress_into(data, out).map_err(|e| bad(e.to_string()))?;
                if n != want {
                    return Err(bad(format!("{n} bytes")));
                }
            }
            Codec::Zstd(_) => {
                if self.zstd.is_none() {
                    self.zstd =
                        Some(zstd::bulk::Decompressor::new().map_err(|e| bad(e.to_string()))?);
                }
                let ctx = self.zstd.as_mut().ok_or_else(|| bad("no context".into()))?;
                let n = ctx
                    .decompress_to_buffer(data, out)
                    .map_err(|e| bad(e.to_string()))?;
                if n != want {
                    return Err(bad(format!("{n} bytes")));
                }
            }
        }
        Ok(())
    }
}

pub use ferry_api::CodecSample;

/// Measures each codec on `pages` (each one page long): what the policy engine needs to
/// judge whether compression would pay on this VM's memory.
pub fn sample<'a>(
    codecs: &[Codec],
    pages: impl Iterator<Item = &'a [u8]> + Clone,
) -> Vec<CodecSample> {
    let mut compressor = Compressor::new();
    let mut out = Vec::with_capacity(PAGE + 64);
    codecs
        .iter()
        .map(|&codec| {
            let (mut raw, mut encoded) = (0usize, 0usize);
            let t = std::time::Instant::now();
            for page in pages.clone() {
                out.clear();
                let n = match compressor.compress(codec, page, &mut out) {
                    Ok(Stored::Compressed(n)) => n,
                    _ => page.len(),
                };
                raw += page.len();
                encoded += n;
            }
            let secs = t.elapsed().as_secs_f64().max(1e-9);
            CodecSample {
                codec,
                ratio: if encoded == 0 {
                    1.0
                } else {
                    raw as f64 / encoded as f64
                },
                compress_bytes_per_sec: raw as f64 / secs,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::corpus;
    use proptest::prelude::*;

    #[test]
    fn wire_ids_round_trip_and_unknown_ids_are_refused() {
        for c in [Codec::None, Codec::Lz4, Codec::Zstd(1)] {
            assert_eq!(from_wire_id(wire_id(c)), Ok(c));
        }
        assert_eq!(wire_id(Codec::Zstd(9)), wire_id(Codec::Zstd(1)));
        assert_eq!(from_wire_id(7), Err(CodecError::UnknownId(7)));
    }

    #[test]
    fn text_compresses_random_is_stored_raw() {
        let text = corpus::text(PAGE, 3);
        let random = corpus::random(PAGE, 3);
        let mut c = Compressor::new();
        let mut d = Decompressor::new();
        // Lab text must compress like prose: lz4 about 1.7x, zstd better than 2.2x.
        for (codec, max) in [
            (Codec::Lz4, PAGE * 2 / 3),
            (Codec::Zstd(1), PAGE * 45 / 100),
            (Codec::Zstd(3), PAGE * 45 / 100),
        ] {
            let mut out = Vec::new();
            let stored = c.compress(codec, &text, &mut out).unwrap();
            assert!(
                matches!(stored, Stored::Compressed(n) if n < max),
                "{codec}: {stored:?}"
            );
            let mut page = [0u8; PAGE];
            d.decompress(codec, &out, &mut page).unwrap();
            assert_eq!(&page[..], &text[..]);
            let mut out = Vec::new();
            assert_eq!(c.compress(codec, &random, &mut out).unwrap(), Stored::Raw);
            assert_eq!(out, random);
        }
    }

    #[test]
    fn sampling_tells_text_from_random() {
        let text: Vec<Vec<u8>> = (0..32).map(|i| corpus::text(PAGE, i)).collect();
        let random: Vec<Vec<u8>> = (0..32).map(|i| corpus::random(PAGE, i)).collect();
        let codecs = [Codec::None, Codec::Lz4, Codec::Zstd(1)];
        let t = sample(&codecs, text.iter().map(Vec::as_slice));
        let r = sample(&codecs, random.iter().map(Vec::as_slice));
        assert_eq!(t[0].ratio, 1.0);
        assert!(t[1].ratio > 1.5 && t[2].ratio > 2.2, "{t:?}");
        assert!(r.iter().all(|s| (s.ratio - 1.0).abs() < 1e-9), "{r:?}");
        assert!(t.iter().all(|s| s.compress_bytes_per_sec > 0.0));
    }

    proptest! {
        #[test]
        fn any_page_round_trips(seed in any::<u64>(), zeros in 0usize..PAGE, codec_id in 0u8..3) {
            let mut page = corpus::random(PAGE, seed);
            page[..zeros].fill(0);
            let codec = from_wire_id(codec_id).unwrap();
            let mut out = Vec::new();
            let stored = Compressor::new().compress(codec, &page, &mut out).unwrap();
            let mut back = [0u8; PAGE];
            let used = if stored == Stored::Raw { Codec::None } else { codec };
            Decompressor::new().decompress(used, &out, &mut back).unwrap();
            prop_assert_eq!(&back[..], &page[..]);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..6000), codec_id in 0u8..3) {
            let codec = from_wire_id(codec_id).unwrap();
            let mut page = [0u8; PAGE];
            let _ = Decompressor::new().decompress(codec, &data, &mut page);
        }
    }
}
