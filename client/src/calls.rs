//! End-to-end sealed call signalling (docs/e2ee.md §17 over docs/protocol.md §21).
//!
//! The server relays call payloads byte for byte and sees the call id, the parties and the
//! state; the SDP and the ICE candidates are sealed on the devices ([`switchboard_e2ee::call`]):
//!
//! * [`Session::call_offer`] makes a fresh call key, grants it to every (verified) device of
//!   the callee over the pairwise sessions (X3DH from a fetched bundle when there is none yet,
//!   as for [`Session::send`]) and sends one `OFFER` whose payload the server relays to every
//!   ringing device.
//! * [`Session::call_answer`], [`Session::call_ice`] and [`Session::call_end`] seal the later
//!   steps under the call key.
//! * Every `CallEvent` the server relays comes out of [`Session::recv`] as
//!   [`crate::Event::Call`] with the opened payload, or the reason it did not open
//!   ([`CallPayload::Failed`]): a device that is not in the offer, a tampered byte, another
//!   call id, a replayed step are typed errors, never a panic.
//!
//! Call keys live in memory only, in a bounded keyring with expiry
//! ([`switchboard_e2ee::CallKeyring`]), and are dropped when the call ends (hangup, reject,
//! busy, missed, answered elsewhere, or the server's `CallUnknown`).
//!
//! [`Session::call_signal`] still sends raw, **unsealed** payloads (tests, tools); nothing in
//! the SDK uses it for calls.

use std::time::Instant;

use bytes::Bytes;
use protocol::frame::{self, CallSignal, FrameBody};
use protocol::presence::CallKind;
use protocol::wire::TAG_BYTES;
use protocol::{Address, DeviceAddr, ErrorCode, Frame, UserId};
use switchboard_e2ee::call::{
    grant, open_grant, CallContext, CallOffer, LiveCall, OfferEntry, Role, CALL_DEVICES_MAX,
    CALL_GRANT_ENVELOPE_BYTES_MAX, CALL_OFFER_ENTRY_HEADER, CALL_OFFER_HEADER,
    CALL_SEALED_OVERHEAD, CALL_STEP_OVERHEAD,
};
use switchboard_e2ee::{CallError, CallKey, CallKeyring};

use crate::error::{Error, Result};
use crate::{secure, Session};

/// A call step as [`Session::recv`] hands it out: the relayed `CallEvent` with its payload
/// opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallEvent {
    /// The call.
    pub call_id: u64,
    /// The device that sent the step (for server events, the device the event is about).
    pub from: DeviceAddr,
    /// Which step.
    pub kind: CallKind,
    /// The opened payload.
    pub payload: CallPayload,
    /// The payload exactly as the server relayed it (sealed).
    pub relayed: Bytes,
}

/// What a call step's payload came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallPayload {
    /// No payload: a server event (RINGING, MISSED, ANSWERED_ELSEWHERE; BUSY or HANGUP said by
    /// the server), or an unsealed REJECT / BUSY / HANGUP. Not authenticated.
    Empty,
    /// Opened and authenticated: the SDP (OFFER, ANSWER), the ICE candidate, or the (usually
    /// empty) plaintext of a sealed end step.
    Opened(Vec<u8>),
    /// A payload that did not open; the step is reported, its content is not.
    Failed(CallOpenError),
}

impl CallPayload {
    /// The opened bytes, if any.
    pub fn opened(&self) -> Option<&[u8]> {
        match self {
            CallPayload::Opened(b) => Some(b),
            _ => None,
        }
    }
}

/// Why a call payload did not open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallOpenError {
    /// The sealed payload itself: malformed, not for this device, another call, tampered,
    /// replayed, or no key for the call (docs/e2ee.md §17.5).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The offer's key grant did not decrypt with the pairwise session of the calling device
    /// (the e2ee error's text; an identity change is one of them, and is never accepted here).
    #[error("the call key grant did not decrypt: {0}")]
    Pairwise(String),
    /// This session has no end-to-end encryption, so it cannot open sealed calls.
    #[error("end-to-end encryption is off for this session")]
    E2eeDisabled,
}

