//! Where the pool lives, as the user names it (`APIJONGLER_DB`, `--db`, `CoordinatorOptions::db_path`):
//! a file path selects SQLite, the default; a `postgres://` or `postgresql://` URL selects PostgreSQL.
//!
//! Invariants:
//! - Anything shaped like a URL (`scheme://...`) is never taken for a file path: a scheme apijongler
//!   does not speak is refused, naming where the value came from, before anything is created on disk
//!   (a `mysql://h/db` once became a directory tree named `mysql:`).
//! - A URL's password never reaches a message: [`PostgresUrl`]'s `Display` and `Debug` mask it, and
//!   a refusal quotes only the scheme.

use std::ffi::OsStr;
use std::fmt;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};

/// The environment variable naming the database: a file path or a PostgreSQL URL.
pub const DB_ENV: &str = "APIJONGLER_DB";

/// The schemes that select PostgreSQL (libpq's two spellings).
const POSTGRES_SCHEMES: [&str; 2] = ["postgres", "postgresql"];

/// What a database value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server and database.
    Postgres(PostgresUrl),
}

impl Location {
    /// Reads `value`, given by `given_by` (the variable, flag or option named in the refusal).
    pub fn parse(value: &OsStr, given_by: &str) -> Result<Self> {
        let Some(text) = value.to_str() else { return Ok(Self::Sqlite(PathBuf::from(value))) };
        match url_scheme(text) {
            None => Ok(Self::Sqlite(PathBuf::from(value))),
            Some(scheme) if POSTGRES_SCHEMES.iter().any(|known| scheme.eq_ignore_ascii_case(known)) => {
                Ok(Self::Postgres(PostgresUrl(text.to_owned())))
            }
            Some(scheme) => {
                Err(Error::UnsupportedDatabaseUrl { given_by: given_by.to_owned(), scheme: scheme.to_owned() })
            }
        }
    }
}

/// The database: `APIJONGLER_DB` (a path or a URL, see [`Location::parse`]), else the SQLite file
/// `$XDG_STATE_HOME/apijongler/apijongler.db`, else `~/.local/state/apijongler/apijongler.db`. An
/// empty variable counts as unset.
pub fn default_location() -> Result<Location> {
    let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(value) = var(DB_ENV) {
        return Location::parse(&value, DB_ENV);
    }
    let state_home = var("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".local/state")))
        .ok_or(Error::NoDatabaseLocation)?;
    Ok(Location::Sqlite(state_home.join("apijongler/apijongler.db")))
}

/// The scheme of `text` if it is shaped like a URL: RFC 3986's `ALPHA *( ALPHA / DIGIT / "+" / "-" /
/// "." )` followed by `://`. A path such as `./a://b` or `C:\x` is not.
fn url_scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    let valid = first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then_some(scheme)
}

/// A PostgreSQL connection URL. It may hold a password: only [`PostgresUrl::secret_text`] gives it
/// out whole, for the driver; every other view masks it.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// The URL as given, password included: for the driver only, never for a message.
    #[allow(dead_code, reason = "the PostgreSQL store's driver will take it; until then only tests do")]
    pub(crate) fn secret_text(&self) -> &str {
        &self.0
    }

    /// The URL with any password (in the user-info part, or a `password=` parameter) replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PostgresUrl").field(&self.redacted()).finish()
    }
}

/// `url` with its passwords masked, generously: it works on the text's shape alone (a malformed URL is
/// masked as well as a good one) and masks at least what the driver (`tokio-postgres`) would read as a
/// password, which takes the user info up to the first `@` of the whole URL, a password that may hold
/// `/`, `?` or `#`, and parameter names percent-decoded. So: whatever follows the first `:` before the
/// last `@` up to that `@`, and the value (to the next `&`) of every parameter named `password` once
/// decoded, in any case.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (userinfo, tail) = match rest.rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => (format!("{}***@", &rest[..=colon]), &rest[at + 1..]),
            None => (rest[..=at].to_owned(), &rest[at + 1..]),
        },
        None => (String::new(), rest),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let masked: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _))
                        if percent_decode_str(name).decode_utf8_lossy().eq_ignore_ascii_case("password") =>
                    {
                        format!("{name}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", masked.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{userinfo}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Result<Location> {
        Location::parse(OsStr::new(value), "APIJONGLER_DB")
    }

    #[test]
    fn paths_stay_sqlite_and_urls_choose_or_are_refused() {
        for path in ["pool.db", "/var/lib/a.db", "./a://b", "C:\\pool.db", "a:b.db", "1x://y", "://x", "dir/x://y"] {
            assert_eq!(parse(path).unwrap(), Location::Sqlite(PathBuf::from(path)), "{path}");
        }
        for url in ["postgres://u@/db?host=/run/pg", "postgresql:///db", "POSTGRES://h/db"] {
            assert!(matches!(parse(url).unwrap(), Location::Postgres(_)), "{url}");
        }
        for (url, scheme) in [("xyz://a", "xyz"), ("mysql://u:pw@h/db", "mysql"), ("file:///x.db", "file")] {
            match parse(url) {
                Err(Error::UnsupportedDatabaseUrl { given_by, scheme: got }) => {
                    assert_eq!((given_by.as_str(), got.as_str()), ("APIJONGLER_DB", scheme), "{url}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn refusals_quote_the_scheme_not_the_password() {
        let message = parse("mysql://me:hunter2@db.example/pool").unwrap_err().to_string();
        assert!(message.contains("APIJONGLER_DB") && message.contains("mysql://"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn passwords_are_masked() {
        let cases = [
            ("postgres://u:hunter2@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgres://u@/db?host=/run/pg", "postgres://u@/db?host=/run/pg"),
            ("postgres://u:p@ss:w@h/db", "postgres://u:***@h/db"),
            ("postgres:///db?host=/s&password=hunter2#f", "postgres:///db?host=/s&password=***"),
            ("postgresql://h?PASSWORD=x&user=u", "postgresql://h?PASSWORD=***&user=u"),
            ("postgres://:hunter2@h", "postgres://:***@h"),
            // The driver's user info runs to the first `@` of the whole URL: a password may hold `/`, `?`
            // or `#`, and parameter names are percent-decoded.
            ("postgres://u:hun/ter2@h/db", "postgres://u:***@h/db"),
            ("postgres://u:hun?ter2@h/db", "postgres://u:***@h/db"),
            ("postgres://u:hun#ter2@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h/db?password=hun#ter2", "postgres://u@h/db?password=***"),
            ("postgres://u@h/db?pass%77ord=hunter2&x=1", "postgres://u@h/db?pass%77ord=***&x=1"),
        ];
        for (url, shown) in cases {
            let Location::Postgres(parsed) = parse(url).unwrap() else { panic!("{url}") };
            assert_eq!(parsed.to_string(), shown, "{url}");
            assert!(!format!("{parsed:?}").contains("hunter2"), "{url}");
            assert_eq!(parsed.secret_text(), url);
        }
    }
}
