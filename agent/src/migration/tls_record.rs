//! TLS 1.3's record layer (RFC 8446 §5), for the migration stream once its handshake
//! is over. rustls shakes hands and keeps the keys (it derives the next traffic secret
//! on a key update); the records are sealed and opened here, in place, the way kTLS
//! does it in a kernel. A record is sealed in the buffer that then goes to the socket,
//! and opened in the buffer the socket filled. So TLS costs the stream one AEAD pass
//! over each byte and no copy of its own, and the two directions share no state: a
//! reader never waits for a writer sealing a megabyte.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, Error, PeerMisbehaved};

/// Most plaintext one record carries.
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The record header: content type, legacy version, length.
pub const HEADER: usize = 5;
/// The AEAD tag at the end of every record.
pub const TAG: usize = 16;
/// Largest encrypted body a TLS 1.3 record may have.
pub const MAX_BODY: usize = MAX_PLAINTEXT + 256;
/// Bytes one record adds to what it carries.
pub const OVERHEAD: usize = HEADER + 1 + TAG;

/// Content types (the outer one is always application data in TLS 1.3).
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// One direction's traffic key and its record sequence number.
pub struct Key {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

/// The algorithm, key and IV rustls handed over.
fn parts(
    secrets: &ConnectionTrafficSecrets,
) -> Result<(&'static aead::Algorithm, &[u8], &[u8]), Error> {
    Ok(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            (&aead::AES_128_GCM, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            (&aead::AES_256_GCM, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (&aead::CHACHA20_POLY1305, key.as_ref(), iv.as_ref())
        }
        _ => {
            return Err(Error::General(
                "a cipher suite the migration stream cannot seal".into(),
            ));
        }
    })
}

/// The key's and IV's bytes, for binding something to this session.
pub fn material(secrets: &ConnectionTrafficSecrets) -> Result<Vec<u8>, Error> {
    let (_, key, iv) = parts(secrets)?;
    Ok([key, iv].concat())
}

impl Key {
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, Error> {
        let (alg, key, iv) = parts(secrets)?;
        let key =
            UnboundKey::new(alg, key).map_err(|_| Error::General("a bad traffic key".into()))?;
        let iv = iv
            .try_into()
            .map_err(|_| Error::General("a traffic IV of the wrong length".into()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// Records sealed (or opened) with this key so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The per-record nonce: the IV with the sequence number XORed into its end.
    fn nonce(&self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }

    /// Appends one record of content type `kind` carrying `data` (at most
    /// [`MAX_PLAINTEXT`] bytes) to `out`.
    pub fn seal(&mut self, kind: u8, data: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        debug_assert!(data.len() <= MAX_PLAINTEXT);
        let len = data.len() + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        out.extend_from_slice(&header);
        let at = out.len();
        out.extend_from_slice(data);
        out.push(kind);
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(), Aad::from(header), &mut out[at..])
            .map_err(|_| Error::EncryptError)?;
        out.extend_from_slice(tag.as_ref());
        self.seq += 1;
        Ok(())
    }

    /// Seals one record of content type `kind` where its data lies: `body` is the
    /// data and one byte more, which this overwrites (the caller keeps and restores
    /// it). Returns the record's header and its tail, the sealed content type and the
    /// tag, which follow the data on the wire: the data is never copied.
    pub fn seal_in_place(
        &mut self,
        kind: u8,
        body: &mut [u8],
    ) -> Result<([u8; HEADER], [u8; 1 + TAG]), Error> {
        let Some(n) = body.len().checked_sub(1).filter(|&n| n <= MAX_PLAINTEXT) else {
            return Err(Error::General("a record of an impossible size".into()));
        };
        let len = n + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        body[n] = kind;
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(), Aad::from(header), body)
            .map_err(|_| Error::EncryptError)?;
        let mut tail = [0u8; 1 + TAG];
        tail[0] = body[n];
        tail[1..].copy_from_slice(tag.as_ref());
        self.seq += 1;
        Ok((header, tail))
    }

    /// Opens the record under `header` whose body (ciphertext and tag) is `body`, in
    /// place; returns its content type and how many bytes at the start of `body` are
    /// its plaintext.
    pub fn open(&mut self, header: [u8; HEADER], body: &mut [u8]) -> Result<(u8, usize), Error> {
        let plain = self
            .key
            .open_in_place(self.nonce(), Aad::from(header), body)
            .map_err(|_| Error::DecryptError)?;
        self.seq += 1;
        // TLSInnerPlaintext: the content, its real type, then zero padding.
        let at = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(Error::PeerMisbehaved(
                PeerMisbehaved::IllegalTlsInnerPlaintext,
            ))?;
        if at > MAX_PLAINTEXT {
            return Err(Error::InvalidMessage(
                rustls::InvalidMessage::MessageTooLarge,
            ));
        }
        Ok((plain[at], at))
    }
}

/// The body length a record header announces, if it is a TLS 1.3 record's.
pub fn body_len(header: &[u8; HEADER]) -> Result<usize, Error> {
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if header[0] != APPLICATION_DATA || header[1] != 3 || header[2] != 3 {
        return Err(Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
    }
    if !(TAG + 1..=MAX_BODY).contains(&len) {
        return Err(Error::InvalidMessage(
            rustls::InvalidMessage::MessageTooLarge,
        ));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
            iv: rustls::crypto::cipher::Iv::from([9u8; 12]),
        };
        Key::new(0, &secrets).unwrap()
    }

    #[test]
    fn a_record_sealed_in_place_is_the_record_sealed_by_copy() {
        let (mut a, mut b) = (key(), key());
        let data: Vec<u8> = (0..MAX_PLAINTEXT).map(|i| (i % 253) as u8).collect();
        for n in [1, 100, MAX_PLAINTEXT] {
            let mut copied = Vec::new();
            a.seal(APPLICATION_DATA, &data[..n], &mut copied).unwrap();
            let mut body = data[..n].to_vec();
            body.push(0xee);
            let (header, tail) = b.seal_in_place(APPLICATION_DATA, &mut body).unwrap();
            let in_place = [&header[..], &body[..n], &tail[..]].concat();
            assert_eq!(in_place, copied, "{n} bytes");
        }
        assert!(b.seal_in_place(APPLICATION_DATA, &mut []).is_err());
        assert!(
            b.seal_in_place(APPLICATION_DATA, &mut vec![0; MAX_PLAINTEXT + 2])
                .is_err()
        );
    }

    #[test]
    fn a_record_opens_to_what_was_sealed_and_a_flipped_bit_fails_it() {
        let (mut a, mut b) = (key(), key());
        let mut out = Vec::new();
        a.seal(APPLICATION_DATA, b"hello", &mut out).unwrap();
        a.seal(ALERT, &[1, 0], &mut out).unwrap();
        let header: [u8; HEADER] = out[..HEADER].try_into().unwrap();
        let len = body_len(&header).unwrap();
        let (kind, n) = b.open(header, &mut out[HEADER..HEADER + len]).unwrap();
        assert_eq!(
            (kind, &out[HEADER..HEADER + n]),
            (APPLICATION_DATA, &b"hello"[..])
        );
        let rest = HEADER + len;
        let header: [u8; HEADER] = out[rest..rest + HEADER].try_into().unwrap();
        let mut body = out[rest + HEADER..].to_vec();
        let mut flipped = body.clone();
        flipped[0] ^= 1;
        let mut c = key();
        c.seq = 1;
        assert!(matches!(
            c.open(header, &mut flipped),
            Err(Error::DecryptError)
        ));
        // The sequence number is part of the nonce: a replayed or reordered record
        // fails too.
        let mut d = key();
        assert!(d.open(header, &mut body.clone()).is_err());
        assert_eq!(b.open(header, &mut body).unwrap(), (ALERT, 2));
    }

    #[test]
    fn headers_that_are_not_tls_13_records_are_refused() {
        assert!(body_len(&[23, 3, 3, 0x40, 0x11]).is_ok());
        assert!(body_len(&[22, 3, 3, 0, 40]).is_err());
        assert!(body_len(&[23, 3, 1, 0, 40]).is_err());
        assert!(body_len(&[23, 3, 3, 0x41, 0x01]).is_err());
        assert!(body_len(&[23, 3, 3, 0, 3]).is_err());
    }
}
