//! `apijongler status [CONNECTOR] [--long] [--watch] [--json]`: every key, its quota group, state,
//! holder, lockdowns by model, uses; one line per key fitted to the terminal (see `columns`), the full
//! table (last reason, heartbeat, keyring note) with `--long`, redrawn in place on every change with
//! `--watch`.
//!
//! A key's lockdowns are those in force on its quota scope (its declared group, the project an answer
//! revealed, or the key alone) and on the key alone: the rows a claim checks. The table lists each
//! key's locked models with their deadlines, and below it each lockdown once, with its reason and the
//! answer that set it (a group's lockdown is shared by all its keys).
//!
//! Warnings go to stderr (to the top of each frame with `--watch`): a PostgreSQL server that does not
//! keep its commits (`fsync` or `full_page_writes` off), quota groups that disagree, keys whose secret
//! differs between hosts.
//!
//! It writes nothing: the keyring, if one is configured, is compared with the database but not synced.
//! Keys in the keyring and not yet in the database are shown in state `new`; a key whose secret
//! changed, that left the keyring or came back to it carries that note. The next command that uses
//! the keyring (a request, `cleanup`) applies it.
//!
//! Everything shown comes from one view of the pool ([`api_jongler::pool::view`]): `--json` prints its
//! keys as they are (the one JSON shape of a key, which `why --json` and `/metrics` share), and the
//! table formats them. The table's state column is the key's own state as stored, for no model in
//! particular (a lockdown past its deadline reads `vacant (lockdown over)` in `--long`, `vacant` in the
//! compact table, whose column is one word); the lockdowns column says
//! which models are kept from it. `--json` gives both the stored state and the state for a request.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api_jongler::holder::Holder;
use api_jongler::pool::view::{self, HolderLiveness, KeyView, KeyringKeys, PoolView, Sources};
use api_jongler::pool::{KeyRecord, KeySpec, LockdownRecord, rule};
use api_jongler::{KeyState, Keyring};

use super::exit::Usage;
use super::{Global, columns, keyring_to_compare, open, output};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this connector.
    connector: Option<String>,
    /// The full table, however wide: each key's holder and heartbeat, last reason and uses, and how the
    /// keyring differs (by default one line per key, fitted to the terminal).
    #[arg(long, short)]
    long: bool,
    /// Redraw in place whenever the database changes (and every second), until Ctrl-C.
    #[arg(long, short)]
    watch: bool,
}

/// How often `--watch` asks the database whether anything changed (a microsecond's read).
const WATCH_POLL: Duration = Duration::from_millis(250);

/// `--watch` redraws at least this often, so relative times ("in 42 s") stay true.
const WATCH_REDRAW: Duration = Duration::from_secs(1);

pub fn run(global: &Global, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    if args.watch && global.json {
        return Err(Usage(
            "--watch redraws the table; leave out --json (or run `status --json` when needed)".to_owned(),
        )
        .into());
    }
    let coordinator = open(global)?;
    if args.watch {
        return watch(global, args, &coordinator);
    }
    let keyring = keyring_to_compare(global);
    render(global, args, (&coordinator, keyring.as_ref()), &mut std::io::stdout().lock(), true)?;
    Ok(ExitCode::SUCCESS)
}

/// `--watch`: the status redrawn from the top of the screen whenever another process committed a
/// change (SQLite's `data_version`, see [`api_jongler::store::Changes`]), and every second.
fn watch(global: &Global, args: &StatusArgs, coordinator: &api_jongler::Coordinator) -> anyhow::Result<ExitCode> {
    let mut changes = coordinator.store().changes()?;
    // Read once: a keyring that cannot be read is warned of once, not at every frame.
    let keyring = keyring_to_compare(global);
    let mut drawn: Option<Instant> = None;
    loop {
        let changed = changes.changed()?;
        if changed || drawn.is_none_or(|at| at.elapsed() >= WATCH_REDRAW) {
            let mut frame = Vec::new();
            render(global, args, (coordinator, keyring.as_ref()), &mut frame, true)?;
            let mut stdout = std::io::stdout().lock();
            // Home, then clear: the new frame replaces the old one in place.
            stdout.write_all(b"\x1b[H\x1b[2J")?;
            stdout.write_all(&frame)?;
            writeln!(stdout, "\nRedrawn as the pool changes; Ctrl-C to stop.")?;
            stdout.flush()?;
            drawn = Some(Instant::now());
        }
        std::thread::sleep(WATCH_POLL);
    }
}

