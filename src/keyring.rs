//! The keyring: the seed's INI file of API keys, one `[connector]` section of `name = secret` lines.
//!
//! # The format
//!
//! - `[connector]` starts the section of a connector; a section may appear twice, its keys add up.
//!   `[DEFAULT]` is an ordinary section. Brackets inside the name are kept (`[a]b]` is `a]b`).
//! - `name = secret` (or `name: secret`) is one key. The line is split at its first `=` or `:`; both
//!   sides are trimmed; the secret is the rest of the line: no quotes, escapes, continuation lines or
//!   `%` interpolation (`%` is just a character).
//! - A line whose first character is `;` or `#` is a comment, and so is everything from a ` ;` or ` #`
//!   (after a space or tab) to the end of a line: `k = abc ; my first key` has the secret `abc`.
//! - Blank lines are skipped; `\r\n` line ends and a UTF-8 byte order mark at the start are accepted.
//!
//! # Quota groups
//!
//! Keys that share one quota (one Google Cloud project for Gemini, one account for Hugging Face) are
//! declared in an optional companion section named after the connector and ` groups`:
//!
//! ```ini
//! [generativelanguage.googleapis.com]
//! key1 = AIza...
//! key2 = AIza...
//! [generativelanguage.googleapis.com groups]
//! key1 = my-project
//! key2 = my-project
//! ```
//!
//! - Each line is `key = label`: the key must be one of the connector's section in this file (which may
//!   come before or after), listed once over all `[... groups]` headers of the connector. A key in no
//!   group is a group of its own. The Python api-jongler reads only the sections it is asked for, so one
//!   keyring serves both.
//! - A **group label** is opaque: 1 to 128 characters of ASCII letters, digits and `-_.:@+/`, enough for
//!   a project id (`gen-lang-client-0123456789`), a project number, `org/account` or `project:123`, and
//!   safe to store and print. A label that is the secret of a key of the file is refused, so a secret
//!   pasted in the wrong section never reaches the database.
//! - Any section whose name ends in ` groups` (lower case, after a space) is a groups section, so no
//!   connector can be named `x groups`; `[x Groups]` is an ordinary connector section.
//!
//! # Declared limits
//!
//! The rate limits a provider states (requests and input tokens per window, per model, per quota group)
//! are declared in optional companion sections named after the connector and ` limits`:
//!
//! ```ini
//! [generativelanguage.googleapis.com limits]
//! gemini-2.5-flash = 10/min, 250000 tokens/min, 250/day
//! *                = 5/min
//! [generativelanguage.googleapis.com limits my-paid-project]
//! gemini-2.5-pro = 150/min, 2000000 tokens/min, 10000/day
//! ```
//!
//! - `[connector limits]` holds the limits of each quota group (a key in no group is a group of its
//!   own); `[connector limits GROUP]` holds the limits of group GROUP, a label `[connector groups]` of
//!   this file gives a key, and replaces `[connector limits]` for that group. Either may come before or
//!   after the connector's section, which must be in the file; a section may appear twice, its models
//!   add up.
//! - Each line is `MODEL = LIMIT, LIMIT, ...`, split at its first `=` (on a line without `=`, at its
//!   last `:`, since a model name may hold a `:` and a limit never does). MODEL is `*` (any model not
//!   listed) or a **model name**: 1 to 128 ASCII letters, digits and `-_.:/@+`, a leading `models/`
//!   dropped (`models/gemini-2.5-pro` is `gemini-2.5-pro`); each model is listed once per section.
//! - A LIMIT is `N/WINDOW` or `N tokens/WINDOW` (see [`crate::pool::limit`]); a model has at least one,
//!   and no two that count the same thing over the same window.
//! - A section whose name ends in ` limits` (lower case, after a space) is a limits section, and so is
//!   one whose last word follows the word `limits` (`[x limits g]`), unless its name ends in ` groups`;
//!   so no connector can be named `x limits` or `x limits g`, and `[x Limits]` is an ordinary
//!   connector section.
//!
//! # The rules
//!
//! - A **key name** is 1 to 64 characters of ASCII letters, digits and `-_.@+`; case is kept and names
//!   are compared exactly. The rule keeps a secret pasted where a name belongs out of the database, the
//!   status table and the logs, and a name safe to print in any message.
//! - A name appears once per section: a duplicate is an error, not a silent winner.
//! - A **secret** is not empty and is a valid HTTP header value (no control character but the tab), so
//!   it can never make a request go out without its key.
//! - Every other line (a secret on a line of its own, say) is an error.
//!
//! Every error names the file, the line and the section, and the key only when its name obeys the rule:
//! no message ever shows a line's text, since any line may hold a secret.
//!
//! # Why a hand-written parser
//!
//! This used to be rust-ini. But the INI subset here is a dozen lines of code, and rust-ini got three
//! things wrong for a file of secrets: it joins a line without `=` to the next key's name (a pasted
//! secret became a key name, stored and printed everywhere), its errors quote the text it found and
//! speak parser (`expecting "[Some('='), Some(':')]" but found EOF`), and it keeps no line numbers, so
//! each message had to rescan the file. One pass over the lines knows each line's number, checks each
//! line once and is linear in the file's size: 100,000 keys parse in well under a second.
//!
//! Secrets live only in memory, in a type whose `Debug` is redacted; everything else in apijongler
//! names a key by its name and its short fingerprint.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

pub use crate::error::KeyringProblem;
use crate::error::{Error, Result};
use crate::pool::{Limit, LimitProblem, Limits};

/// The longest key name, in characters.
pub const MAX_KEY_NAME: usize = 64;

/// The longest quota group label, in characters.
pub const MAX_GROUP_LABEL: usize = 128;

/// The longest model name in a limits section, in characters.
pub const MAX_MODEL_NAME: usize = 128;

/// What ends the name of a section of quota groups: `[connector groups]`.
pub const GROUPS_SUFFIX: &str = " groups";

/// What ends the name of a section of declared limits: `[connector limits]`, or comes before the group
/// in `[connector limits GROUP]`.
pub const LIMITS_SUFFIX: &str = " limits";

/// The prefix a model name may carry in a limits section, as Gemini's model list writes it.
const MODELS_PREFIX: &str = "models/";

/// The environment variable naming the keyring file.
pub const CONFIG_ENV: &str = "APIJONGLER_CONFIG";

