//! Which groups each user homed on this shard belongs to: the count behind
//! `groups_per_user_max`, kept on the user's home shard (one `GroupMembership` record per
//! join and per leave, the last one per (user, group) wins).
//!
//! A group's home shard reserves the membership of every user a create or add would make a
//! member (`MeshMsg::GroupJoin` to each user's home shard), all or nothing per shard, before it
//! records the change; a refusal anywhere makes it release what the other shards reserved
//! (`MeshMsg::GroupRelease`) and refuse the change with `GroupsPerUserLimit`. A removal or
//! leave releases the membership when its event's fan-out reaches the removed user's home
//! shard (re-driven until acknowledged, so never lost). Known gap: a crash of the group's
//! home between a reservation and the change's record leaves that reservation counted.

use std::collections::BTreeMap;

use protocol::group::GroupId;
use protocol::UserId;
use storage::SegmentId;

use crate::ledger::Log;
use crate::record::Record;
use crate::types::HashMap;

/// The groups of the users homed here.
#[derive(Debug)]
pub(crate) struct Memberships {
    max: usize,
    /// Per user, its groups and the segment of each live join record.
    by_user: HashMap<UserId, BTreeMap<GroupId, SegmentId>>,
    /// Joins refused at `groups_per_user_max`.
    pub refused: u64,
}

impl Memberships {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            by_user: HashMap::default(),
            refused: 0,
        }
    }

    /// Groups `user` belongs to.
    pub fn count(&self, user: UserId) -> usize {
        self.by_user.get(&user).map_or(0, BTreeMap::len)
    }

    /// Reserves `group` for every one of `users` (homed here), all or nothing: the users that
    /// would pass `groups_per_user_max` if any (nothing recorded then), else the append id to
    /// wait for (`None`: nothing new to record).
    pub fn reserve(
        &mut self,
        group: GroupId,
        users: &[UserId],
        log: &mut Log<'_>,
    ) -> Result<Option<u64>, Vec<UserId>> {
        let over: Vec<UserId> = users
            .iter()
            .copied()
            .filter(|&u| {
                let groups = self.by_user.get(&u);
                !groups.is_some_and(|g| g.contains_key(&group))
                    && groups.map_or(0, BTreeMap::len) >= self.max
            })
            .collect();
        if !over.is_empty() {
            self.refused = self.refused.saturating_add(over.len() as u64);
            return Err(over);
        }
        let mut last = None;
        for &user in users {
            let groups = self.by_user.entry(user).or_default();
            if groups.contains_key(&group) {
                continue;
            }
            let rec = Record::GroupMembership {
                user,
                group,
                joined: 1,
            };
            let lsn = log.append(&rec, true);
            groups.insert(group, lsn.segment);
            last = Some(lsn.append_id);
        }
        Ok(last)
    }

    /// `users` (homed here) are no longer members of `group`.
    pub fn release(&mut self, group: GroupId, users: &[UserId], log: &mut Log<'_>) {
        for &user in users {
            let Some(groups) = self.by_user.get_mut(&user) else {
                continue;
            };
            let Some(segment) = groups.remove(&group) else {
                continue;
            };
            if groups.is_empty() {
                self.by_user.remove(&user);
            }
            let rec = Record::GroupMembership {
                user,
                group,
                joined: 0,
            };
            log.append(&rec, false);
            log.ledger.kill(segment);
        }
    }

    /// A record at recovery (the last per (user, group) wins); false for other kinds.
    pub fn recover(&mut self, segment: SegmentId, rec: &Record) -> bool {
        let Record::GroupMembership {
            user,
            group,
            joined,
        } = *rec
        else {
            return false;
        };
        let groups = self.by_user.entry(user).or_default();
        if joined == 1 {
            groups.insert(group, segment);
        } else {
            groups.remove(&group);
            if groups.is_empty() {
                self.by_user.remove(&user);
            }
        }
        true
    }

    /// Segments of the live join records (for the ledger's liveness counts at recovery).
    pub fn live_segments(&self) -> Vec<SegmentId> {
        self.by_user
            .values()
            .flat_map(|g| g.values().copied())
            .collect()
    }

    /// `(user, group)` of the live join records in `segment`, for compaction.
    pub fn live_in(&self, segment: SegmentId) -> Vec<(UserId, GroupId)> {
        let mut live: Vec<(UserId, GroupId)> = self
            .by_user
            .iter()
            .flat_map(|(&u, g)| {
                g.iter()
                    .filter(move |(_, &s)| s == segment)
                    .map(move |(&group, _)| (u, group))
            })
            .collect();
        live.sort_unstable();
        live
    }

    /// Re-appends a live join record found by `live_in`.
    pub fn copy(&mut self, (user, group): (UserId, GroupId), from: SegmentId, log: &mut Log<'_>) {
        let Some(seg) = self.by_user.get_mut(&user).and_then(|g| g.get_mut(&group)) else {
            return;
        };
        let rec = Record::GroupMembership {
            user,
            group,
            joined: 1,
        };
        let lsn = log.append(&rec, true);
        *seg = lsn.segment;
        log.ledger.kill(from);
    }
}
