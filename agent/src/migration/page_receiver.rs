//! The one place a destination turns page frames (`Pages`, `ZeroPages`) into guest
//! memory, for pre-copy and post-copy alike. What differs is where a page may be
//! written, and that is the sink's business: before the guest runs nothing else sees
//! its memory, so pages are read from the socket straight into it; once it runs, a
//! page must appear whole and at once (userfaultfd), so its bytes are staged first.
//!
//! Straight into place means a raw page is copied once, by the kernel, from the
//! socket to its guest page (`readv` over runs of pages), and hashed once there: its
//! CRC32 is what the memory digest needs, and the frame's CRC is joined from the
//! pages' ([`FrameCrc`]) rather than computed over the frame a second time. The
//! frame is checked after its pages landed. A bad one fails the migration, and a
//! failed migration's memory is discarded whole: nothing a vCPU could run on was
//! ever written unchecked.

use std::io::{BufRead, BufReader, IoSliceMut, Read};

use super::codec::{CodecError, Decompressor};
use super::frame_crc::FrameCrc;
use super::protocol::{
    self, Frame, FrameHeader, Integrity, Kind, Message, PageBatch, ProtocolError,
};
use crate::guest::abi::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;
/// Pages in one run of raw pages at most: one buffer of a `readv`.
const READ_PAGES: u64 = 256;
/// Runs one `readv` fills at most.
const READ_RUNS: usize = 64;

/// Where received pages go.
pub trait PageSink {
    type Error: From<ProtocolError> + From<CodecError>;

