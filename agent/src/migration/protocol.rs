//! Ferry's migration wire protocol: framed, versioned, every frame checksummed.
//! See docs/PROTOCOL.md for the byte layout.
//!
//! Nothing in a frame is trusted: the header's magic, kind and length are checked before
//! the payload is read, the CRC before it is parsed, and every count, length, page number
//! and codec id inside it before use. A frame that fails any check is an error that
//! aborts the migration; it never panics and never writes outside guest memory.

use std::io::{Read, Write};

use super::codec::{self, Codec, CodecError};
use crate::guest::abi::PAGE_SIZE;

pub const MAGIC: [u8; 4] = *b"FRYM";
/// The protocol version this build speaks; the handshake refuses any other.
pub const VERSION: u16 = 11;
pub const HEADER_LEN: usize = 16;
/// Largest payload a frame may announce (a batch of raw pages plus its index fits).
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Pages in one batch at most.
pub const MAX_BATCH_PAGES: u32 = 2048;
/// Disk bytes one `DiskData` frame may stand for (decoded): one copy step.
pub const MAX_DISK_CHUNK: u32 = 512 << 10;
/// `DiskData` encoding: the bytes are all zero and travel as their length only.
pub const DISK_ZERO: u8 = 0xff;
const ENTRY_LEN: usize = 12;
/// Entry length flag: the page is stored raw (the codec did not shrink it).
const RAW_FLAG: u32 = 1 << 31;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    Config = 3,
    Pages = 4,
    ZeroPages = 5,
    RoundEnd = 6,
    DeviceState = 7,
    Complete = 8,
    Ready = 9,
    Commit = 10,
    Resumed = 11,
    Keepalive = 12,
    Abort = 13,
    FirstHeartbeats = 14,
    MemoryDigest = 15,
    RoundAck = 16,
    Resolve = 17,
    Resolved = 18,
    Postcopy = 19,
    FaultChannel = 20,
    PageRequest = 21,
    PostcopyEnd = 22,
    PostcopyDone = 23,
    Recover = 24,
    Missing = 25,
    Prepared = 26,
    Disks = 27,
    DiskData = 28,
    DiskLog = 29,
    Pausing = 30,
    Ping = 31,
    Pong = 32,
    DiskSynced = 33,
    DisksReady = 34,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Config,
            4 => Pages,
            5 => ZeroPages,
            6 => RoundEnd,
            7 => DeviceState,
            8 => Complete,
            9 => Ready,
            10 => Commit,
            11 => Resumed,
            12 => Keepalive,
            13 => Abort,
            14 => FirstHeartbeats,
            15 => MemoryDigest,
            16 => RoundAck,
            17 => Resolve,
            18 => Resolved,
            19 => Postcopy,
            20 => FaultChannel,
            21 => PageRequest,
            22 => PostcopyEnd,
            23 => PostcopyDone,
            24 => Recover,
            25 => Missing,
            26 => Prepared,
            27 => Disks,
            28 => DiskData,
            29 => DiskLog,
            30 => Pausing,
            31 => Ping,
            32 => Pong,
            33 => DiskSynced,
            34 => DisksReady,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("not a Ferry migration stream (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(u32, u32),
    #[error(
        "frame {kind:?} failed its checksum (CRC32 {computed:#010x}, frame says {expected:#010x})"
    )]
    Checksum {
        kind: Kind,
        expected: u32,
        computed: u32,
    },
    #[error("malformed {kind:?} frame: {reason}")]
    Malformed { kind: Kind, reason: String },
    #[error("page {page} is outside guest memory ({pages} pages)")]
    PageOutOfRange { page: u64, pages: u64 },
    #[error("peer speaks protocol version {theirs}, this ferry speaks {ours}")]
    Version { ours: u16, theirs: u16 },
    #[error("{0}")]
    Codec(#[from] CodecError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub name: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub page_size: u32,
    /// How long either side waits on a silent peer before declaring it dead; the
    /// source sends keepalives well within it.
    pub timeout_ms: u32,
    /// Names this migration, so a reconnection after a broken link (post-copy
    /// recovery) can only continue the migration it belongs to.
    pub id: u64,
    /// How long both sides keep trying to restore a broken post-copy link.
    pub recover_ms: u32,
    /// The one-time ticket the destination was given for this migration (empty:
    /// none); a destination started with one refuses any other.
    pub ticket: String,
    /// The migration's W3C trace context (empty: none), for the destination's log.
    pub traceparent: String,
}

/// Whether two secrets are equal, in a time that depends on their lengths only.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Names one migration between its two ends: the source's `id` (in its `Hello`) and
/// the destination's random `secret` (in its `HelloAck`). Every later connection of
/// the same migration (the post-copy fault channel, a recovery, a `Resolve` of a
/// handover in doubt) carries both, so a third party that did not see the handshake
/// cannot join or settle it. It is no defence against a party that can read the
/// stream: that needs the stream encrypted and the peers authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Session {
    pub id: u64,
    pub secret: u128,
}

impl Session {
    /// A fresh secret for migration `id` (from the kernel's random source).
    pub fn new(id: u64) -> std::io::Result<Self> {
        let mut b = [0u8; 16];
        // SAFETY: getrandom writes at most the 16 bytes of the buffer it is given.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            id,
            secret: u128::from_le_bytes(b),
        })
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.secret.to_le_bytes());
    }
}

