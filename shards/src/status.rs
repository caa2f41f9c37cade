//! Status posts: the poster's home shard keeps each post (its blobs and audience) durably for
//! `status_ttl_ms`, then deletes it and its blobs (docs/protocol.md §19.7).
//!
//! The post's content never passes through here: the poster sends it end-to-end encrypted as
//! one `SendMulti` per audience user (msg_type STATUS), and viewers' "viewed" receipts are the
//! ordinary read receipts of those messages. What the shard adds:
//!
//! * a `StatusPost` record (tag 30), live while the post is; `StatusPublished` only once it is
//!   durable;
//! * `Action::MediaAcl` once durable, so the media endpoint serves the post's blobs only to the
//!   poster and its audience (re-announced after every restart, so an ACL lost in a crash
//!   comes back);
//! * at expiry (`Tick`) or on `StatusDelete`: a `StatusGone` record (tag 31, with the blobs),
//!   then, once durable, `Action::MediaDelete`. A restart that still finds a `StatusGone`
//!   deletes its blobs again (deleting is idempotent).
//!
//! Limits: `status_posts_per_user_max` live posts per poster and `status_audience_max` users
//! per post (`StatusLimit`). Copies not yet delivered stay in the audience's mailboxes until
//! delivered or the message TTL (the client drops copies past the post's expiry, and their
//! blobs are gone by then).

use std::collections::BTreeMap;

use protocol::frame::{StatusDeleted, StatusPublish, StatusPublished};
use protocol::{capability, ErrorCode, Frame, UserId};
use storage::SegmentId;

use crate::ledger::Log;
use crate::out::Out;
use crate::record::Record;
use crate::registry::Registry;
use crate::waiter::Waiter;
use crate::{Action, ConnId};

/// One live post.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Post {
    expires_at_ms: u64,
    blobs: Vec<[u8; 32]>,
    audience: Vec<UserId>,
    /// Segment of its `StatusPost` record.
    segment: SegmentId,
}

/// A post change waiting for its record.
#[derive(Debug)]
pub(crate) enum StatusWaiter {
    /// `StatusPost` durable: answer the poster, restrict the blobs.
    Published {
        conn: ConnId,
        poster: UserId,
        post_id: u64,
        expires_at_ms: u64,
    },
    /// `StatusGone` durable: answer the poster (if it asked), delete the blobs.
    Gone {
        conn: Option<ConnId>,
        post_id: u64,
        blobs: Vec<[u8; 32]>,
    },
}

/// The status sub-state of a shard.
#[derive(Debug, Default)]
pub(crate) struct Status {
    posts: BTreeMap<(UserId, u64), Post>,
    /// After recovery: the ACLs and deletions still to announce (at the first tick).
    replay_pending: bool,
    replay_gone: Vec<Vec<[u8; 32]>>,
    /// Posts published.
    pub published: u64,
    /// Posts deleted by their poster.
    pub deleted: u64,
    /// Posts expired.
    pub expired: u64,
}

impl Status {
    /// Live posts (gauge).
    pub fn live(&self) -> usize {
        self.posts.len()
    }

