//! Operator commands. Each opens the store directly (no server needed); changes
//! that affect authentication bump the auth revision, so running nodes drop
//! their caches within one poll interval.

use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use paygate_domain::audit::{ActorKind, AuditEntry, Outcome};
use paygate_domain::duration::parse_duration;
use paygate_domain::{
    AllowedCidrs, ApiKeyId, CompanyId, CompanyStatus, KeyHasher, KeyMode, KeyPolicy, Label, RateLimitOverride, ScopeSet,
};
use paygate_store::{ApiKey, Company, NewApiKey, NewCompany, OperatorStore, PageRequest, operator_scope};
use serde_json::json;
use time::format_description::well_known::Rfc3339;

use crate::cli::{AdminKeyCommand, CompanyCommand, KeyCreateArgs, LimitArgs, ModeArg};

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn company_json(c: &Company) -> serde_json::Value {
    json!({"id": c.id, "name": c.name, "status": c.status.as_str(), "created_at": rfc3339(c.created_at)})
}

fn key_json(k: &ApiKey) -> serde_json::Value {
    json!({
        "id": k.id, "company_id": k.company_id, "name": k.name, "owner": k.owner,
        "scopes": k.scopes, "mode": k.mode, "created_at": rfc3339(k.created_at),
        "expires_at": k.expires_at.map(rfc3339), "revoked_at": k.revoked_at.map(rfc3339),
        "last_used_at": k.last_used_at.map(rfc3339), "last_used_ip": k.last_used_ip,
        "allowed_cidrs": k.allowed_cidrs, "replaces": k.replaces, "replaced_by": k.replaced_by,
        "rate_limit": k.rate_limit,
    })
}

/// The operator running the CLI: `PAYGATE_OPERATOR`, else the OS user.
pub fn operator_name() -> String {
    ["PAYGATE_OPERATOR", "SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .map(|s| AuditEntry::clean_user_agent(&s))
        .unwrap_or_else(|| "unknown".into())
}

/// The record of an operator change, written in the change's transaction.
pub fn operator_entry(
    action: &'static str,
    company: CompanyId,
    resource: (&str, String),
    details: serde_json::Value,
) -> AuditEntry {
    AuditEntry {
        id: paygate_domain::AuditEventId::generate(),
        chain: company.to_string(),
        occurred_at: paygate_domain::now(),
        actor_kind: ActorKind::Operator,
        actor_id: None,
        actor_name: Some(operator_name()),
        action,
        resource_type: Some(resource.0.to_owned()),
        resource_id: Some(resource.1),
        outcome: Outcome::Success,
        status: 200,
        request_id: None,
        client_ip: None,
        user_agent: Some("paygate-cli".into()),
        details: AuditEntry::details_from(&details),
    }
}

fn parse_limits(args: &LimitArgs) -> anyhow::Result<Option<RateLimitOverride>> {
    if args.clear {
        return Ok(None);
    }
    let (Some(rate), Some(burst)) = (args.rate, args.burst) else { bail!("give --rate and --burst, or --clear") };
    RateLimitOverride::new(rate, burst).map(Some).ok_or_else(|| anyhow!("--rate and --burst must be from 1 to 1000000"))
}

fn show_limit(limit: Option<RateLimitOverride>) -> String {
    limit.map(|l| format!("{}/s, burst {}", l.rate, l.burst)).unwrap_or_else(|| "configured default".into())
}

fn parse_company(id: &str) -> anyhow::Result<CompanyId> {
    CompanyId::parse(id).map_err(|_| anyhow!("{id:?} is not a company id (cmp_…)"))
}

pub async fn company(store: Arc<dyn OperatorStore>, command: CompanyCommand) -> anyhow::Result<()> {
    match command {
        CompanyCommand::Create { name, json } => {
            let name = Label::parse(&name).map_err(|e| anyhow!("--name {e}"))?;
            let new = NewCompany::new(name);
            let record = operator_entry("company.create", new.id, ("company", new.id.to_string()), json!({}));
            let company = store.create_company(new, &record).await?;
            if json {
                println!("{}", company_json(&company));
            } else {
                println!("created company {} ({})", company.id, company.name);
            }
        }
        CompanyCommand::List { json } => {
            let companies = store.list_companies().await?;
            if json {
                println!("{}", serde_json::Value::Array(companies.iter().map(company_json).collect()));
            } else {
                for c in companies {
                    println!("{}\t{}\t{}\t{}", c.id, c.status.as_str(), rfc3339(c.created_at), c.name);
                }
            }
        }
        CompanyCommand::Suspend { id } => set_status(&*store, &id, CompanyStatus::Suspended).await?,
        CompanyCommand::Resume { id } => set_status(&*store, &id, CompanyStatus::Active).await?,
        CompanyCommand::SetLimits { id, limits } => {
            let id = parse_company(&id)?;
            let limit = parse_limits(&limits)?;
            let record = operator_entry("company.set_limits", id, ("company", id.to_string()), json!({"limit": limit}));
            store.set_company_rate_limit(id, limit, &record).await?.ok_or_else(|| anyhow!("no such company {id}"))?;
            println!("company {id} rate limit: {}", show_limit(limit));
        }
        CompanyCommand::SetKeyPolicy { id, max_lifetime, default_lifetime } => {
            let id = parse_company(&id)?;
            let parse = |flag: &str, v: Option<String>| {
                v.as_deref().map(parse_duration).transpose().map_err(|e| anyhow!("--{flag}: {e}"))
            };
            let policy =
                KeyPolicy::new(parse("default-lifetime", default_lifetime)?, parse("max-lifetime", max_lifetime)?)
                    .map_err(|e| anyhow!("{e}"))?;
            let record = operator_entry(
                "company.set_key_policy",
                id,
                ("company", id.to_string()),
                json!({
                    "default_lifetime_seconds": policy.default_lifetime.map(|d| d.whole_seconds()),
                    "max_lifetime_seconds": policy.max_lifetime.map(|d| d.whole_seconds()),
                }),
            );
            let company =
                store.set_key_policy(id, policy, &record).await?.ok_or_else(|| anyhow!("no such company {id}"))?;
            let show =
                |d: Option<time::Duration>| d.map(|d| format!("{}s", d.whole_seconds())).unwrap_or("none".into());
            println!(
                "company {} key policy: default lifetime {}, max lifetime {}",
                company.id,
                show(company.key_policy.default_lifetime),
                show(company.key_policy.max_lifetime)
            );
        }
    }
    Ok(())
}

async fn set_status(store: &dyn OperatorStore, id: &str, status: CompanyStatus) -> anyhow::Result<()> {
    let id = parse_company(id)?;
    let action = if status == CompanyStatus::Suspended { "company.suspend" } else { "company.resume" };
    let record = operator_entry(action, id, ("company", id.to_string()), json!({"status": status.as_str()}));
    let company =
        store.set_company_status(id, status, &record).await?.ok_or_else(|| anyhow!("no such company {id}"))?;
    println!("company {} is now {}", company.id, company.status.as_str());
    Ok(())
}

/// What an operator asks for when issuing a key.
#[derive(Debug, Clone)]
pub struct KeyRequest<'a> {
    pub company: CompanyId,
    pub name: &'a str,
    pub owner: &'a str,
    pub scopes: ScopeSet,
    pub mode: KeyMode,
    pub expires_in: Option<time::Duration>,
    pub allowed_cidrs: AllowedCidrs,
}

