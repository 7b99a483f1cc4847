use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "paygate", version, about = "Secure integration API for payment automation")]
pub struct Cli {
    /// TOML configuration file; `PAYGATE_*` environment variables override it.
    #[arg(long, global = true, env = "PAYGATE_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API and the operations listener.
    Serve {
        /// Create the sandbox company "Demo Co" if absent and print two fresh test keys.
        #[arg(long)]
        demo: bool,
        /// Do not apply migrations on start.
        #[arg(long)]
        no_migrate: bool,
        /// Create the SQLite database's directory if it does not exist (a
        /// mistyped path is refused otherwise, rather than starting empty).
        #[arg(long)]
        create: bool,
    },
    /// Apply the embedded database migrations and exit (creates the SQLite
    /// database and its directory if needed).
    Migrate,
    /// Print the OpenAPI document.
    Openapi,
    /// Operator commands: companies and keys.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Offline key tools.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Webhook tools.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// A local receiver for trying webhooks: prints each delivery and checks
    /// its signature (Standard Webhooks) when given the endpoint's secret.
    Listen {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4000")]
        listen: std::net::SocketAddr,
        /// The endpoint's signing secret (`whsec_…`); better from the environment.
        #[arg(long, env = "PAYGATE_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute every chain and check every signed checkpoint; exit 1 on any problem.
    Verify {
        /// Only this company's chain.
        #[arg(long)]
        company: Option<String>,
    },
    /// Sign a checkpoint of every chain that moved, now.
    Checkpoint,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create, list, suspend and limit companies.
    #[command(subcommand)]
    Company(CompanyCommand),
    /// Issue, list, revoke and limit a company's API keys.
    #[command(subcommand)]
    Key(AdminKeyCommand),
}

#[derive(Debug, Subcommand)]
pub enum CompanyCommand {
    /// Create a company.
    Create {
        /// The company's display name.
        #[arg(long)]
        name: String,
        /// Print the created company as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List companies, newest first.
    List {
        /// Print a JSON array instead of tab-separated lines.
        #[arg(long)]
        json: bool,
    },
    /// Suspend a company: every key of it is refused on every node within 1 s.
    Suspend {
        /// Company id (`cmp_…`).
        id: String,
    },
    /// Resume a suspended company.
    Resume {
        /// Company id (`cmp_…`).
        id: String,
    },
    /// Override the company's rate limit (all its keys together).
    SetLimits {
        /// Company id (`cmp_…`).
        id: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Set the lifetime of keys the company creates over the API.
    SetKeyPolicy {
        /// Company id (`cmp_…`).
        id: String,
        /// Longest lifetime, e.g. 90d; omit for none.
        #[arg(long)]
        max_lifetime: Option<String>,
        /// Lifetime when a key asks for none, e.g. 30d; omit for none.
        #[arg(long)]
        default_lifetime: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Real money: payments go to the rail and never settle by themselves.
    Live,
    /// The sandbox: a simulated rail settles payments after a short delay.
    Test,
}

#[derive(Debug, Args)]
pub struct KeyCreateArgs {
    /// Company id (`cmp_…`) the key belongs to.
    #[arg(long)]
    pub company: String,
    /// A label for the key, e.g. "nightly sync".
    #[arg(long)]
    pub name: String,
    /// Who or which system the key is issued to.
    #[arg(long)]
    pub owner: String,
    /// Comma-separated scopes, e.g. payments:read,payees:read.
    #[arg(long)]
    pub scopes: String,
    /// Test (sandbox) or live (real money). Without it the key is live and
    /// the command says so on standard error.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Lifetime such as 90d, 12h or 2w.
    #[arg(long)]
    pub expires_in: Option<String>,
    /// Comma-separated client networks the key may be used from (at most 32).
    #[arg(long)]
    pub allowed_cidrs: Option<String>,
    /// Print the key (with its secret) as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AdminKeyCommand {
    /// Issue a key; its text is printed once and never stored.
    Create(KeyCreateArgs),
    /// List a company's keys (never secrets).
    List {
        /// Company id (`cmp_…`).
        #[arg(long)]
        company: String,
        /// Print a JSON array instead of tab-separated lines.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key at once.
    Revoke {
        /// Key id (`key_…`).
        id: String,
    },
    /// Override one key's rate limit.
    SetLimits {
        /// Key id (`key_…`).
        id: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Emergency: revoke every key of a company at once.
    RevokeAll {
        /// Company id (`cmp_…`).
        #[arg(long)]
        company: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Exit 0 if TEXT is a well-formed Paygate key (checksum included), 1 if not.
    /// Offline; never prints the key. Use `-` to read it from standard input.
    Check {
        /// The key text, or `-` for standard input.
        text: String,
    },
}

#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Requests per second, sustained.
    #[arg(long, required_unless_present = "clear")]
    pub rate: Option<u32>,
    /// Requests at once.
    #[arg(long, required_unless_present = "clear")]
    pub burst: Option<u32>,
    /// Remove the override: the configured default applies again.
    #[arg(long, conflicts_with_all = ["rate", "burst"])]
    pub clear: bool,
}
