//! A storage fault layer: an in-memory FUSE filesystem that forgets every write not yet
//! fsynced when told to "crash".
//!
//! `kill -9` leaves the kernel's page cache intact, so a server that acknowledged before its
//! fsync would still pass a kill test. Run the server's data directory on this filesystem
//! instead: after [`FaultFs::crash`], each file holds exactly what its last `fsync` (or
//! `fdatasync`) made durable, as after a power cut. The filesystem is unmounted and mounted
//! again across the crash so no cached page survives it.
//!
//! Model and its limits: one flat directory; file contents are durable only through fsync;
//! directory changes (create, unlink, rename) are durable at once (real filesystems may lose
//! an unsynced create; SQLite fsyncs the directory after creating its journal anyway). Needs
//! root and `/dev/fuse`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

const ROOT: u64 = 1;
/// Attributes change with every write; never let the kernel cache them.
const TTL: Duration = Duration::ZERO;

struct Node {
    data: Vec<u8>,
    durable: Vec<u8>,
    perm: u16,
}

struct State {
    names: HashMap<OsString, u64>,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    syncs: u64,
}

/// What a crash threw away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CrashReport {
    /// Files whose contents differed from their last synced state.
    pub files: usize,
    /// Bytes that differed (or were beyond the synced length).
    pub bytes: u64,
    /// fsync calls seen since mount.
    pub syncs: u64,
}

/// A mounted fault-injecting filesystem.
pub struct FaultFs {
    mountpoint: tempfile::TempDir,
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
}

impl std::fmt::Debug for FaultFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultFs").field("path", &self.mountpoint.path()).finish_non_exhaustive()
    }
}

