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
use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

pub use crate::error::KeyringProblem;
use crate::error::{Error, Result};

/// The longest key name, in characters.
pub const MAX_KEY_NAME: usize = 64;

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
        // The current section's name, and its entry (looked up once per header, not once per key).
        let mut current: Option<(String, Section)> = None;
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
                if let Some((done, section)) = current.take() {
                    connectors.insert(done, section);
                }
                let section = connectors.remove(name).unwrap_or_default();
                current = Some((name.to_owned(), section));
                continue;
            }
            let section_name = || current.as_ref().map(|(name, _)| name.clone());
            let Some((name, secret)) = line.split_once(['=', ':']) else {
                return Err(fail(KeyringProblem::NotAKey { section: section_name() }));
            };
            let (name, secret) = (name.trim(), secret.trim());
            // `abc==` or `abc=:x` is a pasted secret (base64 padding, say), not `name = secret`; its
            // left part must not become a key name, nor appear in the message.
            if secret.starts_with(['=', ':']) {
                return Err(fail(KeyringProblem::NotAKey { section: section_name() }));
            }
            if name.is_empty() {
                return Err(fail(KeyringProblem::MissingName { section: section_name() }));
            }
            if let Err(reason) = check_key_name(name) {
                return Err(fail(KeyringProblem::InvalidName { section: section_name(), reason }));
            }
            let Some((connector, section)) = current.as_mut() else {
                return Err(fail(KeyringProblem::BeforeSection { key: name.to_owned() }));
            };
            let (section_name, key) = (connector.clone(), name.to_owned());
            let slot = match section.index.entry(key.clone()) {
                Entry::Occupied(first) => {
                    let first_line = first.get().1;
                    return Err(fail(KeyringProblem::DuplicateKey { section: section_name, key, first_line }));
                }
                Entry::Vacant(slot) => slot,
            };
            if secret.is_empty() {
                return Err(fail(KeyringProblem::EmptySecret { section: section_name, key }));
            }
            if HeaderValue::from_str(secret).is_err() {
                return Err(fail(KeyringProblem::SecretNotHeaderSafe { section: section_name, key }));
            }
            slot.insert((section.keys.len(), number));
            section.keys.push(ApiKey::new(key, secret));
        }
        if let Some((done, section)) = current {
            connectors.insert(done, section);
        }
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
