//! Reading a file an operator names (a certificate, a key, the app's
//! configuration) without trusting what is at the path.
//!
//! A generation reads these files before it takes its sockets, and a
//! reload waits for it: a path that points at `/dev/zero` must not fill the
//! memory, and one that points at a FIFO must not hang the new process
//! (and the reload with it) until the ready timeout. So the file is opened
//! without blocking, refused unless it is a regular file, and read only up
//! to a cap.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Reads the regular file at `path` whole, if it holds at most `max` bytes.
///
/// Opening never blocks (`O_NONBLOCK`: a FIFO without a writer would
/// otherwise wait in `open`), and a path that is not a regular file (a
/// FIFO, a device, a directory, a socket) is refused before a byte is read.
/// Symbolic links are followed, as certbot's `live/` folder needs.
///
/// The errors are one phrase each, for the caller to put after the path:
/// what the system said when it cannot be opened or read;
/// [`io::ErrorKind::InvalidInput`] with `a FIFO, not a regular file` (and
/// the like); [`io::ErrorKind::FileTooLarge`] with `larger than MAX bytes`.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = File::options()
        .read(true)
        // Not blocking in `open` on a FIFO, and never becoming the
        // controlling terminal if the path is one.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    let not = if kind.is_file() {
        None
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    };
    if let Some(what) = not {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}, not a regular file"),
        ));
    }
    // A regular file can still grow while it is read (or be a /proc file
    // whose size says 0): the cap holds whatever the size says.
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_up_to_the_cap_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_regular(&path, 5).unwrap(), b"12345");
        let e = read_regular(&path, 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert_eq!(e.to_string(), "larger than 4 bytes");

        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "a character device, not a regular file");
        let e = read_regular(dir.path(), 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "a directory, not a regular file");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // No writer: a blocking open would never return.
        let e = read_regular(&fifo, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "a FIFO, not a regular file");
        let e = read_regular(&dir.path().join("missing"), 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
