//! The benchmark's yardsticks (`worker --raw`): the bare cycle each database itself can do on the
//! pool's keys, with none of the coordinator's logic. Their SQL lives here, not in the store, because
//! they are what the store is measured against, not part of apijongler.
//!
//! - SQLite: `BEGIN IMMEDIATE; UPDATE one row; INSERT one history row; COMMIT`, twice.
//! - PostgreSQL: the claim `UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING` and
//!   the release fenced by the lease, each one autocommitted statement, prepared once on the
//!   process's one connection; with `--raw-history`, each statement also writes the key's history
//!   row (the bare cycle with the pool's audit trail).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api_jongler::store::Location;
use api_jongler::{Clock, SystemClock};

use super::{WorkerArgs, summarize, wait_for_start};

/// Runs the reference of the database `db` names.
pub(super) fn run(db: &Path, args: &WorkerArgs) -> anyhow::Result<ExitCode> {
    match Location::parse(db.as_os_str(), "--db")? {
        Location::Sqlite(path) => sqlite(&path, args),
        // The URL as given (password included) is for the driver only.
        Location::Postgres(_) => postgres(db.to_str().unwrap_or_default(), args),
    }
}

/// The coordinator's connection settings (`configure` in `src/store/sqlite/schema.rs`), so that the reference
/// and the coordinator differ by the coordinator's work, not by how often SQLite checkpoints.
const REFERENCE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const REFERENCE_CHECKPOINT_PAGES: i64 = 4000;

/// The yardstick: each cycle is two write transactions of one UPDATE (the key's state and lease) and
/// one INSERT each, writing the same history rows (real connector and key names) as a claim and a
/// release, on a connection set up as the coordinator's are, so the two differ only by the
/// coordinator's own work.
fn sqlite(db: &Path, args: &WorkerArgs) -> anyhow::Result<ExitCode> {
    wait_for_start(args.start_at_ms);
    use rusqlite::OpenFlags;
    // The store's flags: an existing file only, one connection per thread.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let mut connection = rusqlite::Connection::open_with_flags(db, flags)?;
    connection.busy_timeout(REFERENCE_BUSY_TIMEOUT)?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    connection.pragma_update(None, "wal_autocheckpoint", REFERENCE_CHECKPOINT_PAGES)?;
    let mode: String = connection.pragma_query_value(None, "journal_mode", |row| row.get(0))?;
    anyhow::ensure!(mode.eq_ignore_ascii_case("wal"), "the reference runs on a WAL database, not '{mode}'");
    let keys: Vec<(i64, String, String, String)> = connection
        .prepare("SELECT id, connector, key_name, fingerprint FROM keys")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    anyhow::ensure!(!keys.is_empty(), "the reference needs a database with keys");
    let end = Instant::now() + Duration::from_millis(args.duration_ms.unwrap_or(1_000));
    let pid = std::process::id();
    let mut latencies = Vec::new();
    let mut cycles = 0u64;
    while Instant::now() < end {
        let (id, connector, key_name, fingerprint) = &keys[fastrand::usize(..keys.len())];
        for (from, to, event) in [("vacant", "locked", "claimed"), ("locked", "vacant", "released")] {
            let asked = Instant::now();
            let transaction = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let lease: i64 = transaction
                .prepare_cached("UPDATE keys SET state = ?2, lease = lease + 1 WHERE id = ?1 RETURNING lease")?
                .query_row(rusqlite::params![id, to], |row| row.get(0))?;
            transaction
                .prepare_cached(
                    "INSERT INTO history (at, connector, key_name, fingerprint, from_state, to_state, reason, holder_pid,
                                         lease, event)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'reference', ?7, ?8, ?9)",
                )?
                .execute(rusqlite::params![
                    SystemClock.now_ms(),
                    connector,
                    key_name,
                    fingerprint,
                    from,
                    to,
                    pid,
                    lease,
                    event
                ])?;
            transaction.commit()?;
            if to == "locked" && args.latencies {
                latencies.push(asked.elapsed().as_micros());
            }
        }
        cycles += 1;
    }
    summarize(&mut std::io::stdout().lock(), cycles, args.latencies.then_some(&latencies[..]))?;
    Ok(ExitCode::SUCCESS)
}

/// The claim: the least recently used vacant key, passed over if another claim holds its row, with a
/// new lease. On the pool's own `keys` table and index (`keys_lru`), so the two sides differ by
/// apijongler's work only, not by the table they update. Ordered by `last_used_at` alone, as
/// apijongler's claim is: the index's own order, so the scan stops at the first row it can lock (a
/// tie-breaker such as `, id` makes the server sort at least 32 rows per claim, an incremental sort,
/// and slowed this yardstick by about 8 % with 64 sessions).
const PG_CLAIM: &str = "UPDATE apijongler.keys SET state = 'locked', lease = lease + 1
  WHERE id = (SELECT id FROM apijongler.keys
               WHERE connector = $1 AND state = 'vacant' AND retired_at IS NULL
               ORDER BY last_used_at LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, lease";

/// The release, fenced by the lease as apijongler's is.
const PG_RELEASE: &str = "UPDATE apijongler.keys SET state = 'vacant', last_used_at = $3
  WHERE id = $1 AND lease = $2 AND state = 'locked'";

/// With `--raw-history`: the claim writing the key's history row in the same statement, as SQLite's
/// reference does and as apijongler's claim does (its key picked in an expression of its own, as
/// apijongler's is: inside a `WITH`, `WHERE id = (SELECT ... SKIP LOCKED)` now and then finds no key).
/// The bare cycle with the pool's audit trail: the difference between it and the bare cycle is the
/// trail's cost, not the coordinator's.
const PG_CLAIM_RECORDED: &str = "WITH picked AS MATERIALIZED (
  SELECT id FROM apijongler.keys WHERE connector = $1 AND state = 'vacant' AND retired_at IS NULL
   ORDER BY last_used_at LIMIT 1 FOR UPDATE SKIP LOCKED
), claimed AS (
  UPDATE apijongler.keys SET state = 'locked', lease = lease + 1 WHERE id = (SELECT id FROM picked)
  RETURNING id, lease, connector, key_name, fingerprint
), recorded AS (
  INSERT INTO apijongler.history (at, connector, key_name, fingerprint, from_state, to_state, reason, holder_pid,
                                  lease, event)
  SELECT $2, connector, key_name, fingerprint, 'vacant', 'locked', 'reference', $3, lease, 'claimed' FROM claimed
)
SELECT id, lease FROM claimed";

