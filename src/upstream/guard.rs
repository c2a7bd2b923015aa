//! The upstream's trust boundary, enforced where connections are made.
//!
//! An upstream is trusted with what configuration gave it: its own host,
//! and the token realm hosts named for it (`token_realm_hosts`, plus
//! `auth.docker.io` for Docker Hub). Every other host wharf is sent to (a
//! redirect to a CDN, mostly) is reached only at a public address: a
//! connection to a loopback, private (RFC 1918, CGNAT, unique local),
//! link-local (169.254/16, where cloud metadata lives; fe80::/10) address is
//! refused unless the upstream itself is at an address of that same kind
//! (an upstream on loopback may send wharf to a CDN on loopback, one on a
//! private network to a store on a private network). Unspecified,
//! multicast, broadcast and reserved addresses are always refused.
//!
//! The check sits in the connector, on the addresses the connection will
//! use: a name is resolved once, its refused addresses are dropped before
//! connecting, so a name cannot resolve to a public address when checked
//! and to a private one when connected (DNS rebinding). IP literals are
//! checked by the same rule. The upstream's own kinds of address are
//! learned from its literal or when its name resolves.

use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use http::Uri;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use tower_service::Service;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The kinds of address the rule tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    Public,
    Loopback,
    Private,
    LinkLocal,
    /// Unspecified, multicast, broadcast, reserved: never connected to
    /// (`0.0.0.0` reaches this machine on Linux).
    Forbidden,
}

impl AddrClass {
    fn bit(self) -> u8 {
        match self {
            AddrClass::Public => 0,
            AddrClass::Loopback => 1,
            AddrClass::Private => 2,
            AddrClass::LinkLocal => 4,
            AddrClass::Forbidden => 0,
        }
    }
}

/// What kind of address `ip` is (an IPv4-mapped IPv6 address as its IPv4
/// address).
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 || ip.is_multicast() || ip.is_broadcast() || a >= 240 {
        AddrClass::Forbidden
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if ip.is_link_local() {
        AddrClass::LinkLocal
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        // RFC 1918, and the shared (CGNAT) range 100.64/10.
        AddrClass::Private
    } else {
        AddrClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let first = ip.segments()[0];
    if ip.is_unspecified() || ip.is_multicast() {
        AddrClass::Forbidden
    } else if ip.is_loopback() {
        AddrClass::Loopback
    } else if first & 0xffc0 == 0xfe80 {
        AddrClass::LinkLocal
    } else if first & 0xfe00 == 0xfc00 {
        // Unique local addresses, fc00::/7.
        AddrClass::Private
    } else {
        AddrClass::Public
    }
}

/// A connection wharf refused to make.
#[derive(Debug, Clone)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Refused {}

/// One upstream's trust boundary.
#[derive(Debug)]
pub struct Policy {
    /// The upstream's host, lowercase, without brackets.
    upstream: String,
    /// Hosts never filtered: the upstream and its token realm hosts.
    trusted: Vec<String>,
    /// The kinds of address the upstream was seen at (bits of
    /// [`AddrClass`]).
    upstream_classes: AtomicU8,
}

/// `host` lowercase, without the brackets of an IPv6 literal.
pub fn normal_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

impl Policy {
    /// The boundary of an upstream on `upstream` (a host, without port),
    /// whose token realms may also be on `realm_hosts`.
    pub fn new(upstream: &str, realm_hosts: &[String]) -> Policy {
        let upstream = normal_host(upstream);
        let mut trusted = vec![upstream.clone()];
        trusted.extend(realm_hosts.iter().map(|h| normal_host(h)));
        let p = Policy {
            upstream,
            trusted,
            upstream_classes: AtomicU8::new(0),
        };
        if let Ok(ip) = p.upstream.parse::<IpAddr>() {
            p.learn(ip);
        }
        p
    }

    fn learn(&self, ip: IpAddr) {
        self.upstream_classes
            .fetch_or(classify(ip).bit(), Ordering::Relaxed);
    }

    fn trusts(&self, host: &str) -> bool {
        self.trusted.iter().any(|t| t == host)
    }

    /// Whether a connection to `ip` for `host` (normalised) is allowed.
    pub fn permits(&self, host: &str, ip: IpAddr) -> bool {
        if self.trusts(host) {
            return true;
        }
        match classify(ip) {
            AddrClass::Public => true,
            AddrClass::Forbidden => false,
            c => self.upstream_classes.load(Ordering::Relaxed) & c.bit() != 0,
        }
    }

    fn refused(&self, host: &str, ip: Option<IpAddr>) -> Refused {
        let what = match ip {
            Some(ip) => format!("{ip} ({:?})", classify(ip)),
            None => "only addresses outside its trust boundary".to_string(),
        };
        Refused(format!(
            "not connecting to {host}: {what} is not reachable from upstream {}",
            self.upstream
        ))
    }

    /// Keeps the addresses of `host` a connection may use; learns the
    /// upstream's own.
    pub fn filter(
        &self,
        host: &str,
        addrs: impl Iterator<Item = SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refused> {
        let host = normal_host(host);
        let addrs: Vec<SocketAddr> = addrs.collect();
        if host == self.upstream {
            for a in &addrs {
                self.learn(a.ip());
            }
        }
        let kept: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| self.permits(&host, a.ip()))
            .collect();
        if kept.is_empty() && !addrs.is_empty() {
            return Err(self.refused(&host, (addrs.len() == 1).then(|| addrs[0].ip())));
        }
        Ok(kept)
    }
}

/// A resolver that drops the addresses [`Policy`] refuses.
#[derive(Clone)]
pub struct GuardedResolver<R = GaiResolver> {
    pub inner: R,
    pub policy: Arc<Policy>,
}

impl<R> Service<Name> for GuardedResolver<R>
where
    R: Service<Name> + Send + 'static,
    R::Response: Iterator<Item = SocketAddr>,
    R::Error: Into<BoxError>,
    R::Future: Send + 'static,
{
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        let resolving = self.inner.call(name);
        async move {
            let addrs = resolving.await.map_err(Into::into)?;
            Ok(policy.filter(&host, addrs)?.into_iter())
        }
        .boxed()
    }
}

