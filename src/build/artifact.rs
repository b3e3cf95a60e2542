//! Packing a build's artifact paths into a deterministic tar.gz and publishing it to the artifact
//! store under a content-addressed key.

use super::Error;
use flate2::Compression;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// A published artifact: what `ArtifactPublished` records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// `<project>-<tag>-<shortsha>.tar.gz`.
    pub name: String,
    /// `sha256/<aa>/<hash>/<name>`.
    pub key: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// The store already held these bytes under this key; nothing was uploaded.
    pub reused: bool,
}

/// Where artifacts are published: `file://` (a local directory) or `s3://` (an S3-compatible
/// store, for fleets whose agents and deploy targets do not share a disk).
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    url: url::Url,
    store: Arc<dyn ObjectStore>,
}

impl ArtifactStore {
    /// `file:///var/lib/ferry/artifacts` (created if missing) or `s3://<bucket>[/<prefix>]`.
    ///
    /// An S3 store takes its settings from the standard `AWS_*` environment variables:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, and for S3-compatible
    /// servers `AWS_ENDPOINT_URL` (with `AWS_ALLOW_HTTP=true` for a plain-http endpoint).
    pub fn from_url(url: &url::Url) -> Result<Self, Error> {
        Self::from_url_with(url, &[])
    }

    /// As [`from_url`](Self::from_url), with S3 settings (`aws_endpoint_url`,
    /// `aws_access_key_id`, ...) given explicitly; they take precedence over the environment.
    pub fn from_url_with(url: &url::Url, s3_options: &[(&str, &str)]) -> Result<Self, Error> {
        let unsupported = |why: &str| Error::UnsupportedStore {
            url: url.to_string(),
            why: why.into(),
        };
        let store_err = |e: object_store::Error| Error::Store {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| unsupported("a file url needs an absolute local path"))?;
                fs::create_dir_all(&path).map_err(|source| Error::Io {
                    what: "creating artifact directory",
                    path: path.clone(),
                    source,
                })?;
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(&path)
                        .map_err(store_err)?,
                )
            }
            "s3" => {
                let bucket = url.host_str().filter(|b| !b.is_empty()).ok_or_else(|| {
                    unsupported("an s3 url names its bucket: s3://<bucket>/<prefix>")
                })?;
                let mut builder =
                    object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                for (key, value) in s3_options {
                    let key = key
                        .parse()
                        .map_err(|_| unsupported(&format!("unknown s3 setting {key}")))?;
                    builder = builder.with_config(key, *value);
                }
                // reqwest's rustls comes without a crypto provider: ring is installed.
                crate::tls::install_provider();
                let s3 = builder.build().map_err(store_err)?;
                match url.path().trim_matches('/') {
                    "" => Arc::new(s3),
                    prefix => Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)),
                }
            }
            other => return Err(unsupported(&format!("unknown scheme {other}"))),
        };
        Ok(ArtifactStore {
            url: url.clone(),
            store,
        })
    }

    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// The underlying store, for readers of artifacts (deploy steps).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Uploads `packed` under its content-addressed key, unless an object of the same size is
    /// already there (same key = same sha256 = same bytes).
    pub(super) async fn publish(&self, packed: &Packed, name: &str) -> Result<Artifact, Error> {
        let key = artifact_key(&packed.sha256, name);
        let location = object_store::path::Path::from(key.as_str());
        let store_err = |e: &dyn std::fmt::Display| Error::Store {
            url: self.url.to_string(),
            reason: format!("{key}: {e}"),
        };
        let artifact = |reused| Artifact {
            name: name.to_string(),
            key: key.clone(),
            size: packed.size,
            sha256: packed.sha256.clone(),
            reused,
        };
        match self.store.head(&location).await {
            Ok(meta) if meta.size == packed.size => return Ok(artifact(true)),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_err(&e)),
        }
        let mut file = tokio::fs::File::open(&packed.path)
            .await
            .map_err(|source| Error::Io {
                what: "opening packed artifact",
                path: packed.path.clone(),
                source,
            })?;
        let mut upload = object_store::buffered::BufWriter::new(self.store.clone(), location);
        if let Err(e) = tokio::io::copy(&mut file, &mut upload).await {
            let _ = upload.abort().await;
            return Err(store_err(&e));
        }
        upload.shutdown().await.map_err(|e| store_err(&e))?;
        Ok(artifact(false))
    }
}