/// One API key: its name, its secret (redacted in `Debug`) and the secret's fingerprint.
#[derive(Debug, Clone)]
pub struct ApiKey {
    name: String,
    secret: SecretString,
    fingerprint: Fingerprint,
}

impl ApiKey {
    /// A key from its name and secret.
    pub fn new(name: impl Into<String>, secret: impl Into<String>) -> Self {
        let secret = SecretString::from(secret.into());
        let fingerprint = Fingerprint::of(secret.expose_secret());
        Self { name: name.into(), secret, fingerprint }
    }

    /// The key's name (the INI option name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret; expose it only to put it in a request header.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }

    /// The secret's short fingerprint, safe to show and store.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

/// The first 8 hex digits of the SHA-256 of a secret: enough to tell keys apart and to notice a
/// changed secret, far too little to recover it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    fn of(secret: &str) -> Self {
        let digest = Sha256::digest(secret.as_bytes());
        let mut hex = String::with_capacity(8);
        for byte in &digest[..4] {
            // Writing to a String cannot fail.
            let _ = write!(hex, "{byte:02x}");
        }
        Self(hex)
    }

    /// The fingerprint as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed keyring file.
#[derive(Debug, Clone)]
pub struct Keyring {
    path: PathBuf,
    connectors: BTreeMap<String, Section>,
}

/// One connector's keys in file order, and an index by name for [`Keyring::key`] (once per request).
#[derive(Debug, Clone, Default)]
struct Section {
    keys: Vec<ApiKey>,
    /// Name -> (position in `keys`, line of the definition).
    index: HashMap<String, (usize, usize)>,
    /// Key name -> the quota group its `[connector groups]` section declares.
    groups: HashMap<String, String>,
    /// What its `[connector limits]` sections declare.
    limits: Limits,
}

/// A `[connector groups]` section as read, checked against its connector once the whole file is read.
#[derive(Debug, Default)]
struct Groups {
    /// The line of its first header.
    header_line: usize,
    /// Key name -> (label, line).
    labels: HashMap<String, (String, usize)>,
}

/// A `[connector limits]` or `[connector limits GROUP]` section as read, checked against its connector
/// once the whole file is read.
#[derive(Debug, Default)]
struct LimitsSection {
    /// The line of its first header.
    header_line: usize,
    /// Model (or `*`) -> (its limits, line).
    models: HashMap<String, (Vec<Limit>, usize)>,
}

/// Which limits section: the connector, and the group (`None`: the section for every group).
type LimitsOf = (String, Option<String>);

/// The section the parser is in.
enum Current {
    Keys(String, Section),
    /// The connector's name (without ` groups`), and its groups.
    Groups(String, Groups),
    /// Which limits section, its name for messages, and its limits.
    Limits(LimitsOf, String, LimitsSection),
}

impl Current {
    /// The section's name as written between brackets, for messages.
    fn name(&self) -> String {
        match self {
            Self::Keys(name, _) => name.clone(),
            Self::Groups(connector, _) => format!("{connector}{GROUPS_SUFFIX}"),
            Self::Limits(_, name, _) => name.clone(),
        }
    }
}

impl Keyring {
    /// Loads the keyring named by `APIJONGLER_CONFIG`.
    pub fn from_env() -> Result<Self> {
        Self::from_env_value(std::env::var_os(CONFIG_ENV).as_deref())
    }

    /// Loads the keyring named by a value of `APIJONGLER_CONFIG` (`None` or empty: not set).
    pub fn from_env_value(value: Option<&std::ffi::OsStr>) -> Result<Self> {
        let path = value.filter(|path| !path.is_empty()).ok_or(Error::ConfigNotSet)?;
        Self::load(Path::new(path))
    }

