//! The bandwidth cap: a token bucket the send loop draws from.

use super::*;

/// Token bucket for the bandwidth cap: at most 50 ms of burst, so any one-second
/// window stays within a few percent of the rate.
pub(super) struct Bucket {
    pub(super) tokens: f64,
    pub(super) last: Instant,
}

impl Bucket {
    pub(super) fn take(&mut self, rate: Option<u64>, bytes: usize) {
        let now = Instant::now();
        let Some(rate) = rate.map(|r| r.max(1) as f64) else {
            self.tokens = 0.0;
            self.last = now;
            return;
        };
        let burst = rate * 0.05;
        self.tokens = (self.tokens + (now - self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / rate));
        }
    }
}
