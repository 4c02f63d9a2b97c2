//! Integers of the wire with a meaning: [`Timestamp`], [`Seq`], [`ServerMsgId`] and [`GroupSeq`]. Each is a
//! `u64` in JSON (serde transparent, documented as a bare integer in the OpenAPI document), so
//! the types cannot be mixed up in code while the wire stays as it was.
//!
//! Databases that store signed 64-bit integers convert with `i64::try_from(value)` and
//! `T::try_from(i64)`: a value beyond `i64::MAX` (or a negative stored value) is an
//! [`OutOfRange`] error, never a wrapped number.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use utoipa::openapi::{schema::Schema, RefOr};

/// A value that does not fit the other integer type (a stored `i64` below 0, or a `u64` above
/// `i64::MAX` to store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{kind} out of range for a signed 64-bit integer")]
pub struct OutOfRange {
    kind: &'static str,
}

macro_rules! u64_newtype {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl TryFrom<i64> for $name {
            type Error = OutOfRange;
            fn try_from(value: i64) -> Result<Self, OutOfRange> {
                u64::try_from(value).map(Self).map_err(|_| OutOfRange { kind: stringify!($name) })
            }
        }
        impl TryFrom<$name> for i64 {
            type Error = OutOfRange;
            fn try_from(value: $name) -> Result<i64, OutOfRange> {
                i64::try_from(value.0).map_err(|_| OutOfRange { kind: stringify!($name) })
            }
        }
        // Documented as the bare integer it is on the wire (the same schema as `u64`).
        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                <u64 as utoipa::PartialSchema>::schema()
            }
        }
        impl utoipa::ToSchema for $name {
            fn name() -> Cow<'static, str> {
                <u64 as utoipa::ToSchema>::name()
            }
            fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
                <u64 as utoipa::ToSchema>::schemas(schemas)
            }
        }
    };
}

/// Milliseconds since the Unix epoch (like ruma's `MilliSecondsSinceUnixEpoch`): every
/// timestamp on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);
u64_newtype!(Timestamp);

impl Timestamp {
    /// The Unix epoch itself (0).
    pub const EPOCH: Self = Self(0);

    /// The current time of the system clock (the epoch if the clock is before 1970). The one
    /// definition of "now in milliseconds"; code that must be tested in simulated time takes a
    /// clock or a timestamp instead of calling this.
    pub fn now() -> Self {
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
    }

    /// The timestamp `millis` milliseconds after the epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `duration` later, saturating at the largest timestamp.
    pub fn saturating_add(self, duration: std::time::Duration) -> Self {
        Self(self.0.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)))
    }

    /// `duration` earlier, saturating at the epoch.
    pub fn saturating_sub(self, duration: std::time::Duration) -> Self {
        Self(self.0.saturating_sub(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)))
    }
}

/// A position in a device's inbox: the `seq` of an event, the sync cursor (`since`, `cursor`)
/// and the cumulative `ack`. Strictly increasing per device; 0 is "before the first event".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(u64);
u64_newtype!(Seq);

impl Seq {
    /// Before the first event of an inbox.
    pub const ZERO: Self = Self(0);

    /// The sequence number `n`.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The next position (saturating at `u64::MAX`, which no database stores: converting it
    /// to `i64` fails).
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

/// A message id assigned by the sender's homeserver, unique per origin server (with the
/// server's name, the global id of the message): `server_msg_id`, the `id` of a message event
/// and of a relayed message, and the `message_ids` of read markers and receipts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServerMsgId(u64);
u64_newtype!(ServerMsgId);

impl ServerMsgId {
    /// The id `n`.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// A position in a group's stream, assigned by the group's hub: 1, 2, 3, … without gaps on the
/// hub (a participating server holds the positions from when it had members). 0 is "before
/// the first message"; a device's group cursor is the highest position it acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupSeq(u64);
u64_newtype!(GroupSeq);

impl GroupSeq {
    /// Before the first message of a group.
    pub const ZERO: Self = Self(0);