/// One decoded page of a batch: its number and its bytes as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPage<'a> {
    pub page: u64,
    /// Stored raw (the codec did not shrink it): `data` is the page itself.
    pub raw: bool,
    pub data: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck {
        version: u16,
        /// The destination's half of the [`Session`].
        secret: u128,
    },
    /// The VM's config (TOML) as the source runs it.
    Config {
        toml: String,
    },
    /// Pages: codec id, then (page, encoded bytes, raw?) entries.
    Pages {
        codec: u8,
        pages: Vec<(u64, bool, Vec<u8>)>,
    },
    /// `count` zero pages from `first` on, sent as a run rather than data.
    ZeroPages {
        first: u64,
        count: u64,
    },
    RoundEnd {
        round: u32,
    },
    /// vCPU, irqchip, clock and device state (a versioned blob of its own).
    DeviceState {
        blob: Vec<u8>,
    },
    /// The source is paused and has sent everything.
    Complete {
        pages_sent: u64,
    },
    Ready,
    Commit,
    Resumed,
    Keepalive,
    Abort {
        reason: String,
    },
    /// Destination → source after resuming: CLOCK_MONOTONIC (ns) of each vCPU's first
    /// heartbeat there, so the source can measure downtime per vCPU.
    FirstHeartbeats {
        ns: Vec<u64>,
    },
    /// Destination → source: the digest of guest memory as it landed (see [`digest`]).
    MemoryDigest {
        digest: u32,
    },
    /// Destination → source: everything up to this round's end has landed. The source
    /// times rounds by it, so its bandwidth and downtime predictions see the whole
    /// pipeline, not just its own socket buffer.
    RoundAck {
        round: u32,
    },
    /// Source → destination on a new connection, to settle a handover in doubt: did the
    /// source record the handover (and send Commit)?
    Resolve {
        session: Session,
        committed: bool,
    },
    /// Destination's answer: whether the guest now runs there.
    Resolved {
        running: bool,
    },
    /// Source → destination at a post-copy switch, before the device state: the pages
    /// the destination does not have current (a bitmap, bit per page). The guest will
    /// run there on `Commit` and fetch these on demand while the source pushes them.
    Postcopy {
        missing: Vec<u64>,
    },
    /// First message on the post-copy fault channel, a second connection that carries
    /// only page requests and their answers so they never queue behind the push.
    FaultChannel {
        session: Session,
    },
    /// Destination → source on the fault channel: a vCPU waits for this page.
    PageRequest {
        page: u64,
    },
    /// Source → destination: every missing page has been pushed.
    PostcopyEnd,
    /// Destination → source: every page is here; what post-copy cost the guest.
    PostcopyDone(PostcopyFigures),
    /// Source → destination on a new connection after the link broke in post-copy.
    Recover {
        session: Session,
    },
    /// Destination's answer to `Recover`: the pages it still lacks (bitmap).
    Missing {
        missing: Vec<u64>,
    },
    /// Destination → source: the VM is built and its memory mapped; a pause from now
    /// on waits for nothing but the transfer.
    Prepared,
    /// Source → destination, post-copy: the pause begins now, and the handover follows.
    Pausing,
    /// Source → destination, after the config, when the disks travel with the VM
    /// (`--copy-storage`): each disk's id and size in bytes.
    Disks {
        disks: Vec<(String, u64)>,
    },
    /// Source → destination: `len` bytes of disk `disk` at `offset` (both whole
    /// sectors), as `encoding` says: a page codec's id ([`codec::wire_id`]; 0 is raw), or
    /// [`DISK_ZERO`] for zeroes (no data: the destination punches a hole).
    DiskData {
        disk: u32,
        offset: u64,
        len: u32,
        encoding: u8,
        data: Vec<u8>,
    },
    /// Source → destination, paused: the disk's write log, compacted to the last
    /// acknowledged generation per block, as (offset u64, generation u64) records.
    DiskLog {
        disk: u32,
        records: Vec<u8>,
    },
    /// Source → destination, between rounds: answer at once. The round trip on an
    /// idle stream is what each exchange of the handover costs beside its work.
    Ping {
        seq: u32,
    },
    /// Destination → source: the answer to `Ping { seq }`.
    Pong {
        seq: u32,
    },
    /// Destination → source, before a `RoundAck` (disks travelling): how long its last
    /// sync of the copies took, microseconds (what the pause's sync will cost, measured
    /// on its own storage).
    DiskSynced {
        us: u32,
    },
    /// Destination → source, the answer to `Disks`: the copies exist, and what its
    /// datastore took to write and sync `bytes` of zeros into the first copy
    /// (`write_us`) and to rewrite one block and sync the file whole (`flush_us`, the
    /// median of three), microseconds: what the pause's sync costs, measured on its
    /// own storage before the copy begins.
    DisksReady {
        flush_us: u32,
        write_us: u32,
        bytes: u32,
    },
}

