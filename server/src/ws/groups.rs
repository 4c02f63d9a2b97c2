//! A connection's group streams: for each group of the device, what was sent (no I/O). Live
//! messages go out as pushed while they follow on; anything else (a gap, a full buffer, a
//! Welcome, a group the connection did not know) makes the stream read from the database.

use crate::hub::GroupPush;
use crate::storage::GroupDeviceRow;
use bytes::Bytes;
use parley_spec::{GroupId, GroupSeq};
use std::collections::HashMap;

#[derive(Debug)]
struct Stream {
    /// The last position sent (or acknowledged before this connection).
    sent: GroupSeq,
    /// The device's first position (its Welcome).
    from: GroupSeq,
    /// Its last position, if it was removed.
    until: Option<GroupSeq>,
    /// Must read from the database after `sent`.
    behind: bool,
}

/// What a connection knows of its device's group streams.
#[derive(Debug, Default)]
pub(super) struct GroupStreams {
    streams: HashMap<GroupId, Stream>,
    /// The memberships must be read again (a push for a group not known here, or lost pushes).
    reload: bool,
}

/// A stream to read from the database: positions after `after`, up to `until`; `from` is the
/// device's Welcome.
#[derive(Debug, Clone)]
pub(super) struct Read {
    pub group_id: GroupId,
    pub after: GroupSeq,
    pub until: Option<GroupSeq>,
    pub from: GroupSeq,
}

impl GroupStreams {
    /// Streams to read at connect: all of them, from the memberships in the database.
    pub fn new() -> Self {
        Self { streams: HashMap::new(), reload: true }
    }

    /// Whether anything must be read from the database.
    pub fn wants_read(&self) -> bool {
        self.reload || self.streams.values().any(|s| s.behind)
    }

    /// Whether the memberships must be read again first.
    pub fn wants_reload(&self) -> bool {
        self.reload
    }

    /// The device's memberships as stored: new ones start after their cursor, known ones keep
    /// what was sent; all are read from the database once.
    pub fn load(&mut self, rows: Vec<GroupDeviceRow>) {
        let mut streams = HashMap::with_capacity(rows.len());
        for row in rows {
            let start = row.acked.max(GroupSeq::new(row.from_seq.get().saturating_sub(1)));
            let sent = self.streams.get(&row.group_id).map_or(start, |known| known.sent.max(start));
            streams.insert(row.group_id, Stream { sent, from: row.from_seq, until: row.until_seq, behind: true });
        }
        self.streams = streams;
        self.reload = false;
    }

    /// Lost pushes: read everything again.
    pub fn lagged(&mut self) {
        self.reload = true;
    }

    /// A live message: the frame to send now if it follows what was sent, else `None` (and the
    /// stream reads from the database).
    pub fn on_push(&mut self, push: &GroupPush) -> Option<Bytes> {
        let Some(stream) = self.streams.get_mut(&push.group_id) else {
            self.reload = true;
            return None;
        };
        if push.seq <= stream.sent || stream.until.is_some_and(|until| push.seq > until) {
            return None;
        }
        match &push.frame {
            Some(frame) if !stream.behind && push.seq == stream.sent.next() => {
                stream.sent = push.seq;
                Some(frame.clone())
            }
            _ => {
                stream.behind = true;
                None
            }
        }
    }

    /// The streams to read from the database.
    pub fn reads(&self) -> Vec<Read> {
        self.streams
            .iter()
            .filter(|(_, s)| s.behind)
            .map(|(group_id, s)| Read { group_id: group_id.clone(), after: s.sent, until: s.until, from: s.from })
            .collect()
    }

    /// `seq` of `group` was sent from the database.
    pub fn sent(&mut self, group: &GroupId, seq: GroupSeq) {
        if let Some(stream) = self.streams.get_mut(group) {
            stream.sent = stream.sent.max(seq);
        }
    }

    /// The database has nothing more after what was sent for `group`.
    pub fn read_all(&mut self, group: &GroupId) {
        if let Some(stream) = self.streams.get_mut(group) {
            stream.behind = false;
        }
    }

    /// A read marker of `group` at `seq`: the position to record (at most what was sent), or
    /// `None` for a group the device is not in.
    pub fn sent_up_to(&self, group: &GroupId, seq: GroupSeq) -> Option<GroupSeq> {
        self.streams.get(group).map(|stream| seq.min(stream.sent))
    }

    /// The device acknowledged `group` up to `seq`: the position to record (at most what was
    /// sent), or `None` for a group the device is not in. A device that acknowledged the commit
    /// removing it is done with the group.
    pub fn ack(&mut self, group: &GroupId, seq: GroupSeq) -> Option<GroupSeq> {
        let stream = self.streams.get(group)?;
        let acked = seq.min(stream.sent);
        if stream.until.is_some_and(|until| acked >= until) {
            self.streams.remove(group);
        }
        Some(acked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn group(name: &str) -> GroupId {
        GroupId::parse(&format!("!{name}:hub.test")).unwrap()
    }

    fn row(name: &str, from: u64, until: Option<u64>, acked: u64) -> GroupDeviceRow {
        GroupDeviceRow {
            group_id: group(name),
            from_seq: GroupSeq::new(from),
            until_seq: until.map(GroupSeq::new),
            acked: GroupSeq::new(acked),
        }
    }

    fn push(name: &str, seq: u64, frame: bool) -> Arc<GroupPush> {
        Arc::new(GroupPush {
            group_id: group(name),
            seq: GroupSeq::new(seq),
            frame: frame.then(|| Bytes::from_static(b"{}")),
            wakes: true,
        })
    }

    #[test]
    fn live_messages_go_out_only_in_order_and_a_gap_reads_the_database() {
        let mut streams = GroupStreams::new();
        assert!(streams.wants_reload());
        streams.load(vec![row("a", 0, None, 3)]);
        let reads = streams.reads();
        assert_eq!((reads.len(), reads[0].after), (1, GroupSeq::new(3)));
        streams.read_all(&group("a"));
        assert!(!streams.wants_read());
        assert!(streams.on_push(&push("a", 4, true)).is_some());
        assert!(streams.on_push(&push("a", 4, true)).is_none(), "a repeat");
        assert!(streams.on_push(&push("a", 6, true)).is_none(), "a gap");
        assert!(streams.wants_read());
        assert_eq!(streams.reads()[0].after, GroupSeq::new(4));
        // Behind: even the next one in order waits for the read.
        assert!(streams.on_push(&push("a", 5, true)).is_none());
        // A group not known here: reload the memberships.
        assert!(streams.on_push(&push("b", 1, true)).is_none());
        assert!(streams.wants_reload());
    }

    #[test]
    fn a_joiner_starts_at_its_welcome_and_a_removed_device_ends_at_its_removal() {
        let mut streams = GroupStreams::new();
        streams.load(vec![row("a", 7, Some(9), 6)]);
        let read = &streams.reads()[0];
        assert_eq!((read.after, read.from, read.until), (GroupSeq::new(6), GroupSeq::new(7), Some(GroupSeq::new(9))));
        streams.sent(&group("a"), GroupSeq::new(9));
        streams.read_all(&group("a"));
        assert!(streams.on_push(&push("a", 10, true)).is_none(), "after the removal");
        assert_eq!(streams.ack(&group("a"), GroupSeq::new(100)), Some(GroupSeq::new(9)), "at most what was sent");
        assert_eq!(streams.ack(&group("a"), GroupSeq::new(9)), None, "done with the group");
    }
}
