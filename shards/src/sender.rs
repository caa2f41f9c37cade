//! The sender side of messaging: checks a `Send` or `Read` from a logged-in device and routes
//! it to the recipient's home shard; relays the `SendResult` back as ✓ or an error.

use protocol::frame::{self, Read, ServerAck};
use protocol::{DeviceAddr, ErrorCode, Frame, Message, ReceiptInfo, ReceiptKind};

use crate::out::Out;
use crate::registry::Registry;
use crate::{home_shard, Config, ConnId, MeshMsg, SendResult, ShardId, Store, StoreReceipt};

/// Routing counters.
#[derive(Debug, Default)]
pub(crate) struct Sender {
    /// Messages whose recipient is on this shard.
    pub routed_local: u64,
    /// Messages sent to another shard.
    pub routed_cross_shard: u64,
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
        if home == cfg.shard {
            self.routed_local = self.routed_local.saturating_add(1);
        } else {
            self.routed_cross_shard = self.routed_cross_shard.saturating_add(1);
        }
        if let Some(s) = registry.session_mut(conn) {
            let n = s.outstanding.entry(home).or_insert(0);
            *n = n.saturating_add(1);
        }
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

    /// A `Read` from `from`: a read receipt to the original sender's home shard.
    pub fn read(
        now_ms: u64,
        conn: ConnId,
        from: DeviceAddr,
        read: &Read,
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
        out.mesh(home, MeshMsg::StoreReceipt(StoreReceipt { to, receipt }));
    }
}