/// What post-copy cost the guest, measured on the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostcopyFigures {
    pub faults: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    /// Sum of every fault's wait: the time vCPUs (and the VMM) spent blocked.
    pub blocked_us: u64,
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::HelloAck { .. } => Kind::HelloAck,
            Message::Config { .. } => Kind::Config,
            Message::Pages { .. } => Kind::Pages,
            Message::ZeroPages { .. } => Kind::ZeroPages,
            Message::RoundEnd { .. } => Kind::RoundEnd,
            Message::DeviceState { .. } => Kind::DeviceState,
            Message::Complete { .. } => Kind::Complete,
            Message::Ready => Kind::Ready,
            Message::Commit => Kind::Commit,
            Message::Resumed => Kind::Resumed,
            Message::Keepalive => Kind::Keepalive,
            Message::Abort { .. } => Kind::Abort,
            Message::FirstHeartbeats { .. } => Kind::FirstHeartbeats,
            Message::MemoryDigest { .. } => Kind::MemoryDigest,
            Message::RoundAck { .. } => Kind::RoundAck,
            Message::Resolve { .. } => Kind::Resolve,
            Message::Resolved { .. } => Kind::Resolved,
            Message::Postcopy { .. } => Kind::Postcopy,
            Message::FaultChannel { .. } => Kind::FaultChannel,
            Message::PageRequest { .. } => Kind::PageRequest,
            Message::PostcopyEnd => Kind::PostcopyEnd,
            Message::PostcopyDone(_) => Kind::PostcopyDone,
            Message::Recover { .. } => Kind::Recover,
            Message::Missing { .. } => Kind::Missing,
            Message::Prepared => Kind::Prepared,
            Message::Pausing => Kind::Pausing,
            Message::Disks { .. } => Kind::Disks,
            Message::DiskData { .. } => Kind::DiskData,
            Message::DiskLog { .. } => Kind::DiskLog,
            Message::Ping { .. } => Kind::Ping,
            Message::Pong { .. } => Kind::Pong,
            Message::DiskSynced { .. } => Kind::DiskSynced,
            Message::DisksReady { .. } => Kind::DisksReady,
        }
    }

    /// The payload bytes of this message's frame.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => {
                out.extend_from_slice(&h.version.to_le_bytes());
                out.extend_from_slice(&h.page_size.to_le_bytes());
                out.extend_from_slice(&h.memory_bytes.to_le_bytes());
                out.extend_from_slice(&h.vcpus.to_le_bytes());
                out.extend_from_slice(&h.timeout_ms.to_le_bytes());
                out.extend_from_slice(&h.id.to_le_bytes());
                out.extend_from_slice(&h.recover_ms.to_le_bytes());
                put_str(out, &h.name);
                put_str(out, &h.ticket);
                put_str(out, &h.traceparent);
            }
            Message::HelloAck { version, secret } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&secret.to_le_bytes());
            }
            Message::Config { toml } => put_str(out, toml),
            Message::Pages { codec, pages } => {
                let mut batch = PageBatchWriter::new(out, *codec, pages.len());
                for (page, raw, data) in pages {
                    batch.push(*page, *raw, data);
                }
                batch.finish();
            }
            Message::ZeroPages { first, count } => {
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            Message::RoundEnd { round }
            | Message::RoundAck { round }
            | Message::Ping { seq: round }
            | Message::Pong { seq: round }
            | Message::DiskSynced { us: round } => out.extend_from_slice(&round.to_le_bytes()),
            Message::DisksReady {
                flush_us,
                write_us,
                bytes,
            } => {
                for v in [flush_us, write_us, bytes] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Message::DeviceState { blob } => out.extend_from_slice(blob),
            Message::Complete { pages_sent } => out.extend_from_slice(&pages_sent.to_le_bytes()),
            Message::Ready
            | Message::Commit
            | Message::Resumed
            | Message::Keepalive
            | Message::PostcopyEnd
            | Message::Prepared
            | Message::Pausing => {}
            Message::Postcopy { missing } | Message::Missing { missing } => {
                for w in missing {
                    out.extend_from_slice(&w.to_le_bytes());
                }
            }
            Message::FaultChannel { session } | Message::Recover { session } => session.put(out),
            Message::PageRequest { page } => out.extend_from_slice(&page.to_le_bytes()),
            Message::Disks { disks } => {
                out.extend_from_slice(&(disks.len() as u32).to_le_bytes());
                for (id, size) in disks {
                    put_str(out, id);
                    out.extend_from_slice(&size.to_le_bytes());
                }
            }
            Message::DiskData {
                disk,
                offset,
                len,
                encoding,
                data,
            } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.push(*encoding);
                out.extend_from_slice(data);
            }
            Message::DiskLog { disk, records } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(records);
            }
            Message::PostcopyDone(f) => {
                for v in [f.faults, f.latency_p50_us, f.latency_p99_us, f.blocked_us] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Message::Abort { reason } => put_str(out, reason),
            Message::MemoryDigest { digest } => out.extend_from_slice(&digest.to_le_bytes()),
            Message::Resolve { session, committed } => {
                session.put(out);
                out.push(u8::from(*committed));
            }
            Message::Resolved { running } => out.push(u8::from(*running)),
            Message::FirstHeartbeats { ns } => {
                out.extend_from_slice(&(ns.len() as u32).to_le_bytes());
                for v in ns {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }

    /// Parses a checked frame. `guest_pages` bounds page numbers once the handshake has
    /// told the size of guest memory.
    pub fn decode(frame: &Frame, guest_pages: Option<u64>) -> Result<Self, ProtocolError> {
        let kind = frame.kind;
        let mut r = Cursor::new(kind, &frame.payload);
        // A peer of another version may lay out its handshake differently: its
        // version is read first, and is all that is read, so the refusal names it.
        if matches!(kind, Kind::Hello | Kind::HelloAck) {
            let version = r.u16()?;
            if version != VERSION {
                return Ok(match kind {
                    Kind::Hello => Message::Hello(Hello {
                        version,
                        name: String::new(),
                        memory_bytes: 0,
                        vcpus: 0,
                        page_size: 0,
                        timeout_ms: 0,
                        id: 0,
                        recover_ms: 0,
                        ticket: String::new(),
                        traceparent: String::new(),
                    }),
                    _ => Message::HelloAck { version, secret: 0 },
                });
            }
            r = Cursor::new(kind, &frame.payload);
        }
        let msg = match kind {
            Kind::Hello => Message::Hello(Hello {
                version: r.u16()?,
                page_size: r.u32()?,
                memory_bytes: r.u64()?,
                vcpus: r.u32()?,
                timeout_ms: r.u32()?,
                id: r.u64()?,
                recover_ms: r.u32()?,
                name: r.string()?,
                ticket: r.string()?,
                traceparent: r.string()?,
            }),
            Kind::HelloAck => Message::HelloAck {
                version: r.u16()?,
                secret: r.u128()?,
            },
            Kind::Config => Message::Config { toml: r.string()? },
            Kind::Pages => {
                let batch = PageBatch::parse(&frame.payload, guest_pages)?;
                return Ok(Message::Pages {
                    codec: codec::wire_id(batch.codec),
                    pages: batch
                        .pages()
                        .map(|p| (p.page, p.raw, p.data.to_vec()))
                        .collect(),
                });
            }
            Kind::ZeroPages => {
                let (first, count) = (r.u64()?, r.u64()?);
                if let Some(pages) = guest_pages {
                    let end = first.saturating_add(count);
                    if count == 0 || end > pages {
                        return Err(ProtocolError::PageOutOfRange {
                            page: end.saturating_sub(1),
                            pages,
                        });
                    }
                }
                Message::ZeroPages { first, count }
            }
            Kind::RoundEnd => Message::RoundEnd { round: r.u32()? },
            Kind::RoundAck => Message::RoundAck { round: r.u32()? },
            Kind::Resolve => Message::Resolve {
                session: r.session()?,
                committed: r.flag()?,
            },
            Kind::Resolved => Message::Resolved { running: r.flag()? },
            Kind::Postcopy => Message::Postcopy {
                missing: r.bitmap(guest_pages)?,
            },
            Kind::Missing => Message::Missing {
                missing: r.bitmap(guest_pages)?,
            },
            Kind::FaultChannel => Message::FaultChannel {
                session: r.session()?,
            },
            Kind::Recover => Message::Recover {
                session: r.session()?,
            },
            Kind::PageRequest => {
                let page = r.u64()?;
                if let Some(pages) = guest_pages
                    && page >= pages
                {
                    return Err(ProtocolError::PageOutOfRange { page, pages });
                }
                Message::PageRequest { page }
            }
            Kind::PostcopyEnd => Message::PostcopyEnd,
            Kind::Prepared => Message::Prepared,
            Kind::Pausing => Message::Pausing,
            Kind::Ping => Message::Ping { seq: r.u32()? },
            Kind::Pong => Message::Pong { seq: r.u32()? },
            Kind::DiskSynced => Message::DiskSynced { us: r.u32()? },
            Kind::DisksReady => Message::DisksReady {
                flush_us: r.u32()?,
                write_us: r.u32()?,
                bytes: r.u32()?,
            },
            Kind::Disks => {
                let n = r.u32()?;
                if n > 64 {
                    return Err(r.malformed(format!("{n} disks")));
                }
                let disks = (0..n)
                    .map(|_| Ok((r.string()?, r.u64()?)))
                    .collect::<Result<_, ProtocolError>>()?;
                Message::Disks { disks }
            }
            Kind::DiskData => {
                let (disk, offset, len, encoding) = (r.u32()?, r.u64()?, r.u32()?, r.u8()?);
                let data = r.take(r.buf.len())?.to_vec();
                if len == 0
                    || len > MAX_DISK_CHUNK
                    || !len.is_multiple_of(512)
                    || !offset.is_multiple_of(512)
                {
                    return Err(r.malformed(format!(
                        "{len} bytes at offset {offset} are not whole sectors (or too many)"
                    )));
                }
                let fits = match encoding {
                    0 => data.len() == len as usize,
                    DISK_ZERO => data.is_empty(),
                    id => {
                        codec::from_wire_id(id).map_err(|e| r.malformed(e.to_string()))?;
                        !data.is_empty() && data.len() < len as usize
                    }
                };
                if !fits {
                    return Err(r.malformed(format!(
                        "{} bytes of data for {len} disk bytes in encoding {encoding}",
                        data.len()
                    )));
                }
                Message::DiskData {
                    disk,
                    offset,
                    len,
                    encoding,
                    data,
                }
            }
            Kind::DiskLog => {
                let disk = r.u32()?;
                let records = r.take(r.buf.len())?.to_vec();
                if records.len() % 16 != 0 {
                    return Err(r.malformed(format!("{} bytes of log records", records.len())));
                }
                Message::DiskLog { disk, records }
            }
            Kind::PostcopyDone => Message::PostcopyDone(PostcopyFigures {
                faults: r.u64()?,
                latency_p50_us: r.u64()?,
                latency_p99_us: r.u64()?,
                blocked_us: r.u64()?,
            }),
            Kind::DeviceState => {
                return Ok(Message::DeviceState {
                    blob: frame.payload.clone(),
                });
            }
            Kind::Complete => Message::Complete {
                pages_sent: r.u64()?,
            },
            Kind::Ready => Message::Ready,
            Kind::Commit => Message::Commit,
            Kind::Resumed => Message::Resumed,
            Kind::Keepalive => Message::Keepalive,
            Kind::Abort => Message::Abort {
                reason: r.string()?,
            },
            Kind::MemoryDigest => Message::MemoryDigest { digest: r.u32()? },
            Kind::FirstHeartbeats => {
                let n = r.u32()?;
                if n > crate::vmm::config::MAX_VCPUS {
                    return Err(r.malformed(format!("{n} vCPUs")));
                }
                let ns = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
                Message::FirstHeartbeats { ns }
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Bounds-checked little-endian reads from a payload.
struct Cursor<'a> {
    kind: Kind,
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(kind: Kind, buf: &'a [u8]) -> Self {
        Self { kind, buf }
    }

    fn malformed(&self, reason: impl Into<String>) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.malformed(format!("{} bytes left, {n} needed", self.buf.len())));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn flag(&mut self) -> Result<bool, ProtocolError> {
        match self.array::<1>()? {
            [0] => Ok(false),
            [1] => Ok(true),
            [v] => Err(self.malformed(format!("flag byte {v}"))),
        }
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn u128(&mut self) -> Result<u128, ProtocolError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    fn session(&mut self) -> Result<Session, ProtocolError> {
        Ok(Session {
            id: self.u64()?,
            secret: self.u128()?,
        })
    }

    /// A page bitmap: one bit per guest page, in little-endian u64 words, exactly as
    /// many words as guest memory needs (and no bit set past its end).
    fn bitmap(&mut self, guest_pages: Option<u64>) -> Result<Vec<u64>, ProtocolError> {
        let words = self.buf.len() / 8;
        if let Some(pages) = guest_pages
            && (words as u64 != pages.div_ceil(64) || !self.buf.len().is_multiple_of(8))
        {
            return Err(self.malformed(format!(
                "a bitmap of {} bytes for {pages} pages",
                self.buf.len()
            )));
        }
        let bits: Vec<u64> = (0..words).map(|_| self.u64()).collect::<Result<_, _>>()?;
        if let Some(pages) = guest_pages
            && pages % 64 != 0
            && let Some(last) = bits.last()
            && last >> (pages % 64) != 0
        {
            return Err(self.malformed("bits set past the end of guest memory"));
        }
        Ok(bits)
    }

    fn string(&mut self) -> Result<String, ProtocolError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed("text is not UTF-8"))
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

/// Builds a page batch payload in place at the end of `out`: room for the index of
/// the `count` pages the caller will push is made first, and each page's data is
/// appended after it as it comes, so the pages are copied once.
pub struct PageBatchWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    reserved: usize,
    pushed: usize,
    /// The CRC32 of the pages' bytes so far, when [`PageBatchWriter::hashing`]:
    /// each page hashed as it is copied in, while it is still in the cache, rather
    /// than the whole frame in a second pass once it is built.
    data: Option<crc32fast::Hasher>,
}

impl<'a> PageBatchWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>, codec: u8, count: usize) -> Self {
        let start = out.len();
        out.extend_from_slice(&[codec, 0, 0, 0, 0, 0, 0, 0]);
        out.resize(start + 8 + count * ENTRY_LEN, 0);
        Self {
            out,
            start,
            reserved: count,
            pushed: 0,
            data: None,
        }
    }

    /// Hashes the batch as it is built; [`PageBatchWriter::finish`] then returns the
    /// payload's CRC32, for [`end_frame_hashed`].
    pub fn hashing(mut self) -> Self {
        self.data = Some(crc32fast::Hasher::new());
        self
    }

    pub fn push(&mut self, page: u64, raw: bool, data: &[u8]) {
        let len = data.len() as u32 | if raw { RAW_FLAG } else { 0 };
        if self.pushed == self.reserved {
            // More than announced: make room (a copy of the data so far; callers
            // announce the count they push).
            let at = self.start + 8 + self.reserved * ENTRY_LEN;
            self.out.splice(at..at, [0u8; ENTRY_LEN]);
            self.reserved += 1;
        }
        let at = self.start + 8 + self.pushed * ENTRY_LEN;
        self.out[at..at + 8].copy_from_slice(&page.to_le_bytes());
        self.out[at + 8..at + ENTRY_LEN].copy_from_slice(&len.to_le_bytes());
        self.pushed += 1;
        let at = self.out.len();
        self.out.extend_from_slice(data);
        // The copy, never `data` again: that may be guest memory a running guest
        // writes to between the two reads.
        if let Some(h) = &mut self.data {
            h.update(&self.out[at..]);
        }
    }

    pub fn len(&self) -> usize {
        self.pushed
    }

    pub fn is_empty(&self) -> bool {
        self.pushed == 0
    }

    /// Writes the count in front of the index (and drops index room left unused);
    /// when hashing, returns the CRC32 of the whole payload.
    pub fn finish(self) -> Option<u32> {
        let used = self.start + 8 + self.pushed * ENTRY_LEN;
        let reserved = self.start + 8 + self.reserved * ENTRY_LEN;
        if used < reserved {
            self.out.drain(used..reserved);
        }
        self.out[self.start + 4..self.start + 8]
            .copy_from_slice(&(self.pushed as u32).to_le_bytes());
        self.data.map(|data| {
            let mut h = crc32fast::Hasher::new();
            h.update(&self.out[self.start..used]);
            h.combine(&data);
            h.finalize()
        })
    }
}

/// Starts a frame in place at the end of `out`: its header is filled in by
/// [`end_frame`] once the payload after it is complete (no copy of the payload).
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    at
}

