//! Reading the files an operator points halo at (token files, PEM files)
//! without letting a wrong path wedge the process.
//!
//! `open(2)` on a FIFO blocks until a writer appears, and a read of a
//! device or a socket may never end: a token file path that names one
//! (a typo, a `mkfifo` someone forgot) used to block a SIGHUP reload, and
//! with it SIGTERM, indefinitely. So every such file is opened with
//! `O_NONBLOCK` (a FIFO then opens at once, and is refused), checked with
//! `fstat` on the descriptor actually opened (no window between a check
//! and the open), and read with a bound. Symlinks are followed: Kubernetes
//! mounts secrets as symlinks to regular files, and those are fine; what
//! counts is what the final target is.
//!
//! This makes a wrong path fail at once; it cannot make a hung file system
//! (NFS, FUSE) answer. Callers on an async runtime therefore run the read
//! on a thread of its own with a deadline (halo-lb's reload,
//! halo-sidecar's token reload).

use std::fs::{File, Metadata};
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Why a file could not be read. Its text never names the file (the caller
/// prefixes the path and the setting) and never contains the file's bytes.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// `open(2)` failed: missing, no permission, …
    #[error("{0}")]
    Open(std::io::Error),
    /// What was opened is not a regular file (the final target, symlinks
    /// followed).
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    /// A secret that group or others may read or write.
    #[error(
        "is readable or writable by others (mode {0:03o}); make it 0600 or 0400 (e.g. chmod 600, or defaultMode: 0400 for a Kubernetes secret)"
    )]
    Loose(u32),
    /// More than the bound.
    #[error("is larger than {0} bytes")]
    TooLarge(u64),
    /// Reading failed after the open.
    #[error("read failed: {0}")]
    Read(std::io::Error),
}

impl FileError {
    /// The error with the file named: `"<path>: <OS error>"` for a failed
    /// open, else `"<path> is …"`.
    pub fn naming(&self, path: &Path) -> String {
        match self {
            FileError::Open(e) => format!("{}: {e}", path.display()),
            e => format!("{} {e}", path.display()),
        }
    }
}

/// What a file that is not a regular file is, in words, for an error:
/// "a FIFO (named pipe)", "a directory", … `None` for a regular file.
pub fn not_regular(meta: &Metadata) -> Option<&'static str> {
    let kind = meta.file_type();
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else {
        Some("not a file")
    }
}

/// Opens `path` for reading without blocking (`O_NONBLOCK`, `O_NOCTTY`;
/// symlinks followed) and checks, on the descriptor opened, that it is a
/// regular file.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), FileError> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) => {
            // A unix socket cannot be opened at all (ENXIO): say what it is
            // rather than "No such device or address".
            if let Some(what) = std::fs::metadata(path).ok().as_ref().and_then(not_regular) {
                return Err(FileError::NotRegular(what));
            }
            return Err(FileError::Open(e));
        }
    };
    let meta = file.metadata().map_err(FileError::Read)?;
    if let Some(what) = not_regular(&meta) {
        return Err(FileError::NotRegular(what));
    }
    Ok((file, meta))
}

/// Reads at most `max` bytes of the regular file `path` (see
/// [`open_regular`]); more is [`FileError::TooLarge`].
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let (file, _) = open_regular(path)?;
    read_bounded(file, max)
}

/// Reads a secret (a token file): a regular file as [`read_regular`], and
/// readable and writable by its owner only (mode `& 0o077 == 0`). A file
/// others can read is refused, not warned about: whoever can read it holds
/// the secret, and a warning in a start-up log is easy to miss (ssh refuses
/// loose private keys for the same reason).
pub fn read_secret(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let (file, meta) = open_regular(path)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(FileError::Loose(mode));
    }
    read_bounded(file, max)
}

fn read_bounded(file: File, max: u64) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(FileError::Read)?;
    if bytes.len() as u64 > max {
        return Err(FileError::TooLarge(max));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::fs::Permissions;
    use std::time::{Duration, Instant};

    use super::*;

    fn write(dir: &Path, name: &str, text: &[u8], mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn regular_files_and_symlinks_to_them_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "token", b"abc\n", 0o600);
        assert_eq!(read_secret(&file, 16).unwrap(), b"abc\n");
        // A Kubernetes secret: a symlink (through ..data) to a 0400 file.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_secret(&link, 16).unwrap(), b"abc\n");
        // The bound: exactly max is fine, one more byte is not.
        assert_eq!(read_regular(&file, 4).unwrap().len(), 4);
        let e = read_regular(&file, 3).unwrap_err().to_string();
        assert_eq!(e, "is larger than 3 bytes");
    }

    /// A FIFO used to block `open` until a writer came: now it is refused at
    /// once, by name, whether named directly or through a symlink.
    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix_mkfifo(&fifo);
        let link = dir.path().join("link-to-fifo");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        for path in [&fifo, &link] {
            let started = Instant::now();
            let e = read_secret(path, 4096).unwrap_err().to_string();
            assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
            assert_eq!(e, "is a FIFO (named pipe), not a regular file");
            assert!(matches!(read_regular(path, 4096), Err(FileError::NotRegular(_))));
        }
    }

    #[test]
    fn other_kinds_of_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_secret(dir.path(), 16).unwrap_err().to_string();
        assert_eq!(e, "is a directory, not a regular file");
        let e = read_regular(Path::new("/dev/null"), 16).unwrap_err().to_string();
        assert_eq!(e, "is a character device, not a regular file");
        let socket = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let e = read_secret(&socket, 16).unwrap_err().to_string();
        assert_eq!(e, "is a socket, not a regular file");
        let missing = dir.path().join("missing");
        let e = read_secret(&missing, 16).unwrap_err();
        assert!(
            matches!(&e, FileError::Open(io) if io.kind() == std::io::ErrorKind::NotFound),
            "{e}"
        );
        assert!(e
            .naming(&missing)
            .starts_with(&format!("{}: No such file", missing.display())));
        let e = read_secret(&socket, 16).unwrap_err();
        assert_eq!(
            e.naming(&socket),
            format!("{} is a socket, not a regular file", socket.display())
        );
    }

    #[test]
    fn secrets_must_be_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_secret(&write(dir.path(), "ro", b"t", 0o400), 16).is_ok());
        for (mode, shown) in [(0o640, "mode 640"), (0o644, "mode 644"), (0o602, "mode 602")] {
            let e = read_secret(&write(dir.path(), "loose", b"hunter2", mode), 16)
                .unwrap_err()
                .to_string();
            assert!(e.contains(shown) && !e.contains("hunter2"), "{e}");
        }
        // Not a rule for public files (CA certificates).
        assert!(read_regular(&write(dir.path(), "ca", b"pem", 0o644), 16).is_ok());
    }

    fn nix_mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
        assert!(status.success());
    }
}