struct Fs(Arc<Mutex<State>>);

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn attr(ino: u64, node: Option<&Node>) -> FileAttr {
    let now = SystemTime::now();
    let (kind, size, perm, nlink) = match node {
        None => (FileType::Directory, 0, 0o700, 2),
        Some(n) => (FileType::RegularFile, n.data.len() as u64, n.perm, 1),
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl FaultFs {
    /// Mounts an empty filesystem on a new temporary directory.
    pub fn mount() -> io::Result<Self> {
        let state = Arc::new(Mutex::new(State {
            names: HashMap::new(),
            nodes: HashMap::new(),
            next_ino: ROOT + 1,
            syncs: 0,
        }));
        let mountpoint = tempfile::tempdir()?;
        let mut fs = FaultFs { mountpoint, state, session: None };
        fs.session = Some(fs.spawn()?);
        Ok(fs)
    }

    fn spawn(&self) -> io::Result<BackgroundSession> {
        let mut config = Config::default();
        config.mount_options =
            vec![MountOption::FSName("postern-faultfs".into()), MountOption::DefaultPermissions];
        fuser::spawn_mount2(Fs(self.state.clone()), self.mountpoint.path(), &config)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.mountpoint.path()
    }

    /// Loses every unsynced write, as a power cut would. Stop every process using the
    /// filesystem first.
    pub fn crash(&mut self) -> io::Result<CrashReport> {
        self.unmount()?;
        let report = {
            let mut state = lock(&self.state);
            let mut report = CrashReport { syncs: state.syncs, ..CrashReport::default() };
            for node in state.nodes.values_mut() {
                if node.data != node.durable {
                    report.files += 1;
                    let common = node.data.len().min(node.durable.len());
                    let differing = node.data[..common]
                        .iter()
                        .zip(&node.durable[..common])
                        .filter(|(a, b)| a != b)
                        .count();
                    report.bytes +=
                        (differing + node.data.len().abs_diff(node.durable.len())) as u64;
                    node.data.clone_from(&node.durable);
                }
            }
            report
        };
        self.session = Some(self.spawn()?);
        Ok(report)
    }
}

impl FaultFs {
    /// Unmounts with the system's `umount` while the session still serves, so the kernel
    /// ends the session cleanly, then waits for the session thread. (fuser's own unmount
    /// could leave a dead mount behind here.)
    fn unmount(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let path = self.mountpoint.path();
        // "target is busy" (a file still open in a killed server's last moments) is
        // expected now and then; the lazy unmount below handles it.
        let clean = std::process::Command::new("umount")
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()?
            .success();
        if !clean && !std::process::Command::new("umount").arg("-l").arg(path).status()?.success() {
            return Err(io::Error::other(format!("cannot unmount {}", path.display())));
        }
        // The session ends when the kernel closes the connection; how it reports that
        // (Ok, or an aborted connection) does not matter here.
        let _ = session.join();
        Ok(())
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

impl Fs {
    fn file_entry(&self, name: &OsStr) -> Option<(u64, FileAttr)> {
        let state = lock(&self.0);
        let ino = *state.names.get(name)?;
        Some((ino, attr(ino, state.nodes.get(&ino))))
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent.0 == ROOT).then(|| self.file_entry(name)).flatten() {
            Some((_, a)) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let state = lock(&self.0);
        if ino.0 == ROOT {
            return reply.attr(&TTL, &attr(ROOT, None));
        }
        match state.nodes.get(&ino.0) {
            Some(node) => reply.attr(&TTL, &attr(ino.0, Some(node))),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = lock(&self.0);
        if ino.0 == ROOT {
            return reply.attr(&TTL, &attr(ROOT, None));
        }
        let Some(node) = state.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(size) = size {
            node.data.resize(size as usize, 0);
        }
        if let Some(mode) = mode {
            node.perm = (mode & 0o7777) as u16;
        }
        reply.attr(&TTL, &attr(ino.0, Some(node)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if lock(&self.0).nodes.contains_key(&ino.0) {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let mut state = lock(&self.0);
        if state.names.contains_key(name) {
            return reply.error(Errno::EEXIST);
        }
        let ino = state.next_ino;
        state.next_ino += 1;
        let node =
            Node { data: Vec::new(), durable: Vec::new(), perm: (mode & !umask & 0o7777) as u16 };
        let a = attr(ino, Some(&node));
        state.nodes.insert(ino, node);
        state.names.insert(name.to_owned(), ino);
        reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = lock(&self.0);
        let Some(node) = state.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let start = (offset as usize).min(node.data.len());
        let end = (start + size as usize).min(node.data.len());
        reply.data(&node.data[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = lock(&self.0);
        let Some(node) = state.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let start = offset as usize;
        let end = start + data.len();
        if node.data.len() < end {
            node.data.resize(end, 0);
        }
        node.data[start..end].copy_from_slice(data);
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = lock(&self.0);
        state.syncs += 1;
        if let Some(node) = state.nodes.get_mut(&ino.0) {
            node.durable.clone_from(&node.data);
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = lock(&self.0);
        match (parent.0 == ROOT).then(|| state.names.remove(name)).flatten() {
            Some(ino) => {
                state.nodes.remove(&ino);
                reply.ok();
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut state = lock(&self.0);
        if parent.0 != ROOT || newparent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let Some(ino) = state.names.remove(name) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(old) = state.names.insert(newname.to_owned(), ino) {
            state.nodes.remove(&old);
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let state = lock(&self.0);
        let mut entries: Vec<(u64, FileType, OsString)> =
            vec![(ROOT, FileType::Directory, ".".into()), (ROOT, FileType::Directory, "..".into())];
        let mut files: Vec<_> =
            state.names.iter().map(|(n, i)| (*i, FileType::RegularFile, n.clone())).collect();
        files.sort_by(|a, b| a.2.cmp(&b.2));
        entries.extend(files);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};

    use super::*;

    #[test]
    fn unsynced_writes_are_lost_and_synced_ones_kept() {
        let mut fs = FaultFs::mount().expect("mount (needs root and /dev/fuse)");
        let path = fs.path().join("f");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"durable").unwrap();
        f.sync_all().unwrap();
        f.write_all(b" and lost").unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"D").unwrap();
        drop(f);
        let other = fs.path().join("never-synced");
        std::fs::write(&other, b"gone").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"Durable and lost");
        let report = fs.crash().unwrap();
        assert_eq!(report.files, 2);
        assert!(report.bytes >= 9 + 1 + 4);
        let mut back = Vec::new();
        std::fs::File::open(&path).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, b"durable");
        assert_eq!(std::fs::read(&other).unwrap(), b"", "created, never synced: empty");
        let mounts = |p: &str| {
            std::fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .lines()
                .filter(|l| l.split(' ').nth(1) == Some(p))
                .count()
        };
        let mountpoint = fs.path().to_string_lossy().into_owned();
        assert_eq!(mounts(&mountpoint), 1, "a crash remounts, it does not stack mounts");
        drop(fs);
        assert_eq!(mounts(&mountpoint), 0, "dropping unmounts");
    }
}
