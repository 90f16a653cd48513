//! A fractional `--cpus` enforced on the host: QEMU goes into a cgroup of its own whose CPU
//! quota is the sandbox's share. The guest also limits its workload with a cgroup of its own,
//! but guest root can rewrite that one; this one is out of its reach.

use std::path::{Path, PathBuf};

/// Where a sandbox's cgroup is made, under the cgroup v2 root or the v1 `cpu` hierarchy.
const GROUP: &str = "matchlock";

/// A host cgroup holding QEMU; removed when dropped (QEMU has exited by then).
#[derive(Debug)]
pub struct CpuLimit {
    dir: PathBuf,
}

impl CpuLimit {
    /// Puts `pid` in the group too (a resumed sandbox's new QEMU).
    pub fn add(&self, pid: u32) -> Result<(), String> {
        let p = self.dir.join("cgroup.procs");
        std::fs::write(&p, pid.to_string()).map_err(|e| format!("writing {}: {e}", p.display()))
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // Fails (EBUSY) only while a process is still inside; nothing else to clean.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Puts `pid` (all its threads) in a new cgroup `matchlock/<id>` limited to `quota` of every
/// `period` microseconds. Uses cgroup v2 when `/sys/fs/cgroup` is unified, else the v1 `cpu`
/// controller. The error says why the host could not enforce it.
pub fn apply(id: &str, pid: u32, (quota, period): (u64, u64)) -> Result<CpuLimit, String> {
    apply_in(Path::new("/sys/fs/cgroup"), id, pid, quota, period)
}

fn apply_in(root: &Path, id: &str, pid: u32, quota: u64, period: u64) -> Result<CpuLimit, String> {
    let write = |p: PathBuf, v: String| {
        std::fs::write(&p, &v).map_err(|e| format!("writing {v:?} to {}: {e}", p.display()))
    };
    let mkdir = |p: &Path| match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", p.display())),
    };
    let v2 = root.join("cgroup.controllers").is_file();
    let base = if v2 {
        root.join(GROUP)
    } else {
        ["cpu", "cpu,cpuacct"]
            .iter()
            .map(|c| root.join(c))
            .find(|p| p.join("cpu.cfs_quota_us").is_file())
            .ok_or("no cgroup v2 and no v1 cpu controller under /sys/fs/cgroup")?
            .join(GROUP)
    };
    mkdir(&base)?;
    if v2 {
        // The cpu controller must reach the sandbox's group through every level.
        for dir in [root, base.as_path()] {
            write(dir.join("cgroup.subtree_control"), "+cpu".into())?;
        }
    }
    let dir = base.join(id);
    mkdir(&dir)?;
    let limit = CpuLimit { dir };
    if v2 {
        write(limit.dir.join("cpu.max"), format!("{quota} {period}"))?;
    } else {
        write(limit.dir.join("cpu.cfs_period_us"), period.to_string())?;
        write(limit.dir.join("cpu.cfs_quota_us"), quota.to_string())?;
    }
    write(limit.dir.join("cgroup.procs"), pid.to_string())?;
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a fake hierarchy (plain files): the quota lands where each version wants it.
    #[test]
    fn writes_the_quota_for_either_cgroup_version() {
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "cpu io").unwrap();
        std::fs::create_dir(v2.path().join(GROUP)).unwrap();
        let l = apply_in(v2.path(), "vm-1", 42, 25_000, 100_000).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            read(&v2.path().join("matchlock/vm-1/cpu.max")),
            "25000 100000"
        );
        assert_eq!(read(&v2.path().join("matchlock/vm-1/cgroup.procs")), "42");
        assert_eq!(read(&v2.path().join("cgroup.subtree_control")), "+cpu");
        drop(l);

        let v1 = tempfile::tempdir().unwrap();
        std::fs::create_dir(v1.path().join("cpu")).unwrap();
        std::fs::write(v1.path().join("cpu/cpu.cfs_quota_us"), "-1").unwrap();
        let _l = apply_in(v1.path(), "vm-2", 7, 50_000, 100_000).unwrap();
        let g = v1.path().join("cpu/matchlock/vm-2");
        assert_eq!(read(&g.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(&g.join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(&g.join("cgroup.procs")), "7");

        let none = tempfile::tempdir().unwrap();
        assert!(apply_in(none.path(), "vm-3", 1, 1, 1).is_err());
    }
}
