use std::collections::HashMap;
use std::time::Duration;

use super::*;

const FILE: &str = "/etc/ferry.toml";

/// A valid file with one project; cases append to it or replace parts of it.
const BASE: &str = r#"
[[projects]]
id = 42
path = "group/app"
webhook_token_env = "APP_HOOK"

[projects.build]
commands = ["make"]

[[projects.environments]]
name = "production"
hosts = ["deploy@10.0.0.5:22", "local", "ops@[::1]"]
path = "/srv/app"
"#;

fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

/// Loads `toml` as if it were `/etc/ferry.toml`, with `APP_HOOK` set unless `env` says otherwise.
fn try_load(toml: &str, env: &[(&str, &str)], flags: &Overrides) -> Result<Config, Error> {
    let mut pairs = vec![("APP_HOOK", "hook-secret")];
    pairs.extend_from_slice(env);
    load_str(toml, Path::new(FILE), &lookup(&pairs), flags)
}

fn ok(toml: &str, env: &[(&str, &str)], flags: &Overrides) -> Config {
    try_load(toml, env, flags).unwrap_or_else(|e| panic!("expected a valid config, got: {e}"))
}

/// Asserts that loading fails with a message that starts with `expected`.
fn check(toml: &str, env: &[(&str, &str)], flags: &Overrides, expected: &str) {
    match try_load(toml, env, flags) {
        Ok(_) => panic!("expected an error starting with {expected:?}, got a valid config"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.starts_with(expected),
                "expected an error starting with\n  {expected:?}\ngot\n  {message:?}"
            );
        }
    }
}

fn no_flags() -> Overrides {
    Overrides::default()
}

