//! Repository names, tags and manifest references, checked against the
//! grammars of the OCI Distribution Spec.

use std::fmt;
use std::str::FromStr;

use super::digest::{Digest, DigestError};

/// Longest repository name accepted (Distribution's limit, host included).
pub const MAX_NAME_LEN: usize = 255;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("repository name component {0:?} does not match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*")]
    BadComponent(String),
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for RepoName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        for c in s.split('/') {
            if !valid_component(c) {
                return Err(NameError::BadComponent(c.to_string()));
            }
        }
        Ok(RepoName(s.into()))
    }
}

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tag must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
pub struct TagError;

impl FromStr for Tag {
    type Err = TagError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
        let rest_ok = b
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if first_ok && rest_ok && b.len() <= 128 {
            Ok(Tag(s.into()))
        } else {
            Err(TagError)
        }
    }
}

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// The `<reference>` of a manifest route: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid digest: {0}")]
    Digest(#[from] DigestError),
    #[error("invalid tag: {0}")]
    Tag(#[from] TagError),
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// A tag pattern: a glob (`*` any run of characters, `?` one character),
/// or a regular expression after `regex:`. Either must match the whole tag.
#[derive(Debug, Clone)]
pub struct TagPattern(regex::Regex);

impl std::str::FromStr for TagPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<TagPattern, String> {
        let re = match s.strip_prefix("regex:") {
            Some(r) => format!("^(?:{r})$"),
            None => {
                let mut re = String::from("^");
                for c in s.chars() {
                    match c {
                        '*' => re.push_str(".*"),
                        '?' => re.push('.'),
                        c => re.push_str(&regex::escape(&c.to_string())),
                    }
                }
                re.push('$');
                re
            }
        };
        regex::Regex::new(&re)
            .map(TagPattern)
            .map_err(|e| format!("{s:?}: {e}"))
    }
}

impl TagPattern {
    pub fn matches(&self, tag: &str) -> bool {
        self.0.is_match(tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for ok in ["a", "library/ubuntu", "a.b/c_d/e__f/g--h-i", "0/1", "x-y"] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a/../b", "..", "a%2Fb",
            "a b", "a/.b", "a:b",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad}");
        }
        assert!("a".repeat(256).parse::<RepoName>().is_err());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "_x", "1.0.0-rc_1", &"a".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129), "ü"] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn name_round_trip(s in "[a-z0-9]{1,8}((\\.|_|__|-+)[a-z0-9]{1,8}){0,2}(/[a-z0-9]{1,8}((\\.|_|__|-+)[a-z0-9]{1,8}){0,2}){0,3}") {
            let n: RepoName = s.parse().unwrap();
            prop_assert_eq!(n.to_string(), s);
        }

        #[test]
        fn tag_round_trip(s in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}") {
            let t: Tag = s.parse().unwrap();
            prop_assert_eq!(t.as_str(), s.as_str());
            let r: Reference = s.parse().unwrap();
            prop_assert_eq!(r.to_string(), s);
        }

        #[test]
        fn arbitrary_never_panics(s in ".{0,300}") {
            let _ = s.parse::<RepoName>();
            let _ = s.parse::<Tag>();
            let _ = s.parse::<Reference>();
        }
    }
}

/// The opaque id of an upload session (a UUID wharf issued).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UploadId(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upload id must be 1 to 64 characters of [a-zA-Z0-9-]")]
pub struct UploadIdError;

impl UploadId {
    /// A fresh random id.
    pub fn new_random() -> UploadId {
        UploadId(uuid::Uuid::new_v4().to_string().into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UploadId {
    type Err = UploadIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            Ok(UploadId(s.into()))
        } else {
            Err(UploadIdError)
        }
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}
