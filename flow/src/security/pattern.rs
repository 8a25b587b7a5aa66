//! Blessing names and the patterns that match them.
//!
//! A blessing name is one or more components separated by
//! [`CHAIN_SEPARATOR`] (`:`), for example `alice:phone:app`. Each certificate
//! of a chain adds an *extension* (one or more components) to the name of the
//! certificate before it.
//!
//! A component must be non-empty, must not be `...`, and must not contain any
//! of the reserved characters:
//!
//! - `:` separates components;
//! - `@` delimits fields of endpoints;
//! - `,` separates names in lists;
//! - `$` ends an exact [`BlessingPattern`];
//! - whitespace and control characters, which make names ambiguous to read.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// Separates the components of a blessing name.
pub const CHAIN_SEPARATOR: char = ':';

/// The pattern that matches every name.
pub const ALL_PRINCIPALS: &str = "...";

/// The last component of a pattern that matches only exactly its prefix.
pub const NO_EXTENSION: &str = "$";

/// Characters that may not appear in a blessing name component (besides
/// whitespace and control characters).
pub const RESERVED_CHARS: &[char] = &[':', '@', ',', '$'];

fn check_component(component: &str, what: &str, whole: &str) -> Result<()> {
    if component.is_empty() {
        return Err(Error::bad_arg(format!(
            "{what} {whole:?} has an empty component"
        )));
    }
    if component == ALL_PRINCIPALS {
        return Err(Error::bad_arg(format!(
            "{what} {whole:?} has the reserved component \"...\""
        )));
    }
    if let Some(c) = component
        .chars()
        .find(|c| RESERVED_CHARS.contains(c) || c.is_whitespace() || c.is_control())
    {
        return Err(Error::bad_arg(format!(
            "{what} {whole:?} contains the reserved character {c:?}"
        )));
    }
    Ok(())
}

fn check_name(name: &str, what: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::bad_arg(format!("{what} is empty")));
    }
    name.split(CHAIN_SEPARATOR)
        .try_for_each(|component| check_component(component, what, name))
}

/// Checks that `name` is a valid blessing name: one or more `:`-separated
/// components, none empty, none `...`, none holding a reserved character.
///
/// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) saying why.
pub fn validate_name(name: &str) -> Result<()> {
    check_name(name, "blessing name")
}

/// Checks that `extension` is a valid certificate extension.
///
/// The rules are those of [`validate_name`]: an extension may add several
/// components at once (`friend:bob`). Fails with
/// [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) saying why.
pub fn validate_extension(extension: &str) -> Result<()> {
    check_name(extension, "blessing extension")
}

/// A pattern over blessing names, used to say whom a blessing is for, whom a
/// root is trusted for, and whom a caveat accepts.
///
/// - `...` matches every name (and, in [`matched_by`](Self::matched_by), even
///   an empty list of names);
/// - `a:b` matches `a:b` and every extension of it (`a:b:c`, `a:b:c:d`), but
///   not `a:bc` or `a`;
/// - `a:b:$` matches exactly `a:b`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlessingPattern(String);

impl BlessingPattern {
    /// Parses and validates a pattern.
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) unless the
    /// pattern is `...`, a valid name, or a valid name followed by `:$`.
    pub fn new(pattern: impl Into<String>) -> Result<Self> {
        let pattern = pattern.into();
        if pattern != ALL_PRINCIPALS {
            let prefix = pattern.strip_suffix(":$").unwrap_or(&pattern);
            check_name(prefix, "blessing pattern").map_err(|e| {
                Error::bad_arg(format!(
                    "invalid blessing pattern {pattern:?}: {}",
                    e.message()
                ))
            })?;
        }
        Ok(BlessingPattern(pattern))
    }

    /// Same as [`new`](Self::new).
    pub fn parse(pattern: &str) -> Result<Self> {
        Self::new(pattern)
    }

    /// The pattern `...`, matching everyone.
    pub fn all() -> Self {
        BlessingPattern(ALL_PRINCIPALS.to_owned())
    }

    /// The pattern matching `name` and its extensions.
    pub fn prefix(name: &str) -> Result<Self> {
        validate_name(name)?;
        Ok(BlessingPattern(name.to_owned()))
    }

    /// The pattern matching exactly `name` (`name:$`).
    pub fn exact(name: &str) -> Result<Self> {
        validate_name(name)?;
        Ok(BlessingPattern(format!("{name}:$")))
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is `...`.
    pub fn is_all(&self) -> bool {
        self.0 == ALL_PRINCIPALS
    }

    /// Whether `name` matches this pattern.
    pub fn matches(&self, name: &str) -> bool {
        if self.is_all() {
            return true;
        }
        if let Some(exact) = self.0.strip_suffix(":$") {
            return name == exact;
        }
        match name.strip_prefix(self.0.as_str()) {
            Some("") => true,
            Some(rest) => rest.starts_with(CHAIN_SEPARATOR),
            None => false,
        }
    }

    /// Whether any of `names` matches this pattern. `...` is matched even by
    /// no names at all, so it can select what to present to a peer whose
    /// names are not known yet.
    pub fn matched_by<S: AsRef<str>>(&self, names: &[S]) -> bool {
        self.is_all() || names.iter().any(|name| self.matches(name.as_ref()))
    }
}

