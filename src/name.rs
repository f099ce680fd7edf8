//! Function names: the one rule for what a name may be, checked at the edge so
//! the rest of the daemon can use a name as a path component without worry.

use std::fmt;

use crate::error::{Error, Result};

/// A validated function name: `^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`, not reserved.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FunctionName(String);

impl FunctionName {
    /// Checks `s` against the naming rule; the error says why in one line.
    pub fn parse(s: &str) -> Result<FunctionName> {
        let shown = || format!("{:?}", s.chars().take(80).collect::<String>());
        if s.starts_with('_') {
            return Err(Error::BadName(format!(
                "invalid function name {}: names starting with '_' are reserved",
                shown()
            )));
        }
        if matches!(s, "mgmt" | "async" | "async-function") {
            return Err(Error::BadName(format!(
                "invalid function name {}: it is reserved",
                shown()
            )));
        }
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !first_ok || !rest_ok || s.len() > 64 {
            return Err(Error::BadName(format!(
                "invalid function name {}: use 1 to 64 letters, digits, '_' or '-', starting with a letter or digit",
                shown()
            )));
        }
        Ok(FunctionName(s.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for the protected default function.
    pub fn is_echo(&self) -> bool {
        self.0 == "echo"
    }
}

impl fmt::Display for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_are_accepted() {
        for ok in ["a", "echo", "A9", "avg_2-x", &"x".repeat(64), "0"] {
            assert!(FunctionName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn invalid_and_reserved_names_are_refused_with_a_reason() {
        for bad in [
            "",
            "_x",
            "-x",
            "mgmt",
            "a.py",
            "..",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(65),
            "x.",
        ] {
            let err = FunctionName::parse(bad).unwrap_err();
            assert_eq!(err.status(), 400, "{bad:?}");
            assert!(
                err.to_string().starts_with("invalid function name"),
                "{err}"
            );
        }
    }

    proptest::proptest! {
        /// Whatever the input, parsing never panics, and anything accepted is a
        /// single safe path component matching the naming rule.
        #[test]
        fn any_accepted_name_is_one_safe_component(s in "\\PC{0,80}|[A-Za-z0-9_.%/-]{0,70}") {
            if let Ok(n) = FunctionName::parse(&s) {
                let n = n.as_str();
                proptest::prop_assert!(n.len() <= 64 && !n.is_empty());
                proptest::prop_assert!(n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
                proptest::prop_assert!(n.as_bytes()[0].is_ascii_alphanumeric());
                proptest::prop_assert!(n != "mgmt" && n != "async" && n != "async-function");
            }
        }
    }
}
