//! `apijongler sync [--as-truth]`: makes the pool's keys match the configured keyring now, and says
//! what changed. Every command that uses keys syncs as well; this one exists for `--as-truth`.
//!
//! On a store several hosts share (PostgreSQL) a sync only adds keys, brings back retired ones and sets
//! quota groups, so hosts whose keyrings differ a little never undo each other; `--as-truth` applies
//! the keyring whole for its connectors, on every host's behalf: keys it lacks are retired and secrets
//! that differ replaced (each key's own lockdowns and error lifted). On SQLite every sync does that.

use std::io::Write;
use std::process::ExitCode;

use api_jongler::keyring::Keyring;
use api_jongler::pool::SyncReport;

use super::exit::Usage;
use super::{Global, open};

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Apply the keyring as the truth for its connectors on a shared (PostgreSQL) store: retire the keys
    /// it lacks and replace the secrets that differ, for every host. Without it, a shared store's sync
    /// only adds keys, restores retired ones and regroups. SQLite syncs so always.
    #[arg(long)]
    as_truth: bool,
}

pub fn run(global: &Global, args: &SyncArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = &global.config else {
        return Err(
            Usage("`apijongler sync` needs a keyring: set APIJONGLER_CONFIG or pass --config".to_owned()).into()
        );
    };
    let keyring = Keyring::load(path)?;
    let coordinator = open(global)?;
    let report = if args.as_truth { coordinator.sync_as_truth(&keyring)? } else { coordinator.sync(&keyring)? };
    let records = coordinator.store().keys(None)?;
    let fingerprint = |(connector, name): &(String, String)| {
        records
            .iter()
            .find(|record| record.connector == *connector && record.key_name == *name)
            .map_or("-", |record| record.fingerprint.as_str())
    };
    let mut stdout = std::io::stdout().lock();
    if global.json {
        let differing: Vec<_> = report
            .differing
            .iter()
            .map(|id @ (connector, name)| {
                let here = keyring.key(connector, name).map(|key| key.fingerprint().as_str().to_owned());
                serde_json::json!({"connector": connector, "key": name, "pool_fingerprint": fingerprint(id),
                    "keyring_fingerprint": here})
            })
            .collect();
        let ids = |ids: &[(String, String)]| -> Vec<serde_json::Value> {
            ids.iter().map(|(connector, name)| serde_json::json!({"connector": connector, "key": name})).collect()
        };
        let json = serde_json::json!({
            "shared_store": coordinator.store().is_shared(),
            "as_truth": args.as_truth || !coordinator.store().is_shared(),
            "added": ids(&report.added), "changed": ids(&report.changed), "retired": ids(&report.retired),
            "restored": ids(&report.restored), "differing": differing,
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&json)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_report(&mut stdout, &report, &keyring, fingerprint)?;
    if !report.differing.is_empty() {
        writeln!(
            stdout,
            "{} key(s) of the shared pool have another secret than {}: this host passes them over. \
             Run `apijongler sync --as-truth` with the keyring that is right.",
            report.differing.len(),
            keyring.path().display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per key the sync changed (or left differing), then a summary line.
fn print_report<'a>(
    out: &mut impl Write,
    report: &SyncReport,
    keyring: &Keyring,
    pool_fingerprint: impl Fn(&(String, String)) -> &'a str,
) -> std::io::Result<()> {
    let lists = [
        ("added", &report.added),
        ("changed", &report.changed),
        ("retired", &report.retired),
        ("restored", &report.restored),
    ];
    for (what, ids) in lists {
        for (connector, name) in ids {
            writeln!(out, "{connector} {name}: {what}")?;
        }
    }
    for id @ (connector, name) in &report.differing {
        let here = keyring.key(connector, name).map_or_else(|| "-".to_owned(), |key| key.fingerprint().to_string());
        writeln!(
            out,
            "{connector} {name}: secret differs (pool {}, this keyring {here}), left as it is",
            pool_fingerprint(id)
        )?;
    }
    writeln!(
        out,
        "Sync done: {} added, {} changed, {} retired, {} restored, {} differing.",
        report.added.len(),
        report.changed.len(),
        report.retired.len(),
        report.restored.len(),
        report.differing.len()
    )
}
