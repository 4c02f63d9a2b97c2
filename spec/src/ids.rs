//! Identifiers: server names, user ids, device ids and group ids. Each is constructed only by parsing, so a
//! value of one of these types is always well formed.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A server name must be a DNS name or IP literal, optionally with `:port`.
    #[error("invalid server name: {0}")]
    ServerName(&'static str),
    /// A user id is `@localpart:server`.
    #[error("invalid user id: {0}")]
    UserId(&'static str),
    /// A localpart is `[a-z0-9._=-]+`, at most 64 bytes.
    #[error("invalid localpart: {0}")]
    Localpart(&'static str),
    /// A device id is `[A-Za-z0-9_-]`, 1 to 32 bytes.
    #[error("invalid device id: {0}")]
    DeviceId(&'static str),
    /// A group id is `!local:hub`, local `[A-Za-z0-9._=-]`, 1 to 64 bytes.
    #[error("invalid group id: {0}")]
    GroupId(&'static str),
}

/// Longest localpart, in bytes.
pub const MAX_LOCALPART_BYTES: usize = 64;
/// Longest server name, in bytes (a DNS name is at most 253, plus `:65535`).
pub const MAX_SERVER_NAME_BYTES: usize = 255 + 6;
/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 32;
/// Longest local part of a group id, in bytes.
pub const MAX_GROUP_LOCAL_BYTES: usize = 64;

macro_rules! string_newtype {
    ($name:ident, $parse:path, $example:literal) => {
        impl $name {
            /// The identifier as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $parse(s)
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                $parse(&s)
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// A server name: a DNS name or IP literal, optionally followed by `:port`
/// (`example.org`, `chat.example.org:8448`, `127.0.0.1:8008`, `[::1]:8448`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "example.org")]
pub struct ServerName(String);
string_newtype!(ServerName, ServerName::parse, "example.org");

impl ServerName {
    /// Parses a server name.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::ServerName("empty"));
        }
        if s.len() > MAX_SERVER_NAME_BYTES {
            return Err(IdError::ServerName("too long"));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let end = rest.find(']').ok_or(IdError::ServerName("unclosed ["))?;
            let host = &rest[..end];
            host.parse::<std::net::Ipv6Addr>().map_err(|_| IdError::ServerName("bad IPv6 literal"))?;
            (None, &rest[end + 1..])
        } else {
            match s.rfind(':') {
                Some(i) => (Some(&s[..i]), &s[i..]),
                None => (Some(s), ""),
            }
        };
        if let Some(host) = host {
            if host.is_empty() || host.len() > 253 {
                return Err(IdError::ServerName("bad host length"));
            }
            let ok = host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
            if !ok {
                return Err(IdError::ServerName("bad host"));
            }
        }
        if !port.is_empty() {
            let digits = port.strip_prefix(':').ok_or(IdError::ServerName("junk after host"))?;
            if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(IdError::ServerName("bad port"));
            }
            if digits.parse::<u32>().map_or(true, |p| p == 0 || p > 65535) {
                return Err(IdError::ServerName("port out of range"));
            }
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// The host, as written in the name and in URL authorities: everything before `:port`,
    /// so a DNS name, an IPv4 address or an IPv6 address **in brackets**
    /// (`chat.example.org:8448` → `chat.example.org`, `[::1]:8448` → `[::1]`). Without its
    /// port, a name is its host: this is the form to compare names by, and itself a valid
    /// server name. For the address of an IP literal, use [`ip`](Self::ip).
    pub fn host(&self) -> &str {
        let name = self.0.as_str();
        if name.starts_with('[') {
            // invariant: parsing checked that the bracket closes
            let end = name.find(']').unwrap_or(name.len() - 1);
            return &name[..=end];
        }
        match name.rfind(':') {
            Some(colon) => &name[..colon],
            None => name,
        }
    }

    /// The explicit port, if the name has one (`example.org:8448` → 8448, never 0).
    pub fn port(&self) -> Option<u16> {
        self.0[self.host().len()..].strip_prefix(':').and_then(|port| port.parse().ok())
    }

    /// The address, if the host is an IP literal (`10.0.0.1`, `[::1]:8448` → `::1`); `None`
    /// for a DNS name. The form for IP SANs and socket addresses.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        let host = self.host();
        match host.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().ok().map(std::net::IpAddr::V6),
            None => host.parse::<std::net::Ipv4Addr>().ok().map(std::net::IpAddr::V4),
        }
    }

    /// The name a TLS certificate for this server is issued to and checked against: the
    /// address of an IP literal without brackets (`::1`, an IP SAN), else the DNS name.
    pub fn tls_name(&self) -> String {
        match self.ip() {
            Some(ip) => ip.to_string(),
            None => self.host().to_owned(),
        }
    }
}

/// A user id: `@localpart:server`, with localpart `[a-z0-9._=-]+` of at most 64 bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "@alice:example.org")]
pub struct UserId(String);
string_newtype!(UserId, UserId::parse, "@alice:example.org");

impl UserId {
    /// Parses `@localpart:server`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let rest = s.strip_prefix('@').ok_or(IdError::UserId("must start with @"))?;
        let colon = rest.find(':').ok_or(IdError::UserId("missing :server"))?;
        validate_localpart(&rest[..colon]).map_err(|_| IdError::UserId("bad localpart"))?;
        let server = ServerName::parse(&rest[colon + 1..]).map_err(|_| IdError::UserId("bad server"))?;
        Ok(Self(format!("@{}:{}", &rest[..colon], server)))
    }

    /// Builds a user id from parts that are already valid.
    pub fn new(localpart: &str, server: &ServerName) -> Result<Self, IdError> {
        validate_localpart(localpart)?;
        Ok(Self(format!("@{localpart}:{server}")))
    }

    /// The localpart (between `@` and the first `:`).
    pub fn localpart(&self) -> &str {
        let colon = self.0.find(':').unwrap_or(self.0.len()); // invariant: parsed with a colon
        &self.0[1..colon]
    }

    /// The server part.
    pub fn server(&self) -> &str {
        let colon = self.0.find(':').unwrap_or(self.0.len()); // invariant: parsed with a colon
        &self.0[colon + 1..]
    }

    /// The server part, as a [`ServerName`] (valid: it was parsed with the id).
    pub fn server_name(&self) -> ServerName {
        ServerName(self.server().to_owned())
    }

    /// Whether this user's server is `server`.
    pub fn is_of(&self, server: &ServerName) -> bool {
        self.server() == server.as_str()
    }
}

/// Checks a localpart: `[a-z0-9._=-]+`, at most [`MAX_LOCALPART_BYTES`].
pub fn validate_localpart(localpart: &str) -> Result<(), IdError> {
    if localpart.is_empty() {
        return Err(IdError::Localpart("empty"));
    }
    if localpart.len() > MAX_LOCALPART_BYTES {
        return Err(IdError::Localpart("longer than 64 bytes"));
    }
    if !localpart.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-')) {
        return Err(IdError::Localpart("only a-z, 0-9 and . _ = - are allowed"));
    }
    Ok(())
}

/// A device id, unique per user: `[A-Za-z0-9_-]`, 1 to 32 bytes. Chosen by the server.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "QWERTYUIOP")]
pub struct DeviceId(String);
string_newtype!(DeviceId, DeviceId::parse, "QWERTYUIOP");

impl DeviceId {
    /// Parses a device id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > MAX_DEVICE_ID_BYTES {
            return Err(IdError::DeviceId("must be 1 to 32 bytes"));
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(IdError::DeviceId("only A-Z, a-z, 0-9, _ and - are allowed"));
        }
        Ok(Self(s.to_owned()))
    }
}

