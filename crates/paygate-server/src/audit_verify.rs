//! `paygate audit verify`: recompute every chain from its stored fields and
//! check every signed checkpoint. Finds modified, deleted, inserted, reordered
//! and truncated records, and reports the first bad sequence number per chain.

use paygate_domain::audit::{AuditRecord, verify_checkpoint};
use paygate_store::OperatorStore;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub chain: String,
    pub records: u64,
    pub checkpoints: usize,
    /// The first bad sequence number and why.
    pub problem: Option<(u64, String)>,
}

impl ChainReport {
    fn fail(&mut self, seq: u64, reason: impl Into<String>) {
        if self.problem.as_ref().is_none_or(|(s, _)| seq < *s) {
            self.problem = Some((seq, reason.into()));
        }
    }
}

/// Verifies one chain against the checkpoints and head that [`verify`] read.
async fn verify_chain(
    store: &dyn OperatorStore,
    chain: &str,
    checkpoints: Vec<paygate_store::Checkpoint>,
    head: Option<(u64, [u8; 32])>,
    public_key: &[u8; 32],
) -> anyhow::Result<ChainReport> {
    let mut report = ChainReport { chain: chain.to_owned(), records: 0, checkpoints: 0, problem: None };
    report.checkpoints = checkpoints.len();
    let mut wanted: std::collections::HashSet<u64> = checkpoints.iter().map(|c| c.seq).collect();
    if let Some((seq, _)) = head {
        wanted.insert(seq);
    }
    let limit = head.map(|(seq, _)| seq).unwrap_or(u64::MAX);
    let mut hashes_at = std::collections::HashMap::new();
    let mut expected = 1u64;
    let mut prev = [0u8; 32];
    let mut after = 0u64;
    'pages: loop {
        let page: Vec<AuditRecord> = store.audit_records(chain, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in page {
            if r.seq > limit {
                break 'pages;
            }
            report.records += 1;
            if r.seq != expected {
                report.fail(
                    expected,
                    format!("record missing: sequence jumps from {} to {} (deleted)", expected - 1, r.seq),
                );
            } else if r.recomputed_hash() != r.hash {
                report.fail(r.seq, "hash mismatch: the record's fields were modified (or records reordered)");
            } else if r.prev_hash != prev {
                report.fail(
                    r.seq,
                    "broken link: prev_hash is not the previous record's hash (inserted or replaced record)",
                );
            }
            if wanted.contains(&r.seq) {
                hashes_at.insert(r.seq, r.hash);
            }
            expected = r.seq + 1;
            prev = r.hash;
        }
    }
    let end = expected - 1;
    match head {
        None if end > 0 => report.fail(1, "chain has records but no head (head row removed)"),
        Some((seq, _)) if seq > end => {
            report.fail(end + 1, format!("chain truncated: its head is at seq {seq} but the records end at {end}"))
        }
        Some((seq, hash)) if hashes_at.get(&seq) != Some(&hash) => {
            report.fail(seq, "the head's hash differs from the record at the head (chain rewritten)")
        }
        _ => {}
    }
    for c in &checkpoints {
        if !verify_checkpoint(public_key, chain, c.seq, &c.hash, &c.signature) {
            report.fail(c.seq, "checkpoint signature invalid (checkpoint forged or signed by another key)");
        } else if c.seq > end {
            report.fail(
                end + 1,
                format!("chain truncated: a signed checkpoint covers seq {} but the chain ends at {end}", c.seq),
            );
        } else if hashes_at.get(&c.seq) != Some(&c.hash) {
            report.fail(c.seq, "record differs from the signed checkpoint (chain rewritten)");
        }
    }
    Ok(report)
}

/// Every chain (or one company's); the reports in chain order.
pub async fn verify(
    store: &dyn OperatorStore,
    public_key: &[u8; 32],
    chain: Option<String>,
) -> anyhow::Result<Vec<ChainReport>> {
    let chains = match chain {
        Some(c) => vec![c],
        None => store.audit_chains().await?,
    };
    // Snapshot every chain's checkpoints, then the heads (so no checkpoint we
    // hold is beyond its head): records appended while we read are past the
    // head and left for the next run, never a false alarm.
    let mut checkpoints = Vec::with_capacity(chains.len());
    for chain in &chains {
        checkpoints.push(store.audit_checkpoints(chain).await?);
    }
    let heads: std::collections::HashMap<String, (u64, [u8; 32])> =
        store.audit_heads().await?.into_iter().map(|(c, seq, hash)| (c, (seq, hash))).collect();
    let mut reports = Vec::new();
    for (chain, checkpoints) in chains.into_iter().zip(checkpoints) {
        let head = heads.get(&chain).copied();
        reports.push(verify_chain(store, &chain, checkpoints, head, public_key).await?);
    }
    Ok(reports)
}
