use std::net::SocketAddr;
use std::path::PathBuf;

use super::*;

fn parse(line: &str) -> Result<Cli, clap::Error> {
    Cli::parse_from(std::iter::once("ferry").chain(line.split_whitespace()))
}

/// Parses `line` and compares the command and the overrides it yields.
fn check(line: &str, command: Command, overrides: Overrides) {
    let cli = parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    assert_eq!(cli.command, command, "{line}");
    assert_eq!(cli.overrides(), overrides, "{line}");
}

fn addr(s: &str) -> Option<SocketAddr> {
    Some(s.parse().unwrap())
}

#[test]
fn each_subcommand_parses() {
    let none = Overrides::default;
    check(
        "gateway",
        Command::Gateway(GatewayArgs { listen: None }),
        none(),
    );
    check(
        "gateway --listen 127.0.0.1:9000",
        Command::Gateway(GatewayArgs {
            listen: addr("127.0.0.1:9000"),
        }),
        Overrides {
            listen: addr("127.0.0.1:9000"),
            ..none()
        },
    );
    check("coordinator", Command::Coordinator, none());
    check(
        "agent --name a1 --pools x,y --concurrency 4",
        Command::Agent(AgentArgs {
            name: Some("a1".into()),
            pools: Some(vec!["x".into(), "y".into()]),
            concurrency: Some(4),
        }),
        Overrides {
            agent_name: Some("a1".into()),
            agent_pools: Some(vec!["x".into(), "y".into()]),
            agent_concurrency: Some(4),
            ..none()
        },
    );
    check(
        "up --listen [::1]:8080",
        Command::Up(UpArgs {
            listen: addr("[::1]:8080"),
        }),
        Overrides {
            listen: addr("[::1]:8080"),
            default_data_dir: Some(PathBuf::from(".ferry")),
            ..none()
        },
    );
    check(
        "demo --keep",
        Command::Demo(DemoArgs {
            keep: true,
            listen: None,
        }),
        Overrides {
            default_data_dir: Some(PathBuf::from(".ferry")),
            ..none()
        },
    );
    check(
        "migrate --from sqlite://.ferry/ferry.db --to redis://r:6379/0 --force",
        Command::Migrate(MigrateArgs {
            from: "sqlite://.ferry/ferry.db".into(),
            to: "redis://r:6379/0".into(),
            force: true,
        }),
        none(),
    );
    check(
        "reconcile --window 2h",
        Command::Reconcile(ReconcileArgs {
            window: Some(std::time::Duration::from_secs(7200)),
        }),
        none(),
    );
    check(
        "replay --verify --from-snapshot --save-snapshot",
        Command::Replay(ReplayArgs {
            verify: true,
            from_snapshot: true,
            save_snapshot: true,
        }),
        none(),
    );
    check(
        "replay",
        Command::Replay(ReplayArgs {
            verify: false,
            from_snapshot: false,
            save_snapshot: false,
        }),
        none(),
    );
    let jobs = |command, api: &str, token: Option<&str>| {
        Command::Jobs(JobsArgs {
            conn: ApiConn {
                api: api.into(),
                token: token.map(Into::into),
                json: false,
            },
            command,
        })
    };
    // FERRY_API_URL / FERRY_API_TOKEN would change the defaults; these cases pass both flags.
    let flags = "--api http://ferry:8080 --token t";
    check(
        &format!("jobs {flags} list"),
        jobs(
            JobsCommand::List(JobsListArgs::default()),
            "http://ferry:8080",
            Some("t"),
        ),
        none(),
    );
    check(
        &format!(
            "jobs {flags} list --project g/app --tag v1 --state failed --limit 5 --cursor c --oldest --json"
        ),
        Command::Jobs(JobsArgs {
            conn: ApiConn {
                api: "http://ferry:8080".into(),
                token: Some("t".into()),
                json: true,
            },
            command: JobsCommand::List(JobsListArgs {
                project: Some("g/app".into()),
                tag: Some("v1".into()),
                state: Some("failed".into()),
                limit: Some(5),
                cursor: Some("c".into()),
                oldest: true,
            }),
        }),
        none(),
    );
    check(
        &format!("agents list {flags}"),
        Command::Agents(AgentsArgs {
            conn: ApiConn {
                api: "http://ferry:8080".into(),
                token: Some("t".into()),
                json: false,
            },
            command: AgentsCommand::List { all: false },
        }),
        none(),
    );
    check(
        &format!("jobs {flags} show 0190-abc"),
        jobs(
            JobsCommand::Show {
                id: "0190-abc".into(),
            },
            "http://ferry:8080",
            Some("t"),
        ),
        none(),
    );
    check(
        &format!("jobs {flags} cancel j1"),
        jobs(
            JobsCommand::Cancel {
                id: "j1".into(),
                reason: None,
            },
            "http://ferry:8080",
            Some("t"),
        ),
        none(),
    );
    check(
        &format!("jobs retry j1 {flags}"),
        jobs(
            JobsCommand::Retry { id: "j1".into() },
            "http://ferry:8080",
            Some("t"),
        ),
        none(),
    );
    let conn = || ApiConn {
        api: "http://ferry:8080".into(),
        token: Some("t".into()),
        json: false,
    };
    check(
        &format!("deploy g/app v1.2.0 --env production {flags}"),
        Command::Deploy(DeployArgs {
            project: "g/app".into(),
            tag: "v1.2.0".into(),
            environment: "production".into(),
            conn: conn(),
        }),
        none(),
    );
    check(
        &format!("rollback {flags} g/app --env staging"),
        Command::Rollback(RollbackArgs {
            project: "g/app".into(),
            environment: "staging".into(),
            to: None,
            conn: conn(),
        }),
        none(),
    );
    check(
        &format!("rollback g/app --env staging --to v1.0.0 {flags}"),
        Command::Rollback(RollbackArgs {
            project: "g/app".into(),
            environment: "staging".into(),
            to: Some("v1.0.0".into()),
            conn: conn(),
        }),
        none(),
    );
}

#[test]
fn global_flags_go_anywhere() {
    for line in [
        "--config /etc/ferry.toml --store redis://r:6379 coordinator",
        "coordinator --config /etc/ferry.toml --store redis://r:6379",
        "agent --store redis://r:6379 --config /etc/ferry.toml",
    ] {
        let cli = parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(cli.config, Some(PathBuf::from("/etc/ferry.toml")), "{line}");
        assert_eq!(cli.store.as_deref(), Some("redis://r:6379"), "{line}");
        assert_eq!(
            cli.overrides().store.as_deref(),
            Some("redis://r:6379"),
            "{line}"
        );
    }
}

#[test]
fn role_flags_are_refused_elsewhere_and_bad_values_fail() {
    for line in [
        "coordinator --listen 0.0.0.0:1",
        "coordinator --concurrency 4",
        "gateway --pools a",
        "gateway --name x",
        "up --concurrency 2",
        "agent --listen 0.0.0.0:1",
        "replay --listen 0.0.0.0:1",
        "jobs --verify list",
        "replay --api http://x",
        "agent --concurrency 0",
        "agent --concurrency x",
        "gateway --listen 8080",
        "jobs show",
        "jobs",
        "",
        "deploy",
        "deploy g/app v1",
        "deploy g/app --env prod",
        "rollback g/app",
        "rollback --env prod",
        "rollback g/app v1 --env prod",
        "migrate --from a",
        "migrate --to b",
        "demo --verify",
        "reconcile --window soon",
    ] {
        assert!(parse(line).is_err(), "{line:?} was accepted");
    }
}

#[test]
fn the_command_definition_is_consistent() {
    Cli::command().debug_assert();
}