    /// Loads the keyring at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::ConfigMissing { path: path.to_owned() },
            _ => Error::ConfigRead { path: path.to_owned(), source },
        })?;
        let text = String::from_utf8(bytes).map_err(|error| {
            let valid = &error.as_bytes()[..error.utf8_error().valid_up_to()];
            let line = 1 + valid.iter().filter(|&&byte| byte == b'\n').count();
            Error::KeyringLine { path: path.to_owned(), line, problem: KeyringProblem::NotUtf8 }
        })?;
        Self::parse(path, &text)
    }

    /// Parses keyring text (see the module documentation for the format and its rules); `path` is only
    /// used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut connectors: BTreeMap<String, Section> = BTreeMap::new();
        let mut groups: BTreeMap<String, Groups> = BTreeMap::new();
        let mut limits: BTreeMap<LimitsOf, LimitsSection> = BTreeMap::new();
        // The current section, and its entry (looked up once per header, not once per key).
        let mut current: Option<Current> = None;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let fail = |problem| Error::KeyringLine { path: path.to_owned(), line: number, problem };
            let line = line.trim();
            if line.is_empty() || line.starts_with([';', '#']) {
                continue;
            }
            let line = strip_comment(line);
            if let Some(header) = line.strip_prefix('[') {
                let name = header.strip_suffix(']').ok_or_else(|| fail(KeyringProblem::UnclosedSection))?.trim();
                if name.is_empty() || name.chars().any(char::is_control) {
                    return Err(fail(KeyringProblem::BadSection));
                }
                finish(current.take(), &mut connectors, &mut groups, &mut limits);
                current = Some(if let Some(connector) = name.strip_suffix(GROUPS_SUFFIX).map(str::trim_end) {
                    let section =
                        groups.remove(connector).unwrap_or(Groups { header_line: number, ..Groups::default() });
                    Current::Groups(connector.to_owned(), section)
                } else if let Some((connector, group)) = limits_section(name) {
                    let of = (connector.to_owned(), group.map(str::to_owned));
                    let name = match group {
                        Some(group) => format!("{connector}{LIMITS_SUFFIX} {group}"),
                        None => format!("{connector}{LIMITS_SUFFIX}"),
                    };
                    let section =
                        limits.remove(&of).unwrap_or(LimitsSection { header_line: number, ..LimitsSection::default() });
                    Current::Limits(of, name, section)
                } else {
                    Current::Keys(name.to_owned(), connectors.remove(name).unwrap_or_default())
                });
                continue;
            }
            if let Some(Current::Limits(_, name, section)) = current.as_mut() {
                read_limits_line(line, number, name, section).map_err(fail)?;
                continue;
            }
            let section_name = || current.as_ref().map(Current::name);
            let Some((name, value)) = line.split_once(['=', ':']) else {
                return Err(fail(KeyringProblem::NotAKey { section: section_name() }));
            };
            let (name, value) = (name.trim(), value.trim());
            // `abc==` or `abc=:x` is a pasted secret (base64 padding, say), not `name = secret`; its
            // left part must not become a key name, nor appear in the message.
            if value.starts_with(['=', ':']) {
                return Err(fail(KeyringProblem::NotAKey { section: section_name() }));
            }
            if name.is_empty() {
                return Err(fail(KeyringProblem::MissingName { section: section_name() }));
            }
            if let Err(reason) = check_key_name(name) {
                return Err(fail(KeyringProblem::InvalidName { section: section_name(), reason }));
            }
            let key = name.to_owned();
            match current.as_mut() {
                None => return Err(fail(KeyringProblem::BeforeSection { key })),
                Some(Current::Keys(connector, section)) => {
                    let section_name = connector.clone();
                    let slot = match section.index.entry(key.clone()) {
                        Entry::Occupied(first) => {
                            let first_line = first.get().1;
                            return Err(fail(KeyringProblem::DuplicateKey { section: section_name, key, first_line }));
                        }
                        Entry::Vacant(slot) => slot,
                    };
                    if value.is_empty() {
                        return Err(fail(KeyringProblem::EmptySecret { section: section_name, key }));
                    }
                    if HeaderValue::from_str(value).is_err() {
                        return Err(fail(KeyringProblem::SecretNotHeaderSafe { section: section_name, key }));
                    }
                    slot.insert((section.keys.len(), number));
                    section.keys.push(ApiKey::new(key, value));
                }
                Some(Current::Groups(connector, section)) => {
                    let connector = connector.clone();
                    let slot = match section.labels.entry(key.clone()) {
                        Entry::Occupied(first) => {
                            let first_line = first.get().1;
                            return Err(fail(KeyringProblem::DuplicateGroupKey { connector, key, first_line }));
                        }
                        Entry::Vacant(slot) => slot,
                    };
                    if let Err(reason) = check_group_label(value) {
                        return Err(fail(KeyringProblem::BadGroupLabel { connector, key, reason }));
                    }
                    slot.insert((value.to_owned(), number));
                }
                Some(Current::Limits(..)) => unreachable!("a limits line is read above"),
            }
        }
        finish(current, &mut connectors, &mut groups, &mut limits);
        attach_groups(path, &mut connectors, groups)?;
        attach_limits(path, &mut connectors, limits)?;
        Ok(Self { path: path.to_owned(), connectors })
    }

    /// The file this keyring came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connectors that have a section, in name order.
    pub fn connectors(&self) -> impl Iterator<Item = &str> {
        self.connectors.keys().map(String::as_str)
    }

    /// Every key of every connector, as `(connector, key)`.
    pub fn all_keys(&self) -> impl Iterator<Item = (&str, &ApiKey)> {
        self.connectors
            .iter()
            .flat_map(|(connector, section)| section.keys.iter().map(move |key| (connector.as_str(), key)))
    }

    /// The keys of one connector, in file order; an error that says how to fix the file if there are none.
    pub fn keys(&self, connector: &str) -> Result<&[ApiKey]> {
        match self.connectors.get(connector) {
            None => Err(Error::NoKeyringSection { connector: connector.to_owned(), path: self.path.clone() }),
            Some(section) if section.keys.is_empty() => {
                Err(Error::NoKeysConfigured { connector: connector.to_owned(), path: self.path.clone() })
            }
            Some(section) => Ok(&section.keys),
        }
    }

    /// One key by name (a hash lookup: it runs once per request).
    pub fn key(&self, connector: &str, name: &str) -> Option<&ApiKey> {
        let section = self.connectors.get(connector)?;
        section.index.get(name).map(|&(position, _)| &section.keys[position])
    }

    /// The quota group `[connector groups]` declares for a key; `None`: the key is a group of its own
    /// (or is not in the keyring).
    pub fn group(&self, connector: &str, key: &str) -> Option<&str> {
        self.connectors.get(connector)?.groups.get(key).map(String::as_str)
    }

    /// The limits `[connector limits]` and `[connector limits GROUP]` declare for a connector; `None`:
    /// none (no such section, or only an empty `[connector limits]`).
    pub fn limits(&self, connector: &str) -> Option<&Limits> {
        self.connectors.get(connector).map(|section| &section.limits).filter(|limits| !limits.is_empty())
    }
}

/// Files the section the parser leaves.
fn finish(
    current: Option<Current>,
    connectors: &mut BTreeMap<String, Section>,
    groups: &mut BTreeMap<String, Groups>,
    limits: &mut BTreeMap<LimitsOf, LimitsSection>,
) {
    match current {
        Some(Current::Keys(name, section)) => _ = connectors.insert(name, section),
        Some(Current::Groups(connector, section)) => _ = groups.insert(connector, section),
        Some(Current::Limits(of, _, section)) => _ = limits.insert(of, section),
        None => {}
    }
}

/// The connector and group of a limits section's name (already trimmed): `connector limits` or
/// `connector limits GROUP`; `None`: not a limits section.
fn limits_section(name: &str) -> Option<(&str, Option<&str>)> {
    let with_group = name.rsplit_once(' ').and_then(|(head, group)| {
        let connector = head.trim_end().strip_suffix(LIMITS_SUFFIX)?;
        Some((connector.trim_end(), Some(group)))
    });
    with_group.or_else(|| name.strip_suffix(LIMITS_SUFFIX).map(|connector| (connector.trim_end(), None)))
}