#[test]
fn defaults_without_a_file() {
    let config = load(None, &lookup(&[]), &no_flags()).unwrap();
    assert_eq!(config.store, None);
    assert_eq!(config.data_dir, PathBuf::from(defaults::DATA_DIR));
    assert_eq!(config.gateway.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(config.gateway.public_url.as_str(), "http://127.0.0.1:8080/");
    assert_eq!(config.gateway.max_body_bytes, 5_242_880);
    assert_eq!(config.gateway.dedupe_window, Duration::from_secs(7 * 86400));
    assert!(config.api.tokens.is_empty());
    assert_eq!(config.coordinator.lease_ttl, Duration::from_secs(15));
    assert_eq!(config.coordinator.max_attempts, 3);
    assert_eq!(config.coordinator.sweep_interval, Duration::from_secs(1));
    assert_eq!(config.coordinator.retry_base, Duration::from_secs(1));
    assert_eq!(config.coordinator.retry_max, Duration::from_secs(300));
    assert_eq!(
        config.coordinator.keep_logs,
        Some(Duration::from_secs(30 * 86400))
    );
    assert_eq!(config.coordinator.metrics_listen, None);
    assert_eq!(config.agent.metrics_listen, None);
    let forever = ok("[coordinator]\nkeep_logs = \"forever\"", &[], &no_flags());
    assert_eq!(forever.coordinator.keep_logs, None);
    assert_eq!(
        config.coordinator.keep_feed,
        Some(Duration::from_secs(7 * 86400))
    );
    let forever = ok("[coordinator]\nkeep_feed = \"forever\"", &[], &no_flags());
    assert_eq!(forever.coordinator.keep_feed, None);
    assert_eq!(
        config.artifacts.keep, None,
        "artifacts are kept unless asked"
    );
    let month = ok("[artifacts]\nkeep = \"30d\"", &[], &no_flags());
    assert_eq!(month.artifacts.keep, Some(Duration::from_secs(30 * 86400)));
    assert_eq!(config.agent.pools, ["default"]);
    assert!(config
        .agent
        .name
        .ends_with(&format!("-{}", std::process::id())));
    assert_eq!(config.agent.concurrency, 2);
    assert_eq!(config.agent.host_key_policy, HostKeyPolicy::Strict);
    assert_eq!(
        config.agent.known_hosts,
        PathBuf::from("/var/lib/ferry/known_hosts")
    );
    assert_eq!(
        config.artifacts.url.as_str(),
        "file:///var/lib/ferry/artifacts/"
    );
    assert!(config.gitlab.is_none());
    assert!(config.projects.is_empty());
}

#[test]
fn project_defaults() {
    let config = ok(BASE, &[], &no_flags());
    let project = config.project("group/app").unwrap();
    assert_eq!(project.id, Some(42));
    assert_eq!(
        project.webhook_token.as_ref().unwrap().expose(),
        "hook-secret"
    );
    assert!(project.signing_token.is_none());
    assert!(!project.allow_unauthenticated);
    assert!(project.auto_build && project.auto_deploy);
    assert_eq!((project.priority, project.deploy_priority), (0, 10));
    assert_eq!(project.on_tag_move, OnTagMove::Ignore);
    assert_eq!(project.build.pool, "default");
    assert_eq!(project.build.timeout, Duration::from_secs(30 * 60));
    let production = project.environment("production").unwrap();
    assert_eq!(
        production.hosts,
        [
            Host::Ssh {
                user: "deploy".into(),
                host: "10.0.0.5".into(),
                port: 22
            },
            Host::Local,
            Host::Ssh {
                user: "ops".into(),
                host: "::1".into(),
                port: 22
            },
        ]
    );
    assert_eq!(production.pool, "default");
    assert_eq!(
        (
            production.max_parallel,
            production.max_failures,
            production.keep_releases
        ),
        (1, 0, 5)
    );
    assert_eq!(production.health_check_retries, 5);
    assert_eq!(production.command_timeout, Duration::from_secs(600));
    assert!(production.rollback_on_failure);
}

#[test]
fn deploy_priority_follows_priority_and_environment_pool_follows_build_pool() {
    let toml = BASE.replace("id = 42", "id = 42\npriority = 5").replace(
        "commands = [\"make\"]",
        "commands = [\"make\"]\npool = \"big\"",
    );
    let config = ok(&toml, &[], &no_flags());
    let project = &config.projects[0];
    assert_eq!((project.priority, project.deploy_priority), (5, 15));
    assert_eq!(project.environments[0].pool, "big");
}

#[test]
fn lookup_by_id_then_path() {
    let toml = format!(
        "{BASE}\n[[projects]]\npath = \"Group/Other\"\nallow_unauthenticated = true\n[projects.build]\ncommands = [\"x\"]\n"
    );
    let config = ok(&toml, &[], &no_flags());
    assert_eq!(
        config
            .find_project(Some(42), Some("nope/nope"))
            .unwrap()
            .path,
        "group/app"
    );
    assert_eq!(
        config
            .find_project(Some(7), Some("group/other"))
            .unwrap()
            .path,
        "Group/Other"
    );
    assert_eq!(config.project("42").unwrap().path, "group/app");
    assert_eq!(config.project("GROUP/APP").unwrap().path, "group/app");
    assert!(config.find_project(Some(7), None).is_none());
    assert!(config.project("group/missing").is_none());
}

/// Each key, read from each layer in turn: default < file < env < flag.
#[test]
fn precedence_default_file_env_flag() {
    /// (file, env variable, env value, flags, getter, [default, file, env, flag] values)
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        Overrides,
        Get,
        [&'static str; 4],
    );
    type Get = fn(&Config) -> String;
    let cases: &[Case] = &[
        (
            "store = \"redis://file:6379\"",
            env::STORE,
            "redis://env:6379",
            Overrides {
                store: Some("redis://flag:6379".into()),
                ..no_flags()
            },
            |c| format!("{:?}", c.store),
            [
                "None",
                "Some(\"redis://file:6379\")",
                "Some(\"redis://env:6379\")",
                "Some(\"redis://flag:6379\")",
            ],
        ),
        (
            "[gateway]\nlisten = \"127.0.0.1:1\"",
            env::GATEWAY_LISTEN,
            "127.0.0.1:2",
            Overrides {
                listen: Some("127.0.0.1:3".parse().unwrap()),
                ..no_flags()
            },
            |c| c.gateway.listen.to_string(),
            ["0.0.0.0:8080", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
        ),
        (
            "[agent]\nconcurrency = 4",
            env::AGENT_CONCURRENCY,
            "8",
            Overrides {
                agent_concurrency: Some(16),
                ..no_flags()
            },
            |c| c.agent.concurrency.to_string(),
            ["2", "4", "8", "16"],
        ),
        (
            "[agent]\npools = [\"file\"]",
            env::AGENT_POOLS,
            "env-a, env-b",
            Overrides {
                agent_pools: Some(vec!["flag".into()]),
                ..no_flags()
            },
            |c| c.agent.pools.join(","),
            ["default", "file", "env-a,env-b", "flag"],
        ),
        (
            "[agent]\nname = \"file\"",
            env::AGENT_NAME,
            "env",
            Overrides {
                agent_name: Some("flag".into()),
                ..no_flags()
            },
            |c| c.agent.name.clone(),
            ["", "file", "env", "flag"],
        ),
    ];
    for (file, var, env_value, flags, get, [default, from_file, from_env, from_flag]) in cases {
        let defaulted = get(&ok("", &[], &no_flags()));
        if !default.is_empty() {
            assert_eq!(defaulted, *default, "default for {file}");
        }
        assert_eq!(get(&ok(file, &[], &no_flags())), *from_file, "file: {file}");
        assert_eq!(
            get(&ok(file, &[(var, env_value)], &no_flags())),
            *from_env,
            "env: {var}"
        );
        assert_eq!(
            get(&ok(file, &[(var, env_value)], flags)),
            *from_flag,
            "flag over {var}"
        );
    }
}

#[test]
fn every_env_setting_is_read() {
    let values: HashMap<&str, &str> = [
        (env::STORE, "redis://h:1/0"),
        (env::DATA_DIR, "/data"),
        (env::NAMESPACE, "team-a"),
        (env::GATEWAY_LISTEN, "127.0.0.1:9"),
        (env::GATEWAY_PUBLIC_URL, "https://ferry.test"),
        (env::GATEWAY_MAX_BODY_BYTES, "10"),
        (env::GATEWAY_DEDUPE_WINDOW, "1h"),
        (env::COORDINATOR_LEASE_TTL, "30s"),
        (env::COORDINATOR_MAX_ATTEMPTS, "9"),
        (env::COORDINATOR_SWEEP_INTERVAL, "2s"),
        (env::COORDINATOR_RETRY_BASE, "3s"),
        (env::COORDINATOR_RETRY_MAX, "1m"),
        (env::COORDINATOR_KEEP_LOGS, "12h"),
        (env::COORDINATOR_KEEP_FEED, "2d"),
        (env::COORDINATOR_METRICS_LISTEN, "0.0.0.0:9101"),
        (env::AGENT_METRICS_LISTEN, "127.0.0.1:9102"),
        (env::AGENT_NAME, "a-1"),
        (env::AGENT_POOLS, "x,y"),
        (env::AGENT_LABELS, "arm64,gpu"),
        (env::AGENT_CONCURRENCY, "7"),
        (env::AGENT_SHUTDOWN_GRACE, "45s"),
        (env::AGENT_SSH_KEY, "/k"),
        (env::AGENT_KNOWN_HOSTS, "/kh"),
        (env::AGENT_HOST_KEY_POLICY, "accept-new"),
        (env::AGENT_GIT_CA_FILE, "/etc/ferry/git-ca.pem"),
        (env::ARTIFACTS_URL, "file:///a/"),
        (env::ARTIFACTS_KEEP, "90d"),
        (env::GITLAB_URL, "https://gitlab.test"),
        (env::GITLAB_TOKEN, "glpat"),
        (env::GITLAB_RECONCILE_INTERVAL, "5m"),
        (env::GITLAB_RECONCILE_WINDOW, "2d"),
        (env::API_TOKENS, "t1, t2"),
        (env::STORE_CA_FILE, "/etc/ferry/ca.pem"),
    ]
    .into_iter()
    .collect();
    // The table and the list above agree, so no setting is forgotten by either.
    for (_, var) in env_settings() {
        assert!(values.contains_key(var), "{var} missing from this test");
    }
    let pairs: Vec<(&str, &str)> = values.into_iter().collect();
    let c = ok("", &pairs, &no_flags());
    assert_eq!(c.store.as_deref(), Some("redis://h:1/0"));
    assert_eq!(c.store_ca_file, Some(PathBuf::from("/etc/ferry/ca.pem")));
    assert_eq!(c.data_dir, PathBuf::from("/data"));
    assert_eq!(c.namespace, "team-a");
    assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:9");
    assert_eq!(c.gateway.public_url.as_str(), "https://ferry.test/");
    assert_eq!(c.gateway.max_body_bytes, 10);
    assert_eq!(c.gateway.dedupe_window, Duration::from_secs(3600));
    assert_eq!(c.coordinator.lease_ttl, Duration::from_secs(30));
    assert_eq!(c.coordinator.max_attempts, 9);
    assert_eq!(c.coordinator.sweep_interval, Duration::from_secs(2));
    assert_eq!(c.coordinator.retry_base, Duration::from_secs(3));
    assert_eq!(c.coordinator.retry_max, Duration::from_secs(60));
    assert_eq!(
        c.coordinator.keep_feed,
        Some(Duration::from_secs(2 * 86400))
    );
    assert_eq!(
        c.coordinator.keep_logs,
        Some(Duration::from_secs(12 * 3600))
    );
    assert_eq!(c.artifacts.keep, Some(Duration::from_secs(90 * 86400)));
    assert_eq!(c.agent.name, "a-1");
    assert_eq!(c.agent.pools, ["x", "y"]);
    assert_eq!(c.agent.labels, ["arm64", "gpu"]);
    assert_eq!(c.agent.concurrency, 7);
    assert_eq!(c.agent.ssh_key, Some(PathBuf::from("/k")));
    assert_eq!(c.agent.known_hosts, PathBuf::from("/kh"));
    assert_eq!(c.agent.host_key_policy, HostKeyPolicy::AcceptNew);
    assert_eq!(
        c.agent.git_ca_file,
        Some(PathBuf::from("/etc/ferry/git-ca.pem"))
    );
    assert_eq!(c.artifacts.url.as_str(), "file:///a/");
    let gitlab = c.gitlab.unwrap();
    assert_eq!(
        (gitlab.url.as_str(), gitlab.token.expose()),
        ("https://gitlab.test/", "glpat")
    );
    assert_eq!(
        (gitlab.reconcile_interval, gitlab.reconcile_window),
        (Duration::from_secs(300), Duration::from_secs(2 * 24 * 3600)),
    );
    let tokens: Vec<&str> = c.api.tokens.iter().map(Secret::expose).collect();
    assert_eq!(tokens, ["t1", "t2"]);
}

#[test]
fn errors_name_the_key_and_the_source() {
    let f = no_flags;
    let with_project = |extra: &str| format!("{extra}\n{BASE}");
    /// (file text, environment, flags, expected start of the message)
    type Case = (
        String,
        Vec<(&'static str, &'static str)>,
        Overrides,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        // Unknown keys, at every depth.
        ("bogus = 1".into(), vec![], f(), "/etc/ferry.toml: unknown key bogus (expected one of: store, "),
        ("[gateway]\nlisen = \"x\"".into(), vec![], f(), "/etc/ferry.toml: unknown key gateway.lisen"),
        (BASE.replace("[projects.build]", "[projects.buid]"), vec![], f(), "/etc/ferry.toml: unknown key projects[0].buid"),
        (BASE.replace("commands =", "comands ="), vec![], f(), "/etc/ferry.toml: unknown key projects[0].build.comands"),
        (format!("{BASE}maxparallel = 2\n"), vec![], f(), "/etc/ferry.toml: unknown key projects[0].environments[0].maxparallel"),
        (BASE.replace("path = \"group/app\"", "path = \"group/app\"\nclone_url = \"https://oauth2:glpat-x@gitlab.example/group/app.git\""), vec![], f(), "/etc/ferry.toml: projects[0].clone_url: must not carry a password"),
        (format!("{BASE}command_timeout = \"500ms\"\n"), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].command_timeout: 500ms is too short: at least 1s"),
        // TOML syntax and type errors keep toml's line and column.
        ("store = ".into(), vec![], f(), "/etc/ferry.toml: TOML parse error at line 1"),
        ("[coordinator]\nmax_attempts = \"x\"".into(), vec![], f(), "/etc/ferry.toml: TOML parse error at line 2"),
        // Durations.
        ("[coordinator]\nlease_ttl = \"15 parsecs\"".into(), vec![], f(), "/etc/ferry.toml: coordinator.lease_ttl: invalid duration \"15 parsecs\": "),
        ("".into(), vec![(env::COORDINATOR_LEASE_TTL, "soon")], f(), "environment FERRY_COORDINATOR_LEASE_TTL: invalid duration \"soon\": "),
        ("[coordinator]\nlease_ttl = \"0s\"".into(), vec![], f(), "/etc/ferry.toml: coordinator.lease_ttl: must be longer than zero"),
        ("[gateway]\ndedupe_window = \"500us\"".into(), vec![], f(), "/etc/ferry.toml: gateway.dedupe_window: \"500us\" is too short: at least 1ms"),
        ("[coordinator]\nsweep_interval = \"200000000000y\"".into(), vec![], f(), "/etc/ferry.toml: coordinator.sweep_interval: \"200000000000y\" is too long: at most 100 years"),
        ("[coordinator]\nkeep_logs = \"500us\"".into(), vec![], f(), "/etc/ferry.toml: coordinator.keep_logs: invalid value \"500us\": expected a duration longer than zero"),
        (BASE.replace("commands = [\"make\"]", "commands = [\"make\"]\ntimeout = \"500ms\""), vec![], f(), "/etc/ferry.toml: projects[0].build.timeout: 500ms is too short: at least 1s"),
        ("[agent]\nmetrics_listen = \"9102\"".into(), vec![], f(), "/etc/ferry.toml: agent.metrics_listen: invalid address \"9102\""),
        ("[coordinator]\nkeep_logs = \"0s\"".into(), vec![], f(), "/etc/ferry.toml: coordinator.keep_logs: invalid value \"0s\": expected a duration longer than zero (like \"30d\") or \"forever\""),
        ("".into(), vec![(env::COORDINATOR_KEEP_LOGS, "always")], f(), "environment FERRY_COORDINATOR_KEEP_LOGS: invalid value \"always\": expected a duration longer than zero (like \"30d\") or \"forever\""),
        ("[artifacts]\nkeep = \"0d\"".into(), vec![], f(), "/etc/ferry.toml: artifacts.keep: invalid value \"0d\": expected a duration longer than zero (like \"30d\") or \"forever\""),
        ("[coordinator]\nretry_base = \"10m\"".into(), vec![], f(), "/etc/ferry.toml: coordinator.retry_base: 10m is longer than coordinator.retry_max (5m)"),
        (BASE.replace("commands = [\"make\"]", "commands = [\"make\"]\ntimeout = \"forever\""), vec![], f(), "/etc/ferry.toml: projects[0].build.timeout: invalid duration \"forever\""),
        // Integers.
        ("".into(), vec![(env::AGENT_CONCURRENCY, "x")], f(), "environment FERRY_AGENT_CONCURRENCY: expected a positive integer, got \"x\""),
        ("".into(), vec![(env::AGENT_CONCURRENCY, "0")], f(), "environment FERRY_AGENT_CONCURRENCY: must be at least 1, got 0"),
        ("[coordinator]\nmax_attempts = 0".into(), vec![], f(), "/etc/ferry.toml: coordinator.max_attempts: must be at least 1, got 0"),
        (format!("{BASE}max_parallel = 0\n"), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].max_parallel: must be at least 1, got 0"),
        // Addresses and urls.
        ("[gateway]\nlisten = \"8080\"".into(), vec![], f(), "/etc/ferry.toml: gateway.listen: invalid address \"8080\""),
        ("".into(), vec![(env::GATEWAY_LISTEN, "localhost:x")], f(), "environment FERRY_GATEWAY_LISTEN: invalid address \"localhost:x\""),
        ("[gateway]\npublic_url = \"ftp://x\"".into(), vec![], f(), "/etc/ferry.toml: gateway.public_url: invalid url \"ftp://x\": expected http or https"),
        ("[gitlab]\nurl = \"gitlab.example.com\"".into(), vec![], f(), "/etc/ferry.toml: gitlab.url: invalid url \"gitlab.example.com\""),
        ("store = \"http://x:6379\"".into(), vec![], f(), "/etc/ferry.toml: store: unsupported store \"http://x:6379\""),
        ("".into(), vec![(env::STORE, "redis://:hunter2@h:99999/0")], f(), "environment FERRY_STORE: invalid url \"redis://:***@h:99999/0\": invalid port number"),
        ("store = \"http://u:hunter2@x:6379\"".into(), vec![], f(), "/etc/ferry.toml: store: unsupported store \"http://u:***@x:6379\""),
        ("store = \"redis://[::1\"".into(), vec![], f(), "/etc/ferry.toml: store: invalid url"),
        ("store = \"redis+sentinel://s1:26379,s2:26379\"".into(), vec![], f(), "/etc/ferry.toml: store: invalid store url: name the master the Sentinels monitor"),
        ("store = \"redis+cluster://n1:7000,n2:7000/0\"".into(), vec![], f(), "/etc/ferry.toml: store: invalid store url: a cluster has no databases or names"),
        ("".into(), vec![], Overrides { store: Some("redis+sentinel://s1:x/main".into()), ..f() }, "flag --store: invalid store url: sentinel address \"s1:x\" is not HOST[:PORT]"),
        ("".into(), vec![], Overrides { store: Some("mysql://db/ferry".into()), ..f() }, "flag --store: unsupported store \"mysql://db/ferry\""),
        ("".into(), vec![], Overrides { store: Some("localhost:6379".into()), ..f() }, "flag --store: unsupported store \"localhost:6379\""),
        // Host key policy: there is no way to ignore host keys.
        ("[agent]\nhost_key_policy = \"ignore\"".into(), vec![], f(), "/etc/ferry.toml: agent.host_key_policy: invalid host key policy \"ignore\": only \"strict\" and \"accept-new\" exist; host keys are never ignored"),
        ("".into(), vec![(env::AGENT_HOST_KEY_POLICY, "no")], f(), "environment FERRY_AGENT_HOST_KEY_POLICY: invalid host key policy \"no\""),
        // Names.
        ("[agent]\npools = [\"a b\"]".into(), vec![], f(), "/etc/ferry.toml: agent.pools[0]: invalid pool name \"a b\""),
        ("".into(), vec![], Overrides { agent_pools: Some(vec![]), ..f() }, "flag --pools: must name at least one pool"),
        (BASE.replace("production", "prod/uction"), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].name: invalid environment name \"prod/uction\""),
        (BASE.replace("commands = [\"make\"]", "commands = [\"make\"]\npool = \"../x\""), vec![], f(), "/etc/ferry.toml: projects[0].build.pool: invalid pool name \"../x\""),
        // Hosts.
        (BASE.replace("\"local\"", "\"a@b:port\""), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].hosts[1]: invalid host \"a@b:port\": invalid port \"port\""),
        (BASE.replace("\"local\"", "\"10.0.0.7\""), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].hosts[1]: invalid host \"10.0.0.7\": expected user@host[:port] or \"local\""),
        (BASE.replace("\"local\"", "\"u@::1\""), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].hosts[1]: invalid host \"u@::1\": put an IPv6 address in brackets"),
        (BASE.replace("\"local\"", "\"-oProxyCommand=x@h\""), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].hosts[1]: invalid host \"-oProxyCommand=x@h\": invalid user"),
        (BASE.replace("\"local\"", "\"deploy@10.0.0.5\""), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].hosts[1]: duplicate host deploy@10.0.0.5:22"),
        (BASE.replace("path = \"/srv/app\"", "path = \"srv/app\""), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].path: invalid path \"srv/app\": must be absolute"),
        (BASE.replace("commands = [\"make\"]", "commands = [\"make\"]\nartifacts = [\"../etc\"]"), vec![], f(), "/etc/ferry.toml: projects[0].build.artifacts[0]: invalid path \"../etc\""),
        (BASE.replace("commands = [\"make\"]", "commands = [\"make\"]\nenv = { FERRY_TAG = \"x\" }"), vec![], f(), "/etc/ferry.toml: projects[0].build.env.FERRY_TAG: names starting with FERRY_ are reserved"),
        (BASE.replace("id = 42", "id = 42\non_tag_move = \"always\""), vec![], f(), "/etc/ferry.toml: projects[0].on_tag_move: invalid value \"always\": expected \"ignore\" or \"rebuild\""),
        // Duplicates.
        (format!("{BASE}{}", BASE.replace("group/app", "group/two")), vec![], f(), "/etc/ferry.toml: projects[1].id: duplicate project id 42 (also projects[0])"),
        (format!("{BASE}{}", BASE.replace("id = 42", "id = 43").replace("group/app", "GROUP/app")), vec![], f(), "/etc/ferry.toml: projects[1].path: duplicate project path \"GROUP/app\" (also projects[0])"),
        (format!("{BASE}[[projects.environments]]\nname = \"production\"\nhosts = [\"local\"]\npath = \"/x\"\n"), vec![], f(), "/etc/ferry.toml: projects[0].environments[1].name: duplicate environment \"production\""),
        // Missing required project fields.
        (BASE.replace("path = \"group/app\"", ""), vec![], f(), "/etc/ferry.toml: projects[0].path: missing required key"),
        ("[[projects]]\npath = \"g/a\"\nallow_unauthenticated = true".into(), vec![], f(), "/etc/ferry.toml: projects[0].build: missing required key"),
        (BASE.replace("commands = [\"make\"]", "timeout = \"1m\""), vec![], f(), "/etc/ferry.toml: projects[0].build.commands: missing required key"),
        (BASE.replace("hosts = ", "# hosts = "), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].hosts: missing required key"),
        (BASE.replace("path = \"/srv/app\"", ""), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].path: missing required key"),
        (BASE.replace("name = \"production\"", ""), vec![], f(), "/etc/ferry.toml: projects[0].environments[0].name: missing required key"),
        // Secrets.
        (BASE.replace("APP_HOOK", "APP_HOOK_MISSING"), vec![], f(), "/etc/ferry.toml: projects[0].webhook_token_env: environment variable APP_HOOK_MISSING is not set"),
        (BASE.replace("webhook_token_env = \"APP_HOOK\"", ""), vec![], f(), "/etc/ferry.toml: projects[0].webhook_token_env: the project has no webhook_token(_env) or signing_token(_env)"),
        (BASE.replace("id = 42", "id = 42\nwebhook_token = \"lit\""), vec![], f(), "/etc/ferry.toml: projects[0].webhook_token_env: set only one of webhook_token and webhook_token_env"),
        (BASE.replace("id = 42", "id = 42\nsigning_token = \"not-whsec\""), vec![], f(), "/etc/ferry.toml: projects[0].signing_token: expected whsec_ followed by base64 (the value is not shown)"),
        // base64 characters, but unpadded: the gateway could not decode it
        (BASE.replace("id = 42", "id = 42\nsigning_token = \"whsec_abc\""), vec![], f(), "/etc/ferry.toml: projects[0].signing_token: expected whsec_ followed by base64 (the value is not shown)"),
        (BASE.replace("id = 42", "id = 42\nsecrets = [\"NOT-A-NAME\"]"), vec![], f(), "/etc/ferry.toml: projects[0].secrets[0]: invalid environment variable name \"NOT-A-NAME\""),
        ("[gitlab]\nurl = \"https://gitlab.example.com\"".into(), vec![], f(), "/etc/ferry.toml: gitlab.token_env: environment variable FERRY_GITLAB_TOKEN is not set"),
        ("[gitlab]\ntoken_env = \"T\"".into(), vec![], f(), "/etc/ferry.toml: gitlab.url: missing required key (gitlab.token_env is set)"),
        ("[gitlab]\nurl = \"https://g.example\"\ntoken_env = \"GL\"\nreconcile_window = \"0s\"".into(), vec![("GL", "x")], f(), "/etc/ferry.toml: gitlab.reconcile_window: must be longer than zero"),
        ("[gitlab]\nurl = \"https://g.example\"\ntoken_env = \"GL\"\nreconcile_interval = \"often\"".into(), vec![("GL", "x")], f(), "/etc/ferry.toml: gitlab.reconcile_interval: invalid duration \"often\""),
        ("[api]\ntokens_env = \"MY_TOKENS\"".into(), vec![], f(), "/etc/ferry.toml: api.tokens_env: environment variable MY_TOKENS is not set"),
        ("[api]\ntokens = [\"a\"]\ntokens_env = \"B\"".into(), vec![], f(), "/etc/ferry.toml: api.tokens_env: set only one of tokens and tokens_env"),
        (with_project("[api]\ntokens = [\"\"]"), vec![], f(), "/etc/ferry.toml: api.tokens[0]: is empty"),
    ];
    for (toml, env, flags, expected) in &cases {
        check(toml, env, flags, expected);
    }
}

