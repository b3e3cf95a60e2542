//! Checking a release archive before it goes anywhere: every entry must stay inside the release
//! directory. Refuses absolute paths, `..`, and links that point out of the release (tar-slip).

use flate2::read::MultiGzDecoder;
use std::collections::{HashMap, VecDeque};
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
///
/// Paths are resolved the way the kernel resolves them once extracted: a symlink of the archive
/// met before the last component is followed (`sub/up -> ..`, then `esc -> sub/up/../..` lands
/// outside, though each looks inside on its own), so an entry or a link target that goes
/// through links is refused only if it lands outside. Names starting with `.ferry-` at the top
/// are ferry's own markers on the host, which the deploy scripts write.
pub fn check(reader: impl Read) -> Result<usize, Error> {
    // Every gzip member, as the host's `tar -xz` reads them: with only the first, entries in a
    // second member would reach the host unchecked.
    let mut archive = tar::Archive::new(MultiGzDecoder::new(reader));
    // (name, path, link target and whether it is a hard link) of every entry
    let mut entries = Vec::new();
    let mut symlinks = HashMap::new();
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path.display().to_string();
        let kind = entry.header().entry_type();
        if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            return Err(Error::Kind {
                entry: name,
                kind: "device or fifo",
            });
        }
        let normal = inside(&path).ok_or_else(|| Error::Escapes {
            entry: name.clone(),
            why: "absolute or through ..",
        })?;
        let target = if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()?
                .ok_or_else(|| Error::Escapes {
                    entry: name.clone(),
                    why: "a link without a target",
                })?
                .into_owned();
            if target.is_absolute() {
                return Err(Error::Escapes {
                    entry: name,
                    why: "a link pointing outside the release",
                });
            }
            if kind.is_symlink() {
                symlinks.insert(normal, target.clone());
            }
            Some((target, kind.is_hard_link()))
        } else {
            None
        };
        entries.push((name, path, target));
    }
    for (name, path, target) in &entries {
        let escapes = |why| Error::Escapes {
            entry: name.clone(),
            why,
        };
        // (the last component is the entry itself, not followed)
        let parent = path.parent().unwrap_or(Path::new(""));
        let dir = resolve(parent, &symlinks)
            .ok_or_else(|| escapes("through a link pointing outside the release"))?;
        let first = dir
            .components()
            .next()
            .or_else(|| path.components().next_back());
        if first.is_some_and(|c| c.as_os_str().to_string_lossy().starts_with(".ferry-")) {
            return Err(escapes(
                "a name ferry keeps for its own markers on the host",
            ));
        }
        if let Some((target, hard)) = target {
            // A symlink resolves relative to its own directory; a hard link to the archive root.
            let from = if *hard { PathBuf::new() } else { dir };
            if resolve(&from.join(target), &symlinks).is_none() {
                return Err(escapes("a link pointing outside the release"));
            }
        }
    }
    Ok(entries.len())
}

/// Links followed in one resolution at most (the kernel's ELOOP bound).
const MAX_HOPS: usize = 40;

/// Where `path` (relative to the release) lands once extracted, following the archive's
/// `symlinks` met on the way, if inside the release.
fn resolve(path: &Path, symlinks: &HashMap<PathBuf, PathBuf>) -> Option<PathBuf> {
    let mut todo: VecDeque<std::ffi::OsString> = VecDeque::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => todo.push_back(p.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => todo.push_back("..".into()),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    let mut out = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            if !out.pop() {
                return None;
            }
            continue;
        }
        out.push(&c);
        if let Some(target) = symlinks.get(&out) {
            hops += 1;
            if hops > MAX_HOPS || target.is_absolute() {
                return None;
            }
            out.pop();
            for c in target.components().rev() {
                match c {
                    Component::Normal(p) => todo.push_front(p.to_owned()),
                    Component::CurDir => {}
                    Component::ParentDir => todo.push_front("..".into()),
                    Component::RootDir | Component::Prefix(_) => return None,
                }
            }
        }
    }
    Some(out)
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
        // Links through links that stay inside (pnpm's node_modules, say) pass.
        assert_eq!(
            check_bytes(&[
                (
                    "node_modules/.pnpm/foo@1/node_modules/foo/bin/foo",
                    Regular,
                    None
                ),
                (
                    "node_modules/foo",
                    Symlink,
                    Some(".pnpm/foo@1/node_modules/foo")
                ),
                ("node_modules/.bin/foo", Symlink, Some("../foo/bin/foo")),
                ("here", Symlink, Some(".")),
                ("again", Symlink, Some("here/here/bin")),
            ])
            .unwrap(),
            5
        );
    }

    /// A release in two gzip members: the host's `tar -xz` reads both as one stream, so the
    /// check must too (with the first member alone, the second's entries went unchecked).
    #[test]
    fn every_gzip_member_is_checked() {
        use std::io::Write;
        let mut tar = tar::Builder::new(Vec::new());
        let mut benign = tar::Header::new_gnu();
        benign.set_size(3);
        benign.set_mode(0o644);
        benign.set_cksum();
        tar.append_data(&mut benign, "app", &b"app"[..]).unwrap();
        let mut evil = tar::Header::new_old();
        evil.as_old_mut().name[..9].copy_from_slice(b"../escape");
        evil.set_size(0);
        evil.set_mode(0o644);
        evil.set_cksum();
        tar.append(&evil, std::io::empty()).unwrap();
        let bytes = tar.into_inner().unwrap();
        // the first entry (header and one block of data) in one member, the rest in another
        let (first, rest) = bytes.split_at(1024);
        let member = |data: &[u8]| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(data).unwrap();
            gz.finish().unwrap()
        };
        let mut both = member(first);
        both.extend(member(rest));
        let err = check(&both[..]).unwrap_err();
        assert!(err.to_string().contains("../escape"), "{err}");
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
            // Through a link of the archive: each link alone looks inside.
            vec![
                ("sub/up", Symlink, Some("..")),
                ("esc", Symlink, Some("sub/up/../..")),
            ],
            vec![("d", Symlink, Some("..")), ("d/x", Regular, None)],
            vec![("l", Symlink, Some("..")), ("hard", Link, Some("l/app"))],
            vec![("loop", Symlink, Some("loop/x"))],
            // ferry's own markers on the host
            vec![(".ferry-previous", Symlink, Some("bin"))],
            vec![("./.ferry-release", Regular, None)],
        ] {
            let name = bad[0].0;
            assert!(check_bytes(&bad).is_err(), "{name} must be refused");
        }
    }
}
