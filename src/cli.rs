//! The command line: `ferry [--config FILE] [--store URL] <command>`.
//!
//! One subcommand per role, the way a cobra CLI splits `app web` / `app api`. Shared flags are
//! global; role flags belong to their subcommand, so `ferry coordinator --concurrency 4` is an
//! error rather than a silently ignored flag. This module only parses: [`Cli::overrides`] hands the
//! flag values to [`crate::config::load`], and `main` runs the command.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{self, Overrides};

/// ferry: event-sourced CI/CD for GitLab.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "ferry", version, about, propagate_version = true)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, value_name = "FILE", env = config::env::CONFIG)]
    pub config: Option<PathBuf>,

    /// Event store URL (e.g. redis://127.0.0.1:6379/0); omitted: the embedded store.
    #[arg(long, global = true, value_name = "URL", env = config::env::STORE)]
    pub store: Option<String>,

    #[command(subcommand)]
    pub command: Command,

    /// `--store` was taken from FERRY_STORE rather than typed: then the config's environment
    /// layer supplies it, and errors name the variable instead of the flag.
    #[arg(skip)]
    store_from_env: bool,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Receive GitLab webhooks and serve the API.
    Gateway(GatewayArgs),
    /// Turn events into jobs, queue steps, retry and reclaim leases.
    Coordinator,
    /// Claim and run build and deploy steps.
    Agent(AgentArgs),
    /// Run every role in one process.
    Up(UpArgs),
    /// Rebuild the view from the event log and print a summary.
    Replay(ReplayArgs),
    /// Inspect and control jobs through the API.
    Jobs(JobsArgs),
    /// Inspect agents through the API.
    Agents(AgentsArgs),
    /// Deploy an already-built tag to an environment, through the API.
    Deploy(DeployArgs),
    /// Roll an environment back to the release before the current one (or to --to TAG),
    /// through the API.
    Rollback(RollbackArgs),
    /// Copy the whole event log from one store to another (embedded to Redis, or back).
    Migrate(MigrateArgs),
    /// Build and deploy a sample project end to end on this machine, in seconds.
    Demo(DemoArgs),
    /// Build the recent tags GitLab lists but no webhook reported (needs [gitlab]).
    Reconcile(ReconcileArgs),
}

/// `ferry reconcile [--window DURATION]`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ReconcileArgs {
    /// How far back a tag may have been made to be built (overrides gitlab.reconcile_window),
    /// e.g. `2h`, `3days`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub window: Option<std::time::Duration>,
}

/// `ferry migrate --from URL --to URL [--force]`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct MigrateArgs {
    /// The store to read: redis://HOST:PORT/DB, sqlite://PATH or an embedded store's file.
    #[arg(long, value_name = "URL")]
    pub from: String,
    /// The store to write.
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// Write into a target that already holds events.
    #[arg(long)]
    pub force: bool,
}

/// `ferry demo [--keep]`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct DemoArgs {
    /// Leave ferry running after the demo, so you can send your own webhooks.
    #[arg(long)]
    pub keep: bool,
    /// Address for the demo's gateway (default: a free port on 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// `ferry gateway`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct GatewayArgs {
    /// Address to listen on (overrides gateway.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// `ferry agent`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct AgentArgs {
    /// Agent name, unique among live agents (overrides agent.name).
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// Pools to take steps from, comma-separated (overrides agent.pools).
    #[arg(long, value_name = "POOLS", value_delimiter = ',')]
    pub pools: Option<Vec<String>>,
    /// Steps run at once (overrides agent.concurrency).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: Option<u32>,
}

/// `ferry up`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct UpArgs {
    /// Address to listen on (overrides gateway.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// `ferry replay`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ReplayArgs {
    /// Compare the rebuilt view with the live projection; exit non-zero on any difference.
    #[arg(long)]
    pub verify: bool,
    /// Start from the last saved snapshot instead of the beginning of the log.
    #[arg(long)]
    pub from_snapshot: bool,
    /// Save the rebuilt view as a snapshot with the log position it reflects.
    #[arg(long)]
    pub save_snapshot: bool,
}

/// How the API clients (`jobs`, `agents`, `deploy`, `rollback`) reach the API.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ApiConn {
    /// Base URL of the ferry API.
    #[arg(long, global = true, value_name = "URL", env = config::env::API_URL, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Bearer token for the API.
    #[arg(long, global = true, value_name = "T", env = config::env::API_TOKEN, hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `ferry jobs`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub conn: ApiConn,
    #[command(subcommand)]
    pub command: JobsCommand,
}

