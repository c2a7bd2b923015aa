//! Registry authentication: secrets, `WWW-Authenticate` challenges, Basic
//! credentials and the bearer-token cache.
//!
//! The token cache holds one entry per scope. A request that finds no fresh
//! token starts a fetch that every concurrent request for the same scope
//! shares (one request to the token realm, one result for all of them).
//! Expiry is tracked on tokio's clock so tests can pause and advance time;
//! the only wall-clock read is the age of a token that carries `issued_at`.

use base64::Engine as _;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::time::Instant;

use super::UpstreamError;

/// A secret string (password, token). `Debug` and `Display` print `***`;
/// the value is only reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(Arc::from(value.into()))
    }
    /// The secret value. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A username and password for an upstream registry (or its token realm).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<Secret>) -> Credentials {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }
    /// The `Authorization` header value for Basic authentication.
    pub fn basic_header(&self) -> Secret {
        Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                self.username,
                self.password.expose()
            ))
        ))
    }
}

/// One challenge of a `WWW-Authenticate` header (RFC 7235): a scheme and its
/// parameters (names lowercased, values unquoted), or a token68.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The auth scheme as sent (compare case-insensitively).
    pub scheme: String,
    pub params: Vec<(String, String)>,
    pub token68: Option<String>,
}

impl Challenge {
    /// The value of parameter `name` (case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed WWW-Authenticate header: {0}")]
pub struct ChallengeError(&'static str);

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn is_token68_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~+/".contains(&c)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] == b' ' || self.s[self.i] == b'\t') {
            self.i += 1;
        }
    }
    /// Skips whitespace and commas (empty list elements are allowed).
    fn skip_ws_commas(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b',') {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn token(&mut self) -> &str {
        let start = self.i;
        while self.i < self.s.len() && is_tchar(self.s[self.i]) {
            self.i += 1;
        }
        // Only ASCII token characters were consumed.
        std::str::from_utf8(&self.s[start..self.i]).unwrap_or_default()
    }
    fn quoted(&mut self) -> Result<String, ChallengeError> {
        // At the opening quote.
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(ChallengeError("unterminated quoted string")),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = self
                        .s
                        .get(self.i + 1)
                        .copied()
                        .ok_or(ChallengeError("dangling escape"))?;
                    out.push(c);
                    self.i += 2;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| ChallengeError("quoted string is not UTF-8"))
    }
}

/// Parses every challenge of a `WWW-Authenticate` header value, e.g.
/// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io"`.
pub fn parse_www_authenticate(value: &str) -> Result<Vec<Challenge>, ChallengeError> {
    let mut c = Cursor {
        s: value.as_bytes(),
        i: 0,
    };
    let mut out: Vec<Challenge> = Vec::new();
    c.skip_ws_commas();
    while c.peek().is_some() {
        let scheme = c.token().to_string();
        if scheme.is_empty() {
            return Err(ChallengeError("expected an auth scheme"));
        }
        let mut ch = Challenge {
            scheme,
            params: Vec::new(),
            token68: None,
        };
        let after_scheme = c.i;
        c.skip_ws();
        match c.peek() {
            // The scheme alone ends the header or this list element.
            None | Some(b',') => {
                out.push(ch);
                c.skip_ws_commas();
                continue;
            }
            Some(_) if c.i == after_scheme => {
                return Err(ChallengeError("unexpected character after scheme"));
            }
            Some(_) => {}
        }
        // Either a token68 or a list of auth-params: a token, `=`, then
        // something other than more `=` padding or the end of the element
        // is a parameter.
        let save = c.i;
        let name_len = c.token().len();
        c.skip_ws();
        let is_param = name_len > 0 && c.peek() == Some(b'=') && {
            c.i += 1;
            c.skip_ws();
            !matches!(c.peek(), None | Some(b'=') | Some(b','))
        };
        if !is_param {
            c.i = save;
            let start = c.i;
            while c.i < c.s.len() && is_token68_char(c.s[c.i]) {
                c.i += 1;
            }
            while c.i < c.s.len() && c.s[c.i] == b'=' {
                c.i += 1;
            }
            if c.i == start {
                return Err(ChallengeError("expected a parameter or token68"));
            }
            ch.token68 = Some(value[start..c.i].to_string());
            c.skip_ws();
            match c.peek() {
                None | Some(b',') => {}
                Some(_) => return Err(ChallengeError("unexpected character after token68")),
            }
            out.push(ch);
            c.skip_ws_commas();
            continue;
        }
        // auth-param list.
        c.i = save;
        loop {
            let name = c.token().to_ascii_lowercase();
            if name.is_empty() {
                return Err(ChallengeError("expected a parameter name"));
            }
            c.skip_ws();
            if c.peek() != Some(b'=') {
                return Err(ChallengeError("expected '=' after parameter name"));
            }
            c.i += 1;
            c.skip_ws();
            let v = if c.peek() == Some(b'"') {
                c.quoted()?
            } else {
                // A token by the grammar; leniently anything up to the next
                // separator, since unquoted URLs are seen in the wild.
                let start = c.i;
                while c.i < c.s.len() && !matches!(c.s[c.i], b',' | b' ' | b'\t' | b'"') {
                    c.i += 1;
                }
                if c.i == start {
                    return Err(ChallengeError("expected a parameter value"));
                }
                String::from_utf8_lossy(&c.s[start..c.i]).into_owned()
            };
            ch.params.push((name, v));
            c.skip_ws();
            match c.peek() {
                None => break,
                Some(b',') => {
                    c.skip_ws_commas();
                    // The next element is another parameter of this
                    // challenge (`token =`) or the start of a new challenge.
                    let save = c.i;
                    let t = c.token().to_string();
                    c.skip_ws();
                    let param_follows = !t.is_empty() && c.peek() == Some(b'=');
                    c.i = save;
                    if !param_follows {
                        break;
                    }
                }
                Some(_) => return Err(ChallengeError("expected ',' between parameters")),
            }
        }
        out.push(ch);
        c.skip_ws_commas();
    }
    if out.is_empty() {
        return Err(ChallengeError("no challenge"));
    }
    Ok(out)
}

