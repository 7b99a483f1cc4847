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
        Command::Serve { demo, no_migrate, create } => {
            serve(Config { create_database_dir: create, ..config }, demo, no_migrate).await
        }
        Command::Migrate => {
            let config = Config { create_database_dir: true, ..config };
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
    } else if server.store.list_companies().await?.is_empty() {
        print_next_steps(server.api_addr);
    }
    let _store: Arc<_> = server.store.clone();
    shutdown_signal().await;
    tracing::info!("shutdown signal received; finishing in-flight requests");
    server.shutdown().await;
    Ok(())
}

/// An empty installation answers every request with 401: say how to get a key.
fn print_next_steps(api: std::net::SocketAddr) {
    let lines = [
        format!("Paygate is running on http://{api} but has no company yet. Next steps:"),
        String::new(),
        "  paygate admin company create --name \"Acme\"".into(),
        "  paygate admin key create --company cmp_… --name \"first key\" --owner you@example.com \\".into(),
        "      --scopes payments:read,payments:write,payees:read,payees:write --mode test".into(),
        format!("  curl -s http://{api}/v1/me -H 'Authorization: Bearer <the key printed above>'"),
        String::new(),
        "Or start with `paygate serve --demo` for a sandbox company and two test keys.".into(),
    ];
    println!("{}", lines.join("\n"));
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