impl fmt::Display for BlessingPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BlessingPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlessingPattern({:?})", self.0)
    }
}

impl FromStr for BlessingPattern {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use proptest::prelude::*;

    fn pat(s: &str) -> BlessingPattern {
        s.parse().unwrap()
    }

    #[test]
    fn matching_table() {
        let table: &[(&str, &str, bool)] = &[
            ("a:b", "a:b", true),
            ("a:b", "a:b:c", true),
            ("a:b", "a:b:c:d", true),
            ("a:b", "a:bc", false),
            ("a:b", "a", false),
            ("a:b", "x:a:b", false),
            ("a:b:$", "a:b", true),
            ("a:b:$", "a:b:c", false),
            ("a:b:$", "a", false),
            ("a:$", "a", true),
            ("a", "a:b", true),
            ("...", "a", true),
            ("...", "anything:at:all", true),
        ];
        for &(p, name, want) in table {
            assert_eq!(pat(p).matches(name), want, "{p} vs {name}");
        }
    }

    #[test]
    fn matched_by_any() {
        let p = pat("alice:friend");
        assert!(p.matched_by(&["bob", "alice:friend:carol"]));
        assert!(!p.matched_by(&["bob", "alice"]));
        assert!(!p.matched_by::<String>(&[]));
        assert!(BlessingPattern::all().matched_by::<String>(&[]));
        let names = vec!["x".to_string()];
        assert!(pat("x:$").matched_by(&names));
    }

    #[test]
    fn constructors() {
        assert_eq!(BlessingPattern::exact("a:b").unwrap(), pat("a:b:$"));
        assert_eq!(BlessingPattern::prefix("a:b").unwrap(), pat("a:b"));
        assert!(BlessingPattern::all().is_all());
        assert!(BlessingPattern::exact("a:$").is_err());
        assert_eq!(pat("a:b:$").as_str(), "a:b:$");
    }

    #[test]
    fn name_validation_rejections() {
        for bad in [
            "", ":", "a:", ":a", "a::b", "a@b", "a,b", "a$", "$", "a b", "a\tb", "a\nb", "a\0b",
            "...", "a:...:b",
        ] {
            let err = validate_name(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BadArg, "{bad:?}");
        }
        for good in ["a", "alice:phone", "a.b", "..", "a-b_c/d", "élan:ü"] {
            validate_name(good).unwrap();
            validate_extension(good).unwrap();
        }
        let msg = validate_name("a@b").unwrap_err().to_string();
        assert!(msg.contains("'@'"), "{msg}");
    }

    #[test]
    fn pattern_validation_rejections() {
        for bad in ["", "$", ":$", "a:$:b", "a:$$", "a b", "a:...", "a,b", "a:"] {
            assert!(BlessingPattern::new(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn display_from_str_round_trip(
            components in prop::collection::vec("[a-z0-9._-]{1,6}", 1..4),
            exact: bool,
        ) {
            prop_assume!(components.iter().all(|c| c != "..."));
            let mut text = components.join(":");
            if exact {
                text.push_str(":$");
            }
            let p: BlessingPattern = text.parse().unwrap();
            prop_assert_eq!(p.to_string(), text.clone());
            prop_assert_eq!(p.to_string().parse::<BlessingPattern>().unwrap(), p.clone());
            let name = components.join(":");
            prop_assert!(p.matches(&name));
            prop_assert_eq!(p.matches(&format!("{name}:x")), !exact);
        }

        #[test]
        fn parse_never_panics(s in ".{0,20}") {
            let _ = BlessingPattern::new(s.clone());
            let _ = validate_name(&s);
        }
    }
}