/// Issues a key and returns it with its text (shown once).
pub async fn create_key(
    store: &dyn OperatorStore,
    hasher: &KeyHasher,
    request: KeyRequest<'_>,
) -> anyhow::Result<(ApiKey, zeroize::Zeroizing<String>)> {
    let KeyRequest { company, name, owner, scopes, mode, expires_in, allowed_cidrs } = request;
    let name = Label::parse(name).map_err(|e| anyhow!("--name {e}"))?;
    let owner = Label::parse(owner).map_err(|e| anyhow!("--owner {e}"))?;
    let scope = operator_scope(store, company, mode);
    if let Some((a, b)) = paygate_domain::payment::conflicting_scopes(scopes) {
        let policy = store.approval_policy(&scope).await?;
        if !policy.allow_write_and_approve_keys {
            bail!(
                "conflicting_scopes: this company's {} approval policy does not allow one key to hold both {a} and {b} \
                 (four eyes need two keys)",
                mode.as_str()
            );
        }
    }
    let generated = hasher.generate(mode);
    let now = paygate_domain::now();
    let record = operator_entry(
        "api_key.create",
        company,
        ("api_key", generated.id.to_string()),
        json!({"scopes": scopes, "mode": mode, "owner": owner.as_str()}),
    );
    let key = store
        .create_api_key(
            &scope,
            NewApiKey {
                id: generated.id,
                name,
                owner,
                scopes,
                mode,
                created_at: now,
                expires_at: expires_in.map(|d| now + d),
                allowed_cidrs,
                rate_limit: None,
                secret_hash: generated.hash,
                pepper_version: generated.pepper_version,
                principal: None,
            },
            &record,
        )
        .await
        .map_err(|e| match e {
            paygate_store::StoreError::NotFound(_) => anyhow!("no such company {company}"),
            other => other.into(),
        })?;
    Ok((key, generated.text))
}

