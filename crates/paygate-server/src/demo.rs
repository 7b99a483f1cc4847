//! `serve --demo`: a sandbox company and two fresh test-mode keys, so a newcomer
//! can call the API within a minute of cloning.

use std::net::SocketAddr;

use paygate_domain::{KeyHasher, KeyMode, Label, Scope, ScopeSet};
use paygate_store::{NewCompany, OperatorStore, operator_scope};

use serde_json::json;

use crate::admin::{KeyRequest, create_key, operator_entry};

pub const DEMO_COMPANY: &str = "Demo Co";

/// `serve --demo` lets webhook endpoints on this machine receive (unless
/// `webhook_allowed_networks` is set).
pub const WEBHOOK_NETWORKS: &[&str] = &["127.0.0.0/8", "::1/128"];

pub async fn prepare(store: &dyn OperatorStore, hasher: &KeyHasher, api_addr: SocketAddr) -> anyhow::Result<()> {
    if store.backend() != paygate_store::Backend::Sqlite {
        anyhow::bail!(
            "--demo is for the embedded SQLite default; on PostgreSQL create companies and keys with `paygate admin`"
        );
    }
    // Found by its flag, never by name: a real tenant called "Demo Co" is left alone.
    let existing = store.list_companies().await?.into_iter().find(|c| c.demo);
    let company = match existing {
        Some(c) => c,
        None => {
            let mut new = NewCompany::new(Label::parse(DEMO_COMPANY)?);
            new.demo = true;
            let record =
                operator_entry("company.create", new.id, ("company", new.id.to_string()), json!({"demo": true}));
            store.create_company(new, &record).await?
        }
    };
    // Each start shows two fresh keys; the previous start's keys stop working.
    let record =
        operator_entry("api_key.revoke_all", company.id, ("company", company.id.to_string()), json!({"demo": true}));
    let revoked = store
        .revoke_all_api_keys(&operator_scope(store, company.id, KeyMode::Test), paygate_domain::now(), &record)
        .await?;
    if revoked > 0 {
        tracing::info!(revoked, "revoked the previous demo keys");
    }
    // One approval from 1,000.00 and two from 1,000,000.00 (EUR, USD, GBP).
    let policy = paygate_domain::payment::ApprovalPolicy::demo();
    let record = operator_entry(
        "approval_policy.update",
        company.id,
        ("company", company.id.to_string()),
        serde_json::to_value(&policy)?,
    );
    store.set_approval_policy(&operator_scope(store, company.id, KeyMode::Test), &policy, &record).await?;
    // Four eyes: the initiator can neither approve nor change the approval policy.
    let mut initiator_scopes = ScopeSet::all();
    initiator_scopes.remove(Scope::PaymentsApprove);
    initiator_scopes.remove(Scope::PolicyManage);
    let approver_scopes: ScopeSet = [Scope::PaymentsApprove, Scope::PaymentsRead].into_iter().collect();
    let (initiator, initiator_text) = create_key(
        store,
        hasher,
        KeyRequest {
            company: company.id,
            name: "demo initiator",
            owner: "demo-erp",
            scopes: initiator_scopes,
            mode: KeyMode::Test,
            expires_in: None,
            allowed_cidrs: Default::default(),
        },
    )
    .await?;
    let (approver, approver_text) = create_key(
        store,
        hasher,
        KeyRequest {
            company: company.id,
            name: "demo approver",
            owner: "demo-approver",
            scopes: approver_scopes,
            mode: KeyMode::Test,
            expires_in: None,
            allowed_cidrs: Default::default(),
        },
    )
    .await?;
    let host =
        if api_addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], api_addr.port())) } else { api_addr };
    println!();
    println!("Paygate demo: company {DEMO_COMPANY} ({})", company.id);
    println!();
    println!("  Initiator key {} (test mode; {}):", initiator.id, initiator.scopes.to_storage());
    println!("    {}", &*initiator_text);
    println!("  Approver key {} (test mode; {}):", approver.id, approver.scopes.to_storage());
    println!("    {}", &*approver_text);
    println!();
    println!("  These keys are shown once. Try:");
    println!("    curl -s http://{host}/v1/me -H 'Authorization: Bearer {}'", &*initiator_text);
    println!();
    println!("  Approval policy: one approval from 1,000.00 and two from 1,000,000.00 (EUR, USD, GBP).");
    println!("  A payment that needs approval, approved and settled on the simulated rail: see README, \"Payments\".");
    println!();
    Ok(())
}