/// The status, once, to `out`, the database compared with `keyring` if given. When `warn` is set, the
/// warnings (the server's durability settings, the view's, keys whose secret differs between hosts) go
/// to stderr, or with `--watch` to the top of the frame, which a redraw's clearing would otherwise erase.
fn render(
    global: &Global,
    args: &StatusArgs,
    (coordinator, keyring): (&api_jongler::Coordinator, Option<&Keyring>),
    out: &mut impl Write,
    warn: bool,
) -> anyhow::Result<()> {
    let now = coordinator.now_ms();
    let keys: Vec<KeyRecord> = coordinator.store().keys(args.connector.as_deref())?;
    let lockdowns: Vec<LockdownRecord> = coordinator.store().lockdowns(args.connector.as_deref())?;
    let view = pool_view(&keys, &lockdowns, keyring, args.connector.as_deref(), None, now);
    let view = with_limits(view, coordinator.store(), keyring)?;
    let shared = coordinator.store().is_shared();
    if warn && !global.quiet {
        // Advice only: a server whose settings cannot be read is no reason for `status` to fail.
        let durability = coordinator.store().durability_warnings().unwrap_or_else(|error| {
            tracing::warn!(error = %error, "the server's durability settings could not be read");
            Vec::new()
        });
        for warning in durability.iter().chain(&view.warnings).chain(&secrets_differing(&view, keyring, shared)) {
            if args.watch && !global.json {
                writeln!(out, "warning: {warning}")?;
            } else {
                eprintln!("apijongler: warning: {warning}");
            }
        }
    }
    if global.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&view.keys)?)?;
        return Ok(());
    }
    if view.keys.is_empty() {
        let scope = args.connector.as_deref().map(|c| format!(" of '{c}'")).unwrap_or_default();
        writeln!(
            out,
            "No keys{scope} in {}. Keys appear once a keyring (APIJONGLER_CONFIG or --config) is used.",
            coordinator.db_path().display()
        )?;
        return Ok(());
    }
    let records: HashMap<(&str, &str), &KeyRecord> =
        keys.iter().map(|key| ((key.connector.as_str(), key.key_name.as_str()), key)).collect();
    let width = columns::width();
    if args.long {
        writeln!(out, "{}", long_table(&view, &records, &lockdowns, keyring.is_some(), now))?;
    } else {
        compact_table(out, &view, &records, &lockdowns, now, width)?;
    }
    let shown: HashSet<&str> = view.keys.iter().map(|line| line.connector.as_str()).collect();
    let explained: Vec<&LockdownRecord> =
        lockdowns.iter().filter(|l| rule::in_force(l, now) && shown.contains(l.connector.as_str())).collect();
    if !explained.is_empty() {
        let heading =
            "Lockdowns in force (keys skip them for that model; `apijongler why CONNECTOR KEY` explains one key):";
        print_wrapped(out, heading, args.long, width)?;
        for lockdown in explained {
            let line = format!(
                "  {} {}: {} until {}, set by {}: {}",
                lockdown.connector,
                output::scope(&lockdown.scope),
                output::model(lockdown),
                output::deadline(lockdown.until, now),
                output::set_by(lockdown, now),
                output::because(lockdown)
            );
            print_wrapped(out, &line, args.long, width)?;
        }
    }
    if !args.long {
        // The compact table has no reason column: a key in error says why here.
        let errors: Vec<&&KeyRecord> =
            records.values().filter(|key| key.retired_at.is_none() && key.state == KeyState::Error).collect::<Vec<_>>();
        if !errors.is_empty() {
            writeln!(out, "Keys in error (never claimed until `apijongler cleanup`):")?;
            let mut errors = errors;
            errors.sort_by_key(|key| (&key.connector, &key.key_name));
            for key in errors {
                print_wrapped(out, &format!("  {} {}: {}", key.connector, key.key_name, reason(key)), false, width)?;
            }
        }
    }
    if !view.limits.is_empty() {
        let heading = "Limits in use (declared by the keyring or learned from a 429; each window's usage):";
        print_wrapped(out, heading, args.long, width)?;
        for usages in output::by_scope_and_model(&view.limits) {
            let first = &usages[0];
            let used = output::limits_used(usages, now);
            let line = format!("  {} {} {}: {used}", first.connector, first.scope, first.model);
            print_wrapped(out, &line, args.long, width)?;
        }
    }
    if let Some(keyring) = keyring.filter(|_| view.keyring_differences().next().is_some()) {
        let column = if args.long { "The keyring column" } else { "A state marked * (see --long)" };
        let applies = if shared {
            "on this shared store the next sync with it adds, restores and regroups keys, and \
             `apijongler sync --as-truth` applies the rest (retired keys, other secrets)"
        } else {
            "the next request or cleanup with it applies it"
        };
        let line = format!("{column} is how {} differs from the database; {applies}.", keyring.path().display());
        print_wrapped(out, &line, args.long, width)?;
    }
    Ok(())
}