/// A connector that refuses IP-literal hosts [`Policy`] refuses (names are
/// checked by [`GuardedResolver`] inside `inner`).
#[derive(Clone)]
pub struct GuardedConnector<C> {
    pub inner: C,
    pub policy: Arc<Policy>,
}

impl<C> Service<Uri> for GuardedConnector<C>
where
    C: Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<C::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = normal_host(uri.host().unwrap_or_default());
        if let Ok(ip) = host.parse::<IpAddr>()
            && !self.policy.permits(&host, ip)
        {
            let refused = self.policy.refused(&host, Some(ip));
            return async move { Err(refused.into()) }.boxed();
        }
        let connecting = self.inner.call(uri);
        async move { connecting.await.map_err(Into::into) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classes() {
        for (a, c) in [
            ("93.184.216.34", AddrClass::Public),
            ("2606:4700::1111", AddrClass::Public),
            ("127.0.0.1", AddrClass::Loopback),
            ("127.9.9.9", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("10.1.2.3", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("172.31.255.255", AddrClass::Private),
            ("192.168.1.1", AddrClass::Private),
            ("100.64.0.1", AddrClass::Private),
            ("fd00::1", AddrClass::Private),
            ("::ffff:10.0.0.1", AddrClass::Private),
            ("169.254.169.254", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("0.0.0.0", AddrClass::Forbidden),
            ("0.1.2.3", AddrClass::Forbidden),
            ("::", AddrClass::Forbidden),
            ("224.0.0.1", AddrClass::Forbidden),
            ("255.255.255.255", AddrClass::Forbidden),
            ("240.0.0.1", AddrClass::Forbidden),
            ("ff02::1", AddrClass::Forbidden),
            ("172.32.0.1", AddrClass::Public),
            ("100.128.0.1", AddrClass::Public),
        ] {
            assert_eq!(classify(ip(a)), c, "{a}");
        }
    }

    #[test]
    fn a_public_upstream_reaches_only_public_addresses_elsewhere() {
        let p = Policy::new("203.0.113.7", &[]);
        for refused in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "10.0.0.5",
            "192.168.0.1",
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
        ] {
            assert!(!p.permits("cdn.example", ip(refused)), "{refused}");
            assert!(!p.permits(refused, ip(refused)), "{refused}");
        }
        assert!(p.permits("cdn.example", ip("93.184.216.34")));
        // The upstream itself is never filtered.
        assert!(p.permits("203.0.113.7", ip("203.0.113.7")));
    }

    #[test]
    fn an_upstream_on_loopback_or_a_private_network_reaches_its_own_kind() {
        let p = Policy::new("127.0.0.1", &[]);
        assert!(p.permits("127.0.0.2", ip("127.0.0.2")));
        assert!(p.permits("localhost", ip("::1")));
        assert!(!p.permits("10.0.0.1", ip("10.0.0.1")));
        assert!(!p.permits("169.254.169.254", ip("169.254.169.254")));
        assert!(!p.permits("0.0.0.0", ip("0.0.0.0")));

        let p = Policy::new("[fd00::10]", &[]);
        assert!(p.permits("store.internal", ip("10.1.1.1")));
        assert!(!p.permits("store.internal", ip("127.0.0.1")));
    }

    #[test]
    fn realm_hosts_are_trusted_like_the_upstream() {
        let p = Policy::new("203.0.113.7", &["Auth.Internal".to_string()]);
        assert!(p.permits("auth.internal", ip("10.0.0.9")));
        assert!(!p.permits("other.internal", ip("10.0.0.9")));
    }

    /// A resolver answering every name with fixed addresses.
    #[derive(Clone)]
    struct Fixed(Vec<SocketAddr>);

    impl Service<Name> for Fixed {
        type Response = std::vec::IntoIter<SocketAddr>;
        type Error = std::io::Error;
        type Future = futures::future::Ready<Result<Self::Response, std::io::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Name) -> Self::Future {
            futures::future::ready(Ok(self.0.clone().into_iter()))
        }
    }

    fn sa(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 0)
    }

    #[tokio::test]
    async fn names_are_checked_on_the_addresses_they_resolve_to() {
        let policy = Arc::new(Policy::new("registry.example", &[]));
        let resolve = |addrs: Vec<&str>, name: &str| {
            let mut r = GuardedResolver {
                inner: Fixed(addrs.into_iter().map(sa).collect()),
                policy: policy.clone(),
            };
            r.call(name.parse().unwrap())
        };
        // The upstream resolves to a public address: that is its kind.
        let got: Vec<_> = resolve(vec!["198.51.100.1"], "registry.example")
            .await
            .unwrap()
            .collect();
        assert_eq!(got, vec![sa("198.51.100.1")]);
        // A name resolving to a private and a public address keeps the
        // public one; one resolving only to loopback is refused.
        let got: Vec<_> = resolve(vec!["10.0.0.1", "93.184.216.34"], "cdn.example")
            .await
            .unwrap()
            .collect();
        assert_eq!(got, vec![sa("93.184.216.34")]);
        let err = resolve(vec!["127.0.0.1"], "rebind.example")
            .await
            .expect_err("refused");
        assert!(err.downcast_ref::<Refused>().is_some(), "{err}");
        // The upstream's own name is never filtered, and a private
        // upstream lets its own kind through.
        let got: Vec<_> = resolve(vec!["10.9.9.9"], "registry.example")
            .await
            .unwrap()
            .collect();
        assert_eq!(got, vec![sa("10.9.9.9")]);
        let got: Vec<_> = resolve(vec!["10.0.0.1"], "cdn.example")
            .await
            .unwrap()
            .collect();
        assert_eq!(got, vec![sa("10.0.0.1")]);
    }
}