/// Reads one `MODEL = LIMIT, LIMIT, ...` line (comments already gone) into its limits section.
fn read_limits_line(
    line: &str,
    number: usize,
    section_name: &str,
    section: &mut LimitsSection,
) -> std::result::Result<(), KeyringProblem> {
    let section_name = || section_name.to_owned();
    // A model name may hold a `:` (`model:version`), a limit never does.
    let Some((model, value)) = line.split_once('=').or_else(|| line.rsplit_once(':')) else {
        return Err(KeyringProblem::NotALimitsLine { section: section_name() });
    };
    let (model, value) = (model.trim(), value.trim());
    // `abc==` is a pasted secret (base64 padding, say), not `model = limits`.
    if value.starts_with(['=', ':']) {
        return Err(KeyringProblem::NotALimitsLine { section: section_name() });
    }
    let model = if model == Limits::ANY_MODEL {
        model
    } else {
        let model = model.strip_prefix(MODELS_PREFIX).unwrap_or(model);
        check_model_name(model).map_err(|reason| KeyringProblem::InvalidModel { section: section_name(), reason })?;
        model
    };
    let slot = match section.models.entry(model.to_owned()) {
        Entry::Occupied(first) => {
            let first_line = first.get().1;
            return Err(KeyringProblem::DuplicateModel { section: section_name(), first_line });
        }
        Entry::Vacant(slot) => slot,
    };
    if value.is_empty() {
        return Err(KeyringProblem::NoLimits { section: section_name() });
    }
    let mut limits: Vec<Limit> = Vec::new();
    for (index, text) in value.split(',').enumerate() {
        let limit: Limit = text.parse().map_err(|problem: LimitProblem| KeyringProblem::BadLimit {
            section: section_name(),
            position: index + 1,
            problem,
        })?;
        let same = |earlier: &Limit| (earlier.measure, earlier.window) == (limit.measure, limit.window);
        if let Some(first) = limits.iter().position(same) {
            return Err(KeyringProblem::SameLimitTwice {
                section: section_name(),
                first: first + 1,
                second: index + 1,
            });
        }
        limits.push(limit);
    }
    slot.insert((limits, number));
    Ok(())
}

/// Of the mistakes found once the whole file is read, the one on the earliest line (the one reported).
#[derive(Default)]
struct Earliest(Option<(usize, KeyringProblem)>);

impl Earliest {
    fn note(&mut self, line: usize, problem: KeyringProblem) {
        if self.0.as_ref().is_none_or(|(earliest, _)| line < *earliest) {
            self.0 = Some((line, problem));
        }
    }

    /// The error of the earliest mistake, if any, in file `path`.
    fn into_result(self, path: &Path) -> Result<()> {
        match self.0 {
            Some((line, problem)) => Err(Error::KeyringLine { path: path.to_owned(), line, problem }),
            None => Ok(()),
        }
    }
}

/// Every secret of the file, to refuse a group label or a model that is one.
fn secrets_of(connectors: &BTreeMap<String, Section>) -> HashSet<&str> {
    connectors.values().flat_map(|section| &section.keys).map(|key| key.secret().expose_secret()).collect()
}

/// Checks every `[connector groups]` section against the keys of its connector, then hands its labels
/// to it. Of several mistakes, the one on the earliest line is reported.
fn attach_groups(
    path: &Path,
    connectors: &mut BTreeMap<String, Section>,
    groups: BTreeMap<String, Groups>,
) -> Result<()> {
    let mut earliest = Earliest::default();
    let mut note = |line, problem| earliest.note(line, problem);
    // The secrets, to refuse a label that is one; gathered only if there is a label.
    let secrets = if groups.is_empty() { HashSet::new() } else { secrets_of(connectors) };
    for (connector, section) in &groups {
        let Some(keys) = connectors.get(connector) else {
            note(section.header_line, KeyringProblem::GroupsWithoutKeys { connector: connector.clone() });
            continue;
        };
        for (key, (label, line)) in &section.labels {
            let problem = if !keys.index.contains_key(key) {
                KeyringProblem::UnknownGroupKey { connector: connector.clone(), key: key.clone() }
            } else if secrets.contains(label.as_str()) {
                KeyringProblem::GroupLabelIsSecret { connector: connector.clone(), key: key.clone() }
            } else {
                continue;
            };
            note(*line, problem);
        }
    }
    earliest.into_result(path)?;
    for (connector, section) in groups {
        if let Some(keys) = connectors.get_mut(&connector) {
            keys.groups.extend(section.labels.into_iter().map(|(key, (label, _))| (key, label)));
        }
    }
    Ok(())
}

/// Checks every limits section against its connector (it must have a section) and, for a group's own
/// section, against the connector's groups (a key must be in the group), then hands the limits to the
/// connector. Of several mistakes, the one on the earliest line is reported.
fn attach_limits(
    path: &Path,
    connectors: &mut BTreeMap<String, Section>,
    limits: BTreeMap<LimitsOf, LimitsSection>,
) -> Result<()> {
    let mut earliest = Earliest::default();
    let mut note = |line, problem| earliest.note(line, problem);
    // The secrets, to refuse a model that is one (models are stored); gathered only if there is one.
    let secrets = if limits.is_empty() { HashSet::new() } else { secrets_of(connectors) };
    for ((connector, group), section) in &limits {
        let header = match group {
            Some(group) => format!("{connector}{LIMITS_SUFFIX} {group}"),
            None => format!("{connector}{LIMITS_SUFFIX}"),
        };
        for (model, (_, line)) in &section.models {
            if secrets.contains(model.as_str()) {
                note(*line, KeyringProblem::LimitsModelIsSecret { section: header.clone() });
            }
        }
        let problem = match (connectors.get(connector), group) {
            (None, _) => KeyringProblem::LimitsWithoutKeys { section: header, connector: connector.clone() },
            (Some(keys), Some(group)) if !keys.groups.values().any(|label| label == group) => {
                KeyringProblem::UnknownLimitsGroup { connector: connector.clone(), group: group.clone() }
            }
            (Some(_), _) => continue,
        };
        note(section.header_line, problem);
    }
    earliest.into_result(path)?;
    for ((connector, group), section) in limits {
        let models: BTreeMap<String, Vec<Limit>> =
            section.models.into_iter().map(|(model, (limits, _))| (model, limits)).collect();
        if let Some(keys) = connectors.get_mut(&connector) {
            match group {
                Some(group) => _ = keys.limits.groups.insert(group, models),
                None => keys.limits.every_group = models,
            }
        }
    }
    Ok(())
}

/// Whether `model` obeys the model-name rule of a limits section (see the module documentation); if
/// not, what is wrong, in words that do not show it.
pub fn check_model_name(model: &str) -> std::result::Result<(), &'static str> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@' | '+');
    if model.is_empty() {
        Err("is empty")
    } else if !model.chars().all(allowed) {
        Err("holds a character other than ASCII letters, digits and `-_.:/@+` (a space, say)")
    } else if model.len() > MAX_MODEL_NAME {
        Err("is longer than 128 characters")
    } else {
        Ok(())
    }
}

