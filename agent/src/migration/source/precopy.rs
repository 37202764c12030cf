//! Pre-copy: the first pass and the rounds, the convergence test, cancel and faults.

use super::*;

impl Sender<'_> {
    /// A failpoint (test builds, see [`crate::failpoint`]): holds here, or drops the
    /// connection as a network failure would, so tests reach this exact point.
    pub(in crate::migration) fn fault(&mut self, point: &str) -> Result<(), MigrateError> {
        if crate::failpoint::reach(point) == Some(crate::failpoint::Action::Drop) {
            let _ = self.r.shutdown(std::net::Shutdown::Both);
            return Err(MigrateError::Vm(format!(
                "lost the connection at {point} (injected fault)"
            )));
        }
        Ok(())
    }

    /// Between batches: cancelled? out of time? new settings?
    pub(in crate::migration) fn check_cancel(&mut self) -> Result<(), MigrateError> {
        if self.vm.cancel.load(Ordering::Acquire) {
            return Err(MigrateError::Cancelled);
        }
        if let Some(max) = self.params.max_total
            && self.stats.t0.elapsed() > max
        {
            return Err(MigrateError::NotConverged(max.as_secs()));
        }
        if self.params.mode == Mode::Hybrid && self.vm.postcopy_requested.load(Ordering::Acquire) {
            return Err(MigrateError::StartPostcopy);
        }
        // A destination that stopped (a hung host, a SIGSTOP) is found out by its
        // silence (see `watchdog`). It answers between frames: under a bandwidth cap
        // a frame may take a while to arrive whole.
        let precopy = lock(&self.vm.progress)
            .as_ref()
            .is_some_and(|p| p.phase == Phase::Precopy);
        let frame_time = self
            .settings
            .bandwidth_bytes_per_sec
            .map_or(Duration::ZERO, |b| {
                Duration::from_secs_f64(f64::from(protocol::MAX_PAYLOAD) / b.max(1) as f64)
            });
        self.watchdog.set(precopy, self.params.timeout + frame_time);
        if let Some(live) = lock(&self.vm.live).as_ref() {
            self.settings = live.settings;
        }
        // The progress feed stays fresh within long rounds too.
        if self.last_publish.elapsed() >= Duration::from_millis(100) {
            let phase = lock(&self.vm.progress)
                .as_ref()
                .map_or(Phase::Precopy, |p| p.phase);
            self.publish(phase);
        }
        Ok(())
    }

    pub(in crate::migration) fn publish(&mut self, phase: Phase) {
        self.last_publish = Instant::now();
        if let Some(m) = self.meter.read(self.w.get_ref().tcp()) {
            self.stats.tcp = Some(m);
        }
        self.measure_disk_dirtying();
        // Not in the pause: the guest waits on every millisecond of it.
        if phase == Phase::Precopy
            && let Err(e) = self.sample_written()
        {
            // An estimate only: the copy itself reports a disk it cannot read.
            tracing::debug!("sampling the guest's written disk blocks: {e}");
        }
        let mut guard = self.vm.progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = guard.as_mut() {
            p.phase = phase;
            fill(p, &self.stats, &self.settings);
        }
    }

    /// Sends pages of `range` in order for about `secs`; returns the first not sent.
    pub(super) fn send_pages_for(
        &mut self,
        range: std::ops::Range<u64>,
        secs: Duration,
    ) -> Result<u64, MigrateError> {
        const CHUNK: u64 = 2048;
        let started = Instant::now();
        let mut at = range.start;
        while at < range.end && started.elapsed() < secs {
            let end = (at + CHUNK).min(range.end);
            self.send_pages(at..end)?;
            at = end;
        }
        Ok(at)
    }

    /// Sends the given pages: zero pages as runs, the rest in batches. With a codec,
    /// batches are compressed on worker threads while this one writes them, in order.
    pub(in crate::migration) fn send_pages(
        &mut self,
        pages: impl Iterator<Item = u64>,
    ) -> Result<(), MigrateError> {
        let m = self.m;
        // SAFETY: pages are read while the guest may write them; every page sent here
        // had its dirty tracking re-armed before this copy, so a racing write is sent
        // again in a later round (or under the final pause).
        let memory = unsafe { m.memory() };
        let pages: Vec<u64> = pages.collect();
        self.round_pages.clone_from(&pages);
        self.sent_upto = 0;
        self.check_cancel()?;
        // A pass goes in groups, each with the settings in force when it starts: a
        // codec the policy picks mid-pass (the first pass is most of the migration)
        // applies from the next group on.
        let mut from = 0;
        while from < pages.len() {
            // Under a bandwidth cap a frame must not take long enough to starve the
            // peer's timeout: at most ~100 ms of the cap per frame.
            let cap = self
                .settings
                .bandwidth_bytes_per_sec
                .map_or(BATCH, |b| (b as usize / 10 / PAGE).clamp(1, BATCH));
            let batch = batch_pages(pages.len() - from, cap);
            let end = (from + batch * GROUP_BATCHES).min(pages.len());
            self.send_group(memory, &pages[from..end], batch)?;
            from = end;
        }
        Ok(())
    }

    pub(super) fn send_group(
        &mut self,
        memory: &[u8],
        pages: &[u64],
        batch: usize,
    ) -> Result<(), MigrateError> {
        let codec = self.settings.codec;
        let integrity = self.w.get_ref().integrity();
        let chunks: Vec<&[u64]> = pages.chunks(batch).collect();
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS);
        if codec == Codec::None || workers < 2 || chunks.len() < 2 {
            let mut bufs = std::mem::take(&mut self.bufs);
            let result = chunks.iter().try_for_each(|chunk| {
                let mut encoded = encode(
                    memory,
                    chunk,
                    codec,
                    &mut self.compressor,
                    &mut bufs,
                    integrity,
                )?;
                self.write_encoded(&mut encoded)?;
                bufs.spare_frames.push(encoded.frames);
                Ok(())
            });
            self.bufs = bufs;
            return result;
        }
        // Written frame buffers go back to the workers through this pool.
        let pool = std::sync::Mutex::new(Vec::<Vec<u8>>::new());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Result<Encoded, MigrateError>)>(
                workers * 2,
            );
            for _ in 0..workers {
                let (tx, next, stop, chunks, pool) = (tx.clone(), &next, &stop, &chunks, &pool);
                scope.spawn(move || {
                    let mut compressor = Compressor::new();
                    let mut bufs = Buffers::default();
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(chunk) = chunks.get(i) else { break };
                        if let Some(f) = lock(pool).pop() {
                            bufs.spare_frames.push(f);
                        }
                        let encoded =
                            encode(memory, chunk, codec, &mut compressor, &mut bufs, integrity);
                        if tx.send((i, encoded)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            // Reorder: frames go out in the order of the pages.
            let mut pending = std::collections::BTreeMap::new();
            let mut due = 0;
            let result = (|| {
                for (i, encoded) in rx.iter() {
                    pending.insert(i, encoded);
                    while let Some(encoded) = pending.remove(&due) {
                        let mut encoded = encoded?;
                        self.write_encoded(&mut encoded)?;
                        lock(&pool).push(encoded.frames);
                        due += 1;
                    }
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            result
        })
    }

    /// Writes a batch's frames, under the bandwidth cap, and counts them.
    pub(super) fn write_encoded(&mut self, e: &mut Encoded) -> Result<(), MigrateError> {
        self.write_wire_owned(&mut e.frames)?;
        self.sent_upto += (e.pages_sent + e.zero_pages) as usize;
        self.count_pages(e);
        // The state's lock only where failpoints exist: this runs for every batch.
        if cfg!(feature = "failpoints")
            && self.stats.round == 0
            && self.m.state() == RunState::Running
        {
            self.fault("source.first-pass")?;
        }
        self.check_cancel()
    }

    pub(in crate::migration) fn count_pages(&mut self, e: &Encoded) {
        self.stats.pages_sent += e.pages_sent;
        self.stats.zero_pages += e.zero_pages;
        self.stats.raw_bytes += e.pages_sent * PAGE as u64;
    }

    /// How long one core takes to compress `bytes` with the codec in force, as the
    /// codec sample measured it (0 for raw pages or before a sample).
    pub(super) fn compress_secs(&self, bytes: f64) -> f64 {
        if self.settings.codec == Codec::None {
            return 0.0;
        }
        let codec = self.settings.codec;
        lock(&self.vm.progress)
            .as_ref()
            .and_then(|p| {
                p.codec_samples
                    .iter()
                    .find(|c| c.codec == codec)
                    .map(|c| c.compress_bytes_per_sec)
            })
            .filter(|&s| s > 0.0)
            .map_or(0.0, |s| bytes / s)
    }

    /// Compresses a sample of the working set's non-zero pages with every codec.
    pub(super) fn sample_codecs(&self) {
        let (samples, zero) = sample_pages(self.m);
        if let Some(p) = lock(&self.vm.progress).as_mut() {
            p.codec_samples = samples;
            p.sampled_zero_fraction = Some(zero);
        }
    }

    pub(super) fn precopy_and_switch(&mut self, switch: &mut Switch) -> Result<(), MigrateError> {
        match self.precopy(switch) {
            Err(MigrateError::StartPostcopy) => {
                // What the round in flight had not sent yet comes on demand.
                let pages = self.m.memory_bytes() / PAGE as u64;
                let mut need = Bitmap::new(pages);
                for &p in self.round_pages.get(self.sent_upto..).unwrap_or_default() {
                    need.set(p);
                }
                self.switch_postcopy(need, true, switch)
            }
            other => other,
        }
    }

    pub(super) fn precopy(&mut self, switch: &mut Switch) -> Result<(), MigrateError> {
        let pages = self.m.memory_bytes() / PAGE as u64;
        self.sample_codecs();
        // Measured at once, so the policy's first prediction has the handover's round
        // trip from these hosts (the first ping may wait for the destination to build
        // the VM: the least of them counts).
        self.measure_idle_rtt()?;
        self.fault("source.setup")?;
        if self.params.mode == Mode::Postcopy && !self.params.precopy_pass {
            let mut need = Bitmap::new(pages);
            need.set_all();
            return self.switch_postcopy(need, false, switch);
        }
        let mut dirty = Bitmap::new(pages);
        self.m.start_dirty_log()?;
        self.publish(Phase::Precopy);
        let mut round_start = Instant::now();
        let mut round_bytes = self.stats.bytes_on_wire;
        // The windows run from the disks' first copy on: the guest dirties memory
        // meanwhile too.
        crate::migration::dirty_windows::during(self.vm, || {
            let mut from = 0;
            if self.params.copy_storage {
                // Memory first, for a moment: the link's own rate is measured before a
                // destination slower to write the disks than the link carries them
                // holds the stream back for the disks' whole first copy (the order
                // costs nothing: the same bytes go either way).
                from = self.send_pages_for(0..pages, LINK_FIRST)?;
                // A switch to post-copy during the disks' copy needs the rest.
                self.round_pages = (from..pages).collect();
                self.sent_upto = 0;
                self.disks_start()?;
            }
            self.send_pages(from..pages)
        })?;
        self.end_round(0, round_start)?;
        self.measure_idle_rtt()?;
        if self.params.mode == Mode::Postcopy {
            // One pass done: what the guest dirtied since comes on demand.
            return self.switch_postcopy(Bitmap::new(pages), true, switch);
        }
        let mut previous = pages;
        loop {
            self.check_cancel()?;
            if self.m.state() != RunState::Running {
                return Err(MigrateError::Vm(format!(
                    "stopped running ({:?})",
                    self.m.state()
                )));
            }
            dirty.clear_all();
            self.m.fetch_dirty(&mut dirty)?;
            let count = dirty.count();
            let took = round_start.elapsed().as_secs_f64().max(1e-6);
            let moving =
                (self.stats.bytes_on_wire - round_bytes) as f64 / bandwidth(&self.stats).max(1.0);
            self.stats.round_overhead = Duration::from_secs_f64((took - moving).max(0.0));
            self.stats.dirty_last = count;
            self.stats.dirty_rate = count as f64 / took;
            self.stats.remaining = count;
            self.stats.round += 1;
            // Predicted downtime: the remaining dirty set at the measured rate; the
            // device state is a few KB and adds nothing measurable.
            let bw = bandwidth(&self.stats).max(1.0);
            // The blocks left are ones the guest wrote: scattered, they compress
            // unlike the first copy's long runs (until a round measured them, as
            // pages do).
            let disk_ratio = disk_written_ratio(&self.stats).unwrap_or(ratio(&self.stats));
            let wire_bytes = count as f64 * PAGE as f64 / ratio(&self.stats).max(1e-3)
                + self.disks_dirty_bytes() as f64 / disk_ratio.max(1e-3);
            // A codec slower than the link makes the pause wait on the CPU instead
            // (one core: the vCPUs are stopped, but the policy budgets one).
            let compress_ms = self.compress_secs(count as f64 * PAGE as f64) * 1e3;
            let predicted_ms = (wire_bytes / bw * 1e3).max(compress_ms);
            self.publish(Phase::Precopy);
            tracing::debug!(
                round = self.stats.round,
                dirty = count,
                took_ms = took * 1e3,
                overhead_ms = self.stats.round_overhead.as_secs_f64() * 1e3,
                predicted_ms,
                bandwidth = bw,
                disk_ratio,
                "pre-copy round"
            );
            let limit = self.settings.max_downtime_ms as f64;
            if converged(
                predicted_ms,
                limit,
                (count, previous),
                self.stats.round,
                self.settings.switchover,
            ) {
                // What the guest wrote through the page cache goes out now, while it
                // runs, not in the flush after the pause (disks that travel need none:
                // see `switchover`).
                if !self.params.copy_storage {
                    self.m.disks().flush_all()?;
                }
                return self.switchover(dirty, switch);
            }
            previous = count;
            self.m.clear_dirty(0, pages)?;
            round_start = Instant::now();
            round_bytes = self.stats.bytes_on_wire;
            if self.params.copy_storage {
                self.disks_round(false)?;
            }
            // A switch to post-copy during this round needs these pages too.
            let result = self.send_pages(dirty.iter_set());
            if matches!(result, Err(MigrateError::StartPostcopy)) {
                // round_pages/sent_upto say which of them went; the dirty log has the rest.
                return Err(MigrateError::StartPostcopy);
            }
            result?;
            self.fault("source.later-round")?;
            self.end_round(self.stats.round, round_start)?;
        }
    }
}

/// Most rounds pre-copy makes before switching over once the downtime fits.
pub(in crate::migration) const MAX_SHRINKING_ROUNDS: u32 = 30;

/// The convergence test: switch over once the predicted downtime fits the limit and
/// another round would not pay: the dirty set stopped halving (rounds have reached the
/// guest's steady dirtying), or it is already under a tenth of the limit. While it
/// still halves, one more short round cuts the downtime the guest will see.
/// `dirty` is this round's dirty set and `previous` the last one's (pages); a peer's
/// rule ([`Switchover::WhenFits`]) switches as soon as the pause fits.
pub fn converged(
    predicted_ms: f64,
    limit_ms: f64,
    (dirty, previous): (u64, u64),
    round: u32,
    rule: Switchover,
) -> bool {
    let fits = predicted_ms <= limit_ms;
    let still_halving = dirty * 2 <= previous;
    fits && (rule == Switchover::WhenFits
        || !still_halving
        || predicted_ms <= limit_ms / 10.0
        || round >= MAX_SHRINKING_ROUNDS)
}

/// With disks travelling, how long the first pass sends memory before the disks'
/// first copy: long enough for the link's rate to be read from TCP (a quarter to half
/// a second of busy time) and reach the policy.
pub(super) const LINK_FIRST: Duration = Duration::from_millis(600);