/// How the upstream wants to be authenticated, as learned from a challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthScheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        /// The scope the challenge asked for, if any.
        scope: Option<String>,
    },
}

impl AuthScheme {
    /// Picks Bearer over Basic from a header's challenges. `None` when the
    /// header offers neither (or a Bearer without a realm).
    pub fn from_challenges(challenges: &[Challenge]) -> Option<AuthScheme> {
        if let Some(b) = challenges.iter().find(|c| c.is("bearer")) {
            let realm = b.param("realm")?.to_string();
            return Some(AuthScheme::Bearer {
                realm,
                service: b.param("service").map(str::to_string),
                scope: b.param("scope").map(str::to_string),
            });
        }
        challenges
            .iter()
            .any(|c| c.is("basic"))
            .then_some(AuthScheme::Basic)
    }
}

/// A token from a realm, with when to stop using it.
#[derive(Debug, Clone)]
pub struct Token {
    pub value: Secret,
    /// Refresh from this instant on (a little before the real expiry).
    pub refresh_at: Instant,
}

/// The JSON a token realm answers with.
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub issued_at: Option<String>,
}

/// Lifetime assumed when the realm sends no `expires_in`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// At most this much before expiry a token is refreshed.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(10);

impl TokenResponse {
    /// Turns the response into a cached token. `now` is tokio's clock and
    /// `wall_now` the system clock (used only to age an `issued_at`).
    pub fn into_token(self, now: Instant, wall_now: SystemTime) -> Result<Token, UpstreamError> {
        let value = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| {
                UpstreamError::Protocol("token response has neither token nor access_token".into())
            })?;
        let lifetime = self
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let age = self
            .issued_at
            .as_deref()
            .and_then(parse_rfc3339)
            .and_then(|issued| wall_now.duration_since(issued).ok())
            .unwrap_or(Duration::ZERO);
        let remaining = lifetime.saturating_sub(age);
        let margin = (lifetime / 10).min(MAX_REFRESH_MARGIN);
        Ok(Token {
            value: Secret::new(value),
            refresh_at: now + remaining.saturating_sub(margin),
        })
    }
}

/// RFC 3339 timestamp (`Z` or a numeric offset, optional fraction).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if s.ends_with('Z') || s.ends_with('z') {
        return humantime::parse_rfc3339_weak(&s.replace('z', "Z")).ok();
    }
    // ±HH:MM offset.
    if s.len() < 6 {
        return None;
    }
    let (base, off) = s.split_at(s.len() - 6);
    let ob = off.as_bytes();
    if !(ob[0] == b'+' || ob[0] == b'-') || ob[3] != b':' {
        return None;
    }
    let hours: u64 = off[1..3].parse().ok()?;
    let minutes: u64 = off[4..6].parse().ok()?;
    let offset = Duration::from_secs(hours * 3600 + minutes * 60);
    let t = humantime::parse_rfc3339_weak(&format!("{base}Z")).ok()?;
    // Local time = UTC + offset, so UTC = local - offset.
    if ob[0] == b'+' {
        t.checked_sub(offset)
    } else {
        t.checked_add(offset)
    }
}

/// Stale tokens are dropped when the cache holds this many scopes.
const PRUNE_AT: usize = 256;

type TokenFuture = Shared<BoxFuture<'static, Result<Token, UpstreamError>>>;

enum Slot {
    Ready(Token),
    Fetching(TokenFuture),
}