/// `ferry jobs <command>`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum JobsCommand {
    /// List jobs, the newest first (--oldest: creation order).
    List(JobsListArgs),
    /// Show a job with its steps and attempts, and why it waits.
    Show { id: String },
    /// Cancel a job: its queued steps are removed and its running step is stopped.
    Cancel {
        id: String,
        /// Why, recorded in the job's history.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Run an ended job again, as a new job with the same plan.
    Retry { id: String },
    /// Print a job's output; with -f, follow it live with a progress line per step until the
    /// job ends (exit status 1 if it did not succeed).
    Logs {
        id: String,
        #[arg(short, long)]
        follow: bool,
    },
}

/// `ferry jobs list`
#[derive(Debug, Clone, PartialEq, Eq, Default, Args)]
pub struct JobsListArgs {
    /// Only jobs of this project (path or numeric id).
    #[arg(long, value_name = "P")]
    pub project: Option<String>,
    /// Only jobs of this tag (with --project, looked up in the tag's index).
    #[arg(long, value_name = "T")]
    pub tag: Option<String>,
    /// Only jobs in this state: queued, running, succeeded, failed, cancelled or superseded.
    #[arg(long, value_name = "S")]
    pub state: Option<String>,
    /// Jobs per page (1 to 500).
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Continue after the page that printed this cursor (with the same filters and order).
    #[arg(long, value_name = "C")]
    pub cursor: Option<String>,
    /// The oldest jobs first (creation order) instead of the newest.
    #[arg(long)]
    pub oldest: bool,
}

/// `ferry agents`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub conn: ApiConn,
    #[command(subcommand)]
    pub command: AgentsCommand,
}

/// `ferry agents <command>`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AgentsCommand {
    /// List live, paused, stopped and lost agents (those that left or were lost more than a
    /// day ago only with --all).
    List {
        /// Also the agents that left or were lost more than a day ago.
        #[arg(long)]
        all: bool,
    },
    /// Ask a live agent to stop as on SIGTERM: it takes no new work, lets its running steps
    /// finish (handing them back after its grace period) and exits. It hears of it with its
    /// next heartbeat.
    Stop {
        name: String,
        /// Why, recorded in the agents' history.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Pause an agent: it claims no new work until resumed, lets its running steps finish and
    /// stays up (also across restarts). It hears of it with its next heartbeat.
    Pause {
        name: String,
        /// Why, recorded in the agents' history and shown by `agents list`.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Let a paused agent claim work again.
    Resume { name: String },
}

/// `ferry deploy PROJECT TAG --env ENV`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct DeployArgs {
    /// Project path (`group/app`).
    pub project: String,
    /// The tag whose artifact to deploy; it must have been built.
    pub tag: String,
    /// The environment to deploy to.
    #[arg(long = "env", value_name = "ENV")]
    pub environment: String,
    #[command(flatten)]
    pub conn: ApiConn,
}

/// `ferry rollback PROJECT --env ENV [--to TAG]`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct RollbackArgs {
    /// Project path (`group/app`).
    pub project: String,
    /// The environment to roll back.
    #[arg(long = "env", value_name = "ENV")]
    pub environment: String,
    /// The tag to go back to; by default the release deployed before the current one.
    #[arg(long, value_name = "TAG")]
    pub to: Option<String>,
    #[command(flatten)]
    pub conn: ApiConn,
}

impl Cli {
    /// Parses `args` (the program name first): `main` calls
    /// `Cli::parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())`.
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        let mut cli = Self::from_arg_matches(&matches)?;
        cli.store_from_env = matches.value_source("store") == Some(ValueSource::EnvVariable);
        Ok(cli)
    }

    /// The flag values that override the file and the environment, for [`config::load`].
    pub fn overrides(&self) -> Overrides {
        let mut overrides = Overrides {
            store: self.store.clone().filter(|_| !self.store_from_env),
            ..Overrides::default()
        };
        match &self.command {
            Command::Gateway(args) => overrides.listen = args.listen,
            Command::Up(args) => {
                overrides.listen = args.listen;
                overrides.default_data_dir = Some(PathBuf::from(".ferry"));
            }
            Command::Demo(args) => {
                overrides.listen = args.listen;
                overrides.default_data_dir = Some(PathBuf::from(".ferry"));
            }
            Command::Agent(args) => {
                overrides.agent_name = args.name.clone();
                overrides.agent_pools = args.pools.clone();
                overrides.agent_concurrency = args.concurrency;
            }
            Command::Coordinator
            | Command::Replay(_)
            | Command::Jobs(_)
            | Command::Agents(_)
            | Command::Deploy(_)
            | Command::Rollback(_)
            | Command::Migrate(_)
            | Command::Reconcile(_) => {}
        }
        overrides
    }
}

#[cfg(test)]
mod tests;
