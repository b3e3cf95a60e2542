//! Masking secret values in build output (design.md invariant 10).

/// Values shorter than this are not masked: masking `1` or `on` would garble every line and
/// hide nothing worth hiding.
pub const MIN_SECRET_LEN: usize = 4;

/// What a masked value is replaced with.
pub const MASK: &str = "***";

/// Replaces every occurrence of a set of secret values with [`MASK`].
#[derive(Clone, Debug, Default)]
pub struct Masker {
    /// Longest first, so a secret that contains another is masked whole.
    secrets: Vec<String>,
}

impl Masker {
    /// Output is masked a line at a time, so a secret of several lines (a PEM key, a value
    /// ending in a newline) is masked line by line: each of its lines, trimmed, is a secret of
    /// its own.
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = values
            .into_iter()
            .flat_map(|v| match v.contains(['\n', '\r']) {
                true => v.lines().map(|l| l.trim().to_string()).collect(),
                false => vec![v],
            })
            .filter(|v| v.chars().count() >= MIN_SECRET_LEN)
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Masker { secrets }
    }

    /// Where to cut `buf` (a line too long to keep whole) at or before `at` so that the bytes
    /// before the cut can be masked and shown on their own: no occurrence of a secret spans
    /// the cut, the bytes after it hold whatever a secret continuing past `buf`'s end could
    /// start with, and the cut is on a UTF-8 character boundary. At least 1 when `at` is.
    pub fn safe_cut(&self, buf: &[u8], at: usize) -> usize {
        let longest = self.secrets.first().map_or(0, String::len);
        let mut cut = at.min(buf.len().saturating_sub(longest.saturating_sub(1)));
        loop {
            let before = cut;
            for s in &self.secrets {
                let s = s.as_bytes();
                let from = cut.saturating_sub(s.len() - 1);
                let spanning = (from..cut).find(|&i| buf[i..].starts_with(s) && i + s.len() > cut);
                if let Some(i) = spanning {
                    cut = i;
                }
            }
            if cut == before {
                break;
            }
        }
        while cut > 0 && cut < buf.len() && buf[cut] & 0xC0 == 0x80 {
            cut -= 1;
        }
        if cut == 0 {
            at.min(buf.len())
        } else {
            cut
        }
    }

    pub fn mask(&self, line: &str) -> String {
        let mut out = line.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
    }
}

/// Whether an environment variable of the agent holds a secret by its name: `*_TOKEN` (which
/// covers `FERRY_*_TOKEN`), `*_SECRET`, `*_PASSWORD`, compared case-insensitively.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["_TOKEN", "_SECRET", "_PASSWORD"]
        .iter()
        .any(|suffix| upper.ends_with(suffix) && upper.len() > suffix.len())
}

/// The values of the secret-named variables among `vars` (pass `std::env::vars()`).
pub fn secret_values_from_env(
    vars: impl IntoIterator<Item = (String, String)>,
) -> impl Iterator<Item = String> {
    vars.into_iter()
        .filter(|(k, _)| is_secret_name(k))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(secrets: &[&str], line: &str, expected: &str) {
        let m = Masker::new(secrets.iter().map(|s| s.to_string()));
        assert_eq!(m.mask(line), expected, "secrets {secrets:?}, line {line:?}");
    }

    #[test]
    fn masks_every_occurrence_and_leaves_short_values() {
        check(
            &["hunter22"],
            "pw=hunter22 again hunter22",
            "pw=*** again ***",
        );
        check(
            &["abc"],
            "abc is too short to mask",
            "abc is too short to mask",
        );
        check(&["abcd"], "abcd", "***");
        check(&[], "nothing to hide", "nothing to hide");
        // The longer secret wins over one it contains.
        check(&["token", "token-long"], "x token-long y", "x *** y");
        check(&["ünïcödé"], "say ünïcödé", "say ***");
        // Several lines, or a trailing newline: each line of the value is masked.
        let key = "-----BEGIN KEY-----\nAAAAsecretline1\nBBBBsecretline2\n-----END KEY-----\n";
        check(&[key], "AAAAsecretline1", "***");
        check(&[key], "  BBBBsecretline2", "  ***");
        check(&["tok-abcdef\n"], "got tok-abcdef", "got ***");
    }

    /// A line cut because it is too long is cut where no secret spans the cut, and keeps
    /// after it what a secret crossing the end could start with.
    #[test]
    fn long_lines_are_cut_where_no_secret_spans_the_cut() {
        let m = Masker::new(["s3cr3t-value".to_string()]);
        let buf = b"xxxxxxxxs3cr3t-valuexxxxxxxxs3cr3".to_vec();
        for at in 0..=buf.len() {
            let cut = m.safe_cut(&buf, at);
            assert!(cut <= at.max(1) && (cut > 0 || at == 0), "at {at}: {cut}");
            let head = String::from_utf8_lossy(&buf[..cut]);
            assert!(!m.mask(&head).contains("s3cr3"), "at {at}: {head}");
        }
        let utf8 = "ééééé".as_bytes();
        assert_eq!(
            Masker::default().safe_cut(utf8, 3),
            2,
            "not inside a character"
        );
    }

    #[test]
    fn secret_names() {
        for (name, secret) in [
            ("FERRY_GITLAB_TOKEN", true),
            ("CI_JOB_TOKEN", true),
            ("DB_PASSWORD", true),
            ("aws_secret", true),
            ("API_SECRET", true),
            ("TOKEN", false),
            ("_TOKEN", false),
            ("PATH", false),
            ("TOKENIZER", false),
        ] {
            assert_eq!(is_secret_name(name), secret, "{name}");
        }
        let vals: Vec<_> = secret_values_from_env([
            ("X_TOKEN".to_string(), "v1".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ])
        .collect();
        assert_eq!(vals, vec!["v1".to_string()]);
    }
}