/// Completes the frame [`begin_frame`] started at `at`: everything after its header
/// is its payload.
pub fn end_frame(
    out: &mut [u8],
    at: usize,
    kind: Kind,
    integrity: Integrity,
) -> Result<(), ProtocolError> {
    let len = out.len() - at - HEADER_LEN;
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or(ProtocolError::TooLarge(u32::MAX, MAX_PAYLOAD))?;
    let (header, payload) = out[at..].split_at_mut(HEADER_LEN);
    header[..4].copy_from_slice(&MAGIC);
    header[4] = kind as u8;
    header[5..8].fill(0);
    header[8..12].copy_from_slice(&len.to_le_bytes());
    let sum = match integrity {
        Integrity::Checksum => crc(header, payload),
        Integrity::Transport => 0,
    };
    header[12..16].copy_from_slice(&sum.to_le_bytes());
    Ok(())
}

/// A page batch's first 8 bytes, checked: its codec and page count.
pub fn batch_head(head: [u8; 8]) -> Result<(Codec, u32), ProtocolError> {
    let codec = codec::from_wire_id(head[0])?;
    let count = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if count == 0 || count > MAX_BATCH_PAGES {
        return Err(ProtocolError::Malformed {
            kind: Kind::Pages,
            reason: format!("{count} pages (1..={MAX_BATCH_PAGES} allowed)"),
        });
    }
    Ok((codec, count))
}

