//! Pins powercut's durability model on a real FUSE mount (needs root and /dev/fuse: the mount
//! failing fails the test, loudly, rather than skipping it).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use powercut::{CutReport, PowerCut, Variation};
use tempfile::TempDir;

/// A mount over a fresh backing dir, with room for images beside it. Field order matters: the
/// mount is dropped (unmounted) before the temp dir is removed.
struct Rig {
    fs: PowerCut,
    backing: PathBuf,
    mnt: PathBuf,
    dir: TempDir,
}

impl Rig {
    /// A mount whose backing dir first gets `files` (durable from the start).
    fn with(files: &[(&str, &[u8])]) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        for (name, data) in files {
            let path = backing.join(name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            fs::write(path, data).unwrap();
        }
        let fs = mount(&backing, &mnt);
        Rig {
            fs,
            backing,
            mnt,
            dir,
        }
    }

    fn new() -> Rig {
        Rig::with(&[])
    }

    /// A path on the mount.
    fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// A fresh path for an image.
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cut(&self, variation: Variation, seed: u64, name: &str) -> (PathBuf, CutReport) {
        let out = self.out(name);
        let report = self.fs.cut_with(variation, seed, &out).expect("cut");
        eprintln!("{report}");
        (out, report)
    }
}

fn mount(backing: &Path, mnt: &Path) -> PowerCut {
    PowerCut::mount(backing, mnt).unwrap_or_else(|e| {
        panic!(
            "mounting powercut failed: {e}. These tests need root and /dev/fuse (CI runs them \
             as root); they do not skip."
        )
    })
}

fn fsync_dir(path: &Path) {
    File::open(path)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync of dir {}: {e}", path.display()));
}

/// Opens (creating if needed) a file on the mount for reading and writing.
fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    Other,
}

/// Every entry under `root`, by relative path.
fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let ft = entry.file_type().unwrap();
            if ft.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(root, &path, out);
            } else if ft.is_file() {
                out.insert(rel, Entry::File(fs::read(&path).unwrap()));
            } else if ft.is_symlink() {
                out.insert(rel, Entry::Symlink(fs::read_link(&path).unwrap()));
            } else {
                out.insert(rel, Entry::Other);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn file(data: &[u8]) -> Entry {
    Entry::File(data.to_vec())
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

fn is_eio(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EIO)
}

fn mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let needle = path.canonicalize().unwrap().to_string_lossy().into_owned();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(needle.as_str()))
}

// 1.
#[test]
fn unsynced_write_is_lost_and_fsynced_write_survives_every_variation() {
    let rig = Rig::with(&[("f", b"durable")]);
    let f = open_rw(&rig.m("f"));
    f.write_all_at(b"UNSYNCED-AND-LONGER", 0).unwrap();
    assert_eq!(fs::read(rig.m("f")).unwrap(), b"UNSYNCED-AND-LONGER");
    let (img, report) = rig.cut(Variation::LoseAll, 1, "img");
    assert_eq!(
        snapshot(&img),
        BTreeMap::from([("f".into(), file(b"durable"))])
    );
    assert_eq!((report.writes_lost, report.writes_kept), (1, 0));
    drop(f);

    let synced = pattern(10_000, 1);
    for variation in Variation::ALL {
        for seed in 0..4 {
            let rig = Rig::with(&[("f", b"old")]);
            let f = open_rw(&rig.m("f"));
            f.write_all_at(&synced, 0).unwrap();
            if seed % 2 == 0 {
                f.sync_all().unwrap();
            } else {
                f.sync_data().unwrap();
            }
            // More, unsynced, past and over the end: whatever the cut keeps of it, the synced
            // bytes are untouched.
            f.write_all_at(&pattern(6_000, 2), 10_000).unwrap();
            let (img, _) = rig.cut(variation, seed, "img");
            let got = fs::read(img.join("f")).unwrap();
            assert_eq!(&got[..10_000], &synced[..], "{variation} seed {seed}");
            if variation == Variation::LoseAll {
                assert_eq!(got.len(), 10_000);
            }
        }
    }
}