/// Whether `name` obeys the key-name rule; if not, what is wrong, in words that do not show it.
pub fn check_key_name(name: &str) -> std::result::Result<(), &'static str> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+');
    if name.is_empty() {
        Err("is empty")
    } else if name.chars().any(char::is_control) {
        Err("holds a control character")
    } else if !name.chars().all(allowed) {
        Err("holds a character other than ASCII letters, digits and `-_.@+` (a space, say)")
    } else if name.len() > MAX_KEY_NAME {
        Err("is longer than 64 characters")
    } else {
        Ok(())
    }
}

/// Whether `label` obeys the group-label rule (see the module documentation); if not, what is wrong,
/// in words that do not show it.
pub fn check_group_label(label: &str) -> std::result::Result<(), &'static str> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@' | '+' | '/');
    if label.is_empty() {
        Err("is empty")
    } else if !label.chars().all(allowed) {
        Err("holds a character other than ASCII letters, digits and `-_.:@+/` (a space, say)")
    } else if label.len() > MAX_GROUP_LABEL {
        Err("is longer than 128 characters")
    } else {
        Ok(())
    }
}

/// `line` up to an inline comment: a `;` or `#` after a space or tab.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let start = (1..bytes.len()).find(|&at| matches!(bytes[at], b';' | b'#') && matches!(bytes[at - 1], b' ' | b'\t'));
    start.map_or(line, |at| line[..at].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Keyring> {
        Keyring::parse(Path::new("/etc/keys.ini"), text)
    }

    /// The message of a keyring that must not parse; it never holds anything that looks like a secret.
    #[track_caller]
    fn refused(text: &str) -> String {
        let message = parse(text).expect_err(text).to_string();
        assert!(message.starts_with("/etc/keys.ini:"), "{message}");
        assert!(!message.contains("fake-secret"), "a secret in {message}");
        message
    }

    fn names(keyring: &Keyring, connector: &str) -> Vec<String> {
        keyring.keys(connector).expect("keys").iter().map(|key| key.name().to_owned()).collect()
    }

    #[test]
    fn keeps_case_percent_and_strips_inline_comments() {
        let keyring =
            parse("[gemini]\nKey_Upper = abc%def ; my first key\nkey2=xyz # second\nk3: a;b#c\n").expect("valid");
        let keys = keyring.keys("gemini").expect("section");
        assert_eq!(names(&keyring, "gemini"), ["Key_Upper", "key2", "k3"]);
        assert_eq!(keys[0].secret().expose_secret(), "abc%def");
        assert_eq!(keys[1].secret().expose_secret(), "xyz");
        assert_eq!(keys[2].secret().expose_secret(), "a;b#c", "no comment without a space before it");
    }

    #[test]
    fn the_accepted_forms() {
        let text = "\u{feff}; comment\r\n# another\r\n\r\n  [ DEFAULT ]  ; inline\r\n  a.b@c+d-e_F9 :  s=1:2  \r\n\
                    [x]y]\nk = v\n[DEFAULT]\nsecond = with inner space\tand é\n[empty]\n";
        let keyring = parse(text).expect("valid");
        assert_eq!(keyring.connectors().collect::<Vec<_>>(), ["DEFAULT", "empty", "x]y"]);
        assert_eq!(names(&keyring, "DEFAULT"), ["a.b@c+d-e_F9", "second"], "a repeated section adds up");
        let key = keyring.key("DEFAULT", "a.b@c+d-e_F9").expect("by name");
        assert_eq!(key.secret().expose_secret(), "s=1:2", "split at the first separator");
        assert_eq!(
            keyring.key("DEFAULT", "second").expect("by name").secret().expose_secret(),
            "with inner space\tand é"
        );
        assert!(keyring.key("DEFAULT", "A.B@C+D-E_F9").is_none(), "names are compared exactly");
        assert!(keyring.key("x]y", "second").is_none() && keyring.key("nope", "k").is_none());
        assert!(keyring.keys("empty").is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let keyring = parse("[gemini]\nk = fake-secret-value-123\n").expect("valid");
        let shown = format!("{keyring:?}");
        assert!(!shown.contains("fake-secret-value-123"), "{shown}");
        assert!(shown.contains(keyring.keys("gemini").expect("keys")[0].fingerprint().as_str()));
    }

    #[test]
    fn fingerprint_is_8_hex_and_follows_the_secret() {
        let a = ApiKey::new("k", "fake-one");
        assert_eq!(a.fingerprint().as_str().len(), 8);
        assert!(a.fingerprint().as_str().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.fingerprint(), ApiKey::new("other", "fake-one").fingerprint());
        assert_ne!(a.fingerprint(), ApiKey::new("k", "fake-two").fingerprint());
    }

    #[test]
    fn a_pasted_secret_with_base64_padding_is_not_a_key() {
        let error = parse("[g]\nk = fake-one\nZmFrZS1zZWNyZXQ==\n").expect_err("padding").to_string();
        assert!(!error.contains("ZmFrZS1zZWNyZXQ"), "{error}");
        assert!(error.contains("keys.ini:3:"), "{error}");
    }

    #[test]
    fn a_secret_on_a_line_of_its_own_is_an_error_that_does_not_show_it() {
        // rust-ini read this as one key named "fake-secret-1\nkey1".
        let message = refused("[g]\nkey0 = fake-secret-0\nfake-secret-1\nkey1 = fake-secret-2\n");
        assert!(message.starts_with("/etc/keys.ini:3: this line, in [g], is neither"), "{message}");
        let message = refused("fake-secret-1\n[g]\nk = fake-secret-2\n");
        assert!(message.starts_with("/etc/keys.ini:1: this line, before the first [connector] section"), "{message}");
    }

    #[test]
    fn each_mistake_names_its_line_in_plain_words() {
        let cases = [
            ("[gemini]\nk = v\n[broken\n", "3: this section header has no closing `]`"),
            ("[gemini]\nk = v\n[]\n", "3: this section header has no usable name"),
            ("[gemini]\n = fake-secret-1\n", "2: this key, in [gemini], has no name"),
            ("stray = 1\n[gemini]\nk = v\n", "1: key 'stray' stands before the first [connector] section"),
            ("[gemini]\nk = v\n\n; note\nk = w\n", "5: key 'k' appears twice in [gemini] (first on line 2)"),
            (
                "[gemini]\nk = v\n[other]\nk = w\n[gemini]\nk = x\n",
                "6: key 'k' appears twice in [gemini] (first on line 2)",
            ),
            ("[other]\nk = x\n[gemini]\nk =\n", "4: key 'k' in [gemini] has an empty secret"),
            ("[gemini]\nk = ; only a comment\n", "2: key 'k' in [gemini] has an empty secret"),
            ("[gemini]\nk = fake-secret-\u{7f}\n", "2: the secret of key 'k' in [gemini] holds a control character"),
            ("[gemini]\nk = fake-secret-a\rb\n", "2: the secret of key 'k' in [gemini] holds a control character"),
        ];
        for (text, expected) in cases {
            let message = refused(text);
            assert!(message.starts_with(&format!("/etc/keys.ini:{expected}")), "{text:?}: {message}");
        }
    }

    #[test]
    fn a_key_name_is_1_to_64_of_letters_digits_and_a_few_marks() {
        for good in ["k", "Key_1", "a.b-c@d+e", &"n".repeat(64), "0"] {
            assert_eq!(check_key_name(good), Ok(()), "{good}");
        }
        let long = "n".repeat(65);
        for bad in ["", "my key", "k\u{1}", "k\r", "clé", "k/1", "k\"", "[k]", &long] {
            assert!(check_key_name(bad).is_err(), "{bad:?}");
        }
        for (name, reason) in
            [("fake-secret-1 x", "holds a character other"), (&*format!("fake-secret-{long}"), "longer")]
        {
            let message = refused(&format!("[g]\n{name} = v\n"));
            assert!(message.contains("2: the name of this key, in [g],") && message.contains(reason), "{message}");
        }
        let message = refused("fake secret = v\n[g]\n");
        assert!(message.contains("1: the name of this key, before the first [connector] section,"), "{message}");
    }

    #[test]
    fn missing_or_empty_sections_say_what_to_add() {
        let keyring = parse("[empty]\n[gemini]\nk = v\n").expect("valid");
        let missing = keyring.keys("hf").expect_err("no section").to_string();
        assert!(missing.contains("add a [hf] section"), "{missing}");
        let empty = keyring.keys("empty").expect_err("no keys").to_string();
        assert!(empty.contains("[empty]") && empty.contains("has no keys"), "{empty}");
    }

    #[test]
    fn a_file_that_is_not_utf8_names_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.ini");
        std::fs::write(&path, b"[g]\nk0 = ok\nk1 = fake-secret-\xff\n").expect("write");
        let message = Keyring::load(&path).expect_err("not UTF-8").to_string();
        assert!(message.ends_with("keys.ini:3: this line is not UTF-8 text: save the keyring as UTF-8"), "{message}");
    }

    #[test]
    fn a_groups_section_before_or_after_its_connector_declares_quota_groups() {
        let after = "[gemini]\nkey1 = fake-secret-1\nkey2 = fake-secret-2\nkey3 = fake-secret-3\n\
                     [gemini groups] ; one Cloud project\nkey1 = my-project\nkey2 = my-project # too\n";
        let before = "[gemini groups]\nkey1 = my-project\n[other]\nk = fake-secret-9\n[gemini]\n\
                      key1 = fake-secret-1\nkey2 = fake-secret-2\nkey3 = fake-secret-3\n\
                      [gemini  groups]\nkey2 = my-project\n";
        for text in [after, before] {
            let keyring = parse(text).expect(text);
            assert_eq!(keyring.group("gemini", "key1"), Some("my-project"), "{text}");
            assert_eq!(keyring.group("gemini", "key2"), Some("my-project"), "{text}");
            assert_eq!(keyring.group("gemini", "key3"), None, "a key in no group is a group of its own");
            assert_eq!(keyring.group("other", "key1"), None);
            assert_eq!(keyring.group("gemini groups", "key1"), None);
            assert!(!keyring.connectors().any(|name| name.ends_with("groups")), "{text}");
            assert_eq!(names(&keyring, "gemini"), ["key1", "key2", "key3"]);
            assert_eq!(keyring.all_keys().count(), 3 + usize::from(text == before));
            assert!(keyring.keys("gemini groups").is_err(), "a groups section is no connector");
        }
        // Only a lower-case ` groups` after a space makes a groups section.
        let keyring = parse("[x Groups]\nk = fake-secret-1\n[xgroups]\nk = fake-secret-2\n").expect("valid");
        assert_eq!(keyring.connectors().collect::<Vec<_>>(), ["x Groups", "xgroups"]);
    }

    #[test]
    fn a_group_label_is_1_to_128_of_letters_digits_and_a_few_marks() {
        for good in
            ["p", "gen-lang-client-0123456789", "411082643095", "org/acc_1", "project:1", "a.b@c+d", &"l".repeat(128)]
        {
            assert_eq!(check_group_label(good), Ok(()), "{good}");
            let keyring = parse(&format!("[g]\nk = fake-secret-1\n[g groups]\nk = {good}\n")).expect(good);
            assert_eq!(keyring.group("g", "k"), Some(good));
        }
        let long = "l".repeat(129);
        for bad in ["", "my project", "proj\u{1}", "projé", "p\"", "p,q", "p=q", &long] {
            assert!(check_group_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_groups_mistake_names_its_line_and_section_and_never_the_label() {
        let keys = "[g]\nk1 = fake-secret-1\nk2 = fake-secret-2\n";
        let cases = [
            (
                format!("{keys}[h groups]\nk1 = fake-label\n"),
                "4: section [h groups] declares quota groups of connector 'h', but this file has no [h] section",
            ),
            (
                format!("[h groups]\n{keys}[h groups]\n"),
                "1: section [h groups] declares quota groups of connector 'h', but this file has no [h] section",
            ),
            (format!("{keys}[g groups]\nk1 = p\nk9 = p\n"), "6: key 'k9' in [g groups] is not a key of [g]"),
            (format!("[g groups]\nk9 = p\n{keys}"), "2: key 'k9' in [g groups] is not a key of [g]"),
            (
                format!("{keys}[g groups]\nk1 = p\n[g groups]\nk1 = p\n"),
                "7: key 'k1' appears twice in [g groups] (first on line 5): a key belongs to one quota group",
            ),
            (format!("{keys}[g groups]\nk1 =\n"), "5: the quota group of key 'k1' in [g groups] is empty"),
            (
                format!("{keys}[g groups]\nk1 = fake label\n"),
                "5: the quota group of key 'k1' in [g groups] holds a character other",
            ),
            (
                format!("{keys}[g groups]\nk1 = fake-secret-2\n"),
                "5: the quota group of key 'k1' in [g groups] is the secret of a key",
            ),
            (format!("{keys}[g groups]\nfake label = p\n"), "5: the name of this key, in [g groups],"),
            (format!("{keys}[g groups]\nfake-label\n"), "5: this line, in [g groups], is neither"),
            // Of two mistakes found once the file is read, the earlier line is reported.
            (
                format!("[g groups]\nk1 = p\n{keys}[h groups]\n[g groups]\nk8 = p\n[g groups]\nk7 = p\n"),
                "6: section [h groups]",
            ),
        ];
        for (text, expected) in cases {
            let message = refused(&text);
            assert!(message.starts_with(&format!("/etc/keys.ini:{expected}")), "{text:?}: {message}");
            assert!(!message.contains("fake-label") && !message.contains("fake label"), "{message}");
        }
    }

    fn limit(text: &str) -> Limit {
        text.parse().expect(text)
    }

    #[test]
    fn limits_sections_before_or_after_their_connector_declare_limits_per_group_and_model() {
        let keys = "[gemini]\nkey1 = fake-secret-1\nkey2 = fake-secret-2\nkey3 = fake-secret-3\n\
                    [gemini groups]\nkey1 = paid\nkey2 = free\n";
        let every_group = "[gemini limits] ; each project\n\
                           gemini-2.5-flash = 10/min, 250000 tokens/min, 250/day # free tier\n";
        let more = "[gemini  limits]\n*:5/min\nmodels/gemini-2.5-pro=2/min,50/day\n";
        let paid = "[gemini limits paid]\ngemini-2.5-pro = 150/min, 2000000 tokens/min, 10000/day\n";
        for text in [format!("{keys}{every_group}{paid}{more}"), format!("{paid}{every_group}{more}{keys}")] {
            let keyring = parse(&text).expect(&text);
            let limits = keyring.limits("gemini").expect("declared");
            let flash = [limit("10/min"), limit("250000 tokens/min"), limit("250/day")];
            assert_eq!(limits.binding(None, "gemini-2.5-flash"), flash, "{text}");
            assert_eq!(limits.binding(Some("free"), "gemini-2.5-flash"), flash, "a group without a section");
            assert_eq!(limits.binding(None, "gemini-2.5-pro"), [limit("2/min"), limit("50/day")], "`models/` dropped");
            assert_eq!(limits.binding(None, "gemma-3"), [limit("5/min")], "`*` is any model not listed");
            let pro = [limit("150/min"), limit("2000000 tokens/min"), limit("10000/day")];
            assert_eq!(limits.binding(Some("paid"), "gemini-2.5-pro"), pro);
            assert_eq!(limits.binding(Some("paid"), "gemini-2.5-flash"), [], "the group's section replaces the other");
            assert_eq!(limits.every_group.len(), 3, "two headers of one section add up");
            assert_eq!(limits.groups.keys().collect::<Vec<_>>(), ["paid"]);
            assert_eq!(keyring.connectors().collect::<Vec<_>>(), ["gemini"], "a limits section is no connector");
            assert_eq!(keyring.all_keys().count(), 3);
        }
        // A model name may hold a `:`; a line without `=` is split at its last `:`.
        let keyring = parse("[o]\nk = fake-secret-1\n[o limits]\nllama3:8b: 1/s\nqwen:7b = 2/s\n").expect("colons");
        let limits = keyring.limits("o").expect("declared");
        assert_eq!(limits.binding(None, "llama3:8b"), [limit("1/s")]);
        assert_eq!(limits.binding(None, "qwen:7b"), [limit("2/s")]);
    }

    #[test]
    fn nothing_declared_is_no_limits_and_only_a_lower_case_limits_makes_a_limits_section() {
        let keyring = parse("[g]\nk = fake-secret-1\n[h]\nk = fake-secret-2\n[h limits]\n; none yet\n").expect("valid");
        assert!(keyring.limits("g").is_none() && keyring.limits("h").is_none() && keyring.limits("nope").is_none());
        let keyring =
            parse("[x Limits]\nk = fake-secret-1\n[xlimits]\nk = fake-secret-2\n[limits]\nk = fake-secret-3\n")
                .expect("valid");
        assert_eq!(keyring.connectors().collect::<Vec<_>>(), ["limits", "x Limits", "xlimits"]);
        assert!(keyring.limits("x").is_none());
        // A group's own empty section is a declaration: that group has no limits.
        let text = "[g]\nk = fake-secret-1\n[g groups]\nk = p\n[g limits]\n* = 1/s\n[g limits p]\n";
        let limits = parse(text).expect("valid").limits("g").cloned().expect("declared");
        assert_eq!((limits.binding(None, "m"), limits.binding(Some("p"), "m")), (&[limit("1/s")][..], &[][..]));
    }

    #[test]
    fn a_model_name_is_star_or_1_to_128_of_letters_digits_and_a_few_marks() {
        for good in ["gemini-2.5-flash", "org/Model_1", "llama3:8b", "a.b@c+d", &"m".repeat(128)] {
            assert_eq!(check_model_name(good), Ok(()), "{good}");
            let keyring = parse(&format!("[g]\nk = fake-secret-1\n[g limits]\n{good} = 1/s\n")).expect(good);
            assert_eq!(keyring.limits("g").expect("declared").every_group.keys().collect::<Vec<_>>(), [good]);
        }
        let long = "m".repeat(129);
        for bad in ["", "*", "gemini 2.5", "modèle", "m\"", "m,n", "m=n", "m;n", &long] {
            assert!(check_model_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_limits_mistake_names_its_line_and_section_and_never_the_text() {
        let keys = "[g]\nk1 = fake-secret-1\n[g groups]\nk1 = p\n";
        let eleven = (1..=10).map(|seconds| format!("1/{seconds}s, ")).collect::<String>() + "fake/limit";
        let cases = [
            (
                format!("{keys}[g limits]\nm = 10/min, fake-limit\n"),
                "6: the 2nd limit of this line, in [g limits], is not a limit: a limit is N/WINDOW",
            ),
            (
                format!("{keys}[g limits]\nm = 10/week\n"),
                "6: the 1st limit of this line, in [g limits], is not a limit: a limit's window is",
            ),
            (
                format!("{keys}[g limits]\nm = 1/s, 1/min, 0/day\n"),
                "6: the 3rd limit of this line, in [g limits], is not a limit: a limit's count",
            ),
            (
                format!("{keys}[g limits]\nm = {eleven}\n"),
                "6: the 11th limit of this line, in [g limits], is not a limit",
            ),
            (
                format!("{keys}[g limits]\nm = 10/min,\n"),
                "6: the 2nd limit of this line, in [g limits], is not a limit",
            ),
            (
                format!("{keys}[g limits p]\n* = fake secret\n"),
                "6: the 1st limit of this line, in [g limits p], is not a limit",
            ),
            (
                format!("{keys}[g limits]\nm =\n"),
                "6: the model of this line, in [g limits], has no limits: write them after the `=`",
            ),
            (format!("{keys}[g limits]\nm = ; later\n"), "6: the model of this line, in [g limits], has no limits"),
            (
                format!("{keys}[g limits]\n= 1/s\n"),
                "6: the model of this line, in [g limits], is empty: write a model's name",
            ),
            (format!("{keys}[g limits]\nmodels/ = 1/s\n"), "6: the model of this line, in [g limits], is empty"),
            (
                format!("{keys}[g limits]\nfake model = 1/s\n"),
                "6: the model of this line, in [g limits], holds a character other",
            ),
            (
                format!("{keys}[g limits]\nfake-secret-1\n"),
                "6: this line, in [g limits], is not a `MODEL = LIMIT, LIMIT, ...` line",
            ),
            (format!("{keys}[g limits]\nZmFrZS1zZWNyZXQ==\n"), "6: this line, in [g limits], is not a `MODEL"),
            (
                format!("{keys}[g limits]\nm = 1/s\n\nmodels/m = 2/s\n"),
                "8: the model of this line appears twice in [g limits] (first on line 6): list each model once",
            ),
            (
                format!("[g limits]\n* = 1/s\n{keys}[g limits]\n* = 2/s\n"),
                "8: the model of this line appears twice in [g limits] (first on line 2)",
            ),
            (
                format!("{keys}[g limits]\nm = 10/min, 1/day, 20/min\n"),
                "6: the 1st and 3rd limits of this line, in [g limits], count the same measure (requests or tokens) over the same window: keep the one",
            ),
            (
                format!("{keys}[g limits]\nm = 5 tokens/60s, 1 tokens/min\n"),
                "6: the 1st and 2nd limits of this line, in [g limits], count the same measure",
            ),
            (
                format!("{keys}[h limits]\nm = 1/s\n"),
                "5: section [h limits] declares limits of connector 'h', but this file has no [h] section: add the keys under [h] or remove [h limits]",
            ),
            (
                format!("[h limits p]\n{keys}[h  limits  p]\n"),
                "1: section [h limits p] declares limits of connector 'h', but this file has no [h] section",
            ),
            (
                format!("{keys}[g limits q]\nm = 1/s\n"),
                "5: section [g limits q] declares limits of quota group 'q', but [g groups] puts no key in that group: declare the group in [g groups] (`key = q`)",
            ),
            (
                "[g]\nk1 = fake-secret-1\n[g limits p]\n".to_owned(),
                "3: section [g limits p] declares limits of quota group 'p'",
            ),
            // Of two mistakes found once the file is read, the earlier line is reported.
            (format!("{keys}[g limits q]\n[h limits]\n[g limits q]\n"), "5: section [g limits q]"),
        ];
        for (text, expected) in cases {
            let message = refused(&text);
            assert!(message.starts_with(&format!("/etc/keys.ini:{expected}")), "{text:?}: {message}");
            for shown in ["fake-limit", "fake/", "fake secret", "fake model", "ZmFrZS1zZWNyZXQ"] {
                assert!(!message.contains(shown), "{message}");
            }
        }
    }

    #[test]
    fn the_message_for_a_bad_limits_line_never_holds_the_lines_text() {
        for line in
            ["gemini = fake-secret-1", "gemini = 10/min, fake-secret-1", "fake-secret-1 fake", "gemini: fake-secret-1"]
        {
            let message = refused(&format!("[g]\nk = v\n[g limits]\n{line}\n"));
            assert!(message.starts_with("/etc/keys.ini:4: "), "{message}");
            assert!(!message.contains(line) && !message.contains("fake"), "{line}: {message}");
        }
    }

    #[test]
    fn a_secret_written_as_a_model_of_a_limits_section_is_refused_without_showing_it() {
        for text in [
            "[g]\nk = fake-secret-1\n[g limits]\nfake-secret-1 = 10/min\n",
            "[g limits]\nfake-secret-1 = 10/min\n[g]\nk = fake-secret-1\n",
        ] {
            let message = refused(text);
            assert!(message.contains("[g limits] is the secret of a key"), "{message}");
        }
        let message = refused("[g]\nk = fake-secret-1\n[g groups]\nk = p\n[g limits p]\nfake-secret-1 = 10/min\n");
        assert!(message.starts_with("/etc/keys.ini:6: ") && message.contains("[g limits p]"), "{message}");
    }

    #[test]
    fn a_hundred_thousand_keys_parse_and_are_found_by_name() {
        let count = 100_000;
        let mut text = String::from("[big]\n");
        for index in 0..count {
            text.push_str(&format!("key{index} = fake-secret-{index}\n"));
        }
        let keyring = parse(&text).expect("valid");
        assert_eq!(keyring.keys("big").expect("keys").len(), count);
        for index in [0, 1, count / 2, count - 1] {
            let key = keyring.key("big", &format!("key{index}")).expect("found");
            assert_eq!(key.secret().expose_secret(), format!("fake-secret-{index}"));
        }
        text.push_str("key5 = again\n");
        let message = refused(&text);
        assert!(message.contains(&format!("{}: key 'key5' appears twice in [big] (first on line 7)", count + 2)));
    }
}