/// The bytes of a batch's index for `count` pages.
pub fn index_len(count: u32) -> usize {
    count as usize * ENTRY_LEN
}

/// One page of a batch's index: its number, its stored length and whether it is
/// stored raw. Only for an index [`check_index`] passed.
pub fn index_entries(index: &[u8]) -> impl Iterator<Item = (u64, usize, bool)> + '_ {
    index.chunks_exact(ENTRY_LEN).map(|e| {
        let page = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
        let len_raw = u32::from_le_bytes(e[8..12].try_into().unwrap_or_default());
        (
            page,
            (len_raw & !RAW_FLAG) as usize,
            len_raw & RAW_FLAG != 0,
        )
    })
}

/// Checks a batch's index against the `data` bytes that follow it and guest memory:
/// every page inside it, every length possible, the lengths adding up.
pub fn check_index(
    index: &[u8],
    data: usize,
    guest_pages: Option<u64>,
) -> Result<(), ProtocolError> {
    let mut total = 0usize;
    for (page, len, raw) in index_entries(index) {
        if let Some(pages) = guest_pages
            && page >= pages
        {
            return Err(ProtocolError::PageOutOfRange { page, pages });
        }
        if len == 0 || len > PAGE_SIZE as usize || (raw && len != PAGE_SIZE as usize) {
            return Err(ProtocolError::Malformed {
                kind: Kind::Pages,
                reason: format!("page {page} has {len} bytes"),
            });
        }
        total += len;
    }
    if total != data {
        return Err(ProtocolError::Malformed {
            kind: Kind::Pages,
            reason: format!("index names {total} bytes of pages, frame carries {data}"),
        });
    }
    Ok(())
}

