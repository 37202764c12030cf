//! How a migration moves: its mode, its switchover rule, how travelling disks keep up.

/// A value that does not name one of a setting's choices; the message lists them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Rounds of dirty pages until the rest fits the downtime limit.
    #[default]
    Precopy,
    /// The guest moves at once; its pages follow, on demand and in the background.
    Postcopy,
    /// Pre-copy, switching to post-copy when told (`start-postcopy`).
    Hybrid,
}
named!(
    Mode,
    "migration mode",
    [
        Precopy = "precopy",
        Postcopy = "postcopy",
        Hybrid = "hybrid"
    ]
);

/// When pre-copy switches over, once the estimated pause fits the downtime target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Switchover {
    /// Ferry's: one more round while the dirty set still halves and the pause is not
    /// yet tiny (a short round then cuts the downtime the guest sees).
    #[default]
    Halving,
    /// QEMU's, libvirt's, KubeVirt's and Cloud Hypervisor's: as soon as it fits.
    WhenFits,
}
named!(
    Switchover,
    "switchover rule",
    [Halving = "halving", WhenFits = "when-fits"]
);

/// How disks that travel with the memory keep up with the guest's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DiskMirror {
    /// With each pre-copy round, the blocks written since the last one.
    #[default]
    Background,
    /// Each guest write also goes to the destination before it completes (libvirt's
    /// `--copy-storage-synchronous-writes`, QEMU's write-blocking mirror): the disks
    /// converge because the link paces the guest's writes.
    Active,
}
named!(
    DiskMirror,
    "disk mirror",
    [Background = "background", Active = "active"]
);

/// How a storage migration copies a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StorageMode {
    /// Background first, active once a round shows the guest writing distinct blocks
    /// too fast for background rounds to converge.
    #[default]
    Auto,
    Background,
    Active,
}
named!(
    StorageMode,
    "storage migration mode",
    [Auto = "auto", Background = "background", Active = "active"]
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_serde_agree_for_every_choice() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(*m));
            let json = serde_json::to_string(m).unwrap();
            assert_eq!(json, format!("\"{m}\""));
        }
        for s in Switchover::ALL {
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        }
        for d in DiskMirror::ALL {
            assert_eq!(serde_json::to_string(d).unwrap(), format!("\"{d}\""));
        }
        let e = serde_json::from_str::<StorageMode>("\"fast\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("unknown storage migration mode \"fast\" (one of: auto"),
            "{e}"
        );
        let e = "sideways".parse::<Mode>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown migration mode \"sideways\" (one of: precopy, postcopy, hybrid)"
        );
    }
}