    /// `StatusPublish` from `poster` (logged in on `conn` with `capabilities`).
    pub fn publish(
        &mut self,
        now_ms: u64,
        (conn, poster, capabilities): (ConnId, UserId, u64),
        p: &StatusPublish,
        cfg: &crate::Config,
        log: &mut Log<'_>,
        out: &mut Out,
    ) {
        let refuse = |out: &mut Out, code: ErrorCode, text: &str| {
            out.send(conn, Frame::error(code, p.post_id, text));
        };
        if capabilities & capability::MEDIA == 0 {
            return refuse(
                out,
                ErrorCode::MediaUnavailable,
                "MEDIA capability not announced",
            );
        }
        if let Some(post) = self.posts.get(&(poster, p.post_id)) {
            // A retry of a post already stored: answer again (durable: it is in the map only
            // after its record was appended, and answers wait for durability).
            let expires_at_ms = post.expires_at_ms;
            let w = StatusWaiter::Published {
                conn,
                poster,
                post_id: p.post_id,
                expires_at_ms,
            };
            return log.ledger.wait_all(Waiter::Status(w));
        }
        if log.ledger.is_poisoned() {
            return refuse(out, ErrorCode::StorageUnavailable, "storage unavailable");
        }
        let mine = self.posts.range((poster, 0)..=(poster, u64::MAX)).count();
        if mine >= cfg.status_posts_per_user_max {
            return refuse(out, ErrorCode::StatusLimit, "status_posts_per_user_max");
        }
        if p.refs.audience.len() > cfg.status_audience_max {
            return refuse(out, ErrorCode::StatusLimit, "status_audience_max");
        }
        let expires_at_ms = now_ms.saturating_add(cfg.status_ttl_ms);
        let rec = Record::StatusPost {
            poster,
            post_id: p.post_id,
            expires_at_ms,
            blobs: p.refs.blobs.clone(),
            audience: p.refs.audience.clone(),
        };
        let lsn = log.append(&rec, true);
        let post = Post {
            expires_at_ms,
            blobs: p.refs.blobs.clone(),
            audience: p.refs.audience.clone(),
            segment: lsn.segment,
        };
        self.posts.insert((poster, p.post_id), post);
        self.published = self.published.saturating_add(1);
        let w = StatusWaiter::Published {
            conn,
            poster,
            post_id: p.post_id,
            expires_at_ms,
        };
        log.ledger.wait(lsn.append_id, Waiter::Status(w));
    }

    /// `StatusDelete` from `poster`.
    pub fn delete(
        &mut self,
        (conn, poster): (ConnId, UserId),
        post_id: u64,
        log: &mut Log<'_>,
        out: &mut Out,
    ) {
        if !self.posts.contains_key(&(poster, post_id)) {
            let e = Frame::error(ErrorCode::NoSuchStatus, post_id, "no such status post");
            return out.send(conn, e);
        }
        if log.ledger.is_poisoned() {
            let e = Frame::error(
                ErrorCode::StorageUnavailable,
                post_id,
                "storage unavailable",
            );
            return out.send(conn, e);
        }
        self.deleted = self.deleted.saturating_add(1);
        self.remove((poster, post_id), Some(conn), log);
    }

    /// Appends the `StatusGone` of a live post and forgets it.
    fn remove(&mut self, key: (UserId, u64), conn: Option<ConnId>, log: &mut Log<'_>) {
        let Some(post) = self.posts.remove(&key) else {
            return;
        };
        let rec = Record::StatusGone {
            poster: key.0,
            post_id: key.1,
            blobs: post.blobs.clone(),
        };
        let lsn = log.append(&rec, false);
        let w = StatusWaiter::Gone {
            conn,
            post_id: key.1,
            blobs: post.blobs,
        };
        log.ledger.wait(lsn.append_id, Waiter::Status(w));
        // The post record is dead once the removal is durable.
        log.ledger.wait(
            lsn.append_id,
            Waiter::Kill {
                segment: post.segment,
            },
        );
    }

    /// Tick: expires posts past their time; after a restart, re-announces ACLs and deletions.
    pub fn tick(&mut self, now_ms: u64, log: &mut Log<'_>, out: &mut Out) {
        if self.replay_pending {
            self.replay_pending = false;
            for ((poster, _), post) in &self.posts {
                out.push(acl(*poster, post));
            }
            for blobs in std::mem::take(&mut self.replay_gone) {
                if !blobs.is_empty() {
                    out.push(Action::MediaDelete { blobs });
                }
            }
        }
        if log.ledger.is_poisoned() {
            return;
        }
        let due: Vec<(UserId, u64)> = self
            .posts
            .iter()
            .filter(|(_, p)| p.expires_at_ms <= now_ms)
            .map(|(&k, _)| k)
            .collect();
        for key in due {
            self.expired = self.expired.saturating_add(1);
            self.remove(key, None, log);
        }
    }