/// As [`end_frame`] over plain TCP, for a payload whose CRC32 is known already
/// (`payload_crc`, from [`PageBatchWriter::finish`]).
pub fn end_frame_hashed(
    out: &mut [u8],
    at: usize,
    kind: Kind,
    payload_crc: u32,
) -> Result<(), ProtocolError> {
    end_frame(out, at, kind, Integrity::Transport)?;
    let len = (out.len() - at - HEADER_LEN) as u64;
    let header = &mut out[at..at + HEADER_LEN];
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..12]);
    h.combine(&crc32fast::Hasher::new_with_initial_len(payload_crc, len));
    header[12..16].copy_from_slice(&h.finalize().to_le_bytes());
    Ok(())
}

/// A checked view of a page batch payload.
pub struct PageBatch<'a> {
    pub codec: Codec,
    index: &'a [u8],
    data: &'a [u8],
}

impl<'a> PageBatch<'a> {
    pub fn parse(payload: &'a [u8], guest_pages: Option<u64>) -> Result<Self, ProtocolError> {
        let mut r = Cursor::new(Kind::Pages, payload);
        let (codec, count) = batch_head(r.array::<8>()?)?;
        let index = r.take(count as usize * ENTRY_LEN)?;
        let data = r.buf;
        check_index(index, data.len(), guest_pages)?;
        Ok(Self { codec, index, data })
    }

    pub fn len(&self) -> usize {
        self.index.len() / ENTRY_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn pages(&self) -> impl Iterator<Item = BatchPage<'a>> + '_ {
        let mut at = 0usize;
        let data = self.data;
        index_entries(self.index).map(move |(page, len, raw)| {
            // Lengths were checked in `parse`, so these slices are in bounds.
            let bytes = &data[at..at + len];
            at += len;
            BatchPage {
                page,
                raw,
                data: bytes,
            }
        })
    }
}

/// What guards a frame's bytes in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// The frame's own CRC-32 (plain TCP).
    Checksum,
    /// The transport's: every TLS record is authenticated, which checks the same
    /// bytes as a frame's CRC would, and more strongly. Bulk frames go with a zero
    /// CRC and no frame's CRC is checked. Each end knows this of its own connection,
    /// never from the wire.
    Transport,
}

/// A frame whose header and checksum have been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

fn crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..12]);
    h.update(payload);
    h.finalize()
}

/// Writes one frame around `payload`.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    write_frame_as(w, kind, payload, Integrity::Checksum)
}

/// As [`write_frame`], leaving the CRC out where the transport authenticates.
pub fn write_frame_as(
    w: &mut impl Write,
    kind: Kind,
    payload: &[u8],
    integrity: Integrity,
) -> Result<(), ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = kind as u8;
    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let sum = match integrity {
        Integrity::Checksum => crc(&header, payload),
        Integrity::Transport => 0,
    };
    header[12..16].copy_from_slice(&sum.to_le_bytes());
    w.write_all(&header)?;
    w.write_all(payload)?;
    Ok(())
}

/// Encodes and writes one message.
pub fn send(w: &mut impl Write, msg: &Message) -> Result<(), ProtocolError> {
    let mut payload = Vec::new();
    msg.encode_payload(&mut payload);
    write_frame(w, msg.kind(), &payload)
}

/// Reads and checks one frame. A clean end of stream before a header is `Closed`.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    let mut payload = Vec::new();
    let kind = read_frame_into(r, &mut payload)?;
    Ok(Frame { kind, payload })
}