#[test]
fn secrets_are_resolved_and_never_printed() {
    let toml = BASE.replace(
        "id = 42",
        "id = 42\nsigning_token_env = \"APP_SIGNING\"\n",
    ) + "[api]\ntokens_env = \"MY_TOKENS\"\n[gitlab]\nurl = \"https://gitlab.example.com\"\ntoken_env = \"GL\"\n";
    let env = [
        ("APP_SIGNING", "whsec_c2VjcmV0LXNpZ25pbmcta2V5"),
        ("MY_TOKENS", "api-one,api-two"),
        ("GL", "glpat-very-secret"),
    ];
    let config = ok(&toml, &env, &no_flags());
    let project = &config.projects[0];
    assert_eq!(
        project.signing_token.as_ref().unwrap().expose(),
        "whsec_c2VjcmV0LXNpZ25pbmcta2V5"
    );
    assert_eq!(config.api.tokens.len(), 2);
    assert_eq!(
        config.gitlab.as_ref().unwrap().token.expose(),
        "glpat-very-secret"
    );

    let secret = Secret::new("hunter2");
    assert_eq!(format!("{secret:?}"), "***");
    assert_eq!(format!("{secret}"), "***");
    let printed = format!("{config:?}");
    for value in ["hook-secret", "c2VjcmV0", "api-one", "glpat"] {
        assert!(!printed.contains(value), "{value} leaked into {printed}");
    }
}