    /// All of guest memory, when no vCPU can see it yet: pages are written into it
    /// directly. `None` has the receiver stage each page and hand it to
    /// [`PageSink::fill`].
    fn memory(&mut self) -> Option<&mut [u8]>;
    /// `page` was written in [`PageSink::memory`]; its CRC32 is `crc`.
    fn wrote(&mut self, page: u64, crc: u32) -> Result<(), Self::Error>;
    /// `page` holds `data` (one page).
    fn fill(&mut self, page: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// Pages `first..first + count` are zero.
    fn zeros(&mut self, first: u64, count: u64) -> Result<(), Self::Error>;
}

/// Decodes page frames into a [`PageSink`]; one per connection that carries pages.
pub struct PageReceiver {
    pages: u64,
    dec: Decompressor,
    scratch: Box<[u8; PAGE]>,
    /// Buffers kept from frame to frame: a batch's index, a compressed page's bytes,
    /// the runs of raw pages one `readv` fills, and those pages' CRCs.
    index: Vec<u8>,
    stored: Vec<u8>,
    runs: Vec<(u64, u64)>,
    crcs: Vec<(u64, u32)>,
}

impl PageReceiver {
    /// For a guest of `pages` pages: a frame naming a page past it is refused.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            dec: Decompressor::new(),
            scratch: Box::new([0; PAGE]),
            index: Vec::new(),
            stored: Vec::new(),
            runs: Vec::new(),
            crcs: Vec::new(),
        }
    }

    /// Reads the payload of the page frame whose header is `header` from `r` straight
    /// into `sink`'s memory, and then checks it. Only for a `Pages` frame and a sink
    /// with [`PageSink::memory`]; anything else goes through [`Self::apply`].
    pub fn read_in_place<S: PageSink, R: Read>(
        &mut self,
        r: &mut BufReader<R>,
        header: &FrameHeader,
        integrity: Integrity,
        sink: &mut S,
    ) -> Result<(), S::Error> {
        let malformed = |reason: String| ProtocolError::Malformed {
            kind: Kind::Pages,
            reason,
        };
        let len = header.len as usize;
        let mut head = [0u8; 8];
        if len < head.len() {
            return Err(malformed(format!("{len} bytes cannot hold a page batch")).into());
        }
        r.read_exact(&mut head).map_err(ProtocolError::from)?;
        let (codec, count) = protocol::batch_head(head)?;
        let index_len = protocol::index_len(count);
        if len < head.len() + index_len {
            return Err(malformed(format!(
                "{len} bytes cannot hold the index of {count} pages"
            ))
            .into());
        }
        let mut index = std::mem::take(&mut self.index);
        index.resize(index_len, 0);
        let landed = (|| -> Result<FrameCrc, S::Error> {
            r.read_exact(&mut index).map_err(ProtocolError::from)?;
            protocol::check_index(&index, len - head.len() - index_len, Some(self.pages))?;
            let mut sum = FrameCrc::new();
            sum.bytes(header.covered());
            sum.bytes(&head);
            sum.bytes(&index);
            self.runs.clear();
            for (page, stored, raw) in protocol::index_entries(&index) {
                if raw {
                    if let Some(last) = self.runs.last_mut()
                        && last.0 + last.1 == page
                        && last.1 < READ_PAGES
                    {
                        last.1 += 1;
                        continue;
                    }
                    // Runs ascend within one read, so no two buffers share a page.
                    let ascending = self.runs.last().is_none_or(|l| page >= l.0 + l.1);
                    if !ascending || self.runs.len() == READ_RUNS {
                        self.land_runs(r, &mut sum, sink)?;
                    }
                    self.runs.push((page, 1));
                    continue;
                }
                self.land_runs(r, &mut sum, sink)?;
                self.stored.resize(stored, 0);
                r.read_exact(&mut self.stored)
                    .map_err(ProtocolError::from)?;
                sum.bytes(&self.stored);
                let memory = in_place(sink)?;
                let dst = page_of(memory, page)?;
                self.dec.decompress(codec, &self.stored, dst)?;
                let crc = crc32fast::hash(dst);
                sink.wrote(page, crc)?;
            }
            self.land_runs(r, &mut sum, sink)?;
            Ok(sum)
        })();
        self.index = index;
        let sum = landed?;
        if integrity == Integrity::Checksum && sum.value() != header.crc {
            return Err(ProtocolError::Checksum {
                kind: Kind::Pages,
                expected: header.crc,
                computed: sum.value(),
            }
            .into());
        }
        Ok(())
    }

    /// Reads the pending runs of raw pages into place: what the reader's buffer holds
    /// of them first, then the rest with one `readv` (or as many as the socket needs)
    /// past the buffer, so that it never takes in page data it would then copy. Then
    /// hashes each page there.
    fn land_runs<S: PageSink, R: Read>(
        &mut self,
        r: &mut BufReader<R>,
        sum: &mut FrameCrc,
        sink: &mut S,
    ) -> Result<(), S::Error> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let memory = in_place(sink)?;
        {
            let mut bufs = Vec::with_capacity(self.runs.len());
            let mut rest: &mut [u8] = memory;
            let mut base = 0usize;
            for &(first, count) in &self.runs {
                // Runs ascend; check_index kept every page inside guest memory.
                let (_, tail) = std::mem::take(&mut rest)
                    .split_at_mut_checked(first as usize * PAGE - base)
                    .ok_or(ProtocolError::PageOutOfRange {
                        page: first,
                        pages: self.pages,
                    })?;
                let (run, tail) = tail.split_at_mut_checked(count as usize * PAGE).ok_or(
                    ProtocolError::PageOutOfRange {
                        page: first + count - 1,
                        pages: self.pages,
                    },
                )?;
                bufs.push(IoSliceMut::new(run));
                rest = tail;
                base = (first + count) as usize * PAGE;
            }
            let mut bufs = &mut bufs[..];
            let buffered = r.buffer();
            let mut took = 0;
            while took < buffered.len() && !bufs.is_empty() {
                let n = bufs[0].len().min(buffered.len() - took);
                bufs[0][..n].copy_from_slice(&buffered[took..took + n]);
                took += n;
                IoSliceMut::advance_slices(&mut bufs, n);
            }
            r.consume(took);
            read_exact_vectored(r.get_mut(), bufs).map_err(ProtocolError::from)?;
        }
        self.crcs.clear();
        for &(first, count) in &self.runs {
            for page in first..first + count {
                let crc = crc32fast::hash(page_of(memory, page)?);
                sum.page(crc);
                self.crcs.push((page, crc));
            }
        }
        self.runs.clear();
        for &(page, crc) in &self.crcs {
            sink.wrote(page, crc)?;
        }
        Ok(())
    }

    /// Applies `frame` to `sink` if it carries pages and says so (`true`); any other
    /// frame is left to the caller (`false`).
    pub fn apply<S: PageSink>(&mut self, frame: &Frame, sink: &mut S) -> Result<bool, S::Error> {
        match frame.kind {
            Kind::Pages => {
                let batch = PageBatch::parse(&frame.payload, Some(self.pages))?;
                for p in batch.pages() {
                    // parse() checked the page number against guest memory.
                    if let Some(memory) = sink.memory() {
                        let dst = page_of(memory, p.page)?;
                        if p.raw {
                            dst.copy_from_slice(p.data);
                        } else {
                            self.dec.decompress(batch.codec, p.data, dst)?;
                        }
                        let crc = crc32fast::hash(dst);
                        sink.wrote(p.page, crc)?;
                    } else if p.raw {
                        sink.fill(p.page, p.data)?;
                    } else {
                        self.dec
                            .decompress(batch.codec, p.data, &mut self.scratch)?;
                        sink.fill(p.page, &self.scratch[..])?;
                    }
                }
                Ok(true)
            }
            Kind::ZeroPages => match Message::decode(frame, Some(self.pages))? {
                Message::ZeroPages { first, count } => {
                    sink.zeros(first, count)?;
                    Ok(true)
                }
                // decode() reads a frame as the message its kind names.
                _ => Ok(false),
            },
            _ => Ok(false),
        }
    }
}