/// Bearer tokens per scope, with shared in-flight fetches.
#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<String, Slot>>,
}

impl TokenCache {
    /// A fresh cached token for `scope`, if any.
    pub fn cached(&self, scope: &str) -> Option<Secret> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.get(scope) {
            Some(Slot::Ready(t)) if Instant::now() < t.refresh_at => Some(t.value.clone()),
            _ => None,
        }
    }

    /// Forgets `rejected` for `scope` (the upstream answered 401 to it). A
    /// newer token fetched meanwhile is kept.
    pub fn invalidate(&self, scope: &str, rejected: &Secret) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Slot::Ready(t)) = slots.get(scope)
            && t.value == *rejected
        {
            slots.remove(scope);
        }
    }

    /// A fresh token for `scope`: the cached one, the one being fetched, or
    /// the result of `fetch` started now and shared with every concurrent
    /// caller.
    pub async fn get_or_fetch(
        &self,
        scope: &str,
        fetch: impl FnOnce() -> BoxFuture<'static, Result<Token, UpstreamError>>,
    ) -> Result<Secret, UpstreamError> {
        let fut = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get(scope) {
                Some(Slot::Ready(t)) if Instant::now() < t.refresh_at => {
                    return Ok(t.value.clone());
                }
                Some(Slot::Fetching(f)) => f.clone(),
                _ => {
                    let f = fetch().shared();
                    slots.insert(scope.to_string(), Slot::Fetching(f.clone()));
                    f
                }
            }
        };
        let result = fut.clone().await;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Slot::Fetching(f)) = slots.get(scope)
            && f.ptr_eq(&fut)
        {
            match &result {
                Ok(t) => {
                    if slots.len() >= PRUNE_AT {
                        let now = Instant::now();
                        slots.retain(|_, s| !matches!(s, Slot::Ready(t) if t.refresh_at <= now));
                    }
                    slots.insert(scope.to_string(), Slot::Ready(t.clone()));
                }
                Err(_) => {
                    slots.remove(scope);
                }
            }
        }
        result.map(|t| t.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn basic_header_is_rfc7617() {
        let c = Credentials::new("Aladdin", "open sesame");
        assert_eq!(
            c.basic_header().expose(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn secrets_never_print() {
        let c = Credentials::new("user", "hunter2");
        let dbg = format!("{c:?} {} {:?}", c.password, c.basic_header());
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("***"));
        assert!(dbg.contains("user"));
    }

    #[test]
    fn docker_hub_challenge() {
        let v = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#;
        let c = parse_www_authenticate(v).unwrap();
        assert_eq!(c.len(), 1);
        assert!(c[0].is("bearer"));
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("Service"), Some("registry.docker.io"));
        assert_eq!(
            AuthScheme::from_challenges(&c),
            Some(AuthScheme::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull".into()),
            })
        );
    }

    #[test]
    fn other_forms() {
        let c = parse_www_authenticate(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(AuthScheme::from_challenges(&c), Some(AuthScheme::Basic));

        let c = parse_www_authenticate("basic").unwrap();
        assert_eq!(AuthScheme::from_challenges(&c), Some(AuthScheme::Basic));

        // Several challenges, unquoted values (even a URL, which is not a
        // token), spaces around '=', escapes.
        let c = parse_www_authenticate(
            r#"Basic realm="a, \"b\"" , Bearer realm = https://x/token, service=reg,  error="insufficient_scope""#,
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some(r#"a, "b""#));
        assert_eq!(c[1].param("realm"), Some("https://x/token"));
        assert_eq!(c[1].param("service"), Some("reg"));
        assert_eq!(c[1].param("error"), Some("insufficient_scope"));
        assert!(matches!(
            AuthScheme::from_challenges(&c),
            Some(AuthScheme::Bearer { .. })
        ));

        // token68 forms.
        let c = parse_www_authenticate("Negotiate abc+/==, Basic").unwrap();
        assert_eq!(c[0].token68.as_deref(), Some("abc+/=="));
        assert!(c[1].is("basic"));
        let c = parse_www_authenticate("Negotiate a=").unwrap();
        assert_eq!(c[0].token68.as_deref(), Some("a="));
        // `name=` with nothing after it is a token68 by the grammar.
        let c = parse_www_authenticate("Bearer realm=").unwrap();
        assert_eq!(c[0].token68.as_deref(), Some("realm="));
        assert_eq!(AuthScheme::from_challenges(&c), None);

        // A Bearer without realm is unusable.
        let c = parse_www_authenticate(r#"Bearer service="x""#).unwrap();
        assert_eq!(AuthScheme::from_challenges(&c), None);
    }

    #[test]
    fn malformed() {
        for bad in [
            "",
            " , ",
            r#"Bearer realm="unterminated"#,
            r#"Bearer realm="x" service="y""#,
            "=x",
            r#"Bearer realm="x\"#,
        ] {
            assert!(parse_www_authenticate(bad).is_err(), "{bad:?}");
        }
    }

    fn render(chs: &[Challenge]) -> String {
        chs.iter()
            .map(|c| {
                let params = c
                    .params
                    .iter()
                    .map(|(k, v)| {
                        format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                if params.is_empty() {
                    c.scheme.clone()
                } else {
                    format!("{} {params}", c.scheme)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn challenge() -> impl Strategy<Value = Challenge> {
        (
            "[A-Za-z][A-Za-z0-9-]{0,10}",
            proptest::collection::vec(("[a-z][a-z0-9_]{0,8}", "[ -~]{0,30}"), 0..4),
        )
            .prop_map(|(scheme, params)| Challenge {
                scheme,
                params,
                token68: None,
            })
    }

    proptest! {
        #[test]
        fn challenge_round_trip(chs in proptest::collection::vec(challenge(), 1..4)) {
            let rendered = render(&chs);
            let parsed = parse_www_authenticate(&rendered).unwrap();
            prop_assert_eq!(parsed, chs);
        }

        #[test]
        fn challenge_never_panics(s in ".{0,200}") {
            let _ = parse_www_authenticate(&s);
        }
    }

    #[test]
    fn token_lifetimes() {
        let now = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let t = TokenResponse {
            token: None,
            access_token: Some("a".into()),
            expires_in: None,
            issued_at: None,
        }
        .into_token(now, wall)
        .unwrap();
        assert_eq!(t.value.expose(), "a");
        assert_eq!(t.refresh_at, now + Duration::from_secs(54));

        // issued 50 s ago with 300 s to live: 250 s left, refreshed 10 s early.
        let issued = humantime::format_rfc3339_seconds(wall - Duration::from_secs(50)).to_string();
        let t = TokenResponse {
            token: Some("t".into()),
            access_token: Some("ignored".into()),
            expires_in: Some(300),
            issued_at: Some(issued),
        }
        .into_token(now, wall)
        .unwrap();
        assert_eq!(t.value.expose(), "t");
        assert_eq!(t.refresh_at, now + Duration::from_secs(240));

        // Issued longer ago than it lives: already stale.
        let t = TokenResponse {
            token: Some("t".into()),
            access_token: None,
            expires_in: Some(60),
            issued_at: Some("2000-01-01T00:00:00Z".into()),
        }
        .into_token(now, wall)
        .unwrap();
        assert_eq!(t.refresh_at, now);

        let none = TokenResponse {
            token: Some(String::new()),
            access_token: None,
            expires_in: None,
            issued_at: None,
        };
        assert!(none.into_token(now, wall).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn token_cache_shares_fetches_and_expires() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cache = Arc::new(TokenCache::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let fetcher = |calls: Arc<AtomicUsize>, value: &'static str| {
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(Token {
                        value: Secret::new(value),
                        refresh_at: Instant::now() + Duration::from_secs(60),
                    })
                }
                .boxed()
            }
        };
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move { cache.get_or_fetch("s", fetcher(calls, "t1")).await })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap().expose(), "t1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.cached("s").unwrap().expose(), "t1");
        assert!(cache.cached("other").is_none());

        // Only the rejected token is forgotten.
        cache.invalidate("s", &Secret::new("not-it"));
        assert!(cache.cached("s").is_some());
        cache.invalidate("s", &Secret::new("t1"));
        assert!(cache.cached("s").is_none());
        let t = cache.get_or_fetch("s", fetcher(calls.clone(), "t2")).await;
        assert_eq!(t.unwrap().expose(), "t2");

        // Expiry on tokio's clock.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(cache.cached("s").is_none());
        let t = cache.get_or_fetch("s", fetcher(calls.clone(), "t3")).await;
        assert_eq!(t.unwrap().expose(), "t3");
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        // A failed fetch is shared but not cached.
        let failing = || async { Err(UpstreamError::Unauthorized("no".into())) }.boxed();
        assert!(cache.get_or_fetch("x", failing).await.is_err());
        let t = cache.get_or_fetch("x", fetcher(calls.clone(), "t4")).await;
        assert_eq!(t.unwrap().expose(), "t4");
    }

    #[test]
    fn rfc3339_offsets() {
        let z = parse_rfc3339("2024-05-01T12:00:00Z").unwrap();
        assert_eq!(parse_rfc3339("2024-05-01T14:00:00+02:00"), Some(z));
        assert_eq!(parse_rfc3339("2024-05-01T10:30:00-01:30"), Some(z));
        assert_eq!(
            parse_rfc3339("2024-05-01T12:00:00.5Z"),
            Some(z + Duration::from_millis(500))
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2024-05-01T12:00:00+0200"), None);
    }
}
