//! Whose quota a lockdown is about (a quota group, a Google Cloud project, one key) and which models
//! it covers (one, or every model).

use std::fmt;
use std::str::FromStr;

use super::UnknownWord;

/// The holder of a quota: every key of a declared group, every key that revealed one project, or a
/// key alone. Stored as `group:NAME`, `project:NUMBER` or `key:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// A quota group the keyring declares.
    Group(String),
    /// A Google Cloud project number an answer revealed.
    Project(String),
    /// One key, by name.
    Key(String),
}

impl Scope {
    /// The kind's prefix, as stored.
    fn kind(&self) -> &'static str {
        match self {
            Self::Group(_) => "group",
            Self::Project(_) => "project",
            Self::Key(_) => "key",
        }
    }

    /// The group's name, the project's number or the key's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Group(name) | Self::Project(name) | Self::Key(name) => name,
        }
    }

    /// Whether this is a key alone.
    pub fn is_key(&self) -> bool {
        matches!(self, Self::Key(_))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind(), self.name())
    }
}

impl FromStr for Scope {
    type Err = UnknownWord;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownWord::new("quota scope", text, "group:NAME, project:NUMBER or key:NAME");
        let (kind, name) = text.split_once(':').ok_or_else(unknown)?;
        if name.is_empty() {
            return Err(unknown());
        }
        let name = name.to_owned();
        match kind {
            "group" => Ok(Self::Group(name)),
            "project" => Ok(Self::Project(name)),
            "key" => Ok(Self::Key(name)),
            _ => Err(unknown()),
        }
    }
}

/// The models a lockdown covers. Stored as the model's name, or `*` for every model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelScope {
    /// Every model of the scope.
    Every,
    /// One model, by the name the request used.
    One(String),
}

impl ModelScope {
    /// The stored word for every model.
    pub const EVERY: &'static str = "*";

    /// Whether a request for `model` (`None`: a request that names no model) is covered: a lockdown of
    /// every model covers every request, a lockdown of one model only the requests for it.
    pub fn covers(&self, model: Option<&str>) -> bool {
        match self {
            Self::Every => true,
            Self::One(mine) => model == Some(mine.as_str()),
        }
    }
}

impl fmt::Display for ModelScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Every => f.write_str(Self::EVERY),
            Self::One(model) => f.write_str(model),
        }
    }
}

impl FromStr for ModelScope {
    type Err = UnknownWord;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            Self::EVERY => Ok(Self::Every),
            "" => Err(UnknownWord::new("model", text, "a model name or *")),
            model => Ok(Self::One(model.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_key_alone_is_a_key_scope() {
        assert!(Scope::Key("k".into()).is_key());
        assert!(!Scope::Group("k".into()).is_key());
        assert!(!Scope::Project("1".into()).is_key());
    }

    #[test]
    fn scopes_read_back_and_malformed_ones_are_refused() {
        for scope in [Scope::Group("team".into()), Scope::Project("123".into()), Scope::Key("k:1".into())] {
            assert_eq!(scope.to_string().parse::<Scope>(), Ok(scope));
        }
        for text in ["", "team", "group:", "user:x", "Key:x"] {
            assert!(text.parse::<Scope>().is_err(), "{text:?}");
        }
    }

    #[test]
    fn a_model_scope_covers_its_model_or_every_model() {
        let one = ModelScope::One("gemini-2.5-pro".into());
        assert!(one.covers(Some("gemini-2.5-pro")));
        assert!(!one.covers(Some("gemini-2.5-flash")));
        assert!(!one.covers(None));
        assert!(ModelScope::Every.covers(None) && ModelScope::Every.covers(Some("x")));
        assert_eq!("*".parse::<ModelScope>(), Ok(ModelScope::Every));
        assert_eq!(one.to_string().parse::<ModelScope>(), Ok(one));
        assert!("".parse::<ModelScope>().is_err());
    }
}