/// A group id: `!local:hub`, where `hub` is the server that orders the group
/// (`spec/groups.md` §1) and `local` is 1 to 64 bytes of `[A-Za-z0-9._=-]`. The MLS group id is
/// the UTF-8 of the whole string ([`GroupId::mls_group_id`]), so a group cannot change hubs.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "!team:example.org")]
pub struct GroupId(String);
string_newtype!(GroupId, GroupId::parse, "!team:example.org");

impl GroupId {
    /// Parses `!local:hub`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let rest = s.strip_prefix('!').ok_or(IdError::GroupId("must start with !"))?;
        let colon = rest.find(':').ok_or(IdError::GroupId("missing :hub"))?;
        let local = &rest[..colon];
        if local.is_empty() || local.len() > MAX_GROUP_LOCAL_BYTES {
            return Err(IdError::GroupId("the local part must be 1 to 64 bytes"));
        }
        if !local.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'=' | b'-')) {
            return Err(IdError::GroupId("the local part allows only A-Z, a-z, 0-9 and . _ = -"));
        }
        let hub = ServerName::parse(&rest[colon + 1..]).map_err(|_| IdError::GroupId("bad hub server name"))?;
        Ok(Self(format!("!{local}:{hub}")))
    }

    /// Builds a group id hubbed on `hub`.
    pub fn new(local: &str, hub: &ServerName) -> Result<Self, IdError> {
        Self::parse(&format!("!{local}:{hub}"))
    }

    /// The local part (between `!` and the first `:`).
    pub fn local(&self) -> &str {
        let colon = self.0.find(':').unwrap_or(self.0.len()); // invariant: parsed with a colon
        &self.0[1..colon]
    }

    /// The hub: the server that orders the group.
    pub fn hub(&self) -> ServerName {
        let colon = self.0.find(':').unwrap_or(self.0.len()); // invariant: parsed with a colon
        ServerName(self.0[colon + 1..].to_owned())
    }

    /// The MLS group id: the UTF-8 bytes of the whole id.
    pub fn mls_group_id(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for ok in ["example.org", "chat.example.org:8448", "127.0.0.1:8008", "[::1]:8448", "localhost"] {
            assert!(ServerName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "exa mple.org", "example.org:", "example.org:0", "example.org:70000", "-a.org", "[::1", "a..b", "[zz]"] {
            assert!(ServerName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ServerName::parse("Example.ORG").unwrap().as_str(), "example.org");
    }

    #[test]
    fn server_name_parts() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = |a, b, c, d| Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
        let v6 = |s: &str| Some(IpAddr::V6(s.parse::<Ipv6Addr>().unwrap()));
        // name, host, port, ip, tls name
        let cases = [
            ("example.org", "example.org", None, None, "example.org"),
            ("Chat.Example.org:8448", "chat.example.org", Some(8448), None, "chat.example.org"),
            ("localhost:1", "localhost", Some(1), None, "localhost"),
            ("10.0.0.1", "10.0.0.1", None, v4(10, 0, 0, 1), "10.0.0.1"),
            ("127.0.0.1:65535", "127.0.0.1", Some(65535), v4(127, 0, 0, 1), "127.0.0.1"),
            ("[::1]", "[::1]", None, v6("::1"), "::1"),
            ("[::1]:8448", "[::1]", Some(8448), v6("::1"), "::1"),
            ("[2001:DB8::1]:443", "[2001:db8::1]", Some(443), v6("2001:db8::1"), "2001:db8::1"),
            ("[::ffff:10.0.0.1]:80", "[::ffff:10.0.0.1]", Some(80), v6("::ffff:10.0.0.1"), "::ffff:10.0.0.1"),
            // Four numeric labels are an address; anything else numeric is a DNS name.
            ("1.2.3", "1.2.3", None, None, "1.2.3"),
            ("1.2.3.4.5:9", "1.2.3.4.5", Some(9), None, "1.2.3.4.5"),
        ];
        for (name, host, port, ip, tls) in cases {
            let parsed = ServerName::parse(name).unwrap();
            assert_eq!(parsed.host(), host, "{name}");
            assert_eq!(parsed.port(), port, "{name}");
            assert_eq!(parsed.ip(), ip, "{name}");
            assert_eq!(parsed.tls_name(), tls, "{name}");
            // The host is a server name of its own: the name without its port.
            let bare = ServerName::parse(parsed.host()).unwrap();
            assert_eq!((bare.host(), bare.port(), bare.ip()), (host, None, ip), "{name}");
        }
    }

    #[test]
    fn user_ids() {
        let u = UserId::parse("@alice.b=c-d_e:example.org:8448").unwrap();
        assert_eq!(u.localpart(), "alice.b=c-d_e");
        assert_eq!(u.server(), "example.org:8448");
        assert_eq!(u.server_name(), ServerName::parse("example.org:8448").unwrap());
        assert!(u.is_of(&ServerName::parse("example.org:8448").unwrap()));
        assert!(!u.is_of(&ServerName::parse("example.org").unwrap()));
        for bad in ["alice:example.org", "@Alice:example.org", "@:example.org", "@alice", "@alice:", "@al ice:x.org"] {
            assert!(UserId::parse(bad).is_err(), "{bad}");
        }
        let long = format!("@{}:x.org", "a".repeat(65));
        assert!(UserId::parse(&long).is_err());
        let max = format!("@{}:x.org", "a".repeat(64));
        assert!(UserId::parse(&max).is_ok());
    }

    #[test]
    fn serde_parses() {
        let u: UserId = serde_json::from_str("\"@bob:example.org\"").unwrap();
        assert_eq!(serde_json::to_string(&u).unwrap(), "\"@bob:example.org\"");
        assert!(serde_json::from_str::<UserId>("\"bob\"").is_err());
        assert!(serde_json::from_str::<DeviceId>("\"a/b\"").is_err());
    }

    #[test]
    fn group_ids() {
        let g = GroupId::parse("!Team.1_=-:Chat.Example.org:8448").unwrap();
        assert_eq!(g.as_str(), "!Team.1_=-:chat.example.org:8448", "the hub is lowercased like any server name");
        assert_eq!(g.local(), "Team.1_=-");
        assert_eq!(g.hub(), ServerName::parse("chat.example.org:8448").unwrap());
        assert_eq!(g.mls_group_id(), b"!Team.1_=-:chat.example.org:8448");
        assert_eq!(GroupId::new("team", &ServerName::parse("[::1]:8448").unwrap()).unwrap().hub().as_str(), "[::1]:8448");
        let long = format!("!{}:x.org", "a".repeat(MAX_GROUP_LOCAL_BYTES + 1));
        for bad in ["team:x.org", "!:x.org", "!team", "!team:", "!te am:x.org", "!te/am:x.org", "!team:bad host", long.as_str()] {
            assert!(GroupId::parse(bad).is_err(), "{bad}");
        }
        assert!(GroupId::parse(&format!("!{}:x.org", "a".repeat(MAX_GROUP_LOCAL_BYTES))).is_ok());
        let json = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<GroupId>(&json).unwrap(), g);
        assert!(serde_json::from_str::<GroupId>("\"@alice:x.org\"").is_err());
    }
}