// 1b. Size changes are pending operations too.
#[test]
fn unsynced_truncate_is_lost() {
    let rig = Rig::with(&[("f", b"0123456789"), ("h", b"old content")]);
    let f = open_rw(&rig.m("f"));
    f.set_len(3).unwrap();
    assert_eq!(fs::read(rig.m("f")).unwrap(), b"012");
    // O_TRUNC of an existing file, and a new file, all unsynced.
    fs::write(rig.m("h"), b"new").unwrap();
    fs::write(rig.m("g"), b"x").unwrap();
    let (img, report) = rig.cut(Variation::LoseAll, 0, "img");
    assert_eq!(
        snapshot(&img),
        BTreeMap::from([
            ("f".into(), file(b"0123456789")),
            ("h".into(), file(b"old content")),
        ])
    );
    assert_eq!(report.size_changes_lost, 2);
    assert_eq!(report.writes_lost, 2);
}

// 1c. A write through an O_DSYNC (or O_SYNC) fd is durable when it returns.
#[test]
fn o_dsync_write_is_durable_on_return() {
    let rig = Rig::with(&[("f", b"old"), ("g", b"old")]);
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(rig.m("f"))
        .unwrap();
    f.write_all_at(b"new", 0).unwrap();
    let g = OpenOptions::new().write(true).open(rig.m("g")).unwrap();
    g.write_all_at(b"new", 0).unwrap();
    let (img, _) = rig.cut(Variation::LoseAll, 0, "img");
    assert_eq!(
        snapshot(&img),
        BTreeMap::from([("f".into(), file(b"new")), ("g".into(), file(b"old"))])
    );
}

// 2.
#[test]
fn created_file_needs_its_directory_fsynced() {
    let rig = Rig::new();
    let f = open_rw(&rig.m("new"));
    f.write_all_at(b"payload", 0).unwrap();
    f.sync_all().unwrap();
    let (img, report) = rig.cut(Variation::LoseAll, 0, "img");
    assert!(
        snapshot(&img).is_empty(),
        "the file's name was never durable"
    );
    assert_eq!(report.live_files_missing, 1);

    for variation in Variation::ALL {
        let rig = Rig::new();
        let f = open_rw(&rig.m("new"));
        f.write_all_at(b"payload", 0).unwrap();
        f.sync_all().unwrap();
        fsync_dir(&rig.mnt);
        let (img, _) = rig.cut(variation, 9, "img");
        assert_eq!(
            snapshot(&img),
            BTreeMap::from([("new".into(), file(b"payload"))]),
            "{variation}"
        );
    }
}

// 3.
#[test]
fn rename_reverts_without_a_directory_fsync() {
    for dir_fsync in [false, true] {
        let rig = Rig::with(&[("a", b"old content")]);
        let tmp = open_rw(&rig.m("tmp"));
        tmp.write_all_at(b"new content", 0).unwrap();
        tmp.sync_all().unwrap();
        fsync_dir(&rig.mnt); // "tmp" is durable
        fs::rename(rig.m("tmp"), rig.m("a")).unwrap();
        assert_eq!(fs::read(rig.m("a")).unwrap(), b"new content");
        if dir_fsync {
            fsync_dir(&rig.mnt);
        }
        let (img, _) = rig.cut(Variation::LoseAll, 0, "img");
        let expected = if dir_fsync {
            BTreeMap::from([("a".into(), file(b"new content"))])
        } else {
            BTreeMap::from([
                ("a".into(), file(b"old content")),
                ("tmp".into(), file(b"new content")),
            ])
        };
        assert_eq!(snapshot(&img), expected, "dir fsync: {dir_fsync}");
    }
}

