//! Work that runs once an append is durable.
//!
//! Every answer that reveals a change waits here, keyed by the append id that carries the
//! change, and runs in append order once the log reports that id durable (see
//! [`crate::ledger::Ledger::take_ready`]).

use protocol::DeviceAddr;
use storage::SegmentId;

use crate::devices::Companion;
use crate::types::StaticKey;
use crate::{ConnId, ConnRef, FetchedBundle};

/// One piece of deferred work.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// A mailbox entry became durable: deliver it, or push if the device is offline.
    Stored { key: DeviceAddr, seq: u64 },
    /// Tell a sender its message is stored.
    SendReply {
        reply: ConnRef,
        client_msg_id: u64,
        ts_ms: u64,
    },
    /// A device's new account record is durable: switch to it and answer `Registered`.
    Account(AccountWaiter),
    /// A key binding is durable: record it and answer every claimant.
    Binding {
        static_key: StaticKey,
        segment: SegmentId,
    },
    /// The re-appends of a compaction are durable: the old segment may go.
    Compaction { segment: SegmentId },
    /// The append that superseded a record in `segment` is durable: that record is dead.
    Kill { segment: SegmentId },
    /// A fetch's consumption (and everything before it) is durable: answer the requester.
    PrekeyReply {
        reply: ConnRef,
        request_id: u64,
        bundle: FetchedBundle,
    },
    /// An upload is durable: tell the uploading connection.
    PrekeyUploaded { conn: ConnId, key: DeviceAddr },
    /// Tell the owner (if online) that its one-time prekeys run low.
    PrekeyNotice { key: DeviceAddr },
    /// A linked device's record is durable: it joins the list; answer both devices.
    Linked(Box<LinkWaiter>),
    /// A device's removal is durable: answer the requester, close the device.
    Unlinked(UnlinkWaiter),
    /// A status post change is durable.
    Status(crate::status::StatusWaiter),
    /// A privacy or contact-list change is durable: answer the requester.
    PrivacySaved(Box<crate::privacy::SavedWaiter>),
    /// A group change is durable on the group's home: answer the requester.
    GroupReply {
        reply: ConnRef,
        frame: Box<protocol::Frame>,
    },
    /// A group event or message is durable on the group's home: start its fan-out.
    GroupFanout { group: u64, gseq: u64 },
    /// Memberships are durable on the users' home shard: answer the group's home.
    GroupJoined {
        reply_shard: crate::ShardId,
        token: u64,
    },
    /// A fan-out is durable on this destination shard: acknowledge it to the home.
    GroupStored {
        home: crate::ShardId,
        group: u64,
        gseq: u64,
    },
}

/// A link waiting for its `Device` record.
#[derive(Debug)]
pub(crate) struct LinkWaiter {
    pub addr: DeviceAddr,
    pub companion: Companion,
    /// The approving primary's connection.
    pub primary: ConnRef,
    pub request_id: u64,
    /// The new device's connection (on the shard that issued the code).
    pub new_device: ConnRef,
}

/// A removal waiting for its `DeviceRemoved` record.
#[derive(Debug)]
pub(crate) struct UnlinkWaiter {
    /// Who asked and its request id (none for a removal by re-registration).
    pub requester: Option<(ConnRef, u64)>,
    pub addr: DeviceAddr,
}

/// A device's account record waiting to become durable.
#[derive(Debug)]
pub(crate) struct AccountWaiter {
    pub key: DeviceAddr,
    pub static_key: StaticKey,
    pub ts_ms: u64,
    pub segment: SegmentId,
    pub reply: ConnRef,
}