#[test]
fn literal_tokens_and_unauthenticated_projects() {
    let toml = BASE.replace("webhook_token_env = \"APP_HOOK\"", "webhook_token = \"lit\"")
        + "[[projects]]\npath = \"g/open\"\nallow_unauthenticated = true\n[projects.build]\ncommands = [\"x\"]\n[api]\ntokens = [\"a\", \"b\"]\n";
    let config = ok(&toml, &[], &no_flags());
    assert_eq!(
        config.projects[0].webhook_token.as_ref().unwrap().expose(),
        "lit"
    );
    assert!(config.projects[1].allow_unauthenticated);
    assert!(config.projects[1].webhook_token.is_none());
    assert_eq!(config.api.tokens.len(), 2);
}

#[test]
fn host_round_trips() {
    for (text, shown) in [
        ("local", "local"),
        ("deploy@10.0.0.5:22", "deploy@10.0.0.5:22"),
        ("deploy@web-1.example.com", "deploy@web-1.example.com:22"),
        ("root@[2001:db8::1]:2222", "root@[2001:db8::1]:2222"),
    ] {
        let host: Host = text.parse().unwrap();
        assert_eq!(host.to_string(), shown);
        assert_eq!(shown.parse::<Host>().unwrap(), host);
    }
    for bad in [
        "",
        "@h",
        "u@",
        "u@h:0",
        "u@h:65536",
        "u@[::1",
        "u@[nope]:22",
        "u@h;rm",
    ] {
        assert!(bad.parse::<Host>().is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn missing_file_names_the_file() {
    let err = load(
        Some(Path::new("/nonexistent/ferry.toml")),
        &lookup(&[]),
        &no_flags(),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("/nonexistent/ferry.toml: "),
        "{err}"
    );
}

/// Every config shipped in `ops/` loads, with the secrets it names provided.
#[test]
fn ops_examples_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        let mut secrets = HashMap::new();
        collect_env_refs(&toml::Value::Table(doc), &mut secrets);
        let env = move |name: &str| secrets.get(name).cloned();
        if let Err(e) = load(Some(&path), &env, &no_flags()) {
            panic!("{e}");
        }
    }
    assert!(seen > 0, "no example config in {}", dir.display());
}

/// The example documents every key: each table's keys all appear in it.
#[test]
fn example_documents_every_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/ferry.example.toml");
    let doc: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tables: [(&str, Option<&toml::Table>, &[&str]); 9] = [
        ("top", Some(&doc), raw::RawConfig::KEYS),
        ("gateway", doc["gateway"].as_table(), raw::RawGateway::KEYS),
        ("api", doc["api"].as_table(), raw::RawApi::KEYS),
        (
            "coordinator",
            doc["coordinator"].as_table(),
            raw::RawCoordinator::KEYS,
        ),
        ("agent", doc["agent"].as_table(), raw::RawAgent::KEYS),
        (
            "artifacts",
            doc["artifacts"].as_table(),
            raw::RawArtifacts::KEYS,
        ),
        ("gitlab", doc["gitlab"].as_table(), raw::RawGitlab::KEYS),
        (
            "projects",
            doc["projects"][0].as_table(),
            raw::RawProject::KEYS,
        ),
        (
            "build",
            doc["projects"][0]["build"].as_table(),
            raw::RawBuild::KEYS,
        ),
    ];
    let mut missing = Vec::new();
    for (name, table, keys) in tables {
        let table = table.unwrap_or_else(|| panic!("[{name}] missing"));
        missing.extend(
            keys.iter()
                .filter(|k| !table.contains_key(**k))
                .map(|k| format!("{name}.{k}")),
        );
    }
    let environment = doc["projects"][0]["environments"][0].as_table().unwrap();
    missing.extend(
        raw::RawEnvironment::KEYS
            .iter()
            .filter(|k| !environment.contains_key(**k))
            .map(|k| format!("environments.{k}")),
    );
    // Pairs of alternatives cannot both be set in a valid file; the example shows them in
    // comments instead.
    missing.retain(|k| {
        ![
            "api.tokens",
            "projects.webhook_token",
            "projects.signing_token",
        ]
        .contains(&k.as_str())
    });
    assert!(missing.is_empty(), "undocumented keys: {missing:?}");
}

