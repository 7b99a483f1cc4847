use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use paygate_domain::{ApiKeyText, KeyHasher};
use paygate_server::cli::{AdminCommand, AuditCommand, Cli, Command, KeyCommand, WebhooksCommand};
use paygate_server::config::Config;
use paygate_server::{admin, app, audit_verify, demo, pepper, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Offline commands need neither configuration nor a runtime.
    match &cli.command {
        Command::Openapi => {
            print!("{}", paygate_api::openapi_json());
            return ExitCode::SUCCESS;
        }
        Command::Key(KeyCommand::Check { text }) => return key_check(text),
        Command::Webhooks(WebhooksCommand::Listen { listen, secret }) => {
            telemetry::init_logs(paygate_server::config::LogFormat::Text, "warn");
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            return match runtime.block_on(paygate_server::webhook_listen::listen(*listen, secret.clone())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("paygate: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("paygate: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logs(config.log_format, &config.log_level);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("paygate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve { demo, no_migrate } => serve(config, demo, no_migrate).await,
        Command::Migrate => {
            let store = app::open_store(&config).await?;
            store.migrate().await?;
            println!("migrations applied ({})", store.backend().as_str());
            Ok(())
        }
        Command::Admin(admin) => {
            let store = app::open_store(&config).await?;
            if config.migrate_on_start {
                store.migrate().await?;
            }
            match admin {
                AdminCommand::Company(c) => admin::company(store, c).await,
                AdminCommand::Key(k) => {
                    let hasher = KeyHasher::new(&pepper::load(&config)?);
                    admin::key(store, Some(&hasher), k).await
                }
            }
        }
        Command::Audit(command) => {
            let store = app::open_store(&config).await?;
            let signer = pepper::load_audit_signer(&config, false)?;
            match command {
                AuditCommand::Checkpoint => {
                    let signed = app::checkpoint(&*store, &signer).await?;
                    println!("signed {signed} checkpoint(s)");
                    Ok(())
                }
                AuditCommand::Verify { company } => {
                    let chain = company
                        .map(|c| paygate_domain::CompanyId::parse(&c).map(|id| id.to_string()))
                        .transpose()
                        .map_err(|_| anyhow::anyhow!("--company is not a company id (cmp_…)"))?;
                    let reports = audit_verify::verify(&*store, &signer.public_key(), chain).await?;
                    let mut failed = false;
                    for r in &reports {
                        match &r.problem {
                            None => println!("ok    {}: {} records, {} checkpoints", r.chain, r.records, r.checkpoints),
                            Some((seq, reason)) => {
                                failed = true;
                                println!("FAIL  {}: first bad record at seq {seq}: {reason}", r.chain);
                            }
                        }
                    }
                    if failed {
                        anyhow::bail!("audit verification failed");
                    }
                    Ok(())
                }
            }
        }
        Command::Openapi | Command::Key(_) | Command::Webhooks(_) => unreachable!("handled before configuration"),
    }
}

async fn serve(mut config: Config, demo: bool, no_migrate: bool) -> anyhow::Result<()> {
    if demo && config.webhooks.allowed_networks.is_empty() {
        // The walkthrough receives webhooks on this machine; a real
        // deployment never reaches loopback unless its operator says so.
        config.webhooks.allowed_networks =
            demo::WEBHOOK_NETWORKS.iter().map(|n| n.parse().expect("a network")).collect();
        tracing::info!(networks = ?config.webhooks.allowed_networks, "demo: webhook endpoints may use loopback");
    }
    let server = app::start(&config, app::StartOptions { skip_migrations: no_migrate }).await?;
    if demo {
        demo::prepare(&*server.store, &server.hasher, server.api_addr).await?;
    }
    let _store: Arc<_> = server.store.clone();
    shutdown_signal().await;
    tracing::info!("shutdown signal received; finishing in-flight requests");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// `paygate key check`: offline, never prints the key; exit 0 well-formed, 1 not.
fn key_check(text: &str) -> ExitCode {
    let mut input = zeroize::Zeroizing::new(String::new());
    let candidate: &str = if text == "-" {
        if std::io::stdin().read_to_string(&mut input).is_err() {
            eprintln!("cannot read standard input");
            return ExitCode::FAILURE;
        }
        input.trim()
    } else {
        text.trim()
    };
    match ApiKeyText::parse(candidate) {
        Ok(key) => {
            println!("well-formed Paygate {} key {}", key.mode(), key.id());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("not a Paygate key: {e}");
            ExitCode::FAILURE
        }
    }
}
