//! The raw layer: what the TOML file says, before any layering or validation.
//!
//! Every field is an `Option` so that "not set" can be told apart from "set to the default", which
//! is what lets environment variables and flags layer on top. Each table also knows its own key
//! names (`KEYS`, generated from the field names so they cannot drift), which is how an unknown key
//! is reported with its full path (`projects[0].buid`) instead of only a line number.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Declares a raw table: a `Deserialize` struct whose fields are all optional and unknown keys
/// refused, plus `KEYS`, the list of its TOML key names.
macro_rules! raw_table {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct $name {
            $($(#[$fmeta])* pub(crate) $field: Option<$ty>,)*
        }

        impl $name {
            /// The TOML keys this table accepts.
            pub(crate) const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];
        }
    };
}

raw_table! {
    /// The whole file.
    RawConfig {
        store: String,
        store_ca_file: String,
        namespace: String,
        data_dir: String,
        gateway: RawGateway,
        api: RawApi,
        coordinator: RawCoordinator,
        agent: RawAgent,
        artifacts: RawArtifacts,
        gitlab: RawGitlab,
        projects: Vec<RawProject>,
    }
}

raw_table! {
    /// `[gateway]`
    RawGateway {
        listen: String,
        public_url: String,
        max_body_bytes: u64,
        dedupe_window: String,
    }
}

raw_table! {
    /// `[api]`
    RawApi {
        tokens_env: String,
        tokens: Vec<String>,
    }
}

raw_table! {
    /// `[coordinator]`
    RawCoordinator {
        lease_ttl: String,
        max_attempts: u64,
        sweep_interval: String,
        retry_base: String,
        retry_max: String,
        keep_logs: String,
        keep_feed: String,
        metrics_listen: String,
    }
}

raw_table! {
    /// `[agent]`
    RawAgent {
        name: String,
        shutdown_grace: String,
        pools: Vec<String>,
        labels: Vec<String>,
        concurrency: u64,
        ssh_key: String,
        known_hosts: String,
        host_key_policy: String,
        git_ca_file: String,
        metrics_listen: String,
    }
}

raw_table! {
    /// `[artifacts]`
    RawArtifacts {
        url: String,
        keep: String,
    }
}

raw_table! {
    /// `[gitlab]`
    RawGitlab {
        url: String,
        token_env: String,
        reconcile_interval: String,
        reconcile_window: String,
    }
}

raw_table! {
    /// One `[[projects]]` entry.
    RawProject {
        id: u64,
        path: String,
        webhook_token_env: String,
        webhook_token: String,
        signing_token_env: String,
        signing_token: String,
        allow_unauthenticated: bool,
        clone_url: String,
        auto_build: bool,
        auto_deploy: bool,
        priority: i64,
        deploy_priority: i64,
        on_tag_move: String,
        branches: Vec<String>,
        secrets: Vec<String>,
        build: RawBuild,
        environments: Vec<RawEnvironment>,
    }
}

raw_table! {
    /// `[projects.build]`
    RawBuild {
        pool: String,
        commands: Vec<String>,
        artifacts: Vec<String>,
        timeout: String,
        env: BTreeMap<String, String>,
    }
}

raw_table! {
    /// One `[[projects.environments]]` entry.
    RawEnvironment {
        name: String,
        hosts: Vec<String>,
        path: String,
        pool: String,
        before_switch: Vec<String>,
        after_switch: Vec<String>,
        health_check: String,
        health_check_retries: u64,
        health_check_interval: String,
        command_timeout: String,
        max_parallel: u64,
        max_failures: u64,
        keep_releases: u64,
        rollback_on_failure: bool,
    }
}

/// A key in the file that no table accepts, with its full path (`projects[0].buid`) and the keys
/// that table does accept.
pub(crate) struct UnknownKey {
    pub(crate) key: String,
    pub(crate) expected: &'static [&'static str],
}

/// Walks the parsed document and returns the first key that is not part of the schema.
///
/// Values of the wrong type (a string where a table belongs) are skipped here: deserialisation
/// reports those, with their line.
pub(crate) fn find_unknown_key(doc: &toml::Table) -> Option<UnknownKey> {
    let sections: [(&str, &'static [&'static str]); 6] = [
        ("gateway", RawGateway::KEYS),
        ("api", RawApi::KEYS),
        ("coordinator", RawCoordinator::KEYS),
        ("agent", RawAgent::KEYS),
        ("artifacts", RawArtifacts::KEYS),
        ("gitlab", RawGitlab::KEYS),
    ];
    if let Some(unknown) = unknown_in(doc, RawConfig::KEYS, "") {
        return Some(unknown);
    }
    for (section, keys) in sections {
        if let Some(toml::Value::Table(table)) = doc.get(section) {
            if let Some(unknown) = unknown_in(table, keys, &format!("{section}.")) {
                return Some(unknown);
            }
        }
    }
    let Some(toml::Value::Array(projects)) = doc.get("projects") else {
        return None;
    };
    for (i, project) in projects.iter().enumerate() {
        let toml::Value::Table(project) = project else {
            continue;
        };
        let prefix = format!("projects[{i}].");
        if let Some(unknown) = unknown_in(project, RawProject::KEYS, &prefix) {
            return Some(unknown);
        }
        if let Some(toml::Value::Table(build)) = project.get("build") {
            if let Some(unknown) = unknown_in(build, RawBuild::KEYS, &format!("{prefix}build.")) {
                return Some(unknown);
            }
        }
        if let Some(toml::Value::Array(envs)) = project.get("environments") {
            for (j, env) in envs.iter().enumerate() {
                if let toml::Value::Table(env) = env {
                    let prefix = format!("{prefix}environments[{j}].");
                    if let Some(unknown) = unknown_in(env, RawEnvironment::KEYS, &prefix) {
                        return Some(unknown);
                    }
                }
            }
        }
    }
    None
}

fn unknown_in(
    table: &toml::Table,
    expected: &'static [&'static str],
    prefix: &str,
) -> Option<UnknownKey> {
    table
        .keys()
        .find(|key| !expected.contains(&key.as_str()))
        .map(|key| UnknownKey {
            key: format!("{prefix}{key}"),
            expected,
        })
}