/// Collects every `*_env` value so the test environment provides exactly those variables.
fn collect_env_refs(value: &toml::Value, out: &mut HashMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                match value.as_str() {
                    Some(var) if key.ends_with("_env") => {
                        let secret = if key.starts_with("signing") {
                            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()
                        } else {
                            format!("test-{var}")
                        };
                        out.insert(var.to_owned(), secret);
                    }
                    _ => collect_env_refs(value, out),
                }
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|v| collect_env_refs(v, out)),
        _ => {}
    }
}

#[test]
fn a_store_without_a_scheme_must_name_a_database_file() {
    for file in [
        ".ferry/ferry.db",
        "ferry.db",
        "/var/lib/ferry/x.sqlite",
        "a.sqlite3",
    ] {
        assert!(is_store_file(file), "{file}");
    }
    for not_a_file in ["localhost:6379", ".db", "ferry", "redis://h/0.db", ""] {
        assert!(!is_store_file(not_a_file), "{not_a_file}");
    }
    let c = ok("store = \"state/ferry.db\"", &[], &no_flags());
    assert_eq!(c.store.as_deref(), Some("state/ferry.db"));
}

/// Every scalar key outside `[[projects]]` has its `FERRY_<SECTION>_<KEY>` variable, as the
/// example configuration promises (secrets excepted: `*_env` keys name the variable that holds
/// one, and `api.tokens` has `api.tokens_env`).
#[test]
fn every_scalar_key_outside_projects_has_an_environment_variable() {
    use super::raw::*;
    let have: std::collections::BTreeSet<&str> = env_settings().map(|(k, _)| k).collect();
    let sections: [(&str, &[&str]); 7] = [
        ("", RawConfig::KEYS),
        ("gateway.", RawGateway::KEYS),
        ("api.", RawApi::KEYS),
        ("coordinator.", RawCoordinator::KEYS),
        ("agent.", RawAgent::KEYS),
        ("artifacts.", RawArtifacts::KEYS),
        ("gitlab.", RawGitlab::KEYS),
    ];
    let tables = [
        "gateway",
        "api",
        "coordinator",
        "agent",
        "artifacts",
        "gitlab",
        "projects",
    ];
    for (prefix, keys) in sections {
        for key in keys {
            let full = format!("{prefix}{key}");
            if (prefix.is_empty() && tables.contains(key))
                || key.ends_with("_env")
                || full == "api.tokens"
            {
                continue;
            }
            let var = format!("FERRY_{}", full.replace('.', "_").to_ascii_uppercase());
            assert!(
                env_settings().any(|(k, v)| k == full && v == var),
                "{full} has no {var} ({have:?})"
            );
        }
    }
}

#[test]
fn gitlab_reconciliation_has_defaults() {
    let c = ok(
        "[gitlab]\nurl = \"https://gitlab.test\"",
        &[(env::GITLAB_TOKEN, "glpat")],
        &no_flags(),
    );
    let gitlab = c.gitlab.unwrap();
    assert_eq!(
        (gitlab.reconcile_interval, gitlab.reconcile_window),
        (Duration::from_secs(600), Duration::from_secs(24 * 3600)),
    );
}
