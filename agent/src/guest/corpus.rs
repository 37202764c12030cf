//! The two corpora page bodies are copied from. Text must compress like prose (so codec
//! ratios measured on lab guests mean something); random must not compress at all.

use super::abi::mix64;

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "memory",
    "page",
    "migration",
    "host",
    "guest",
    "virtual",
    "machine",
    "network",
    "storage",
    "disk",
    "kernel",
    "process",
    "thread",
    "service",
    "request",
    "response",
    "latency",
    "bandwidth",
    "throughput",
    "checksum",
    "snapshot",
    "cluster",
    "operator",
    "failure",
    "recovery",
    "transaction",
    "database",
    "record",
    "index",
    "buffer",
    "cache",
    "queue",
    "message",
    "event",
    "metric",
    "trace",
    "policy",
    "decision",
    "budget",
    "deadline",
    "schedule",
    "between",
    "through",
    "during",
    "before",
    "after",
    "without",
    "within",
    "because",
    "however",
    "therefore",
    "although",
    "several",
    "different",
    "important",
    "available",
];

/// Word salad with punctuation and line breaks, about 2.5-3x compressible by zstd.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let mut state = seed;
    let mut sentence = 0;
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let r = mix64(state);
        let word = WORDS[(r % WORDS.len() as u64) as usize];
        if sentence == 0 {
            let mut chars = word.chars();
            if let Some(c) = chars.next() {
                out.push(c.to_ascii_uppercase() as u8);
                out.extend_from_slice(chars.as_str().as_bytes());
            }
        } else {
            out.extend_from_slice(word.as_bytes());
        }
        sentence += 1;
        if sentence > 6 && (r >> 32).is_multiple_of(5) {
            out.extend_from_slice(if (r >> 40).is_multiple_of(4) {
                b".\n"
            } else {
                b". "
            });
            sentence = 0;
        } else if (r >> 48).is_multiple_of(11) {
            out.extend_from_slice(b", ");
        } else {
            out.push(b' ');
        }
    }
    out.truncate(len);
    out
}

/// Incompressible bytes.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut state = seed ^ 0x5bd1_e995;
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        out.extend_from_slice(&mix64(state).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpora_are_deterministic_and_sized() {
        assert_eq!(text(1000, 7), text(1000, 7));
        assert_ne!(text(1000, 7), text(1000, 8));
        assert_eq!(random(4096, 1).len(), 4096);
        assert!(text(4096, 1).iter().all(|b| b.is_ascii()));
    }
}
