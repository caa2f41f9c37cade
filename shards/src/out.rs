//! The action sink: everything a shard asks its driver to do, in order.

use std::collections::VecDeque;

use protocol::{ErrorCode, Frame};

use crate::{Action, ConnId, ConnRef, MeshMsg, SendResult, ShardId};

/// Actions produced while handling one event; the driver takes them with
/// [`crate::Shard::drain_actions`].
#[derive(Debug)]
pub(crate) struct Out {
    shard: ShardId,
    actions: Vec<Action>,
    /// Mesh messages to this shard itself: the dispatcher handles them before the event
    /// returns, so they never make a round trip through the driver.
    local: VecDeque<MeshMsg>,
}

impl Out {
    pub fn new(shard: ShardId) -> Self {
        Self {
            shard,
            actions: Vec::new(),
            local: VecDeque::new(),
        }
    }

    pub fn push(&mut self, action: Action) {
        self.actions.push(action);
    }

    /// Write `frame` to a connection on this shard.
    pub fn send(&mut self, conn: ConnId, frame: Frame) {
        self.push(Action::Send { conn, frame });
    }

    /// Send `Error{code}` and close. The caller has already forgotten the connection.
    pub fn close(&mut self, conn: ConnId, code: ErrorCode, text: &str) {
        self.push(Action::Close {
            conn,
            code,
            text: text.to_owned(),
        });
    }

    /// A message to shard `shard`; to this one, it stays inside the state machine.
    pub fn mesh(&mut self, shard: ShardId, msg: MeshMsg) {
        if shard == self.shard {
            self.local.push_back(msg);
        } else {
            self.push(Action::ToShard { shard, msg });
        }
    }

    /// The next mesh message this shard sent itself.
    pub fn pop_local(&mut self) -> Option<MeshMsg> {
        self.local.pop_front()
    }

    pub fn has_local(&self) -> bool {
        !self.local.is_empty()
    }

    /// Answers a pre-auth request. Home-side answers always travel as `ToConn` to the shard
    /// holding the connection, this one included, so there is one path.
    pub fn reply(&mut self, to: ConnRef, frame: Frame) {
        self.mesh(
            to.shard,
            MeshMsg::ToConn {
                conn: to.conn,
                frame,
            },
        );
    }

    pub fn reply_error(&mut self, to: ConnRef, code: ErrorCode, text: &str) {
        self.reply(to, Frame::error(code, 0, text));
    }

    /// The outcome of a `Store`, to the sender's shard.
    pub fn send_result(
        &mut self,
        reply: ConnRef,
        client_msg_id: u64,
        result: Result<u64, ErrorCode>,
    ) {
        self.mesh(
            reply.shard,
            MeshMsg::SendResult(SendResult {
                conn: reply.conn,
                client_msg_id,
                result,
            }),
        );
    }

    /// A connection of this shard, as other shards name it.
    pub fn here(&self, conn: ConnId) -> ConnRef {
        ConnRef {
            shard: self.shard,
            conn,
        }
    }

    pub fn drain(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }
}
