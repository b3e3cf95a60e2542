//! Checking a release archive before it goes anywhere: every entry must stay inside the release
//! directory. Refuses absolute paths, `..`, and links that point out of the release (tar-slip).

use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Why an archive is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("archive entry {entry:?} escapes the release: {why}")]
    Escapes { entry: String, why: &'static str },
    #[error("archive entry {entry:?} is a {kind}, which a release may not contain")]
    Kind { entry: String, kind: &'static str },
    #[error("cannot read the archive: {0}")]
    Read(#[from] std::io::Error),
}

/// Checks every entry of a tar.gz read from `reader`.
pub fn check(reader: impl Read) -> Result<usize, Error> {
    let mut archive = tar::Archive::new(GzDecoder::new(reader));
    let mut n = 0;
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path.display().to_string();
        let normal = inside(&path).ok_or_else(|| Error::Escapes {
            entry: name.clone(),
            why: "absolute or through ..",
        })?;
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()?
                .ok_or_else(|| Error::Escapes {
                    entry: name.clone(),
                    why: "a link without a target",
                })?
                .into_owned();
            // A symlink resolves relative to its own directory; a hard link to the archive root.
            let base = if kind.is_symlink() {
                normal.parent().map(Path::to_path_buf).unwrap_or_default()
            } else {
                PathBuf::new()
            };
            if target.is_absolute() || inside(&base.join(&target)).is_none() {
                return Err(Error::Escapes {
                    entry: name,
                    why: "a link pointing outside the release",
                });
            }
        } else if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            return Err(Error::Kind {
                entry: name,
                kind: "device or fifo",
            });
        }
        n += 1;
    }
    Ok(n)
}

/// `path` normalised, if it stays inside the directory it is relative to.
fn inside(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tar.gz with raw headers, so that malicious names can be written at all.
    fn archive(entries: &[(&str, tar::EntryType, Option<&str>)]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        {
            let mut b = tar::Builder::new(&mut gz);
            for (name, kind, link) in entries {
                let mut h = tar::Header::new_old();
                let bytes = h.as_old_mut();
                bytes.name[..name.len()].copy_from_slice(name.as_bytes());
                if let Some(l) = link {
                    bytes.linkname[..l.len()].copy_from_slice(l.as_bytes());
                }
                h.set_entry_type(*kind);
                h.set_size(0);
                h.set_mode(0o644);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            b.finish().unwrap();
        }
        gz.finish().unwrap()
    }

    fn check_bytes(entries: &[(&str, tar::EntryType, Option<&str>)]) -> Result<usize, Error> {
        check(&archive(entries)[..])
    }

    #[test]
    fn ordinary_releases_pass() {
        use tar::EntryType::*;
        assert_eq!(
            check_bytes(&[
                ("bin/app", Regular, None),
                ("config/", Directory, None),
                ("bin/current", Symlink, Some("app")),
                ("config/link", Symlink, Some("../bin/app")),
                ("bin/hard", Link, Some("bin/app")),
            ])
            .unwrap(),
            5
        );
    }

    #[test]
    fn tar_slip_is_refused() {
        use tar::EntryType::*;
        for bad in [
            vec![("../evil", Regular, None)],
            vec![("/etc/passwd", Regular, None)],
            vec![("a/../../evil", Regular, None)],
            vec![("link", Symlink, Some("/etc"))],
            vec![("a/link", Symlink, Some("../../etc"))],
            vec![("hard", Link, Some("../outside"))],
            vec![("dev", Char, None)],
        ] {
            let name = bad[0].0;
            assert!(check_bytes(&bad).is_err(), "{name} must be refused");
        }
    }
}