impl ArtifactStore {
    /// Whether an object is stored under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, Error> {
        match self.store.head(&object_store::path::Path::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(key, &e)),
        }
    }

    /// Deletes the object under `key`; one that is not there is fine.
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        match self
            .store
            .delete(&object_store::path::Path::from(key))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, &e)),
        }
    }

    /// The keys of the artifacts last written before `before_ms` (ms since the Unix epoch),
    /// sorted.
    pub async fn written_before(&self, before_ms: u64) -> Result<Vec<String>, Error> {
        use futures_util::StreamExt;
        let prefix = object_store::path::Path::from(KEY_PREFIX);
        let mut listing = self.store.list(Some(&prefix));
        let mut keys = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.error(KEY_PREFIX, &e))?;
            if (meta.last_modified.timestamp_millis().max(0) as u64) < before_ms {
                keys.push(meta.location.to_string());
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn error(&self, key: &str, e: &dyn std::fmt::Display) -> Error {
        Error::Store {
            url: self.url.to_string(),
            reason: format!("{key}: {e}"),
        }
    }
}

/// The first segment of every artifact key.
const KEY_PREFIX: &str = "sha256";

/// The content hash in an artifact key (`sha256/<2>/<hash>/<name>`), if it is one.
pub fn key_sha256(key: &str) -> Option<&str> {
    let mut parts = key.split('/');
    (parts.next()? == KEY_PREFIX)
        .then(|| parts.nth(1))
        .flatten()
        .filter(|h| !h.is_empty())
}

/// `sha256/<first two hex digits>/<hash>/<name>`.
pub fn artifact_key(sha256: &str, name: &str) -> String {
    format!("sha256/{}/{sha256}/{name}", &sha256[..2])
}

/// `<project>-<tag>-<shortsha>.tar.gz`, with `/` in the project and anything but
/// `[A-Za-z0-9._-]` in either made harmless.
pub fn file_name(project: &str, tag: &str, sha: &str) -> String {
    let short: String = sha.chars().take(8).collect();
    format!(
        "{}-{}-{}.tar.gz",
        file_name_part(project),
        file_name_part(tag),
        file_name_part(&short)
    )
}

/// A string made safe for one file name component: `/` becomes `-`, other characters outside
/// `[A-Za-z0-9._-]` become `_`, and a leading `.` becomes `_` (no `..`, no hidden files).
pub fn file_name_part(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| match c {
            '/' => '-',
            c if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' => c,
            _ => '_',
        })
        .collect();
    if out.starts_with('.') {
        out.replace_range(..1, "_");
    }
    out
}

