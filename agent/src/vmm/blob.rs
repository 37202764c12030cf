//! Versioned, checksummed container for saved VM state.
//!
//! Layout (little-endian):
//!
//! ```text
//! magic [8] | version u16 | kind u16 | payload_len u64 | payload [payload_len] | crc32 u32
//! ```
//!
//! The CRC covers the header and the payload, so a flipped bit anywhere is caught before the
//! payload decoder sees it.
//!
//! The payload is postcard: a documented, frozen wire format (postcard 1.x spec), compact
//! (varints make the mostly-zero KVM register areas small) and with no encoder options, so
//! writer and reader cannot disagree on a configuration the way they can with bincode 2.
//! It is not self-describing: any change to a serialized type must bump [`FORMAT_VERSION`].

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Identifies a Ferry state blob; the NUL keeps it from reading as a text file's start.
pub const MAGIC: [u8; 8] = *b"FERRYST\0";

/// Version of the payload encoding written by this build.
pub const FORMAT_VERSION: u16 = 1;

const VERSION_AT: usize = 8;
const KIND_AT: usize = 10;
const LEN_AT: usize = 12;
const HEADER_LEN: usize = 20;
const CRC_LEN: usize = 4;

/// Offsets are the constants above, all in bounds of the fixed-size header.
fn field<const N: usize>(header: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    std::array::from_fn(|i| header[at + i])
}

/// What a blob holds; decoding insists on the kind the caller expects so that one saved
/// structure is never reinterpreted as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum BlobKind {
    /// VM-wide and per-vCPU KVM state, without guest memory.
    MachineState = 1,
}

impl BlobKind {
    fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(Self::MachineState),
            _ => None,
        }
    }
}

impl fmt::Display for BlobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MachineState => f.write_str("machine state"),
        }
    }
}

/// A kind code read from a blob, shown by name when this build knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindCode(pub u16);

impl fmt::Display for KindCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match BlobKind::from_code(self.0) {
            Some(kind) => write!(f, "{kind} (code {})", self.0),
            None => write!(f, "unknown kind code {}", self.0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error(
        "not a Ferry state blob (magic {found:02x?}); check that the right file or stream was given"
    )]
    BadMagic { found: Vec<u8> },
    #[error(
        "state blob format version {found} is not supported by this Ferry (it reads version {supported}); \
         restore with the Ferry release that saved it"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error(
        "state blob holds {found}, but {expected} was expected; pass the blob saved for this purpose"
    )]
    WrongKind { expected: BlobKind, found: KindCode },
    #[error(
        "state blob is truncated: expected {expected} bytes, got {got}; the transfer or file write was cut short"
    )]
    Truncated { expected: u64, got: usize },
    #[error(
        "state blob has {extra} bytes after its checksum; it was concatenated or overwritten in place"
    )]
    TrailingBytes { extra: usize },
    #[error(
        "state blob checksum mismatch: stored {expected:#010x}, computed {computed:#010x}; the blob is corrupted"
    )]
    ChecksumMismatch { expected: u32, computed: u32 },
    #[error("could not encode state payload: {0}")]
    PayloadEncode(#[source] postcard::Error),
    #[error(
        "state payload does not decode as {expected}: {source}; the saving Ferry used another layout"
    )]
    PayloadDecode {
        expected: BlobKind,
        source: postcard::Error,
    },
    #[error(
        "state payload has {unused} unused bytes after decoding {expected}; the saving Ferry used another layout"
    )]
    PayloadTrailing { expected: BlobKind, unused: usize },
}

