//! Host keys that an ssh clone pinned under `host_key_policy = "accept-new"`. The `ssh` that
//! gix runs adds an unknown key to the agent's `known_hosts` itself (`StrictHostKeyChecking=
//! accept-new`, `HashKnownHosts=no`), so the pins are found by comparing the file's lines for
//! the clone's host before and after the fetch, whatever the fetch's outcome. The agent records
//! each as `host_key_pinned`, as deploys do.

use crate::deploy::ssh::{fingerprint, known_hosts_name};
use crate::deploy::transport::PinnedKey;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// `known_hosts` as it was before a clone from an ssh URL.
pub(super) struct Before {
    path: PathBuf,
    /// How `known_hosts` names the clone's host (`host`, or `[host]:port` off port 22).
    name: String,
    /// The host as the clone URL gives it: `[user@]host:port`.
    target: String,
    lines: HashSet<String>,
}

/// Remembers `known_hosts` before a clone of `url`; `None` unless new keys are accepted and
/// `url` is an ssh URL.
pub(super) fn before(url: &str, known_hosts: Option<&Path>, accept_new: bool) -> Option<Before> {
    let path = known_hosts.filter(|_| accept_new)?;
    let url = gix::url::parse(gix::bstr::BStr::new(url)).ok()?;
    if url.scheme != gix::url::Scheme::Ssh {
        return None;
    }
    let host = url.host()?.to_string();
    let port = url.port_or_default().unwrap_or(22);
    let target = match url.user() {
        Some(user) => format!("{user}@{host}:{port}"),
        None => format!("{host}:{port}"),
    };
    Some(Before {
        path: path.to_path_buf(),
        name: known_hosts_name(&host, port),
        target,
        lines: lines(path),
    })
}

impl Before {
    /// The keys added for the clone's host since [`before`].
    pub(super) fn pinned(&self) -> Vec<PinnedKey> {
        let mut seen = self.lines.clone();
        let mut pins = Vec::new();
        for line in std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
        {
            if !seen.insert(line.to_string()) {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(names), Some(_), Some(blob)) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if !names.split(',').any(|n| n == self.name) {
                continue;
            }
            if let Ok(key) = russh::keys::parse_public_key_base64(blob) {
                pins.push(PinnedKey {
                    host: self.target.clone(),
                    fingerprint: fingerprint(&key),
                    key_type: key.algorithm().to_string(),
                });
            }
        }
        pins
    }
}

fn lines(path: &Path) -> HashSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIDCKE6FvTw2IO6PDdt6u/45JsKannmBgX+j7RIkSAhF2";
    const NEW_KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIB5GCTWBl9+TXNPx2T/LC90pPhQjVyYA3djfmLnsKCxW";

    #[test]
    fn only_new_lines_for_the_clone_host_are_pins() {
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        std::fs::write(&kh, format!("[10.0.0.9]:2222 ssh-ed25519 {KEY}\n")).unwrap();
        let url = "ssh://git@10.0.0.9:2222/group/app.git";
        let before = before(url, Some(&kh), true).expect("an ssh url under accept-new");
        assert!(before.pinned().is_empty(), "nothing new yet");

        let mut text = std::fs::read_to_string(&kh).unwrap();
        text += &format!("[10.0.0.8]:2222 ssh-ed25519 {KEY}\n"); // another host
        text += &format!("[10.0.0.9]:2222 ssh-ed25519 {KEY}\n"); // the same line again
        text += &format!("[10.0.0.9]:2222 ssh-rsa {KEY}x\n"); // not a key
        std::fs::write(&kh, &text).unwrap();
        assert!(before.pinned().is_empty(), "{text}");

        std::fs::write(
            &kh,
            format!("{text}[10.0.0.9]:2222 ssh-ed25519 {NEW_KEY}\n"),
        )
        .unwrap();
        let pins = before.pinned();
        let key = russh::keys::parse_public_key_base64(NEW_KEY).unwrap();
        assert_eq!(
            pins,
            [PinnedKey {
                host: "git@10.0.0.9:2222".into(),
                fingerprint: fingerprint(&key),
                key_type: "ssh-ed25519".into(),
            }]
        );
    }

    #[test]
    fn nothing_is_watched_unless_new_keys_are_accepted_over_ssh() {
        let kh = Path::new("/nonexistent/known_hosts");
        let ssh = "git@gitlab.example:group/app.git";
        assert!(before(ssh, Some(kh), false).is_none());
        assert!(before(ssh, None, true).is_none());
        assert!(before("https://gitlab.example/group/app.git", Some(kh), true).is_none());
        let b = before(ssh, Some(kh), true).expect("scp-like urls are ssh");
        assert_eq!(
            (b.name.as_str(), b.target.as_str()),
            ("gitlab.example", "git@gitlab.example:22")
        );
    }
}