/// A small, real-looking SDP offer (audio only): the CLI's default `--sdp`.
pub const PLACEHOLDER_SDP: &str = "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=switchboard\r\nt=0 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n\
a=setup:actpass\r\na=sendrecv\r\n";

/// The answer to [`PLACEHOLDER_SDP`]: the CLI's default `--sdp` when it answers.
pub const PLACEHOLDER_ANSWER_SDP: &str =
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=switchboard\r\nt=0 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n\
a=setup:active\r\na=sendrecv\r\n";

/// The session's call keys and its clock for their expiry.
#[derive(Debug)]
pub(crate) struct Calls {
    keys: CallKeyring,
    epoch: Instant,
}

impl Calls {
    pub(crate) fn new() -> Self {
        Self {
            keys: CallKeyring::new(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

fn is_end(kind: CallKind) -> bool {
    matches!(
        kind,
        CallKind::REJECT
            | CallKind::BUSY
            | CallKind::HANGUP
            | CallKind::MISSED
            | CallKind::ANSWERED_ELSEWHERE
    )
}

impl Session {
    /// The largest call payload this connection carries: a record body of the server's
    /// `max_frame_bytes` less the tag, the kind byte and the `CallEvent` header (19 bytes, two
    /// more than `CallSignal`'s, so the relayed frame fits too). 16 348 by default.
    pub fn max_call_payload_bytes(&self) -> usize {
        self.max_record_body()
            .saturating_sub(TAG_BYTES + 1 + <frame::CallEvent as FrameBody>::HEADER_BYTES)
    }

    /// Calls `peer` with `sdp` (the SDP offer), end-to-end sealed (docs/e2ee.md §17): a fresh
    /// call key granted to each verified device of `peer` over its pairwise session, one
    /// `OFFER` that rings them all. Returns the new call id; the answer arrives as
    /// [`crate::Event::Call`] (first `RINGING`, then `ANSWER` with the callee's SDP, or `BUSY`,
    /// `REJECT`, `MISSED`). A device whose list entry does not verify is left out (it could not
    /// open the offer anyway), and so is one that has published no keys. Errors:
    /// [`Error::E2eeDisabled`], [`Error::PayloadTooLarge`] (checked before any ratchet step),
    /// [`Error::NoDevices`] (no device to ring), [`Error::IdentityChanged`], [`Error::Call`].
    pub fn call_offer(&mut self, peer: UserId, sdp: &[u8]) -> Result<u64> {
        if self.secure.is_none() {
            return Err(Error::E2eeDisabled);
        }
        let targets = self.call_targets(peer)?;
        let need = CALL_OFFER_HEADER
            + targets.len() * (CALL_OFFER_ENTRY_HEADER + CALL_GRANT_ENVELOPE_BYTES_MAX)
            + CALL_SEALED_OVERHEAD
            + sdp.len();
        let max = self.max_call_payload_bytes();
        if need > max {
            return Err(Error::PayloadTooLarge { len: need, max });
        }
        let call_id = loop {
            let id = rand::random::<u64>();
            if id != 0 && self.calls.keys.get_mut(self.calls.now_ms(), id).is_none() {
                break id;
            }
        };
        let key = CallKey::generate(&mut rand::rngs::OsRng);
        let granted = grant(call_id, &key);
        let mut entries = Vec::with_capacity(targets.len());
        for (device, identity) in targets {
            let to = Address::device(peer, device);
            match self.encrypt_for(to, &granted, identity.as_ref()) {
                Ok(envelope) => entries.push(OfferEntry {
                    device,
                    grant: envelope,
                }),
                Err(Error::Server { code, .. }) if code.is(ErrorCode::NoSuchRecipient) => {
                    tracing::warn!(user = peer, device, "no keys published: not ringing it");
                }
                Err(e) => return Err(e),
            }
        }
        if entries.is_empty() {
            return Err(Error::NoDevices { user: peer });
        }
        let ctx = CallContext {
            call_id,
            caller: secure::peer(self.user(), self.device()),
            callee: peer,
        };
        let now = self.calls.now_ms();
        let mut call = LiveCall::caller(key, ctx, now);
        let payload = call.seal_offer(entries, sdp)?;
        self.calls.keys.insert(now, call)?;
        self.call_signal(call_id, peer, CallKind::OFFER, Bytes::from(payload))?;
        Ok(call_id)
    }

    /// The devices an offer to `peer` rings: every verified device of its list (with the
    /// identity it must have), or device 0 without `MULTI_DEVICE`.
    fn call_targets(
        &mut self,
        peer: UserId,
    ) -> Result<Vec<(u16, Option<switchboard_e2ee::IdentityPublic>)>> {
        if !self.is_multi_device() {
            return Ok(vec![(0, None)]);
        }
        self.check_primary(peer)?;
        let list = self.device_list_for(peer)?;
        let mut out = Vec::new();
        for d in &list.devices {
            if !d.verified {
                tracing::warn!(
                    user = peer,
                    device = d.device,
                    "unverified device: not ringing it"
                );
                continue;
            }
            out.push((d.device, Some(d.identity)));
        }
        out.sort_unstable_by_key(|(d, _)| *d);
        out.truncate(CALL_DEVICES_MAX);
        if out.is_empty() {
            return Err(Error::NoDevices { user: peer });
        }
        Ok(out)
    }

    /// Answers the incoming call `call_id` (whose offer this device opened) with `sdp`, sealed.
    /// The first device to answer wins; the others get `ANSWERED_ELSEWHERE`.
    pub fn call_answer(&mut self, call_id: u64, sdp: &[u8]) -> Result<()> {
        self.seal_and_send(call_id, CallKind::ANSWER, sdp, Some(Role::Callee))
    }

    /// Sends an ICE candidate for the live call `call_id`, sealed (either side).
    pub fn call_ice(&mut self, call_id: u64, candidate: &[u8]) -> Result<()> {
        self.seal_and_send(call_id, CallKind::ICE, candidate, None)
    }

    /// Ends the live call `call_id` with `kind` (REJECT or BUSY from a ringing callee device,
    /// HANGUP from either side), sealed, and drops its key. A device that holds no key for the
    /// call (it was not in the offer) can only send an unsealed end step with
    /// [`Session::call_signal`] and an empty payload.
    pub fn call_end(&mut self, call_id: u64, kind: CallKind) -> Result<()> {
        if !matches!(kind, CallKind::REJECT | CallKind::BUSY | CallKind::HANGUP) {
            return Err(Error::Call(CallError::WrongParty));
        }
        let r = self.seal_and_send(call_id, kind, b"", None);
        self.calls.keys.remove(call_id);
        r
    }

    fn seal_and_send(
        &mut self,
        call_id: u64,
        kind: CallKind,
        plaintext: &[u8],
        role: Option<Role>,
    ) -> Result<()> {
        let max = self.max_call_payload_bytes();
        let len = plaintext.len() + CALL_STEP_OVERHEAD;
        if len > max {
            return Err(Error::PayloadTooLarge { len, max });
        }
        let now = self.calls.now_ms();
        let call = self.calls.keys.call(now, call_id)?;
        if role.is_some_and(|r| r != call.role()) {
            return Err(Error::Call(CallError::WrongParty));
        }
        let ctx = *call.context();
        let peer = match call.role() {
            Role::Caller => ctx.callee,
            Role::Callee => ctx.caller.user,
        };
        let payload = call.seal_step(kind.0, plaintext)?;
        if kind == CallKind::ANSWER {
            call.mark_answered(now);
        }
        self.call_signal(call_id, peer, kind, Bytes::from(payload))
    }

    /// Opens a relayed `CallEvent` into the event [`Session::recv`] hands out, keeping or
    /// dropping the call's key.
    pub(crate) fn on_call_event(&mut self, e: frame::CallEvent) -> CallEvent {
        let payload = match e.kind {
            CallKind::OFFER => self.open_offer(&e),
            CallKind::RINGING | CallKind::MISSED | CallKind::ANSWERED_ELSEWHERE => {
                CallPayload::Empty
            }
            k if is_end(k) && e.payload.is_empty() => CallPayload::Empty,
            _ => self.open_step(&e),
        };
        if is_end(e.kind) && self.calls.keys.remove(e.call_id) {
            tracing::debug!(call_id = e.call_id, kind = ?e.kind, "call over: key dropped");
        }
        CallEvent {
            call_id: e.call_id,
            from: e.from,
            kind: e.kind,
            payload,
            relayed: e.payload,
        }
    }

    fn open_offer(&mut self, e: &frame::CallEvent) -> CallPayload {
        let (me, my_device) = (self.user(), self.device());
        let Some(s) = self.secure.as_mut() else {
            return CallPayload::Failed(CallOpenError::E2eeDisabled);
        };
        let caller = secure::peer(e.from.user, e.from.device);
        let offer = match CallOffer::decode(&e.payload) {
            Ok(o) => o,
            Err(err) => return CallPayload::Failed(CallError::from(err).into()),
        };
        let entry = match offer.entry(my_device) {
            Ok(entry) => entry,
            Err(err) => return CallPayload::Failed(err.into()),
        };
        // Persisted before it returns: the one-time prekey an X3DH used is gone on disk too.
        let granted = match s.e2ee.decrypt(caller, entry) {
            Ok(p) => p,
            Err(err) => return CallPayload::Failed(CallOpenError::Pairwise(err.to_string())),
        };
        let opened = open_grant(&granted, e.call_id).and_then(|key| {
            let ctx = CallContext {
                call_id: e.call_id,
                caller,
                callee: me,
            };
            LiveCall::callee(key, ctx, my_device, &offer, self.calls.now_ms())
        });
        let now = self.calls.now_ms();
        match opened.and_then(|(call, sdp)| {
            self.calls.keys.insert(now, call)?;
            Ok(sdp)
        }) {
            Ok(sdp) => CallPayload::Opened(sdp.to_vec()),
            Err(err) => CallPayload::Failed(err.into()),
        }
    }

    fn open_step(&mut self, e: &frame::CallEvent) -> CallPayload {
        if self.secure.is_none() {
            return CallPayload::Failed(CallOpenError::E2eeDisabled);
        }
        let now = self.calls.now_ms();
        let from = secure::peer(e.from.user, e.from.device);
        let opened = self.calls.keys.call(now, e.call_id).and_then(|call| {
            let pt = call.open_step(from, e.kind.0, &e.payload)?;
            if e.kind == CallKind::ANSWER && call.role() == Role::Caller {
                call.mark_answered(now);
            }
            Ok(pt)
        });
        match opened {
            Ok(pt) => CallPayload::Opened(pt.to_vec()),
            Err(err) => CallPayload::Failed(err.into()),
        }
    }

    /// A non-fatal server error: `CallUnknown` or `CallLimit` for a live call ends it.
    pub(crate) fn on_call_error(&mut self, code: crate::ServerCode, ref_id: u64) {
        let ends = code.is(ErrorCode::CallUnknown)
            || code.is(ErrorCode::CallLimit)
            || code.is(ErrorCode::NoSuchRecipient);
        if ref_id != 0 && ends && self.calls.keys.remove(ref_id) {
            tracing::debug!(call_id = ref_id, %code, "call refused: key dropped");
        }
    }

    /// Whether this session holds a live key for `call_id` (it offered it, or opened its
    /// offer, and it has not ended).
    pub fn has_call_key(&mut self, call_id: u64) -> bool {
        let now = self.calls.now_ms();
        self.calls.keys.get_mut(now, call_id).is_some()
    }

    /// One raw call step to `peer` (a fresh `call_id` with [`CallKind::OFFER`] starts a call).
    /// **Unsealed**: `payload` goes to the other party as it is, readable by the server. Use
    /// [`Session::call_offer`], [`Session::call_answer`], [`Session::call_ice`] and
    /// [`Session::call_end`] for calls; this is for tests, tools, and an empty REJECT from a
    /// device that holds no key for the call.
    pub fn call_signal(
        &mut self,
        call_id: u64,
        peer: UserId,
        kind: CallKind,
        payload: Bytes,
    ) -> Result<()> {
        let f = CallSignal {
            call_id,
            peer,
            kind,
            payload,
        };
        self.write_control(Frame::CallSignal(f))
    }
}