/// With `--raw-history`: the release writing the key's history row in the same statement.
const PG_RELEASE_RECORDED: &str = "WITH released AS (
  UPDATE apijongler.keys SET state = 'vacant', last_used_at = $3
   WHERE id = $1 AND lease = $2 AND state = 'locked'
  RETURNING lease, connector, key_name, fingerprint
), recorded AS (
  INSERT INTO apijongler.history (at, connector, key_name, fingerprint, from_state, to_state, reason, holder_pid,
                                  lease, event)
  SELECT $3, connector, key_name, fingerprint, 'locked', 'vacant', 'reference', $4, lease, 'released' FROM released
)
SELECT count(*) FROM released";

/// The yardstick on PostgreSQL: one connection (its commits durable, as apijongler's are), the two
/// statements prepared once, each cycle a claim and its release (two round trips, two commits). A claim
/// that finds every key taken asks again; its latency counts from the first ask.
fn postgres(url: &str, args: &WorkerArgs) -> anyhow::Result<ExitCode> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    // Committed as durably as apijongler's own sessions commit, whatever the server's default.
    client.batch_execute(api_jongler::store::POSTGRES_DURABLE_COMMITS)?;
    let (claim, release) = if args.raw_history {
        (client.prepare(PG_CLAIM_RECORDED)?, client.prepare(PG_RELEASE_RECORDED)?)
    } else {
        (client.prepare(PG_CLAIM)?, client.prepare(PG_RELEASE)?)
    };
    let pid = i64::from(std::process::id());
    wait_for_start(args.start_at_ms);
    let end = Instant::now() + Duration::from_millis(args.duration_ms.unwrap_or(1_000));
    let mut latencies = Vec::new();
    let mut cycles = 0u64;
    let mut asked = Instant::now();
    while Instant::now() < end {
        let claimed = if args.raw_history {
            client.query_opt(&claim, &[&args.connector, &SystemClock.now_ms(), &pid])?
        } else {
            client.query_opt(&claim, &[&args.connector])?
        };
        let Some(row) = claimed else { continue };
        if args.latencies {
            latencies.push(asked.elapsed().as_micros());
        }
        let (id, lease): (i64, i64) = (row.get(0), row.get(1));
        let freed = if args.raw_history {
            let freed: i64 = client.query_one(&release, &[&id, &lease, &SystemClock.now_ms(), &pid])?.get(0);
            u64::try_from(freed)?
        } else {
            client.execute(&release, &[&id, &lease, &SystemClock.now_ms()])?
        };
        anyhow::ensure!(freed == 1, "the reference lost key {id}'s lease {lease}");
        cycles += 1;
        asked = Instant::now();
    }
    summarize(&mut std::io::stdout().lock(), cycles, args.latencies.then_some(&latencies[..]))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use postgres::types::ToSql;

    use super::{PG_CLAIM, PG_CLAIM_RECORDED};
    use crate::cli::Global;
    use crate::cli::bench::keys::{Pool, prepare};
    use crate::cli::bench::scratch::Server;

    /// The yardstick's claim, with and without its history row, walks `keys_lru` in the index's own
    /// order and stops at the first row it can lock, as apijongler's claim does (no sort: ordered by
    /// `last_used_at, id` the server sorted at least 32 rows per claim). On 10,000 keys, in a throwaway
    /// database on the server `APIJONGLER_TEST_PG` names (skipped when unset).
    #[test]
    fn the_postgres_yardstick_walks_keys_lru_without_a_sort() {
        let Some(base) = std::env::var_os("APIJONGLER_TEST_PG").filter(|url| !url.is_empty()) else {
            eprintln!("skipped: APIJONGLER_TEST_PG is unset");
            return;
        };
        let global = Global {
            config: None,
            db: Some(base.into()),
            connectors: None,
            json: false,
            verbose: 0,
            quiet: true,
            log_level: None,
        };
        let server = Server::of(&global).expect("the test server");
        let scratch = server.scratch().expect("a throwaway database");
        prepare(scratch.dir(), scratch.db(), Pool { keys: 10_000, locked: 0 }, None).expect("10,000 keys");
        let url = scratch.db().to_str().expect("a URL").to_owned();
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        client.batch_execute("ANALYZE apijongler.keys").expect("analyze");
        let claims: [(&str, &[&(dyn ToSql + Sync)]); 2] =
            [(PG_CLAIM, &[&"bench"]), (PG_CLAIM_RECORDED, &[&"bench", &0_i64, &1_i64])];
        for (claim, params) in claims {
            let plan: Vec<String> = client
                .query(&format!("EXPLAIN {claim}"), params)
                .expect("explain")
                .iter()
                .map(|row| row.get(0))
                .collect();
            assert!(plan.iter().any(|step| step.contains("Index Scan using keys_lru")), "{plan:?}");
            assert!(!plan.iter().any(|step| step.contains("Sort")), "{plan:?}");
        }
    }
}