/// Page `page` of `memory` (the frame's index was checked against guest memory, so
/// this only fails on a sink whose memory is not the guest's size).
fn page_of(memory: &mut [u8], page: u64) -> Result<&mut [u8; PAGE], ProtocolError> {
    let pages = (memory.len() / PAGE) as u64;
    let at = page as usize * PAGE;
    memory
        .get_mut(at..at + PAGE)
        .and_then(|p| p.try_into().ok())
        .ok_or(ProtocolError::PageOutOfRange { page, pages })
}

/// The sink's memory, which [`PageReceiver::read_in_place`]'s caller checked it has.
fn in_place<S: PageSink>(sink: &mut S) -> Result<&mut [u8], ProtocolError> {
    sink.memory().ok_or(ProtocolError::Malformed {
        kind: Kind::Pages,
        reason: "pages for memory that cannot be written in place".into(),
    })
}

/// Fills `bufs` whole from `r`, however the reads split.
fn read_exact_vectored(r: &mut impl Read, mut bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<()> {
    while !bufs.is_empty() {
        match r.read_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => IoSliceMut::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::codec::{self, Codec, Compressor, Stored};
    use crate::migration::protocol::PageBatchWriter;

    /// Guest memory and the CRC of each page, as pre-copy's sink keeps them.
    struct Memory {
        bytes: Vec<u8>,
        crcs: Vec<Option<u32>>,
    }

    impl Memory {
        fn new(pages: usize) -> Self {
            Self {
                bytes: vec![0; pages * PAGE],
                crcs: vec![None; pages],
            }
        }
    }

    impl PageSink for Memory {
        type Error = ProtocolError;
        fn memory(&mut self) -> Option<&mut [u8]> {
            Some(&mut self.bytes)
        }
        fn wrote(&mut self, page: u64, crc: u32) -> Result<(), ProtocolError> {
            self.crcs[page as usize] = Some(crc);
            Ok(())
        }
        fn fill(&mut self, _: u64, _: &[u8]) -> Result<(), ProtocolError> {
            unreachable!("this sink writes in place")
        }
        fn zeros(&mut self, _: u64, _: u64) -> Result<(), ProtocolError> {
            unreachable!("no zero runs here")
        }
    }

    fn page(seed: u64, text: bool) -> Vec<u8> {
        let mut s = seed | 1;
        (0..PAGE)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if text { b"ferry "[i % 6] } else { s as u8 }
            })
            .collect()
    }

    /// A Pages frame over plain TCP: each page numbered, compressible ones (`text`)
    /// with lz4, the rest raw.
    fn frame(pages: &[(u64, bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        let at = protocol::begin_frame(&mut out);
        let mut enc = Compressor::new();
        let mut data = Vec::new();
        let mut stored = Vec::new();
        for &(p, text) in pages {
            data.clear();
            let kind = enc.compress(Codec::Lz4, &page(p, text), &mut data).unwrap();
            stored.push((p, kind == Stored::Raw, data.clone()));
        }
        let mut w = PageBatchWriter::new(&mut out, codec::wire_id(Codec::Lz4), pages.len());
        for (p, raw, d) in &stored {
            w.push(*p, *raw, d);
        }
        w.finish();
        protocol::end_frame(&mut out, at, Kind::Pages, Integrity::Checksum).unwrap();
        out
    }

    fn receive(bytes: &[u8], memory: &mut Memory) -> Result<(), ProtocolError> {
        // A small buffer: pages land partly from it, partly past it.
        let mut r = BufReader::with_capacity(5000, bytes);
        let header = protocol::read_header(&mut r, protocol::MAX_PAYLOAD)?;
        let pages = (memory.bytes.len() / PAGE) as u64;
        PageReceiver::new(pages).read_in_place(&mut r, &header, Integrity::Checksum, memory)
    }

    #[test]
    fn raw_and_compressed_pages_land_in_place_with_their_crcs() {
        // Runs, a gap, a page out of order, a compressed page between raw ones.
        let pages = [
            (3, false),
            (4, false),
            (5, false),
            (9, true),
            (10, false),
            (1, false),
            (7, true),
        ];
        let mut memory = Memory::new(16);
        receive(&frame(&pages), &mut memory).unwrap();
        for (p, text) in pages {
            let want = page(p, text);
            let at = p as usize * PAGE;
            assert_eq!(&memory.bytes[at..at + PAGE], &want[..], "page {p}");
            assert_eq!(memory.crcs[p as usize], Some(crc32fast::hash(&want)));
        }
        assert!(memory.crcs[0].is_none() && memory.bytes[..PAGE].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_page_named_twice_lands_as_its_last_copy() {
        let mut memory = Memory::new(4);
        let bytes = frame(&[(2, false), (1, false), (2, false)]);
        receive(&bytes, &mut memory).unwrap();
        assert_eq!(&memory.bytes[2 * PAGE..3 * PAGE], &page(2, false)[..]);
    }

    #[test]
    fn any_flipped_byte_or_cut_fails_the_frame() {
        let good = frame(&[(0, false), (1, true), (2, false)]);
        // A byte in the header's CRC, the batch head, the index, a raw page, the
        // compressed page, the last byte.
        for at in [
            12,
            17,
            30,
            16 + 8 + 36 + 100,
            good.len() - 4200,
            good.len() - 1,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let r = receive(&bad, &mut Memory::new(4));
            assert!(r.is_err(), "flipping byte {at} went unnoticed");
        }
        for cut in [20, 40, good.len() - 1] {
            assert!(
                receive(&good[..cut], &mut Memory::new(4)).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_page_past_guest_memory_is_refused_before_anything_lands() {
        let mut memory = Memory::new(2);
        let r = receive(&frame(&[(0, false), (2, false)]), &mut memory);
        assert!(
            matches!(r, Err(ProtocolError::PageOutOfRange { page: 2, pages: 2 })),
            "{r:?}"
        );
        assert!(memory.crcs.iter().all(Option::is_none));
    }
}