// 3b. A rename into another directory is two operations, each durable with its own directory.
#[test]
fn cross_directory_rename_is_durable_per_directory() {
    let rig = Rig::with(&[("src/f", b"data"), ("dst/keep", b"k")]);
    fs::rename(rig.m("src/f"), rig.m("dst/f")).unwrap();
    fsync_dir(&rig.m("dst")); // only the target side
    let (img, _) = rig.cut(Variation::LoseAll, 0, "img");
    let snap = snapshot(&img);
    assert_eq!(snap.get("src/f"), Some(&file(b"data")));
    assert_eq!(snap.get("dst/f"), Some(&file(b"data")));
}

// 4.
#[test]
fn unlink_without_directory_fsync_comes_back() {
    for dir_fsync in [false, true] {
        let rig = Rig::with(&[("f", b"keep me"), ("d/g", b"inner")]);
        fs::remove_file(rig.m("f")).unwrap();
        fs::remove_file(rig.m("d/g")).unwrap();
        fs::remove_dir(rig.m("d")).unwrap();
        assert!(!rig.m("f").exists());
        if dir_fsync {
            fsync_dir(&rig.mnt);
        }
        let (img, _) = rig.cut(Variation::LoseAll, 0, "img");
        let expected = if dir_fsync {
            BTreeMap::new()
        } else {
            BTreeMap::from([
                ("d".into(), Entry::Dir),
                ("d/g".into(), file(b"inner")),
                ("f".into(), file(b"keep me")),
            ])
        };
        assert_eq!(snapshot(&img), expected, "dir fsync: {dir_fsync}");
    }
}

// 4b. An unlinked file stays usable through its fd, and comes back with its durable bytes.
#[test]
fn unlinked_open_file_keeps_working_and_comes_back_durable() {
    let rig = Rig::with(&[("f", b"v1")]);
    let f = open_rw(&rig.m("f"));
    fs::remove_file(rig.m("f")).unwrap();
    f.write_all_at(b"v2", 0).unwrap();
    f.sync_all().unwrap();
    let mut back = String::new();
    (&f).read_to_string(&mut back).unwrap();
    assert_eq!(back, "v2");
    assert_eq!(f.metadata().unwrap().len(), 2);
    let (img, _) = rig.cut(Variation::LoseAll, 0, "img");
    assert_eq!(snapshot(&img), BTreeMap::from([("f".into(), file(b"v2"))]));
}

// 5.
#[test]
fn after_a_cut_everything_fails_with_eio() {
    let rig = Rig::with(&[("f", b"data")]);
    let open = open_rw(&rig.m("f"));
    let dir = File::open(&rig.mnt).unwrap();
    rig.cut(Variation::LoseAll, 0, "img");

    let e = open.write_at(b"x", 0).unwrap_err();
    assert!(is_eio(&e), "write: {e}");
    let e = open.sync_all().unwrap_err();
    assert!(is_eio(&e), "fsync: {e}");
    let e = dir.sync_all().unwrap_err();
    assert!(is_eio(&e), "fsync dir: {e}");
    let e = File::create(rig.m("g")).unwrap_err();
    assert!(is_eio(&e), "create: {e}");
    let e = fs::metadata(rig.m("f")).unwrap_err();
    assert!(is_eio(&e), "stat: {e}");
    let e = fs::read_dir(&rig.mnt).unwrap_err();
    assert!(is_eio(&e), "opendir: {e}");
    let e = fs::rename(rig.m("f"), rig.m("h")).unwrap_err();
    assert!(is_eio(&e), "rename: {e}");
    // The backing dir was not touched after the cut.
    assert_eq!(fs::read(rig.backing.join("f")).unwrap(), b"data");

    // A second cut images the same frozen moment.
    let (a, _) = rig.cut(Variation::LoseAll, 0, "again");
    assert_eq!(snapshot(&a), BTreeMap::from([("f".into(), file(b"data"))]));
    // Images never go inside the mount or the backing dir, nor into a non-empty dir.
    assert!(rig.fs.cut(0, &rig.m("inside")).is_err());
    assert!(rig.fs.cut(0, &rig.backing.join("inside")).is_err());
    assert!(rig.fs.cut(0, &a).is_err());
}

