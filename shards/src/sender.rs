//! The sender side of messaging: checks a `Send` or `Read` from a logged-in device and routes
//! it to the recipient's home shard; relays the `SendResult` back as ✓ or an error.

use protocol::frame::{self, Read, ServerAck};
use protocol::{AddressKind, ErrorCode, Frame, ReceiptKind};

use crate::out::Out;
use crate::registry::Registry;
use crate::types::DeviceKey;
use crate::{
    home_shard, Config, ConnId, MeshMsg, SendResult, ShardId, Store, StoreReceipt, StoredMessage,
};

/// Routing counters.
#[derive(Debug, Default)]
pub(crate) struct Sender {
    /// Messages whose recipient is on this shard.
    pub routed_local: u64,
    /// Messages sent to another shard.
    pub routed_cross_shard: u64,
}

impl Sender {
    /// A `Send` from `key` on `conn`: size and address checks, then `Store` at the recipient's
    /// home shard (this one included).
    pub fn send(
        &mut self,
        conn: ConnId,
        (user, device): DeviceKey,
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
        if req.to.kind() != Some(AddressKind::Device) {
            let text = "only device addresses are routed";
            return out.send(conn, Frame::error(ErrorCode::UnsupportedAddress, id, text));
        }
        let home = home_shard(req.to.id, cfg.shards);
        if home == cfg.shard {
            self.routed_local = self.routed_local.saturating_add(1);
        } else {
            self.routed_cross_shard = self.routed_cross_shard.saturating_add(1);
        }
        if let Some(s) = registry.session_mut(conn) {
            let n = s.outstanding.entry(home).or_insert(0);
            *n = n.saturating_add(1);
        }
        let msg = StoredMessage {
            from_user: user,
            from_device: device,
            to_user: req.to.id,
            to_device: req.to.device,
            client_msg_id: id,
            msg_type: req.msg_type.0,
            payload: req.payload,
        };
        let reply = out.here(conn);
        out.mesh(home, MeshMsg::Store(Store { reply, msg }));
    }

    /// The outcome of a `Store` from shard `from`: ✓ or an error to the sender's connection.
    pub fn result(from: ShardId, r: SendResult, registry: &mut Registry, out: &mut Out) {
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

    /// A `Read` from `key`: a read receipt to the original sender's home shard.
    pub fn read(
        now_ms: u64,
        conn: ConnId,
        (user, device): DeviceKey,
        read: &Read,
        cfg: &Config,
        out: &mut Out,
    ) {
        let (to, client_msg_id) = (read.to, read.client_msg_id);
        if to.kind() != Some(AddressKind::Device) {
            let text = "only device addresses are routed";
            let error = Frame::error(ErrorCode::UnsupportedAddress, client_msg_id, text);
            return out.send(conn, error);
        }
        let receipt = StoreReceipt {
            to_user: to.id,
            to_device: to.device,
            from_user: user,
            from_device: device,
            client_msg_id,
            kind: ReceiptKind::READ.0,
            ts_ms: now_ms,
        };
        out.mesh(
            home_shard(to.id, cfg.shards),
            MeshMsg::StoreReceipt(receipt),
        );
    }
}
