//! The one place a destination turns page frames (`Pages`, `ZeroPages`) into guest
//! memory, for pre-copy and post-copy alike. What differs is where a page may be
//! written, and that is the sink's business: before the guest runs nothing else sees
//! its memory, so pages are decompressed straight into it; once it runs, a page must
//! appear whole and at once (userfaultfd), so its bytes are staged first.

use super::codec::{CodecError, Decompressor};
use super::protocol::{Frame, Kind, Message, PageBatch, ProtocolError};
use crate::guest::abi::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// Where received pages go.
pub trait PageSink {
    type Error: From<ProtocolError> + From<CodecError>;

    /// The guest page to write `page` into directly, when no vCPU can see it yet;
    /// `None` has the receiver stage the bytes and hand them to [`PageSink::fill`].
    fn direct(&mut self, page: u64) -> Option<&mut [u8; PAGE]>;
    /// `page` was written through [`PageSink::direct`].
    fn wrote(&mut self, page: u64) -> Result<(), Self::Error>;
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
}

impl PageReceiver {
    /// For a guest of `pages` pages: a frame naming a page past it is refused.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            dec: Decompressor::new(),
            scratch: Box::new([0; PAGE]),
        }
    }

    /// Applies `frame` to `sink` if it carries pages and says so (`true`); any other
    /// frame is left to the caller (`false`).
    pub fn apply<S: PageSink>(&mut self, frame: &Frame, sink: &mut S) -> Result<bool, S::Error> {
        match frame.kind {
            Kind::Pages => {
                let batch = PageBatch::parse(&frame.payload, Some(self.pages))?;
                for p in batch.pages() {
                    // parse() checked the page number against guest memory.
                    if let Some(dst) = sink.direct(p.page) {
                        if p.raw {
                            dst.copy_from_slice(p.data);
                        } else {
                            self.dec.decompress(batch.codec, p.data, dst)?;
                        }
                        sink.wrote(p.page)?;
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
