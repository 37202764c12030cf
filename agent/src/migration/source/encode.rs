//! The encoder pool: page batches compressed on worker threads while the send loop
//! writes them in order; and the codec sample a policy plans with.

use super::*;

/// Each codec's ratio and speed on a sample of the working set's non-zero pages, and
/// the share of all guest pages that are zero (also sampled).
pub fn sample_pages(m: &dyn Movable) -> (Vec<crate::migration::codec::CodecSample>, f64) {
    const SAMPLE: u64 = 256;
    // SAFETY: a racy read of guest pages only feeds a measurement.
    let memory = unsafe { m.memory() };
    let ws = m.working_set_pages();
    let (first, ws_pages) = (ws.start, ws.end - ws.start);
    let step = (ws_pages / SAMPLE).max(1);
    let page = |i: u64| {
        let at = (i * PAGE as u64) as usize;
        &memory[at..at + PAGE]
    };
    let pages: Vec<&[u8]> = (0..ws_pages)
        .step_by(step as usize)
        .map(|i| page(first + i))
        .filter(|p| !is_zero(p))
        .take(SAMPLE as usize)
        .collect();
    let codecs = [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3)];
    let all = (memory.len() / PAGE) as u64;
    let probes: Vec<u64> = (0..all).step_by((all / 4096).max(1) as usize).collect();
    let zero = probes.iter().filter(|&&i| is_zero(page(i))).count();
    (
        crate::migration::codec::sample(&codecs, pages.iter().copied()),
        zero as f64 / probes.len().max(1) as f64,
    )
}

/// Compression threads for page batches at most.
pub(super) const MAX_WORKERS: usize = 4;

/// One batch of pages, ready for the wire: its zero runs and one page-batch frame.
pub(in crate::migration) struct Encoded {
    pub(in crate::migration) frames: Vec<u8>,
    pub(in crate::migration) pages_sent: u64,
    pub(in crate::migration) zero_pages: u64,
}

/// Buffers a batch is encoded in, kept and reused: fresh megabytes per batch would
/// cost a host page fault per 4 KiB, which is slow on this kind of host.
#[derive(Default)]
pub(in crate::migration) struct Buffers {
    /// The batch's non-zero pages.
    pub(super) nonzero: Vec<u64>,
    pub(in crate::migration) spare_frames: Vec<Vec<u8>>,
}

/// Encodes `pages` into complete frames (reusing `bufs`).
pub(in crate::migration) fn encode(
    memory: &[u8],
    pages: &[u64],
    codec: Codec,
    compressor: &mut Compressor,
    bufs: &mut Buffers,
    integrity: protocol::Integrity,
) -> Result<Encoded, MigrateError> {
    let mut frames = bufs.spare_frames.pop().unwrap_or_default();
    frames.clear();
    let mut out = Encoded {
        frames,
        pages_sent: 0,
        zero_pages: 0,
    };
    // Zero pages first: they go as runs, and the batch's index has room for exactly
    // the others, so their data is copied once, from guest memory into the frame.
    let nonzero = &mut bufs.nonzero;
    nonzero.clear();
    let mut zero_run: Option<(u64, u64)> = None;
    let mut zero_frames = Vec::new();
    for &page in pages {
        let at = page as usize * PAGE;
        if !is_zero(&memory[at..at + PAGE]) {
            nonzero.push(page);
            continue;
        }
        out.zero_pages += 1;
        zero_run = match zero_run {
            Some((first, n)) if first + n == page => Some((first, n + 1)),
            other => {
                if let Some((first, count)) = other {
                    protocol::send(&mut zero_frames, &Message::ZeroPages { first, count })?;
                }
                Some((page, 1))
            }
        };
    }
    if let Some((first, count)) = zero_run {
        protocol::send(&mut zero_frames, &Message::ZeroPages { first, count })?;
    }
    if !nonzero.is_empty() {
        let frame = protocol::begin_frame(&mut out.frames);
        let mut writer = PageBatchWriter::new(
            &mut out.frames,
            crate::migration::codec::wire_id(codec),
            nonzero.len(),
        );
        if integrity == protocol::Integrity::Checksum {
            writer = writer.hashing();
        }
        let mut scratch = Vec::with_capacity(PAGE + 64);
        for &page in nonzero.iter() {
            let at = page as usize * PAGE;
            // The guest may have written the page since the scan: whatever it holds
            // now is what goes (a write after this copy is in the dirty log).
            let bytes = &memory[at..at + PAGE];
            if codec == Codec::None {
                writer.push(page, true, bytes);
            } else {
                scratch.clear();
                let stored = compressor
                    .compress(codec, bytes, &mut scratch)
                    .map_err(|e| MigrateError::Vm(e.to_string()))?;
                writer.push(page, stored == Stored::Raw, &scratch);
            }
            out.pages_sent += 1;
        }
        match writer.finish() {
            Some(crc) => {
                protocol::end_frame_hashed(&mut out.frames, frame, protocol::Kind::Pages, crc)?
            }
            None => protocol::end_frame(&mut out.frames, frame, protocol::Kind::Pages, integrity)?,
        }
    }
    out.frames.extend_from_slice(&zero_frames);
    Ok(out)
}
