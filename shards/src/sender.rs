//! The sender side of messaging: checks a `Send` or `Read` from a logged-in device and routes
//! it to the recipient's home shard; relays the `SendResult` back as ✓ or an error.

use crate::types::HashMap;

use bytes::Bytes;
use protocol::addr::is_valid_user_id;
use protocol::frame::{self, Read, SendMulti, ServerAck};
use protocol::{DeviceAddr, DeviceId, ErrorCode, Frame, Message, ReceiptInfo, ReceiptKind};

use crate::out::Out;
use crate::registry::Registry;
use crate::{
    home_shard, Config, ConnId, MeshMsg, SendResult, ShardId, Store, StoreMulti, StoreReceipt,
};

/// Routing counters, and the sync copies of `SendMulti`s waiting for their recipient copies.
#[derive(Debug, Default)]
pub(crate) struct Sender {
    /// Messages whose recipient is on this shard.
    pub routed_local: u64,
    /// Messages sent to another shard.
    pub routed_cross_shard: u64,
    /// `SendMulti`s routed.
    pub sends_multi: u64,
    /// Own-device copies to store here once the recipient's shard stored its copies, by
    /// (connection, client_msg_id). Bounded by the sends in flight of the connections here
    /// (a connection's entries go when it closes).
    pending_sync: HashMap<(ConnId, u64), StoreMulti>,
}

/// One device's copy of a message: where it goes and its payload.
type Copy = (DeviceAddr, Bytes);

/// Why a `SendMulti` is refused on the sender's shard.
#[derive(Debug)]
pub(crate) enum MultiRefusal {
    /// A per-send error.
    Error(ErrorCode, &'static str),
    /// The own copies do not name exactly the sender's other devices.
    StaleOwn,
}

impl Sender {
    /// A `Send` from `from` on `conn`: size and address checks, then `Store` at the recipient's
    /// home shard (this one included).
    pub fn send(
        &mut self,
        conn: ConnId,
        from: DeviceAddr,
        req: frame::Send,
        cfg: &Config,
        registry: &mut Registry,
        out: &mut Out,
    ) {
        let id = req.client_msg_id;
        if req.payload.len() > cfg.max_payload_bytes {
            let error = Frame::error(ErrorCode::PayloadTooLarge, id, "payload too large");
            return out.send(conn, error);
        }
        let Some(to) = req.to.device_addr() else {
            let text = "only device addresses are routed";
            return out.send(conn, Frame::error(ErrorCode::UnsupportedAddress, id, text));
        };
        let home = home_shard(to.user, cfg.shards);
        self.route(conn, home, cfg, registry);
        let message = Message {
            from,
            client_msg_id: id,
            // Set by the home shard when it stores the message.
            server_ts_ms: 0,
            msg_type: req.msg_type,
            payload: req.payload,
        };
        let reply = out.here(conn);
        out.mesh(home, MeshMsg::Store(Store { reply, to, message }));
    }

    /// A `SendMulti` from `from` on `conn` (this is `from`'s home shard); `own_others` are
    /// the sender's other devices, increasing, or `None` when the send was stored here before
    /// (a retry: dedup answers it, whatever the own devices are now). Checks sizes and the own copies, then one
    /// `StoreMulti` to the recipient's home shard; the own copies follow once those are stored
    /// (or go with them when that shard is this one), so a refused send stores nothing.
    pub fn send_multi(
        &mut self,
        (conn, from): (ConnId, DeviceAddr),
        req: SendMulti,
        own_others: Option<&[DeviceId]>,
        cfg: &Config,
        registry: &mut Registry,
        out: &mut Out,
    ) -> Result<(), MultiRefusal> {
        if req
            .copies
            .iter()
            .any(|c| c.payload.len() > cfg.max_payload_bytes)
        {
            return Err(MultiRefusal::Error(
                ErrorCode::PayloadTooLarge,
                "payload too large",
            ));
        }
        if !is_valid_user_id(req.to_user) {
            let text = "no such recipient";
            return Err(MultiRefusal::Error(ErrorCode::NoSuchRecipient, text));
        }
        let to_self = req.to_user == from.user;
        if to_self && req.copies.iter().any(|c| c.own) {
            let text = "a message to one's own account takes only recipient copies";
            return Err(MultiRefusal::Error(ErrorCode::UnsupportedAddress, text));
        }
        let mut own: Vec<DeviceId> = req
            .copies
            .iter()
            .filter(|c| c.own || to_self)
            .map(|c| c.device)
            .collect();
        own.sort_unstable();
        if own_others.is_some_and(|others| own != others) {
            return Err(MultiRefusal::StaleOwn);
        }
        let message = Message {
            from,
            client_msg_id: req.client_msg_id,
            server_ts_ms: 0,
            msg_type: req.msg_type,
            payload: Bytes::new(),
        };
        let (theirs, mine): (Vec<Copy>, Vec<Copy>) = req
            .copies
            .into_iter()
            .map(|c| {
                let user = if c.own { from.user } else { req.to_user };
                (DeviceAddr::new(user, c.device), c.payload)
            })
            .partition(|(a, _)| a.user == req.to_user && !to_self);
        let home = home_shard(req.to_user, cfg.shards);
        let own_expect = (from.user, Some(from.device));
        let reply = out.here(conn);
        let store = if to_self {
            StoreMulti {
                reply,
                message,
                copies: mine,
                expect: vec![own_expect],
            }
        } else if home == cfg.shard || mine.is_empty() {
            let mut expect = vec![(req.to_user, None)];
            if home == cfg.shard {
                expect.push(own_expect);
            }
            let mut copies = theirs;
            copies.extend(mine);
            StoreMulti {
                reply,
                message,
                copies,
                expect,
            }
        } else {
            let sync = StoreMulti {
                reply,
                message: message.clone(),
                copies: mine,
                expect: vec![own_expect],
            };
            self.pending_sync.insert((conn, req.client_msg_id), sync);
            StoreMulti {
                reply,
                message,
                copies: theirs,
                expect: vec![(req.to_user, None)],
            }
        };
        self.sends_multi = self.sends_multi.saturating_add(1);
        self.route(conn, home, cfg, registry);
        out.mesh(home, MeshMsg::StoreMulti(Box::new(store)));
        Ok(())
    }