pub async fn key(
    store: Arc<dyn OperatorStore>,
    hasher: Option<&KeyHasher>,
    command: AdminKeyCommand,
) -> anyhow::Result<()> {
    match command {
        AdminKeyCommand::Create(args) => {
            let hasher = hasher.context("a key pepper is needed to issue keys")?;
            create_key_command(&*store, hasher, args).await?;
        }
        AdminKeyCommand::List { company, json } => {
            let company = parse_company(&company)?;
            if store.find_company(company).await?.is_none() {
                bail!("no such company {company}");
            }
            // Keys belong to the company: the scope's mode does not narrow them.
            let scope = operator_scope(&*store, company, KeyMode::Test);
            let mut keys = Vec::new();
            let mut after = None;
            loop {
                let page = store.list_api_keys(&scope, PageRequest { limit: 100, after }).await?;
                after = page.items.last().map(|k| k.id);
                keys.extend(page.items);
                if !page.has_more {
                    break;
                }
            }
            if json {
                println!("{}", serde_json::Value::Array(keys.iter().map(key_json).collect()));
            } else {
                for k in keys {
                    let state = if k.revoked_at.is_some() { "revoked" } else { "active" };
                    println!("{}\t{}\t{}\t{}\t{}\t{}", k.id, k.mode, state, k.scopes.to_storage(), k.owner, k.name);
                }
            }
        }
        AdminKeyCommand::SetLimits { id, limits } => {
            let id = ApiKeyId::parse(&id).map_err(|_| anyhow!("{id:?} is not a key id (key_…)"))?;
            let limit = parse_limits(&limits)?;
            let owner = store.find_key_for_auth(id).await?.ok_or_else(|| anyhow!("no such key {id}"))?.key.company_id;
            let record =
                operator_entry("api_key.set_limits", owner, ("api_key", id.to_string()), json!({"limit": limit}));
            store.set_key_rate_limit(id, limit, &record).await?.ok_or_else(|| anyhow!("no such key {id}"))?;
            println!("key {id} rate limit: {}", show_limit(limit));
        }
        AdminKeyCommand::RevokeAll { company } => {
            let company = parse_company(&company)?;
            if store.find_company(company).await?.is_none() {
                bail!("no such company {company}");
            }
            let record = operator_entry("api_key.revoke_all", company, ("company", company.to_string()), json!({}));
            let revoked = store
                .revoke_all_api_keys(&operator_scope(&*store, company, KeyMode::Test), paygate_domain::now(), &record)
                .await?;
            println!("revoked {revoked} key(s) of company {company}");
        }
        AdminKeyCommand::Revoke { id } => {
            let id = ApiKeyId::parse(&id).map_err(|_| anyhow!("{id:?} is not a key id (key_…)"))?;
            let owner = store.find_key_for_auth(id).await?.ok_or_else(|| anyhow!("no such key {id}"))?.key.company_id;
            let record = operator_entry("api_key.revoke", owner, ("api_key", id.to_string()), json!({}));
            let key = store
                .revoke_api_key_by_id(id, paygate_domain::now(), &record)
                .await?
                .ok_or_else(|| anyhow!("no such key {id}"))?;
            println!("key {} revoked at {}", key.id, key.revoked_at.map(rfc3339).unwrap_or_default());
        }
    }
    Ok(())
}

async fn create_key_command(store: &dyn OperatorStore, hasher: &KeyHasher, args: KeyCreateArgs) -> anyhow::Result<()> {
    let company = parse_company(&args.company)?;
    let scopes = ScopeSet::parse_list(&args.scopes).map_err(|e| {
        let all: Vec<_> = paygate_domain::Scope::ALL.iter().map(|s| s.as_str()).collect();
        anyhow!("--scopes: {e}; known scopes: {}", all.join(", "))
    })?;
    let mode = match args.mode {
        Some(ModeArg::Live) => KeyMode::Live,
        Some(ModeArg::Test) => KeyMode::Test,
        None => {
            // Live is the safe default for an operator tool (no sandbox data
            // leaks into production), but never a silent one.
            eprintln!(
                "no --mode given: creating a live key (real money; payments are not settled by the simulated rail). \
                 Pass --mode test for a sandbox key."
            );
            KeyMode::Live
        }
    };
    let expires_in =
        args.expires_in.as_deref().map(parse_duration).transpose().map_err(|e| anyhow!("--expires-in: {e}"))?;
    let allowed_cidrs = AllowedCidrs::parse_list(args.allowed_cidrs.as_deref().unwrap_or(""))
        .map_err(|e| anyhow!("--allowed-cidrs: {e}"))?;
    let request = KeyRequest { company, name: &args.name, owner: &args.owner, scopes, mode, expires_in, allowed_cidrs };
    let (key, text) = create_key(store, hasher, request).await?;
    if args.json {
        let mut value = key_json(&key);
        value["secret"] = serde_json::Value::String(text.to_string());
        println!("{value}");
    } else {
        println!("created key {} for company {} (shown once, store it now):", key.id, key.company_id);
        println!("{}", &*text);
    }
    Ok(())
}