/// The first check on an artifact path, before any file is read: relative, no `..`, not empty.
pub fn check_relative(path: &str) -> Result<(), Error> {
    let refuse = |why: &str| Error::PathRefused {
        path: path.to_string(),
        why: why.into(),
    };
    let p = Path::new(path);
    if path.is_empty() {
        return Err(refuse("is empty"));
    }
    if p.is_absolute() {
        return Err(refuse("is absolute"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refuse("contains .."));
    }
    Ok(())
}

/// A packed artifact on local disk.
#[derive(Debug)]
pub(super) struct Packed {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// What goes into the archive under one name.
enum Entry {
    Dir,
    File { source: PathBuf, executable: bool },
    Symlink { target: PathBuf },
}

/// Packs `paths` (relative to `root`) into `out`. Entries are sorted, with mtime 0, uid/gid 0
/// and no user names, so the same tree gives the same bytes. A top-level path that is a symlink
/// is followed (if it stays inside); symlinks inside directories are kept as relative symlinks
/// and refused if they resolve outside `root` or are absolute.
pub(super) fn pack(root: &Path, paths: &[String], out: &Path, name: &str) -> Result<Packed, Error> {
    let root = fs::canonicalize(root).map_err(|source| Error::Io {
        what: "resolving checkout",
        path: root.to_path_buf(),
        source,
    })?;
    let mut entries = BTreeMap::new();
    for p in paths {
        collect(&root, p, &mut entries)?;
    }
    let pack_err = |source| Error::Pack {
        name: name.to_string(),
        source,
    };
    let file = fs::File::create(out).map_err(pack_err)?;
    let hashing = HashingWriter {
        inner: io::BufWriter::new(file),
        hasher: Sha256::new(),
        size: 0,
    };
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(hashing, Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, entry) in &entries {
        append(&mut tar, name, entry).map_err(pack_err)?;
    }
    let gz = tar.into_inner().map_err(pack_err)?;
    let mut hashing = gz.finish().map_err(pack_err)?;
    hashing.inner.flush().map_err(pack_err)?;
    hashing.inner.get_ref().sync_all().map_err(pack_err)?;
    Ok(Packed {
        path: out.to_path_buf(),
        size: hashing.size,
        sha256: format!("{:x}", hashing.hasher.finalize()),
    })
}

fn collect(root: &Path, rel: &str, entries: &mut BTreeMap<String, Entry>) -> Result<(), Error> {
    check_relative(rel)?;
    let refuse = |why: String| Error::PathRefused {
        path: rel.to_string(),
        why,
    };
    let given = root.join(rel);
    if fs::symlink_metadata(&given).is_err() {
        return Err(Error::NoArtifacts {
            path: rel.to_string(),
        });
    }
    let resolved =
        fs::canonicalize(&given).map_err(|e| refuse(format!("cannot be resolved: {e}")))?;
    if !resolved.starts_with(root) {
        return Err(refuse("resolves outside the checkout".into()));
    }
    // The name in the archive: the path as given, normalised (no `.`, no trailing `/`).
    let name = normalise(rel);
    if name.is_empty() {
        // `.`: the whole checkout.
        return walk(root, &resolved, "", entries);
    }
    walk(root, &resolved, &name, entries)
}

fn normalise(rel: &str) -> String {
    Path::new(rel)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Adds `real` (a resolved path inside `root`) under `name`, recursing into directories.
fn walk(
    root: &Path,
    real: &Path,
    name: &str,
    entries: &mut BTreeMap<String, Entry>,
) -> Result<(), Error> {
    let io_err = |source| Error::Io {
        what: "reading artifact path",
        path: real.to_path_buf(),
        source,
    };
    let meta = fs::metadata(real).map_err(io_err)?;
    if meta.is_file() {
        entries.insert(
            name.to_string(),
            Entry::File {
                source: real.to_path_buf(),
                executable: meta.permissions().mode() & 0o111 != 0,
            },
        );
        return Ok(());
    }
    if !meta.is_dir() {
        return Err(Error::PathRefused {
            path: name.to_string(),
            why: "is neither a file nor a directory".into(),
        });
    }
    if !name.is_empty() {
        entries.insert(name.to_string(), Entry::Dir);
    }
    let mut children: Vec<_> = fs::read_dir(real)
        .map_err(io_err)?
        .collect::<Result<_, _>>()
        .map_err(io_err)?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        let child_name = match name {
            "" => child.file_name().to_string_lossy().into_owned(),
            n => format!("{n}/{}", child.file_name().to_string_lossy()),
        };
        let path = child.path();
        let kind = child.file_type().map_err(io_err)?;
        if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err)?;
            let refuse = |why: &str| Error::PathRefused {
                path: child_name.clone(),
                why: why.into(),
            };
            if target.is_absolute() {
                return Err(refuse("is a symlink with an absolute target"));
            }
            match fs::canonicalize(&path) {
                Ok(t) if t.starts_with(root) => {}
                Ok(_) => return Err(refuse("is a symlink that points outside the checkout")),
                Err(_) => return Err(refuse("is a symlink that cannot be resolved")),
            }
            entries.insert(child_name, Entry::Symlink { target });
        } else {
            walk(root, &path, &child_name, entries)?;
        }
    }
    Ok(())
}

fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, entry: &Entry) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    match entry {
        Entry::Dir => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            tar.append_data(&mut header, format!("{name}/"), io::empty())
        }
        Entry::File { source, executable } => {
            let file = fs::File::open(source)?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if *executable { 0o755 } else { 0o644 });
            header.set_size(file.metadata()?.len());
            tar.append_data(&mut header, name, file)
        }
        Entry::Symlink { target } => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, name, target)
        }
    }
}

/// Counts and hashes the bytes on their way to the file.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests;