/// Serializes `value` into a complete blob of the given kind.
pub fn encode<T: Serialize>(kind: BlobKind, value: &T) -> Result<Vec<u8>, BlobError> {
    let payload = postcard::to_allocvec(value).map_err(BlobError::PayloadEncode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Validates framing, checksum and kind, then decodes the payload.
///
/// Nothing from `bytes` is trusted before it is checked: lengths are compared with what is
/// actually there before any slice is taken, and the checksum is verified before decoding.
pub fn decode<T: DeserializeOwned>(kind: BlobKind, bytes: &[u8]) -> Result<T, BlobError> {
    let truncated = |expected: u64| BlobError::Truncated {
        expected,
        got: bytes.len(),
    };
    // Magic first, even on a short input: a stray file is "not a blob", not "truncated".
    let prefix = &bytes[..bytes.len().min(MAGIC.len())];
    if prefix != &MAGIC[..prefix.len()] {
        return Err(BlobError::BadMagic {
            found: prefix.to_vec(),
        });
    }
    let (header, rest) = bytes
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(truncated((HEADER_LEN + CRC_LEN) as u64))?;

    let version = u16::from_le_bytes(field(header, VERSION_AT));
    if version != FORMAT_VERSION {
        return Err(BlobError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let kind_code = u16::from_le_bytes(field(header, KIND_AT));
    let declared_len = u64::from_le_bytes(field(header, LEN_AT));

    let total = declared_len.saturating_add((HEADER_LEN + CRC_LEN) as u64);
    let payload_len = match usize::try_from(declared_len) {
        Ok(len) if len.checked_add(CRC_LEN).is_some_and(|n| n <= rest.len()) => len,
        _ => return Err(truncated(total)),
    };
    let (payload, crc_and_extra) = rest.split_at(payload_len);
    let (stored_crc, extra) = crc_and_extra
        .split_first_chunk::<CRC_LEN>()
        .ok_or(truncated(total))?;
    if !extra.is_empty() {
        return Err(BlobError::TrailingBytes { extra: extra.len() });
    }

    let expected = u32::from_le_bytes(*stored_crc);
    let computed = crc32fast::hash(&bytes[..HEADER_LEN + payload_len]);
    if expected != computed {
        return Err(BlobError::ChecksumMismatch { expected, computed });
    }
    if kind_code != kind as u16 {
        return Err(BlobError::WrongKind {
            expected: kind,
            found: KindCode(kind_code),
        });
    }

    let (value, unused) =
        postcard::take_from_bytes(payload).map_err(|source| BlobError::PayloadDecode {
            expected: kind,
            source,
        })?;
    if !unused.is_empty() {
        return Err(BlobError::PayloadTrailing {
            expected: kind,
            unused: unused.len(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u32,
        regs: Vec<u64>,
        name: String,
        flag: Option<bool>,
    }

    fn sample() -> Sample {
        Sample {
            id: 7,
            regs: vec![1, u64::MAX, 0],
            name: "vcpu0".into(),
            flag: Some(true),
        }
    }

    /// Rewrites a header field and re-seals the checksum, as a writer that really produced
    /// those values would have.
    fn patch_and_reseal(blob: &mut [u8], at: usize, value: &[u8]) {
        blob[at..at + value.len()].copy_from_slice(value);
        let body = blob.len() - CRC_LEN;
        let crc = crc32fast::hash(&blob[..body]);
        blob[body..].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode_sample(bytes: &[u8]) -> Result<Sample, BlobError> {
        decode(BlobKind::MachineState, bytes)
    }

    #[test]
    fn header_layout_is_stable() {
        let blob = encode(BlobKind::MachineState, &sample()).unwrap();
        assert_eq!(&blob[..8], b"FERRYST\0");
        assert_eq!(&blob[8..10], &1u16.to_le_bytes());
        assert_eq!(&blob[10..12], &1u16.to_le_bytes());
        let payload_len = u64::from_le_bytes(blob[12..20].try_into().unwrap());
        assert_eq!(blob.len() as u64, 20 + payload_len + 4);
    }

    #[test]
    fn bad_magic() {
        let mut blob = encode(BlobKind::MachineState, &sample()).unwrap();
        blob[0] ^= 0x01;
        let err = decode_sample(&blob).unwrap_err();
        assert!(matches!(err, BlobError::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains("not a Ferry state blob"));
    }

    #[test]
    fn unsupported_version() {
        let mut blob = encode(BlobKind::MachineState, &sample()).unwrap();
        patch_and_reseal(&mut blob, 8, &9u16.to_le_bytes());
        let err = decode_sample(&blob).unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::UnsupportedVersion {
                    found: 9,
                    supported: FORMAT_VERSION
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("version 9"));
    }

    #[test]
    fn wrong_kind() {
        let mut blob = encode(BlobKind::MachineState, &sample()).unwrap();
        patch_and_reseal(&mut blob, 10, &42u16.to_le_bytes());
        let err = decode_sample(&blob).unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::WrongKind {
                    expected: BlobKind::MachineState,
                    found: KindCode(42)
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("unknown kind code 42"));
    }

    #[test]
    fn flipped_header_byte_is_a_checksum_mismatch() {
        let mut blob = encode(BlobKind::MachineState, &sample()).unwrap();
        blob[10] ^= 0x02; // kind field, not resealed
        let err = decode_sample(&blob).unwrap_err();
        assert!(matches!(err, BlobError::ChecksumMismatch { .. }), "{err}");
    }

    #[test]
    fn flipped_payload_byte_is_a_checksum_mismatch() {
        let mut blob = encode(BlobKind::MachineState, &sample()).unwrap();
        blob[HEADER_LEN + 1] ^= 0x80;
        let err = decode_sample(&blob).unwrap_err();
        assert!(matches!(err, BlobError::ChecksumMismatch { .. }), "{err}");
    }

    #[test]
    fn flipped_crc_byte_is_a_checksum_mismatch() {
        let mut blob = encode(BlobKind::MachineState, &sample()).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 0xff;
        let err = decode_sample(&blob).unwrap_err();
        let BlobError::ChecksumMismatch { expected, computed } = err else {
            panic!("expected checksum mismatch, got {err}");
        };
        assert_ne!(expected, computed);
    }

    #[test]
    fn truncation_reports_expected_and_actual_length() {
        let blob = encode(BlobKind::MachineState, &sample()).unwrap();
        let err = decode_sample(&blob[..blob.len() - 1]).unwrap_err();
        assert!(
            matches!(err, BlobError::Truncated { expected, got }
                if expected == blob.len() as u64 && got == blob.len() - 1),
            "{err}"
        );
        let err = decode_sample(&blob[..5]).unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::Truncated {
                    expected: 24,
                    got: 5
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn huge_declared_length_is_truncation_not_allocation() {
        let mut blob = encode(BlobKind::MachineState, &sample()).unwrap();
        patch_and_reseal(&mut blob, 12, &u64::MAX.to_le_bytes());
        let err = decode_sample(&blob).unwrap_err();
        assert!(matches!(err, BlobError::Truncated { .. }), "{err}");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut blob = encode(BlobKind::MachineState, &sample()).unwrap();
        blob.push(0);
        let err = decode_sample(&blob).unwrap_err();
        assert!(
            matches!(err, BlobError::TrailingBytes { extra: 1 }),
            "{err}"
        );
    }

    #[test]
    fn payload_of_another_type_is_a_decode_error() {
        let blob = encode(BlobKind::MachineState, &"short").unwrap();
        let err = decode_sample(&blob).unwrap_err();
        assert!(matches!(err, BlobError::PayloadDecode { .. }), "{err}");

        let blob = encode(BlobKind::MachineState, &(sample(), 5u8)).unwrap();
        let err = decode_sample(&blob).unwrap_err();
        assert!(
            matches!(err, BlobError::PayloadTrailing { unused: 1, .. }),
            "{err}"
        );
    }

    fn arb_sample() -> impl Strategy<Value = Sample> {
        (
            any::<u32>(),
            prop::collection::vec(any::<u64>(), 0..64),
            ".{0,32}",
            any::<Option<bool>>(),
        )
            .prop_map(|(id, regs, name, flag)| Sample {
                id,
                regs,
                name,
                flag,
            })
    }

    proptest! {
        #[test]
        fn round_trip(value in arb_sample()) {
            let blob = encode(BlobKind::MachineState, &value).unwrap();
            prop_assert_eq!(decode_sample(&blob).unwrap(), value);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_sample(&bytes);
        }

        #[test]
        fn random_bytes_after_valid_magic_never_panic(
            tail in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = decode_sample(&bytes);
        }

        /// Correctly framed and checksummed garbage reaches the payload decoder.
        #[test]
        fn random_sealed_payload_never_panics(payload in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut blob = MAGIC.to_vec();
            blob.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            blob.extend_from_slice(&(BlobKind::MachineState as u16).to_le_bytes());
            blob.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            blob.extend_from_slice(&payload);
            let crc = crc32fast::hash(&blob);
            blob.extend_from_slice(&crc.to_le_bytes());
            let _ = decode_sample(&blob);
        }
    }
}