    /// Counts a store routed to `home` (local or cross-shard, and outstanding on `conn`).
    pub fn route(&mut self, conn: ConnId, home: ShardId, cfg: &Config, registry: &mut Registry) {
        if home == cfg.shard {
            self.routed_local = self.routed_local.saturating_add(1);
        } else {
            self.routed_cross_shard = self.routed_cross_shard.saturating_add(1);
        }
        if let Some(s) = registry.session_mut(conn) {
            let n = s.outstanding.entry(home).or_insert(0);
            *n = n.saturating_add(1);
        }
    }

    /// A connection closed: its waiting sync copies go (the client resends under the same id).
    pub fn forget_conn(&mut self, conn: ConnId) {
        if !self.pending_sync.is_empty() {
            self.pending_sync.retain(|&(c, _), _| c != conn);
        }
    }

    /// The outcome of a `Store` from shard `from`: ✓ or an error to the sender's connection
    /// (for a `SendMulti` whose own copies wait, a success stores those first).
    pub fn result(
        &mut self,
        from: ShardId,
        r: SendResult,
        cfg: &Config,
        registry: &mut Registry,
        out: &mut Out,
    ) {
        let sync = self.pending_sync.remove(&(r.conn, r.client_msg_id));
        // The connection may be gone (closed, replaced): the client resends after reconnecting.
        let Some(s) = registry.session_mut(r.conn) else {
            return;
        };
        if let Some(n) = s.outstanding.get_mut(&from) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.outstanding.remove(&from);
            }
        }
        if let (Some(mut sync), Ok(ts_ms)) = (sync, r.result) {
            // The sync copies carry the time the recipient's copies were stored with, so every
            // copy of the message, and the ✓, have one time.
            sync.message.server_ts_ms = ts_ms;
            self.route(r.conn, cfg.shard, cfg, registry);
            return out.mesh(cfg.shard, MeshMsg::StoreMulti(Box::new(sync)));
        }
        let frame = match r.result {
            Ok(server_ts_ms) => ServerAck {
                client_msg_id: r.client_msg_id,
                server_ts_ms,
            }
            .into(),
            Err(code) => Frame::error(code, r.client_msg_id, code.name()),
        };
        out.send(r.conn, frame);
    }

    /// A `Read` from `from`: a read receipt to the original sender's home shard, and a
    /// `READ_ELSEWHERE` receipt to each of `own_others` (the reader's other devices, homed
    /// here).
    pub fn read(
        now_ms: u64,
        (conn, from): (ConnId, DeviceAddr),
        read: &Read,
        own_others: &[DeviceId],
        cfg: &Config,
        out: &mut Out,
    ) {
        let client_msg_id = read.client_msg_id;
        let Some(to) = read.to.device_addr() else {
            let text = "only device addresses are routed";
            let error = Frame::error(ErrorCode::UnsupportedAddress, client_msg_id, text);
            return out.send(conn, error);
        };
        let receipt = ReceiptInfo {
            from,
            client_msg_id,
            kind: ReceiptKind::READ,
            ts_ms: now_ms,
        };
        let home = home_shard(to.user, cfg.shards);
        let sent_at_ms = 0;
        let store = StoreReceipt {
            to,
            receipt,
            sent_at_ms,
        };
        out.mesh(home, MeshMsg::StoreReceipt(store));
        for &device in own_others {
            let receipt = ReceiptInfo {
                from: to,
                client_msg_id,
                kind: ReceiptKind::READ_ELSEWHERE,
                ts_ms: now_ms,
            };
            let to = DeviceAddr::new(from.user, device);
            out.mesh(
                cfg.shard,
                MeshMsg::StoreReceipt(StoreReceipt {
                    to,
                    receipt,
                    sent_at_ms: 0,
                }),
            );
        }
    }
}