/// On a store several hosts share, one warning per key whose secret in `keyring` (this host's) differs
/// from the pool's, naming both fingerprints: another host's keyring set it, and this host passes the
/// key over until one keyring is applied as the truth. Elsewhere the next sync replaces it: none.
fn secrets_differing(view: &PoolView, keyring: Option<&Keyring>, shared: bool) -> Vec<String> {
    let Some(keyring) = keyring.filter(|_| shared) else { return Vec::new() };
    view.keys
        .iter()
        .filter(|key| key.retired_at.is_none())
        .filter_map(|key| {
            let here = key.keyring_fingerprint.as_deref()?;
            Some(format!(
                "key '{}' of '{}' has another secret in the shared pool (fingerprint {}) than in this host's \
                 keyring {} (fingerprint {here}): this host passes it over. Run `apijongler sync --as-truth` \
                 with the keyring that is right",
                key.key,
                key.connector,
                key.fingerprint,
                keyring.path().display()
            ))
        })
        .collect()
}

/// `line` as is for `--long`, else wrapped to `width` with its continuation indented.
fn print_wrapped(out: &mut impl Write, line: &str, long: bool, width: usize) -> std::io::Result<()> {
    if long {
        return writeln!(out, "{line}");
    }
    for part in columns::wrap(line, width, "      ") {
        writeln!(out, "{part}")?;
    }
    Ok(())
}

/// One line per key, fitted to `width`: per connector a heading with its keys' count by state, then
/// its keys' name, fingerprint, group, state, holder, lockdowns (the first to end, and how many),
/// uses and last use.
fn compact_table(
    out: &mut impl Write,
    view: &PoolView,
    records: &HashMap<(&str, &str), &KeyRecord>,
    lockdowns: &[LockdownRecord],
    now: i64,
    width: usize,
) -> std::io::Result<()> {
    let mut connectors: Vec<&str> = view.keys.iter().map(|key| key.connector.as_str()).collect();
    connectors.dedup();
    for connector in connectors {
        let keys: Vec<&KeyView> = view.keys.iter().filter(|key| key.connector == connector).collect();
        let mut counts: Vec<(String, usize)> = Vec::new();
        for key in &keys {
            let state = key.state.to_string();
            match counts.iter_mut().find(|(word, _)| *word == state) {
                Some((_, n)) => *n += 1,
                None => counts.push((state, 1)),
            }
        }
        let counts: Vec<String> = counts.iter().map(|(state, n)| format!("{n} {state}")).collect();
        let heading = format!("{connector}: {} keys ({})", keys.len(), counts.join(", "));
        writeln!(out, "{}", columns::wrap(&heading, width, "  ").join("\n"))?;
        let mut rows = vec![
            ["key", "fingerprint", "group", "state", "holder", "lockdowns", "uses", "last used"]
                .map(String::from)
                .to_vec(),
        ];
        for line in keys {
            let noted = if line.keyring.is_some() { "*" } else { "" };
            rows.push(match records.get(&(line.connector.as_str(), line.key.as_str())) {
                Some(key) => vec![
                    key.key_name.clone(),
                    key.fingerprint.clone(),
                    group(key),
                    format!("{}{noted}", compact_state(key, now)),
                    compact_holder(line),
                    compact_lockdowns(key, &view::in_force(key, lockdowns, now), now),
                    key.uses.to_string(),
                    if key.last_used_at > 0 { output::relative(key.last_used_at, now) } else { "never".to_owned() },
                ],
                None => vec![
                    line.key.clone(),
                    line.fingerprint.clone(),
                    String::new(),
                    format!("new{noted}"),
                    String::new(),
                    String::new(),
                    "0".to_owned(),
                    "never".to_owned(),
                ],
            });
        }
        // The key's name (up to 24 characters) and the lockdowns column (a model and its deadline) are
        // kept longest; a longer name is cut in the middle, so that two keys never look alike by their
        // start. On a narrow terminal the last use, then the group, then the fingerprint go first.
        let narrowing = columns::Narrowing {
            wanted: &[24, 11, 8, 6, 12, 36, 4, 9],
            dropped_first: &[7, 2, 1],
            right: &[6],
            middle: &[0],
        };
        for row in columns::fit(&rows, width.saturating_sub(2), narrowing) {
            writeln!(out, "  {row}")?;
        }
    }
    Ok(())
}

