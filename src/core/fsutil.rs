//! File-system helpers: atomic writes and relative paths.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written, flushed
/// to disk and renamed over `path`, so a crash leaves either the old file or the new one whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    // A temporary file is private (0600); give the result the usual permissions, or keep those
    // of the file it replaces.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode());
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // Make the rename itself durable (best effort: not every platform can open a folder).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// How the temporary files of [`write_atomic`] begin; the writer's process id follows, so a later
/// process can tell what a killed writer left from what a running one is writing.
pub const TEMP_PREFIX: &str = ".moi-";

/// Removes from `dir` the temporary files of [`write_atomic`] whose writer is no longer running
/// (killed mid-write); returns how many went. Files of running processes are left alone.
pub fn remove_dead_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .filter(|_| name.to_string_lossy().ends_with(".tmp"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if !process_running(pid) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether a process with this id exists (one that is gone but not yet waited for counts).
fn process_running(pid: i32) -> bool {
    if pid <= 0 {
        return true;
    }
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// Writes a folder atomically: `fill` writes its files into a temporary folder beside `dir`,
/// which is flushed to disk and then swapped with `dir` in one step, so a kill at any moment
/// leaves either the old folder whole or the new one (on Linux, `renameat2` with
/// `RENAME_EXCHANGE`; elsewhere the old folder is moved aside for the instant between two
/// renames). The old contents are then removed.
pub fn write_dir_atomic(
    dir: &Path,
    fill: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("folder")
        .to_string();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}-"))
        .tempdir_in(parent)?;
    fill(tmp.path())?;
    for entry in std::fs::read_dir(tmp.path())? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    std::fs::File::open(tmp.path())?.sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    if dir.exists() {
        if !exchange(tmp.path(), dir) {
            let aside = parent.join(format!(".{name}.old"));
            if aside.exists() {
                std::fs::remove_dir_all(&aside)?;
            }
            std::fs::rename(dir, &aside)?;
            std::fs::rename(tmp.path(), dir)?;
            std::fs::remove_dir_all(&aside)?;
        }
        // `tmp` now holds the old folder; dropping it removes it.
    } else {
        let kept = tmp.keep();
        std::fs::rename(&kept, dir)?;
    }
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Swaps two paths in one step where the system can; whether it did.
fn exchange(a: &Path, b: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let (Ok(a), Ok(b)) = (
            std::ffi::CString::new(a.as_os_str().as_bytes()),
            std::ffi::CString::new(b.as_os_str().as_bytes()),
        ) else {
            return false;
        };
        // SAFETY: both are valid NUL-terminated paths; the call only reads them.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        rc == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        false
    }
}

/// Gives a file the usual permissions (0644): temporary files that became real ones are private.
pub fn set_readable(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    }
    let _ = path;
    Ok(())
}

/// `path` written relative to the folder `base` when both are absolute and share a root;
/// otherwise `path` unchanged.
pub fn relative_to(path: &Path, base: &Path) -> PathBuf {
    if !(path.is_absolute() && base.is_absolute()) {
        return path.to_path_buf();
    }
    let path = normalize(path);
    let base = normalize(base);
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common == 0 {
        return path;
    }
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Removes `.` and resolves `..` lexically (without touching the file system).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `/..` is `/`.
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                // Leading `..`s stay: `../../x` is not `x`.
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_temporary_files_of_writers_that_are_gone_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir
            .path()
            .join(format!(".moi-{}-abc.tmp", std::process::id()));
        // Above any pid Linux hands out (at most 2^22).
        let dead = dir.path().join(".moi-999999999-abc.tmp");
        let other = dir.path().join(".moi-notes.txt");
        for p in [&ours, &dead, &other] {
            std::fs::write(p, "x").unwrap();
        }
        write_atomic(&dir.path().join("p.toml"), b"whole").unwrap();
        assert_eq!(remove_dead_temps(dir.path()), 1);
        assert!(ours.exists() && other.exists() && !dead.exists());
        assert_eq!(std::fs::read(dir.path().join("p.toml")).unwrap(), b"whole");
    }

    #[test]
    fn leading_parent_folders_are_kept() {
        assert_eq!(
            normalize(Path::new("./../../tmp/x")),
            Path::new("../../tmp/x")
        );
        assert_eq!(normalize(Path::new("a/../../b")), Path::new("../b"));
        assert_eq!(normalize(Path::new("/a/../../b")), Path::new("/b"));
        assert_eq!(normalize(Path::new("a/./b/../c")), Path::new("a/c"));
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_to(Path::new("/a/b/data/x.jsonl"), Path::new("/a/b/proj")),
            PathBuf::from("../data/x.jsonl")
        );
        assert_eq!(
            relative_to(Path::new("/a/b/x.jsonl"), Path::new("/a/b")),
            PathBuf::from("x.jsonl")
        );
        assert_eq!(
            relative_to(Path::new("rel/x"), Path::new("/a")),
            PathBuf::from("rel/x")
        );
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        write_atomic(&path, b"first version, long").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
