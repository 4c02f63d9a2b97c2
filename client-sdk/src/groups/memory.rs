//! [`MemoryGroupStore`]: the [`GroupStore`] of tests, in memory. Clones share their contents, so
//! a test can "restart" a machine over the same store.

use super::store::{GroupChanges, GroupMessage, GroupRecord, GroupStore};
use crate::e2ee::StoreError;
use parley_spec::GroupId;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
struct Contents {
    mls: BTreeMap<Vec<u8>, Vec<u8>>,
    groups: BTreeMap<GroupId, GroupRecord>,
    messages: Vec<GroupMessage>,
    /// Fail the next write (to test what a failed store leaves behind).
    fail_next: bool,
}

/// An in-memory [`GroupStore`].
#[derive(Debug, Clone, Default)]
pub struct MemoryGroupStore(Arc<Mutex<Contents>>);

impl MemoryGroupStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Contents> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the next [`GroupStore::apply_group_changes`] fail.
    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.lock().fail_next = true;
    }
}

impl GroupStore for MemoryGroupStore {
    async fn mls_state(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        Ok(self.lock().mls.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    async fn apply_group_changes(&self, changes: &GroupChanges) -> Result<(), StoreError> {
        let mut contents = self.lock();
        if std::mem::take(&mut contents.fail_next) {
            return Err(StoreError::Backend("the test made this write fail".into()));
        }
        for change in &changes.mls {
            match &change.value {
                Some(value) => contents.mls.insert(change.key.clone(), value.clone()),
                None => contents.mls.remove(&change.key),
            };
        }
        if let Some(record) = &changes.record {
            contents.groups.insert(record.group_id.clone(), record.clone());
        }
        for message in &changes.messages {
            let found = contents.messages.iter_mut().find(|m| {
                m.group_id == message.group_id && m.sender == message.sender && m.client_msg_id == message.client_msg_id
            });
            match found {
                Some(stored) if stored.group_seq.is_none() => {
                    stored.group_seq = message.group_seq;
                    stored.ts = message.ts;
                }
                Some(_) => {}
                None => {
                    let local_id = contents.messages.len() as i64 + 1;
                    contents.messages.push(GroupMessage { local_id, ..message.clone() });
                }
            }
        }
        for confirmed in &changes.confirmations {
            let found = contents.messages.iter_mut().find(|m| {
                m.group_id == confirmed.group_id && m.sender == confirmed.sender && m.client_msg_id == confirmed.client_msg_id
            });
            if let Some(stored) = found.filter(|m| m.group_seq.is_none()) {
                stored.group_seq = Some(confirmed.group_seq);
                stored.ts = confirmed.ts;
            }
        }
        if let Some(group_id) = &changes.delete {
            contents.groups.remove(group_id);
            contents.messages.retain(|m| &m.group_id != group_id);
        }
        Ok(())
    }

    async fn group(&self, group_id: &GroupId) -> Result<Option<GroupRecord>, StoreError> {
        Ok(self.lock().groups.get(group_id).cloned())
    }

    async fn groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        let mut groups: Vec<GroupRecord> = self.lock().groups.values().cloned().collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.last_ts));
        Ok(groups)
    }

    async fn group_history(&self, group_id: &GroupId, limit: u32) -> Result<Vec<GroupMessage>, StoreError> {
        let contents = self.lock();
        let mut all: Vec<&GroupMessage> = contents.messages.iter().filter(|m| &m.group_id == group_id).collect();
        // The hub's order; own messages it has not confirmed yet last.
        all.sort_by_key(|m| (m.group_seq.is_none(), m.group_seq, m.local_id));
        let skip = all.len().saturating_sub(limit as usize);
        Ok(all.into_iter().skip(skip).cloned().collect())
    }
}