/// The state in a word: `vacant` for a lockdown that is over.
fn compact_state(key: &KeyRecord, now: i64) -> String {
    if key.retired_at.is_some() {
        return "retired".to_owned();
    }
    key.effective_state(now).to_string()
}

/// `pid 4242 since 13:02:05` (`, dead` when it is).
fn compact_holder(key: &KeyView) -> String {
    let Some(holder) = key.holder.as_ref() else { return String::new() };
    let Some(locked_at) = holder.locked_at else { return String::new() };
    let dead = if holder.liveness == HolderLiveness::Dead { ", dead" } else { "" };
    format!("pid {} since {}{dead}", holder.pid, output::clock_time(locked_at))
}

/// The lockdown that ends first, with its deadline, and how many more: `gemini-2.5-pro until 00:00 PT
/// (in 9 h) +1`.
fn compact_lockdowns(key: &KeyRecord, mine: &[&LockdownRecord], now: i64) -> String {
    let mut ends: Vec<(String, i64)> = mine.iter().map(|l| (output::model(l).to_owned(), l.until)).collect();
    if let Some(until) = rule::own_lockdown_end(key, now)
        && !mine.iter().any(|l| l.is_every_model())
    {
        ends.push(("every model".to_owned(), until));
    }
    ends.sort_by_key(|(_, until)| *until);
    let Some((model, until)) = ends.first() else { return String::new() };
    let more = if ends.len() > 1 { format!(" +{}", ends.len() - 1) } else { String::new() };
    format!("{model} until {}{more}", output::deadline(*until, now))
}

/// The full table of `--long`: every detail, one row per key, as wide as it needs.
fn long_table(
    view: &PoolView,
    records: &HashMap<(&str, &str), &KeyRecord>,
    lockdowns: &[LockdownRecord],
    with_keyring: bool,
    now: i64,
) -> comfy_table::Table {
    let mut header = vec![
        "connector",
        "key",
        "fingerprint",
        "group",
        "state",
        "holder",
        "lockdowns",
        "last reason",
        "uses",
        "last used",
    ];
    if with_keyring {
        header.push("keyring");
    }
    let mut table = output::table(&header);
    for line in &view.keys {
        let mut row = match records.get(&(line.connector.as_str(), line.key.as_str())) {
            Some(key) => vec![
                key.connector.clone(),
                key.key_name.clone(),
                key.fingerprint.clone(),
                group(key),
                state_label(key, now),
                holder(line, now),
                lockdown_cell(key, &view::in_force(key, lockdowns, now), now),
                reason(key),
                key.uses.to_string(),
                if key.last_used_at > 0 { output::relative(key.last_used_at, now) } else { "never".to_owned() },
            ],
            None => {
                let mut row = vec![line.connector.clone(), line.key.clone(), line.fingerprint.clone()];
                row.extend(["", "new", "", "", "", "0", "never"].map(str::to_owned));
                row
            }
        };
        if with_keyring {
            row.push(line.keyring.map(|note| note.as_str()).unwrap_or_default().to_owned());
        }
        table.add_row(row);
    }
    table
}

