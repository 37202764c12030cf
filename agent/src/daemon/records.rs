//! What the agent's migration and storage-migration records share: their ids, their
//! times, and how many ended ones are kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Ended records kept at most (the oldest go first); live ones are always kept.
pub const KEEP_ENDED: usize = 200;

/// Milliseconds since the Unix epoch: a record's times.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new record's id: `prefix`, the time and a count (unique within a run, and
/// across runs as the time moves on).
pub fn new_id(prefix: char, next: &AtomicU64) -> String {
    format!(
        "{prefix}{}-{}",
        unix_ms(),
        next.fetch_add(1, Ordering::Relaxed)
    )
}

/// Of the ended records, as `(ended at, id)`, the ids past the newest
/// [`KEEP_ENDED`]: the ones to drop.
pub fn beyond_keep(mut ended: Vec<(u64, String)>) -> Vec<String> {
    if ended.len() <= KEEP_ENDED {
        return Vec::new();
    }
    ended.sort();
    let drop = ended.len() - KEEP_ENDED;
    ended.into_iter().take(drop).map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_ended_go_first_and_only_past_the_limit() {
        let ended: Vec<(u64, String)> = (0..KEEP_ENDED as u64 + 3)
            .rev()
            .map(|t| (t, format!("m{t}")))
            .collect();
        assert_eq!(beyond_keep(ended), ["m0", "m1", "m2"]);
        assert!(beyond_keep(vec![(1, "m1".into())]).is_empty());
    }
}
