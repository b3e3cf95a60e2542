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
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = values
            .into_iter()
            .filter(|v| v.chars().count() >= MIN_SECRET_LEN)
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Masker { secrets }
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
