//! The keyring: the seed's INI file of API keys, one `[connector]` section of `name = secret` lines.
//!
//! Unlike Python's configparser (which the seed used), key names keep their case, `%` is just a
//! character, `[DEFAULT]` is an ordinary section, ` ; comment` after a value is a comment, and a
//! duplicate key name is an error. Secrets live only in memory, in a type whose `Debug` is redacted;
//! everything else in apijongler names a key by its name and its short fingerprint.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

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
        Self(digest.iter().take(4).map(|byte| format!("{byte:02x}")).collect())
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
    connectors: BTreeMap<String, Vec<ApiKey>>,
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
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::ConfigMissing { path: path.to_owned() },
            _ => Error::ConfigRead { path: path.to_owned(), source },
        })?;
        Self::parse(path, &text)
    }

    /// Parses keyring text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let options = ini::ParseOption { enabled_quote: false, enabled_escape: false, ..Default::default() };
        let ini = ini::Ini::load_from_str_opt(text, options).map_err(|error| {
            // rust-ini reports an error found at the end of a line after it has stepped onto the newline,
            // i.e. as column 1 of the next line; point at the line the user has to fix instead.
            let (line, column) = if error.col == 1 && error.line > 1 {
                let previous = text.lines().nth(error.line - 2).unwrap_or_default();
                (error.line - 1, previous.chars().count() + 1)
            } else {
                (error.line, error.col)
            };
            Error::ConfigSyntax { path: path.to_owned(), line, column, message: error.msg.into_owned() }
        })?;
        let invalid = |problem: String| Error::ConfigInvalid { path: path.to_owned(), problem };

        let mut connectors: BTreeMap<String, Vec<ApiKey>> = BTreeMap::new();
        for (section, properties) in &ini {
            let Some(connector) = section else {
                if let Some((name, _)) = properties.iter().next() {
                    let at = line_of(text, None, name, 0);
                    return Err(invalid(format!(
                        "{at}key '{name}' stands before the first [connector] section: move it under one"
                    )));
                }
                continue;
            };
            let keys = connectors.entry(connector.to_owned()).or_default();
            for (name, secret) in properties.iter() {
                let seen_before = keys.iter().filter(|key| key.name == name).count();
                if secret.is_empty() {
                    let at = line_of(text, Some(connector), name, seen_before);
                    return Err(invalid(format!("{at}key '{name}' in [{connector}] has an empty secret")));
                }
                if seen_before > 0 {
                    let at = line_of(text, Some(connector), name, seen_before);
                    return Err(invalid(format!(
                        "{at}key '{name}' appears twice in [{connector}]: give each key its own name"
                    )));
                }
                keys.push(ApiKey::new(name, secret));
            }
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
        self.connectors.iter().flat_map(|(connector, keys)| keys.iter().map(move |key| (connector.as_str(), key)))
    }

    /// The keys of one connector; an error that says how to fix the file if there are none.
    pub fn keys(&self, connector: &str) -> Result<&[ApiKey]> {
        match self.connectors.get(connector) {
            None => Err(Error::NoKeyringSection { connector: connector.to_owned(), path: self.path.clone() }),
            Some(keys) if keys.is_empty() => {
                Err(Error::NoKeysConfigured { connector: connector.to_owned(), path: self.path.clone() })
            }
            Some(keys) => Ok(keys),
        }
    }

    /// One key by name.
    pub fn key(&self, connector: &str, name: &str) -> Option<&ApiKey> {
        self.connectors.get(connector)?.iter().find(|key| key.name == name)
    }
}

/// `line N: ` for the `nth` (0-based) line defining `name` in `[section]` (`None`: before any section),
/// found by a plain scan because the INI parser keeps no positions; empty if not found.
fn line_of(text: &str, section: Option<&str>, name: &str, nth: usize) -> String {
    let mut current: Option<&str> = None;
    let mut seen = 0;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header.rsplit_once(']').map(|(inside, _)| inside.trim());
            continue;
        }
        let key = line.split_once(['=', ':']).map(|(key, _)| key.trim());
        if current == section && key == Some(name) {
            if seen == nth {
                return format!("line {}: ", index + 1);
            }
            seen += 1;
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Keyring> {
        Keyring::parse(Path::new("/etc/keys.ini"), text)
    }

    #[test]
    fn keeps_case_percent_and_strips_inline_comments() {
        let keyring = parse("[gemini]\nKey_Upper = abc%def ; my first key\nkey2=xyz\n").expect("valid");
        let keys = keyring.keys("gemini").expect("section");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].name(), "Key_Upper");
        assert_eq!(keys[0].secret().expose_secret(), "abc%def");
        assert_eq!(keys[1].secret().expose_secret(), "xyz");
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
    fn syntax_errors_name_file_and_line() {
        let error = parse("[gemini]\nk = v\n[broken\n").expect_err("unterminated section");
        let message = error.to_string();
        assert!(message.starts_with("/etc/keys.ini:3:"), "{message}");
    }

    #[test]
    fn bad_contents_are_explained() {
        let cases = [
            ("stray = 1\n[gemini]\nk = v\n", "line 1: key 'stray' stands before the first [connector]"),
            ("[gemini]\nk = v\n\n; note\nk = w\n", "line 5: key 'k' appears twice"),
            ("[other]\nk = x\n[gemini]\nk =\n", "line 4: key 'k' in [gemini] has an empty secret"),
        ];
        for (text, expected) in cases {
            let message = parse(text).expect_err(text).to_string();
            assert!(message.contains(expected) && message.contains("/etc/keys.ini"), "{message}");
        }
    }

    #[test]
    fn missing_or_empty_sections_say_what_to_add() {
        let keyring = parse("[empty]\n[gemini]\nk = v\n").expect("valid");
        let missing = keyring.keys("hf").expect_err("no section").to_string();
        assert!(missing.contains("add a [hf] section"), "{missing}");
        let empty = keyring.keys("empty").expect_err("no keys").to_string();
        assert!(empty.contains("[empty]") && empty.contains("has no keys"), "{empty}");
    }
}
