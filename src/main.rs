//! The `ferry` binary: parses the command line, loads the configuration and runs a role.

use ferry::app;
use ferry::cli::{Cli, Command};
use ferry::config;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    // The demo talks to a person through its own output; the roles' logs would drown it.
    let default_log = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let finish = |r: anyhow::Result<ExitCode>| match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    };
    // The API clients take only --api and --token: a server's configuration (FERRY_CONFIG in an
    // operator's shell, hook tokens it names that are not set there) is none of their business.
    let client = match &cli.command {
        Command::Jobs(args) => Some(runtime.block_on(ferry::client::jobs(args))),
        Command::Agents(args) => Some(runtime.block_on(ferry::client::agents(args))),
        Command::Deploy(args) => Some(runtime.block_on(ferry::client::deploy(args))),
        Command::Rollback(args) => Some(runtime.block_on(ferry::client::rollback(args))),
        _ => None,
    };
    if let Some(result) = client {
        return finish(result.map(|_| ExitCode::SUCCESS));
    }
    let config = match config::load(
        cli.config.as_deref(),
        &config::process_env,
        &cli.overrides(),
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    finish(runtime.block_on(run(cli.command, config)))
}

async fn run(command: Command, config: config::Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Coordinator => {
            // Options first: a bad artifact store fails before the store is contacted.
            let options = app::coordinator_options(&config)?;
            if let Some(listen) = config.coordinator.metrics_listen {
                // Registered before the first scrape can come.
                std::sync::LazyLock::force(&ferry::metrics::COORDINATOR);
                ferry::metrics::serve("coordinator.metrics_listen", listen).await?;
            }
            let store = app::open_store(&config).await?;
            let stop = app::shutdown_signal();
            let reporter = app::gitlab_reporter_options(&config).map(|o| {
                tokio::spawn(ferry::gitlab::run(
                    store.clone(),
                    o,
                    app::until(stop.clone()),
                ))
            });
            ferry::coordinator::run(store, options, app::until(stop)).await?;
            if let Some(reporter) = reporter {
                reporter.await??;
            }
        }
        Command::Agent(_) => {
            // Options first: a bad key, CA file or artifact store fails before the store is
            // contacted.
            let options = app::agent_options(&config)?;
            if let Some(listen) = config.agent.metrics_listen {
                // Registered before the first scrape can come.
                std::sync::LazyLock::force(&ferry::metrics::AGENT);
                ferry::metrics::serve("agent.metrics_listen", listen).await?;
            }
            let store = app::open_store(&config).await?;
            let stop = app::shutdown_signal();
            ferry::agent::run(store, options, app::until(stop)).await?;
        }
        Command::Gateway(_) => {
            let store = app::open_store(&config).await?;
            app::run_gateway(&config, store, app::shutdown_signal()).await?;
        }
        Command::Up(_) => {
            let store = app::open_store(&config).await?;
            app::run_up(&config, store).await?;
        }
        Command::Replay(args) => {
            let store = app::open_store(&config).await?;
            let ok =
                app::replay(&*store, args.from_snapshot, args.save_snapshot, args.verify).await?;
            if !ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        // (run in main, without loading the configuration)
        Command::Jobs(_) | Command::Agents(_) | Command::Deploy(_) | Command::Rollback(_) => {
            unreachable!("the API clients run before the configuration is loaded")
        }
        Command::Migrate(args) => app::migrate(&config, &args).await?,
        Command::Reconcile(args) => {
            if !app::reconcile(&config, args.window).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Demo(args) => {
            if !ferry::demo::run(&config, &args).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
