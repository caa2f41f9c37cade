//! Presence, privacy, blocking, typing and call signalling (`docs/protocol.md` §20, §21).
//!
//! Every call here writes one frame and returns at once; the answers arrive as [`Event`]s from
//! [`Session::recv`]: [`Event::Presence`] (the first with the request's id, then changes with
//! id 0), [`Event::PrivacySaved`], [`Event::Typing`], [`Event::Call`],
//! [`Event::TurnCredentials`], and refusals as [`Event::ServerError`] with the request's id.
//!
//! Calls are in [`crate::calls`]: their payloads are sealed end to end there
//! ([`Session::call_offer`] and the steps after it).
//!
//! [`Event`]: crate::Event
//! [`Event::Presence`]: crate::Event::Presence
//! [`Event::PrivacySaved`]: crate::Event::PrivacySaved
//! [`Event::Typing`]: crate::Event::Typing
//! [`Event::Call`]: crate::Event::Call
//! [`Event::TurnCredentials`]: crate::Event::TurnCredentials
//! [`Event::ServerError`]: crate::Event::ServerError

use protocol::frame::{ContactsEdit, PresenceSubscribe, PrivacySet, TurnRequest, Typing};
use protocol::presence::{ContactOp, TypingState, Visibility};
use protocol::{Frame, UserId};

use crate::session::new_client_msg_id;
use crate::{Result, Session};

impl Session {
    /// Watches `user`'s presence for `ttl_s` seconds (renew before it runs out; 0 ends it).
    /// Returns the request id the first [`crate::Event::Presence`] carries.
    pub fn subscribe_presence(&mut self, user: UserId, ttl_s: u32) -> Result<u64> {
        let request_id = new_client_msg_id();
        let f = PresenceSubscribe {
            request_id,
            user,
            ttl_s,
        };
        self.write_control(Frame::PresenceSubscribe(f))?;
        Ok(request_id)
    }

    /// Who may see this user's last seen and online status. Returns the request id of the
    /// [`crate::Event::PrivacySaved`] answer.
    pub fn set_privacy(&mut self, last_seen: Visibility, online: Visibility) -> Result<u64> {
        let request_id = new_client_msg_id();
        let f = PrivacySet {
            request_id,
            last_seen,
            online,
        };
        self.write_control(Frame::PrivacySet(f))?;
        Ok(request_id)
    }

    /// Adds, removes, blocks or unblocks users (at most 1024 per call). Returns the request id
    /// of the [`crate::Event::PrivacySaved`] answer.
    pub fn edit_contacts(&mut self, op: ContactOp, users: &[UserId]) -> Result<u64> {
        let request_id = new_client_msg_id();
        let f = ContactsEdit {
            request_id,
            op,
            users: users.to_vec(),
        };
        self.write_control(Frame::ContactsEdit(f))?;
        Ok(request_id)
    }

    /// Blocks `user`: no presence, messages or calls from it (it still sees ✓).
    pub fn block(&mut self, user: UserId) -> Result<u64> {
        self.edit_contacts(ContactOp::BLOCK, &[user])
    }

    /// Unblocks `user`.
    pub fn unblock(&mut self, user: UserId) -> Result<u64> {
        self.edit_contacts(ContactOp::UNBLOCK, &[user])
    }

    /// Tells `to_user`'s online devices this device is typing (never stored; rate-limited).
    pub fn typing(&mut self, to_user: UserId, state: TypingState) -> Result<()> {
        self.write_control(Frame::Typing(Typing { to_user, state }))
    }

    /// Asks for TURN credentials. Returns the request id of the
    /// [`crate::Event::TurnCredentials`] answer.
    pub fn request_turn(&mut self) -> Result<u64> {
        let request_id = new_client_msg_id();
        self.write_control(Frame::TurnRequest(TurnRequest { request_id }))?;
        Ok(request_id)
    }
}