/// The view of the pool `status` and `why` print: the database's keys (of `connector`, or all) as a
/// request for `model` sees them at `now`, compared with `keyring` if one is configured, each holder
/// judged from this process.
pub(super) fn pool_view(
    keys: &[KeyRecord],
    lockdowns: &[LockdownRecord],
    keyring: Option<&Keyring>,
    connector: Option<&str>,
    model: Option<&str>,
    now: i64,
) -> PoolView {
    let keyring = keyring.map(|keyring| KeyringKeys {
        connectors: keyring.connectors().collect(),
        keys: keyring
            .all_keys()
            .map(|(connector, key)| KeySpec { connector, name: key.name(), fingerprint: key.fingerprint().as_str() })
            .collect(),
    });
    let sources = Sources { keys, lockdowns, keyring: keyring.as_ref(), connector, model, now };
    view::pool(&sources, &Holder::liveness)
}

/// The key's quota group: the keyring's label, else the project an answer revealed, else nothing (the
/// key is a group of its own).
fn group(key: &KeyRecord) -> String {
    match (&key.quota_group, &key.project_learned) {
        (Some(group), _) => group.clone(),
        (None, Some(project)) => format!("#{project} (learned)"),
        (None, None) => String::new(),
    }
}

/// One line per locked model: `gemini-2.5-pro until 00:00 PT (in 9 h)`. A key in lockdown whose every-model
/// row is gone (a database from before per-model lockdowns) still shows its deadline.
fn lockdown_cell(key: &KeyRecord, mine: &[&LockdownRecord], now: i64) -> String {
    let mut lines: Vec<String> =
        mine.iter().map(|l| format!("{} until {}", output::model(l), output::deadline(l.until, now))).collect();
    if let Some(until) = rule::own_lockdown_end(key, now)
        && !mine.iter().any(|l| l.is_every_model())
    {
        lines.insert(0, format!("every model until {}", output::deadline(until, now)));
    }
    lines.join("\n")
}

/// The state as a user should read it: an expired lockdown is claimable, a retired key is gone.
fn state_label(key: &KeyRecord, now: i64) -> String {
    if key.retired_at.is_some() {
        return "retired".to_owned();
    }
    match (key.state, key.effective_state(now)) {
        (KeyState::Lockdown, KeyState::Vacant) => "vacant (lockdown over)".to_owned(),
        (state, _) => state.to_string(),
    }
}

fn holder(key: &KeyView, now: i64) -> String {
    let Some(holder) = key.holder.as_ref() else { return String::new() };
    let Some(locked_at) = holder.locked_at else { return String::new() };
    let heartbeat =
        holder.heartbeat_at.map(|at| output::humanize((now - at).max(0).unsigned_abs())).unwrap_or_default();
    let dead = if holder.liveness == HolderLiveness::Dead { ", dead" } else { "" };
    format!("pid {} since {}, heartbeat {heartbeat} ago{dead}", holder.pid, output::clock_time(locked_at))
}

fn reason(key: &KeyRecord) -> String {
    match (&key.reason, key.http_status) {
        (Some(reason), _) => reason.clone(),
        (None, Some(status)) => status.to_string(),
        (None, None) => String::new(),
    }
}

/// `view` with the limits in use on each of its connectors: those `keyring` declares and those learned.
pub(super) fn with_limits(
    view: PoolView,
    store: &api_jongler::Store,
    keyring: Option<&Keyring>,
) -> api_jongler::Result<PoolView> {
    let connectors: std::collections::BTreeSet<&str> = view.keys.iter().map(|key| key.connector.as_str()).collect();
    let mut limits = Vec::new();
    for connector in connectors {
        limits.extend(store.limits_in_use(
            connector,
            keyring.and_then(|keyring| keyring.limits(connector)),
            view.at,
        )?);
    }
    Ok(view.with_limits(limits))
}