// 6.
#[test]
fn keep_some_blocks_keeps_some_pieces_and_is_deterministic() {
    const N: usize = 8 * 4096;
    /// The write's source, page-aligned: the kernel may split a write where copying from the
    /// caller's memory faults (a short write, which `write_all_at` finishes with another),
    /// and such a split then falls on a 4 KiB boundary, as the blocks checked below do.
    #[repr(align(4096))]
    struct PageAligned([u8; N]);
    let rig = Rig::with(&[("f", &[b'a'; N])]);
    let f = open_rw(&rig.m("f"));
    let source = Box::new(PageAligned([b'b'; N]));
    f.write_all_at(&source.0, 0).unwrap();
    let mut mixed_seed = None;
    for seed in 0..20 {
        let (img, report) = rig.cut(Variation::KeepSomeBlocks, seed, &format!("s{seed}"));
        let got = fs::read(img.join("f")).unwrap();
        assert_eq!(got.len(), N);
        let mut kept = 0;
        for block in got.chunks(4096) {
            assert!(
                block.iter().all(|&c| c == block[0]),
                "a 4 KiB piece is kept or lost whole"
            );
            kept += usize::from(block[0] == b'b');
        }
        assert_eq!(report.bytes_kept as usize, kept * 4096);
        if kept > 0 && kept < 8 {
            mixed_seed = Some(seed);
            assert_eq!(report.writes_partial, 1);
            break;
        }
    }
    let seed = mixed_seed.expect("no seed in 0..20 kept some pieces and lost others");
    let (again, _) = rig.cut(Variation::KeepSomeBlocks, seed, "again");
    assert_eq!(
        snapshot(&again),
        snapshot(&rig.out(&format!("s{seed}"))),
        "same seed, same image"
    );
}

// 6b.
#[test]
fn torn_write_keeps_a_strict_prefix_and_is_deterministic() {
    const N: usize = 5000;
    let rig = Rig::with(&[("f", &[b'a'; 2 * N])]);
    let f = open_rw(&rig.m("f"));
    f.write_all_at(&[b'b'; N], 0).unwrap();
    f.write_all_at(&[b'c'; N], N as u64).unwrap();
    let mut torn_seed = None;
    for seed in 0..40 {
        let (img, _) = rig.cut(Variation::TornWrite, seed, &format!("s{seed}"));
        let got = fs::read(img.join("f")).unwrap();
        assert_eq!(got.len(), 2 * N);
        let bs = got.iter().take_while(|&&c| c == b'b').count();
        let cs = got[bs..].iter().take_while(|&&c| c == b'c').count();
        assert!(
            got[bs + cs..].iter().all(|&c| c == b'a'),
            "seed {seed}: not a prefix"
        );
        if cs > 0 {
            assert_eq!(
                bs, N,
                "seed {seed}: the second write kept, the first must be whole"
            );
            assert!(cs < N, "seed {seed}: the last kept write must be torn");
        } else {
            assert!(bs < N, "seed {seed}: the last kept write must be torn");
        }
        if (bs > 0 && bs < N) || (cs > 0 && cs < N) {
            torn_seed.get_or_insert(seed);
        }
    }
    let seed = torn_seed.expect("no seed in 0..40 tore a write");
    let (again, _) = rig.cut(Variation::TornWrite, seed, "again");
    assert_eq!(snapshot(&again), snapshot(&rig.out(&format!("s{seed}"))));
}

