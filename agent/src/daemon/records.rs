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

/// The records an earlier run kept in `dir` (`<id>.json`), read as `T`, with the file
/// each came from. One that does not read is set aside (`.json.bad`) and named in
/// the log; a folder that cannot be made or read is logged and gives none.
pub fn read_back<T: serde::de::DeserializeOwned>(
    dir: &std::path::Path,
    what: &str,
) -> Vec<(std::path::PathBuf, T)> {
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::error!("cannot keep {what} records in {}: {e}", dir.display());
        return Vec::new();
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("cannot read {}: {e}", dir.display());
            return Vec::new();
        }
    };
    let mut read = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let record = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()));
        match record {
            Ok(r) => read.push((path, r)),
            Err(e) => {
                tracing::warn!(
                    "the {what} record {} does not read ({e}); set aside",
                    path.display()
                );
                let _ = std::fs::rename(&path, path.with_extension("json.bad"));
            }
        }
    }
    read
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