    /// The position `n`.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The next position (saturating).
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn json_is_the_bare_integer() {
        for n in [0, 1, 1_700_000_000_000, i64::MAX as u64, u64::MAX] {
            let bare = serde_json::to_string(&n).unwrap();
            assert_eq!(serde_json::to_string(&Timestamp::from_millis(n)).unwrap(), bare);
            assert_eq!(serde_json::to_string(&Seq::new(n)).unwrap(), bare);
            assert_eq!(serde_json::to_string(&ServerMsgId::new(n)).unwrap(), bare);
            assert_eq!(serde_json::from_str::<Timestamp>(&bare).unwrap(), Timestamp::from_millis(n));
            assert_eq!(serde_json::from_str::<Seq>(&bare).unwrap(), Seq::new(n));
            assert_eq!(serde_json::from_str::<ServerMsgId>(&bare).unwrap(), ServerMsgId::new(n));
        }
        for bad in ["-1", "1.5", "\"1\"", "null", "18446744073709551616"] {
            assert!(serde_json::from_str::<Seq>(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<Timestamp>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_integers_round_trip() {
        for n in [0_i64, 1, 1_700_000_000_000, i64::MAX] {
            assert_eq!(i64::try_from(Timestamp::try_from(n).unwrap()), Ok(n));
            assert_eq!(i64::try_from(Seq::try_from(n).unwrap()), Ok(n));
            assert_eq!(i64::try_from(ServerMsgId::try_from(n).unwrap()), Ok(n));
        }
    }

    #[test]
    fn out_of_range_is_an_error_not_a_wrap() {
        for n in [-1_i64, i64::MIN] {
            assert!(Timestamp::try_from(n).is_err(), "{n}");
            assert!(Seq::try_from(n).is_err(), "{n}");
            assert!(ServerMsgId::try_from(n).is_err(), "{n}");
        }
        for n in [i64::MAX as u64 + 1, u64::MAX] {
            assert!(i64::try_from(Timestamp::from_millis(n)).is_err(), "{n}");
            assert!(i64::try_from(Seq::new(n)).is_err(), "{n}");
            let error = i64::try_from(ServerMsgId::new(n)).unwrap_err();
            assert_eq!(error.to_string(), "ServerMsgId out of range for a signed 64-bit integer");
        }
    }

    #[test]
    fn timestamps() {
        let ts = Timestamp::from_millis(10_000);
        assert_eq!(ts.as_millis(), 10_000);
        assert_eq!(ts.to_string(), "10000");
        assert_eq!(ts.saturating_add(Duration::from_millis(1_500)), Timestamp::from_millis(11_500));
        assert_eq!(ts.saturating_sub(Duration::from_secs(3)), Timestamp::from_millis(7_000));
        assert_eq!(ts.saturating_sub(Duration::from_secs(11)), Timestamp::EPOCH);
        assert_eq!(Timestamp::from_millis(u64::MAX - 1).saturating_add(Duration::MAX), Timestamp::from_millis(u64::MAX));
        assert!(Timestamp::EPOCH < ts);
        // The system clock is after this code was written (2026-01-01) and before 2100.
        let now = Timestamp::now();
        assert!(now > Timestamp::from_millis(1_767_225_600_000) && now < Timestamp::from_millis(4_102_444_800_000), "{now}");
    }

    #[test]
    fn sequence_numbers() {
        assert_eq!(Seq::default(), Seq::ZERO);
        assert_eq!(Seq::new(41).next(), Seq::new(42));
        assert_eq!(Seq::new(u64::MAX).next(), Seq::new(u64::MAX));
        assert!(Seq::new(2) > Seq::new(1));
        assert_eq!(Seq::new(7).get(), 7);
        assert_eq!(ServerMsgId::new(9).get(), 9);
        assert_eq!(ServerMsgId::new(9).to_string(), "9");
    }

    #[test]
    fn documented_as_u64() {
        use utoipa::{PartialSchema, ToSchema};
        let as_json = |schema: RefOr<Schema>| serde_json::to_value(schema).unwrap();
        assert_eq!(as_json(Timestamp::schema()), as_json(u64::schema()));
        assert_eq!(as_json(Seq::schema()), as_json(u64::schema()));
        assert_eq!(as_json(ServerMsgId::schema()), as_json(u64::schema()));
        assert_eq!(<Timestamp as ToSchema>::name(), <u64 as ToSchema>::name());
    }
}