/// As [`read_frame`], into a buffer the caller reuses (the receive loop: no fresh,
/// zeroed megabyte per frame).
pub fn read_frame_into(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, ProtocolError> {
    read_frame_within(r, payload, MAX_PAYLOAD)
}

/// As [`read_frame_into`], on a connection whose transport may check the frame's
/// bytes already (see [`Integrity`]).
pub fn read_frame_as(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
    integrity: Integrity,
) -> Result<Kind, ProtocolError> {
    read_frame_checked(r, payload, MAX_PAYLOAD, integrity)
}

/// As [`read_frame_into`], refusing a payload over `max` bytes before reading it. A
/// connection's first frame is small; a stranger must not make the destination
/// allocate a full frame for it.
pub fn read_frame_within(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
    max: u32,
) -> Result<Kind, ProtocolError> {
    read_frame_checked(r, payload, max, Integrity::Checksum)
}

fn read_frame_checked(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
    max: u32,
    integrity: Integrity,
) -> Result<Kind, ProtocolError> {
    let header = read_header(r, max)?;
    read_payload(r, &header, payload, integrity)?;
    Ok(header.kind)
}

/// A frame's header, read and checked (magic, kind, length) before its payload.
pub struct FrameHeader {
    pub kind: Kind,
    pub len: u32,
    /// The CRC the sender put in.
    pub crc: u32,
    bytes: [u8; HEADER_LEN],
}

impl FrameHeader {
    /// The header bytes the frame's CRC covers, in front of the payload.
    pub fn covered(&self) -> &[u8] {
        &self.bytes[..12]
    }
}

/// Reads and checks a frame's header, refusing a payload over `max` bytes. A clean
/// end of stream before it is `Closed`.
pub fn read_header(r: &mut impl Read, max: u32) -> Result<FrameHeader, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => {
                return Err(ProtocolError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let kind = Kind::from_u8(header[4]).ok_or(ProtocolError::UnknownKind(header[4]))?;
    let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if len > max {
        return Err(ProtocolError::TooLarge(len, max));
    }
    Ok(FrameHeader {
        kind,
        len,
        crc: u32::from_le_bytes([header[12], header[13], header[14], header[15]]),
        bytes: header,
    })
}

/// Reads the payload of the frame whose header is `header` into `payload`, and checks
/// it against the header's CRC where the transport does not check it already.
pub fn read_payload(
    r: &mut impl Read,
    header: &FrameHeader,
    payload: &mut Vec<u8>,
    integrity: Integrity,
) -> Result<(), ProtocolError> {
    payload.resize(header.len as usize, 0);
    r.read_exact(payload)?;
    if integrity == Integrity::Transport {
        return Ok(());
    }
    let computed = crc(&header.bytes, payload);
    if header.crc != computed {
        return Err(ProtocolError::Checksum {
            kind: header.kind,
            expected: header.crc,
            computed,
        });
    }
    Ok(())
}

/// Reads, checks and parses one message.
pub fn recv(r: &mut impl Read, guest_pages: Option<u64>) -> Result<Message, ProtocolError> {
    let frame = read_frame(r)?;
    Message::decode(&frame, guest_pages)
}

/// Digest of guest memory: CRC32 over every page's CRC32, in page order. Per page so
/// that a destination can keep it up to date as pages land, and the final value costs
/// nothing at switchover.
pub fn digest(page_crcs: &[u32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for c in page_crcs {
        h.update(&c.to_le_bytes());
    }
    h.finalize()
}

/// Per-page CRC32s of a memory image (the source computes these over its frozen copy,
/// after the handover: its time counts in the migration's total, so it is split
/// across the host's cores, up to four).
pub fn page_crcs(memory: &[u8]) -> Vec<u32> {
    let page = PAGE_SIZE as usize;
    let mut crcs = vec![0u32; memory.len().div_ceil(page)];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let per = crcs.len().div_ceil(threads).max(1);
    let hash = |out: &mut [u32], mem: &[u8]| {
        for (c, p) in out.iter_mut().zip(mem.chunks(page)) {
            *c = crc32fast::hash(p);
        }
    };
    let spawned = std::thread::scope(|s| {
        crcs.chunks_mut(per)
            .zip(memory.chunks(per * page))
            .map(|(out, mem)| {
                std::thread::Builder::new()
                    .name("digest".into())
                    .spawn_scoped(s, move || hash(out, mem))
                    .is_ok()
            })
            // Collected first: every chunk gets its thread, whichever failed.
            .collect::<Vec<bool>>()
            .into_iter()
            .all(|ok| ok)
    });
    if !spawned {
        hash(&mut crcs, memory);
    }
    crcs
}

/// Checks a peer's hello against ours: same protocol version and page size.
pub fn check_hello(theirs: &Hello) -> Result<(), ProtocolError> {
    if theirs.version != VERSION {
        return Err(ProtocolError::Version {
            ours: VERSION,
            theirs: theirs.version,
        });
    }
    if u64::from(theirs.page_size) != PAGE_SIZE {
        return Err(ProtocolError::Malformed {
            kind: Kind::Hello,
            reason: format!(
                "page size {} (this host uses {PAGE_SIZE})",
                theirs.page_size
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(msg: &Message, pages: Option<u64>) -> Message {
        let mut wire = Vec::new();
        send(&mut wire, msg).unwrap();
        recv(&mut wire.as_slice(), pages).unwrap()
    }

    const SESSION: Session = Session {
        id: 7,
        secret: u128::MAX - 5,
    };

    fn sample_messages() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: VERSION,
                name: "lab1".into(),
                memory_bytes: 1 << 30,
                vcpus: 2,
                page_size: 4096,
                timeout_ms: 5000,
                id: 42,
                recover_ms: 60_000,
                ticket: "one-time".into(),
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            }),
            Message::HelloAck {
                version: VERSION,
                secret: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
            },
            Message::Config {
                toml: "name = \"x\"\n".into(),
            },
            Message::Pages {
                codec: 1,
                pages: vec![(3, false, vec![1, 2, 3]), (9, true, vec![7; 4096])],
            },
            Message::ZeroPages {
                first: 10,
                count: 5,
            },
            Message::RoundEnd { round: 4 },
            Message::DeviceState { blob: vec![9; 100] },
            Message::Complete { pages_sent: 77 },
            Message::Ready,
            Message::Commit,
            Message::Resumed,
            Message::Keepalive,
            Message::Abort {
                reason: "cancelled".into(),
            },
            Message::FirstHeartbeats { ns: vec![5, 6] },
            Message::Postcopy {
                missing: vec![u64::MAX, 0b1011],
            },
            Message::Missing {
                missing: vec![0, 1],
            },
            Message::FaultChannel { session: SESSION },
            Message::Recover { session: SESSION },
            Message::Resolve {
                session: SESSION,
                committed: true,
            },
            Message::Resolved { running: false },
            Message::PageRequest { page: 99 },
            Message::PostcopyEnd,
            Message::Prepared,
            Message::Pausing,
            Message::Ping { seq: 3 },
            Message::Pong { seq: 3 },
            Message::DiskSynced { us: 12_345 },
            Message::DisksReady {
                flush_us: 900,
                write_us: 12_000,
                bytes: 4 << 20,
            },
            Message::Disks {
                disks: vec![("root".into(), 1 << 30), ("data".into(), 512)],
            },
            Message::DiskData {
                disk: 1,
                offset: 4096,
                len: 1024,
                encoding: 0,
                data: vec![7; 1024],
            },
            Message::DiskData {
                disk: 0,
                offset: 512,
                len: 65536,
                encoding: DISK_ZERO,
                data: Vec::new(),
            },
            Message::DiskData {
                disk: 0,
                offset: 0,
                len: 4096,
                encoding: codec::wire_id(Codec::Lz4),
                data: vec![1; 20],
            },
            Message::DiskLog {
                disk: 0,
                records: vec![1; 32],
            },
            Message::PostcopyDone(PostcopyFigures {
                faults: 3,
                latency_p50_us: 100,
                latency_p99_us: 900,
                blocked_us: 1200,
            }),
            Message::MemoryDigest {
                digest: 0xdead_beef,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in sample_messages() {
            assert_eq!(round_trip(&m, Some(100)), m);
        }
    }

    #[test]
    fn corruption_is_named() {
        let msg = Message::Pages {
            codec: 0,
            pages: vec![(1, true, vec![5; 4096])],
        };
        let mut wire = Vec::new();
        send(&mut wire, &msg).unwrap();
        let at = |i: usize| {
            let mut w = wire.clone();
            w[i] ^= 0x80;
            recv(&mut w.as_slice(), Some(16)).unwrap_err()
        };
        assert!(matches!(at(0), ProtocolError::BadMagic(_)));
        assert!(matches!(at(4), ProtocolError::UnknownKind(_)));
        assert!(matches!(
            at(HEADER_LEN + 100),
            ProtocolError::Checksum { .. }
        ));
        assert!(matches!(at(13), ProtocolError::Checksum { .. }));
        let e = recv(&mut &wire[..wire.len() - 1], Some(16)).unwrap_err();
        assert!(matches!(e, ProtocolError::Io(_)), "{e}");
        assert!(matches!(
            recv(&mut &wire[..0], None),
            Err(ProtocolError::Closed)
        ));
        // A page beyond guest memory is refused even with a good checksum.
        let e = recv(&mut wire.as_slice(), Some(1)).unwrap_err();
        assert!(
            matches!(e, ProtocolError::PageOutOfRange { page: 1, pages: 1 }),
            "{e}"
        );
        // So is a header that announces more than the limit.
        let mut big = wire.clone();
        big[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            recv(&mut big.as_slice(), None),
            Err(ProtocolError::TooLarge(..))
        ));
    }

    #[test]
    fn a_batch_built_in_place_reads_back_whatever_count_was_announced() {
        let page = |i: u8| vec![i; PAGE_SIZE as usize];
        for (announced, pushed) in [(3usize, 3usize), (5, 3), (1, 3)] {
            // The last: hashed page by page as the batch is built.
            for (integrity, hashed) in [
                (Integrity::Checksum, false),
                (Integrity::Transport, false),
                (Integrity::Checksum, true),
            ] {
                let mut wire = b"before".to_vec();
                let at = begin_frame(&mut wire);
                let mut b = PageBatchWriter::new(&mut wire, 0, announced);
                if hashed {
                    b = b.hashing();
                }
                for i in 0..pushed {
                    b.push(i as u64 * 7, true, &page(i as u8));
                }
                match b.finish() {
                    Some(crc) => end_frame_hashed(&mut wire, at, Kind::Pages, crc).unwrap(),
                    None => end_frame(&mut wire, at, Kind::Pages, integrity).unwrap(),
                }
                let mut r = &wire[6..];
                let mut payload = Vec::new();
                let kind = read_frame_as(&mut r, &mut payload, integrity).unwrap();
                assert!(r.is_empty());
                let batch = PageBatch::parse(&payload, Some(100)).unwrap();
                assert_eq!((kind, batch.len()), (Kind::Pages, pushed));
                for (i, p) in batch.pages().enumerate() {
                    assert_eq!(p.page, i as u64 * 7);
                    assert_eq!(p.data, &page(i as u8)[..]);
                }
            }
        }
    }

    #[test]
    fn page_crcs_split_across_threads_are_each_pages_own() {
        let memory: Vec<u8> = (0..7 * PAGE_SIZE as usize)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let serial: Vec<u32> = memory
            .chunks(PAGE_SIZE as usize)
            .map(crc32fast::hash)
            .collect();
        assert_eq!(page_crcs(&memory), serial);
        assert!(page_crcs(&[]).is_empty());
    }

    #[test]
    fn batch_lengths_must_add_up() {
        // A good CRC over a lying index: the index claims more bytes than are there.
        let mut payload = Vec::new();
        let mut b = PageBatchWriter::new(&mut payload, 1, 1);
        b.push(0, false, &[1, 2, 3]);
        b.finish();
        payload.truncate(payload.len() - 1);
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Pages, &payload).unwrap();
        let e = recv(&mut wire.as_slice(), Some(4)).unwrap_err();
        assert!(e.to_string().contains("index names 3 bytes"), "{e}");
    }

    #[test]
    fn hello_checks_version_and_page_size() {
        let mut h = Hello {
            version: VERSION,
            name: "a".into(),
            memory_bytes: 4096,
            vcpus: 1,
            page_size: 4096,
            timeout_ms: 5000,
            id: 1,
            recover_ms: 1000,
            ticket: String::new(),
            traceparent: String::new(),
        };
        check_hello(&h).unwrap();
        h.version = VERSION + 1;
        assert!(matches!(
            check_hello(&h),
            Err(ProtocolError::Version { .. })
        ));
    }

    proptest! {
        #[test]
        fn batches_round_trip(pages in proptest::collection::vec((0u64..1000, 1usize..4096), 1..40)) {
            let msg = Message::Pages {
                codec: 2,
                pages: pages.iter().map(|&(p, n)| (p, false, vec![(p % 251) as u8; n])).collect(),
            };
            prop_assert_eq!(round_trip(&msg, Some(1000)), msg);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = recv(&mut data.as_slice(), Some(64));
        }

        /// Whatever a header announces, a reader with a limit never holds more than
        /// the limit: a stranger's first frame costs the destination at most that.
        #[test]
        fn a_first_frame_never_allocates_past_its_limit(
            kind in any::<u8>(),
            len in any::<u32>(),
            rest in proptest::collection::vec(any::<u8>(), 0..8192),
        ) {
            let mut wire = MAGIC.to_vec();
            wire.extend_from_slice(&[kind, 0, 0, 0]);
            wire.extend_from_slice(&len.to_le_bytes());
            wire.extend_from_slice(&rest);
            let mut payload = Vec::new();
            let r = read_frame_within(&mut wire.as_slice(), &mut payload, 4096);
            prop_assert!(payload.capacity() <= 4096);
            if len > 4096 && rest.len() >= 4 {
                let too_large = matches!(r, Err(ProtocolError::TooLarge(..) | ProtocolError::UnknownKind(_)));
                prop_assert!(too_large);
            }
        }

        #[test]
        fn random_payloads_with_good_crc_never_panic(kind in 1u8..=34, data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let kind = Kind::from_u8(kind).unwrap();
            let mut wire = Vec::new();
            write_frame(&mut wire, kind, &data).unwrap();
            let _ = recv(&mut wire.as_slice(), Some(64));
        }
    }
}