    /// Runs a durable post change.
    pub fn durable(&self, w: StatusWaiter, registry: &Registry, out: &mut Out) {
        match w {
            StatusWaiter::Published {
                conn,
                poster,
                post_id,
                expires_at_ms,
            } => {
                if let Some(post) = self.posts.get(&(poster, post_id)) {
                    out.push(acl(poster, post));
                }
                if registry.session(conn).is_some() {
                    let f = StatusPublished {
                        post_id,
                        expires_at_ms,
                    };
                    out.send(conn, f.into());
                }
            }
            StatusWaiter::Gone {
                conn,
                post_id,
                blobs,
            } => {
                if !blobs.is_empty() {
                    out.push(Action::MediaDelete { blobs });
                }
                if let Some(conn) = conn.filter(|&c| registry.session(c).is_some()) {
                    out.send(conn, StatusDeleted { post_id }.into());
                }
            }
        }
    }

    /// The log failed before the change was durable: tell the poster.
    pub fn failed(&self, w: StatusWaiter, registry: &Registry, out: &mut Out) {
        let (conn, post_id) = match w {
            StatusWaiter::Published { conn, post_id, .. } => (Some(conn), post_id),
            StatusWaiter::Gone { conn, post_id, .. } => (conn, post_id),
        };
        if let Some(conn) = conn.filter(|&c| registry.session(c).is_some()) {
            let e = Frame::error(
                ErrorCode::StorageUnavailable,
                post_id,
                "storage unavailable",
            );
            out.send(conn, e);
        }
    }

    // ----- recovery and compaction --------------------------------------------------------

    /// Replays one record; true if it was a status record.
    pub fn recover(&mut self, seg: SegmentId, rec: &Record) -> bool {
        match rec {
            Record::StatusPost {
                poster,
                post_id,
                expires_at_ms,
                blobs,
                audience,
            } => {
                let post = Post {
                    expires_at_ms: *expires_at_ms,
                    blobs: blobs.clone(),
                    audience: audience.clone(),
                    segment: seg,
                };
                // A compaction copy replaces the older record of the same post.
                self.posts.insert((*poster, *post_id), post);
                self.replay_pending = true;
                true
            }
            Record::StatusGone {
                poster,
                post_id,
                blobs,
            } => {
                self.posts.remove(&(*poster, *post_id));
                self.replay_gone.push(blobs.clone());
                self.replay_pending = true;
                true
            }
            _ => false,
        }
    }

    /// Segments holding live post records (one per post).
    pub fn live_segments(&self) -> Vec<SegmentId> {
        self.posts.values().map(|p| p.segment).collect()
    }

    /// The posts whose record is in `segment`.
    pub fn live_in(&self, segment: SegmentId) -> Vec<(UserId, u64)> {
        self.posts
            .iter()
            .filter(|(_, p)| p.segment == segment)
            .map(|(&k, _)| k)
            .collect()
    }

    /// Compaction: re-appends a post's record unchanged.
    pub fn copy(&mut self, key: (UserId, u64), from: SegmentId, log: &mut Log<'_>) {
        let Some(post) = self.posts.get_mut(&key) else {
            return;
        };
        if post.segment != from {
            return;
        }
        let rec = Record::StatusPost {
            poster: key.0,
            post_id: key.1,
            expires_at_ms: post.expires_at_ms,
            blobs: post.blobs.clone(),
            audience: post.audience.clone(),
        };
        let lsn = log.append(&rec, true);
        post.segment = lsn.segment;
        log.ledger.kill(from);
    }
}

fn acl(poster: UserId, post: &Post) -> Action {
    let mut users = post.audience.clone();
    users.push(poster);
    users.sort_unstable();
    users.dedup();
    Action::MediaAcl {
        blobs: post.blobs.clone(),
        users,
        expires_at_ms: post.expires_at_ms,
    }
}
