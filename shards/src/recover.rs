//! Start-up: the dispatcher replays the recovered log into every sub-state.

use storage::{RawRecord, SegmentId};

use crate::record::{decode_recovered, Record, Undecodable};

use crate::groups::GroupReplay;
use crate::mailboxes::MailboxReplay;
use crate::prekeys::PrekeyReplay;
use crate::{RecordRef, Shard};

/// Recovered records decoded for [`Shard::recover`], each with where it is in the log, and what
/// could not be decoded.
#[derive(Clone, Debug, Default)]
pub struct DecodedLog {
    /// Every decodable record, in log order, with its location.
    pub records: Vec<(RecordRef, Record)>,
    /// Soundly framed records whose body this schema cannot decode: skipped, logged, counted.
    pub undecodable: Vec<Undecodable>,
}

/// Decodes what recovery returned (`storage::Recovery::records`), in order, keeping each
/// record's segment and offset (cold mailbox entries are read back from there). Like
/// [`decode_recovered`], which it uses per record: an undecodable body is skipped with a
/// `WARN` line and listed.
pub fn decode_log(raw: impl IntoIterator<Item = RawRecord>) -> DecodedLog {
    let mut out = DecodedLog::default();
    for r in raw {
        let at = RecordRef {
            segment: r.segment,
            // Offsets are below `segment_bytes_max`, which the log keeps within a u32.
            offset: u32::try_from(r.offset).unwrap_or(u32::MAX),
        };
        let d = decode_recovered(std::iter::once(r));
        out.records
            .extend(d.records.into_iter().map(|(_, rec)| (at, rec)));
        out.undecodable.extend(d.undecodable);
    }
    out
}

impl Shard {
    /// Rebuilds state from the recovered log before any event is handled.
    ///
    /// `segments` lists every segment present (empty ones too); `records` must come in log order
    /// (segment ascending, then offset), each with its location. Everything recovered is durable;
    /// mailbox entries come back cold (their content is read from the log when delivered). What is rebuilt:
    /// accounts (the last record per device wins), key bindings, mailboxes (messages and
    /// receipts minus tombstones minus entries past `message_ttl_ms` at `now_ms`; a seq seen
    /// twice, which compaction causes, is kept once, in its latest segment), the dedup window
    /// (the newest `dedup_window_entries` message records, tombstoned or not), the next seq
    /// (above every seq in any record, tombstones included, so seqs are never reused) and the
    /// live count of every segment, and the prekey directory (the last identity record per
    /// device; one-time keys of batches of the device's final identity generation, minus
    /// consumed ones; a key id seen again, which compaction causes, is kept in its latest
    /// batch), the device lists (companions linked and not removed since; a `DeviceRemoved`
    /// record also drops the mailbox entries and prekeys of its device recorded before it).
    /// Privacy settings, contact and block lists (the last record per user and kind) and
    /// last-seen times (the last per user) come back too; presence subscriptions and calls
    /// are volatile and start empty. Registration and link codes are not persisted: a restart invalidates outstanding codes and
    /// the client asks for a new one.
    pub fn recover(
        &mut self,
        now_ms: u64,
        segments: &[SegmentId],
        records: impl IntoIterator<Item = (RecordRef, Record)>,
    ) {
        for &s in segments {
            self.ledger.recovered_segment(s);
        }
        let mut mail = MailboxReplay::default();
        let mut keys = PrekeyReplay::default();
        let mut groups = GroupReplay::default();
        for (at, rec) in records {
            let seg = at.segment;
            self.ledger.recovered_record(seg);
            let removal = match rec {
                Record::DeviceRemoved {
                    user,
                    device,
                    version,
                    ..
                } if self.devices.removal_applies(user, device, version) => Some((user, device)),
                _ => None,
            };
            if let Some((user, device)) = removal {
                // What the device had before its removal is dead.
                let addr = protocol::DeviceAddr::new(user, device);
                mail.remove_device(addr);
                keys.remove_device(addr, &mut self.prekeys);
            }
            // A group copy is a mailbox record and also the destination's dedup mark.
            self.fanout.recover(&rec);
            if !mail.record(at, &rec)
                && !self.recover_group_record(&mut groups, seg, &rec)
                && !self.accounts.recover(seg, &rec)
                && !self.devices.recover(seg, &rec)
                && !self.status.recover(seg, &rec)
                && !self.privacy.recover((seg, at.offset), &rec)
            {
                keys.record(seg, &rec, &mut self.prekeys);
            }
        }
        keys.finish(&mut self.prekeys);
        let (max_seq, max_seq_segment) = (mail.max_seq, mail.max_seq_segment);
        self.mailboxes.recover(now_ms, mail, &mut self.ledger);
        for seg in self
            .accounts
            .live_segments()
            .into_iter()
            .chain(self.prekeys.live_segments())
            .chain(self.devices.live_segments())
            .chain(self.status.live_segments())
            .chain(self.privacy.live_segments())
            .chain(self.groups.recover(groups))
            .chain(self.memberships.live_segments())
        {
            self.ledger.add_live(seg);
        }
        self.ledger.recovered_seqs(max_seq, max_seq_segment);
        self.refresh_stats();
    }
}
