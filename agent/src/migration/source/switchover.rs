//! The pause and the handover: the last dirty pages, device state, the two-phase
//! commit, and what the guest's downtime was.

use super::*;

#[derive(Default)]
pub(in crate::migration) struct Switch {
    pub(in crate::migration) committed: bool,
    /// Post-copy ran; what it cost the guest.
    pub(in crate::migration) postcopy: Option<protocol::PostcopyFigures>,
    pub(in crate::migration) recoveries: u32,
    pub(super) memory_verified: Option<bool>,
    pub(super) downtime_ms: Option<f64>,
    pub(in crate::migration) switchover_ms: Option<f64>,
}

impl Sender<'_> {
    pub(super) fn switchover(
        &mut self,
        mut dirty: Bitmap,
        switch: &mut Switch,
    ) -> Result<(), MigrateError> {
        self.wait_prepared()?;
        self.publish(Phase::Switchover);
        let before = crate::clock::monotonic_ns();
        let quiet = self
            .m
            .last_heartbeats_ns()
            .iter()
            .filter(|&&h| h > 0)
            .map(|&h| before.saturating_sub(h))
            .max()
            .unwrap_or(0);
        // The guest's downtime runs from its last heartbeat: a vCPU held in a capped
        // disk write before the pause is part of it.
        tracing::debug!(
            "handover: the guest's last heartbeat came {:.3} ms before the pause",
            quiet as f64 / 1e6
        );
        let t_pause = Instant::now();
        let mut lap = crate::migration::Lap::new();
        if self.params.copy_storage {
            // A guest write the disk cap is holding back would hold the pause as long
            // (64 KiB at 2.4 MB/s is 27 ms). The vCPUs are told to stop first, then the
            // cap goes: the held write completes at once and its vCPU parks rather
            // than run on uncapped (a guest behind its own pace would burst, and the
            // pause would carry the burst). Whatever the cap in force: `set-params`
            // may have set one since this thread last looked.
            self.m.request_pause();
            self.m.disks().limit_writes(None);
        }
        self.m.pause()?;
        lap.mark("paused");
        // The guest is stopped now: the last pages go at full speed (as QEMU lifts
        // its rate limit for the completion stage), its disks are uncapped.
        self.settings.bandwidth_bytes_per_sec = None;
        self.settings.disk_write_limit_bytes_per_sec = None;
        if let Some(live) = lock(&self.vm.live).as_mut() {
            live.settings.bandwidth_bytes_per_sec = None;
            live.settings.disk_write_limit_bytes_per_sec = None;
        }
        let last_heartbeats = self.m.last_heartbeats_ns();
        // Everything dirtied since the last fetch, including by devices.
        self.m.fetch_dirty(&mut dirty)?;
        self.stats.remaining = dirty.count();
        self.send_pages(dirty.iter_set())?;
        lap.mark(&format!("{} pages sent", self.stats.remaining));
        if self.params.copy_storage {
            // Paused: no guest I/O; the last written blocks complete the copies.
            self.disks_round(true)?;
            lap.mark("last disk blocks sent");
            self.disks_logs()?;
        }
        // Shared storage: the destination reads these images next. Disks that travel
        // need no flush here: from the handover the destination's copies (which it
        // syncs before it resumes) are the disks, and a failed migration runs on here
        // through the same page cache.
        if !self.params.copy_storage {
            self.m.disks().flush_all()?;
            lap.mark("disks flushed");
        }
        let state = self
            .m
            .save_state()?
            .encode()
            .map_err(|e| MigrateError::Vm(format!("state could not be encoded: {e}")))?;
        self.send(&Message::DeviceState { blob: state })?;
        if !self.params.copy_storage {
            // Shared storage: the destination takes the images' locks from here on.
            self.m.disks().set_locked(false)?;
        }
        self.send(&Message::Complete {
            pages_sent: self.stats.pages_sent,
        })?;
        self.w.flush().map_err(ProtocolError::from)?;
        lap.mark("device state and complete sent");
        self.commit(switch, (t_pause, lap))?;
        self.measure_handover(switch, &last_heartbeats);
        Ok(())
    }

    /// Ready, Commit, Resumed: the handover proper, the same for pre-copy and
    /// post-copy.
    pub(in crate::migration) fn commit(
        &mut self,
        switch: &mut Switch,
        (t_pause, mut lap): (Instant, crate::migration::Lap),
    ) -> Result<(), MigrateError> {
        match self.recv()? {
            Message::Ready => {}
            Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
            _ => return Err(MigrateError::Unexpected("something other than Ready")),
        }
        self.fault("source.after-ready")?;
        // The handover is recorded before Commit leaves: from here on this copy must
        // never run again, whatever happens to the connection.
        self.m.hand_over();
        switch.committed = true;
        self.send(&Message::Commit)?;
        self.w.flush().map_err(ProtocolError::from)?;
        lap.mark("ready received, commit sent");
        self.fault("source.after-commit")?;
        match self.recv()? {
            Message::Resumed => {}
            _ => return Err(MigrateError::Unexpected("something other than Resumed")),
        }
        lap.mark("resumed there");
        switch.switchover_ms = Some(ms(t_pause.elapsed()));
        Ok(())
    }

    /// After the handover: compares memory digests and measures downtime.
    pub(in crate::migration) fn measure_handover(
        &mut self,
        switch: &mut Switch,
        last_heartbeats: &[u64],
    ) {
        // The handover is complete. What follows only measures it: a lost answer leaves
        // a figure unknown (None in the report), never the outcome in doubt.
        match self.recv() {
            Ok(Message::MemoryDigest { digest }) if self.params.verify => {
                // This copy is frozen for good now: hashing it costs the guest nothing.
                // SAFETY: the VM is paused and handed over; nothing writes its memory.
                let ours = protocol::digest(&protocol::page_crcs(unsafe { self.m.memory() }));
                switch.memory_verified = Some(ours == digest);
                if ours != digest {
                    tracing::error!(
                        "memory digest mismatch after migration: source {ours:#010x}, destination {digest:#010x}"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("no memory digest from the destination: {e}"),
        }
        match self.recv() {
            Ok(Message::FirstHeartbeats { ns }) => {
                switch.downtime_ms = ns
                    .iter()
                    .zip(last_heartbeats)
                    .filter(|(first, last)| **first > 0 && **last > 0)
                    .map(|(first, last)| first.saturating_sub(*last) as f64 / 1e6)
                    .reduce(f64::max);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("no heartbeat times from the destination: {e}"),
        }
        self.stats.remaining = 0;
    }
}