// 6c. Directory logs are kept as prefixes.
#[test]
fn directory_ops_are_kept_as_a_prefix() {
    let rig = Rig::new();
    for name in ["a", "b", "c", "d"] {
        fs::write(rig.m(name), name).unwrap();
    }
    let mut counts = std::collections::BTreeSet::new();
    for seed in 0..30 {
        let (img, report) = rig.cut(Variation::KeepSomeBlocks, seed, &format!("s{seed}"));
        let names: Vec<String> = snapshot(&img).into_keys().collect();
        let expected: Vec<String> = ["a", "b", "c", "d"][..names.len()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(names, expected, "seed {seed}: creations kept out of order");
        assert_eq!(report.dir_ops_kept as usize, names.len());
        counts.insert(names.len());
    }
    assert!(counts.len() > 2, "prefix lengths hardly vary: {counts:?}");
}

// 7.
#[test]
fn nested_directory_needs_every_fsync_in_the_chain() {
    for parent_fsync in [true, false] {
        let rig = Rig::new();
        fs::create_dir(rig.m("d")).unwrap();
        let f = open_rw(&rig.m("d/f"));
        f.write_all_at(b"deep", 0).unwrap();
        f.sync_all().unwrap();
        fsync_dir(&rig.m("d"));
        if parent_fsync {
            fsync_dir(&rig.mnt);
        }
        let (img, _) = rig.cut(Variation::LoseAll, 0, "img");
        let expected = if parent_fsync {
            BTreeMap::from([("d".into(), Entry::Dir), ("d/f".into(), file(b"deep"))])
        } else {
            BTreeMap::new()
        };
        assert_eq!(snapshot(&img), expected, "parent fsync: {parent_fsync}");
    }
}

// 8.
#[test]
fn a_cut_image_remounts_as_the_rebooted_disk() {
    let rig = Rig::with(&[("keep/old", b"old")]);
    fs::create_dir(rig.m("dir")).unwrap();
    fs::write(rig.m("dir/durable"), b"durable").unwrap();
    File::open(rig.m("dir/durable"))
        .unwrap()
        .sync_all()
        .unwrap();
    std::os::unix::fs::symlink("dir/durable", rig.m("link")).unwrap();
    fsync_dir(&rig.m("dir"));
    fsync_dir(&rig.mnt);
    fs::write(rig.m("dir/lost"), b"lost").unwrap();
    let (img, _) = rig.cut(Variation::LoseAll, 0, "img");
    let expected = BTreeMap::from([
        ("dir".into(), Entry::Dir),
        ("dir/durable".into(), file(b"durable")),
        ("keep".into(), Entry::Dir),
        ("keep/old".into(), file(b"old")),
        ("link".into(), Entry::Symlink("dir/durable".into())),
    ]);
    assert_eq!(snapshot(&img), expected);
    let Rig { fs: old, dir, .. } = rig;
    old.unmount().unwrap();

    let mnt2 = dir.path().join("mnt2");
    fs::create_dir(&mnt2).unwrap();
    let rebooted = mount(&img, &mnt2);
    assert_eq!(
        snapshot(&mnt2),
        expected,
        "the mount shows exactly the image"
    );
    assert_eq!(fs::read(mnt2.join("link")).unwrap(), b"durable");
    // Everything in the image is durable after the reboot.
    let again = dir.path().join("img2");
    rebooted.cut_with(Variation::LoseAll, 0, &again).unwrap();
    assert_eq!(snapshot(&again), expected);
    rebooted.unmount().unwrap();
    assert!(!mounted(&mnt2), "unmounted");
}

// 9.
#[test]
fn flock_is_exclusive_on_the_mount() {
    let rig = Rig::new();
    let a = open_rw(&rig.m("db"));
    let b = open_rw(&rig.m("db"));
    // SAFETY: flock on open fds.
    let lock = |f: &File| unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(
        lock(&a),
        0,
        "first exclusive lock: {}",
        io::Error::last_os_error()
    );
    assert_eq!(lock(&b), -1, "a second exclusive lock must fail");
    assert_eq!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::EWOULDBLOCK)
    );
    // Closing releases the lock once no process holds the open file description: a child
    // another test thread forks at this moment (to mount, say) holds a copy of every
    // descriptor until it execs, which closes them (Rust opens with O_CLOEXEC). So the lock is
    // retried until a deadline.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock(&b) != 0 {
        let error = io::Error::last_os_error();
        assert!(
            error.raw_os_error() == Some(libc::EWOULDBLOCK) && Instant::now() < deadline,
            "lock after release: {error}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A xorshift for the workload (the crate's PRNG is private).
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

// 10.
#[test]
fn sled_like_workload_reads_back_what_it_wrote() {
    let rig = Rig::new();
    let path = rig.m("db");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .unwrap();
    fsync_dir(&rig.mnt);
    let mut shadow = vec![0u8; 0];
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    for i in 0..400 {
        let offset = (rng.next() % (1 << 20)) as usize;
        let len = 1 + (rng.next() % 20_000) as usize;
        let data = pattern(len, i as u8);
        f.write_all_at(&data, offset as u64).unwrap();
        if shadow.len() < offset + len {
            shadow.resize(offset + len, 0);
        }
        shadow[offset..offset + len].copy_from_slice(&data);
        if i % 10 == 9 {
            f.sync_data().unwrap();
        }
        if i % 50 == 0 {
            let start = (rng.next() as usize) % shadow.len();
            let n = std::cmp::min(8192, shadow.len() - start);
            let mut buf = vec![0; n];
            f.read_exact_at(&mut buf, start as u64).unwrap();
            assert_eq!(buf, shadow[start..start + n], "pread at {start}");
        }
    }
    f.sync_all().unwrap();
    assert_eq!(
        fs::read(&path).unwrap(),
        shadow,
        "read back through the mount"
    );
    assert_eq!(
        fs::read(rig.backing.join("db")).unwrap(),
        shadow,
        "backing file"
    );

    // O_APPEND goes to the end, whatever the backing fd would think.
    let mut log = OpenOptions::new()
        .append(true)
        .create(true)
        .open(rig.m("log"))
        .unwrap();
    log.write_all(b"one,").unwrap();
    log.write_all(b"two").unwrap();
    assert_eq!(fs::read(rig.m("log")).unwrap(), b"one,two");

    // statvfs passes through the backing dir's figures.
    let statvfs = |p: &Path| {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: plain data filled by the call.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and buffer.
        assert_eq!(
            unsafe { libc::statvfs(c.as_ptr(), &mut s) },
            0,
            "statvfs {p:?}"
        );
        s
    };
    let (m, b) = (statvfs(&rig.mnt), statvfs(&rig.backing));
    assert_eq!(
        (m.f_blocks, m.f_frsize, m.f_bsize, m.f_files, m.f_namemax),
        (b.f_blocks, b.f_frsize, b.f_bsize, b.f_files, b.f_namemax)
    );
    assert!(m.f_bavail > 0 && m.f_bavail.abs_diff(b.f_bavail) < b.f_blocks / 100);

    let (img, _) = rig.cut(Variation::TornWrite, 3, "img");
    assert_eq!(
        fs::read(img.join("db")).unwrap(),
        shadow,
        "all of it was fsynced"
    );
}

// Namespace passthrough: what the daemon's directory handling relies on.
#[test]
fn namespace_operations_pass_through() {
    let rig = Rig::new();
    fs::create_dir_all(rig.m("a/b")).unwrap();
    fs::write(rig.m("a/b/f"), b"x").unwrap();
    let e = fs::remove_dir(rig.m("a/b")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(rig.m("a/b/f"))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    fs::rename(rig.m("a/b"), rig.m("c")).unwrap();
    assert_eq!(fs::read(rig.m("c/f")).unwrap(), b"x");
    assert_eq!(fs::read(rig.backing.join("c/f")).unwrap(), b"x");
    let names: Vec<String> = fs::read_dir(&rig.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, ["a", "c"]);
    std::os::unix::fs::symlink("c/f", rig.m("l")).unwrap();
    assert_eq!(fs::read_link(rig.m("l")).unwrap(), Path::new("c/f"));
    let f = File::options()
        .write(true)
        .truncate(true)
        .open(rig.m("c/f"))
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    // fallocate growing the file is a size change.
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 10_000) }, 0);
    assert_eq!(fs::metadata(rig.m("c/f")).unwrap().len(), 10_000);
    f.sync_all().unwrap();
    let mut perms = fs::metadata(rig.m("c/f")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    fs::set_permissions(rig.m("c/f"), perms).unwrap();
    fs::remove_file(rig.m("l")).unwrap();
    fs::remove_dir(rig.m("a")).unwrap();
    let fifo = CString::new(rig.m("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert_eq!(snapshot(&rig.mnt).get("fifo"), Some(&Entry::Other));
    fsync_dir(&rig.mnt);
    let (img, _) = rig.cut(Variation::LoseAll, 0, "img");
    // "c" (the moved "b") is durable in the root, but its own entries were never fsynced.
    assert_eq!(
        snapshot(&img),
        BTreeMap::from([("c".into(), Entry::Dir), ("fifo".into(), Entry::Other)])
    );
}

#[test]
fn moved_directory_keeps_its_fsynced_entries() {
    let rig = Rig::new();
    fs::create_dir_all(rig.m("a/b")).unwrap();
    let f = open_rw(&rig.m("a/b/f"));
    f.set_len(10_000).unwrap();
    f.sync_all().unwrap();
    fsync_dir(&rig.m("a/b"));
    fs::rename(rig.m("a/b"), rig.m("c")).unwrap();
    fs::remove_dir(rig.m("a")).unwrap();
    fsync_dir(&rig.mnt);
    let (img, _) = rig.cut(Variation::LoseAll, 0, "img");
    assert_eq!(
        snapshot(&img),
        BTreeMap::from([("c".into(), Entry::Dir), ("c/f".into(), file(&[0; 10_000]))])
    );
}

#[test]
fn unmount_leaves_no_mount_and_does_not_wait_for_open_files() {
    let rig = Rig::new();
    let mnt = rig.mnt.clone();
    assert!(mounted(&mnt));
    let f = open_rw(&rig.m("held-open"));
    let Rig { fs: pc, dir, .. } = rig;
    let start = Instant::now();
    pc.unmount().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(!mounted(&mnt), "no stale mount");
    // The connection was aborted: the fd still open fails instead of hanging.
    let e = f.write_at(b"x", 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    drop(f);
    drop(dir);
}

/// Run as a child by `watchdog_unmounts_after_the_process_dies`: mounts, says so, and waits
/// to be killed.
#[test]
#[ignore = "helper, run as a child process by watchdog_unmounts_after_the_process_dies"]
fn watchdog_helper_child() {
    let Ok(dir) = std::env::var("POWERCUT_WATCHDOG_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let fs = mount(&dir.join("backing"), &dir.join("mnt"));
    // Files open on its own mount as it dies: closing them must not wait on the dead server.
    let held = open_rw(&dir.join("mnt/held"));
    held.write_all_at(b"x", 0).unwrap();
    let _dir = File::open(dir.join("mnt")).unwrap();
    println!("MOUNTED");
    io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
    drop(held);
    drop(fs);
}

#[test]
fn watchdog_unmounts_after_the_process_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(dir.path().join("backing")).unwrap();
    fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "watchdog_helper_child",
            "--nocapture",
        ])
        .env("POWERCUT_WATCHDOG_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("MOUNTED") {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "child ended before mounting: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    let canonical = mnt.canonicalize().unwrap();
    assert!(mounted(&canonical));
    child.kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the killed process does not finish dying"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    while mounted(&canonical) {
        assert!(Instant::now() < deadline, "the mount outlived its process");
        std::thread::sleep(Duration::from_millis(20));
    }
}
