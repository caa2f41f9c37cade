//! Call state and TURN credentials.
//!
//! * **Where.** A call lives on the callee's home shard, keyed by `(callee, call_id)`
//!   ([`Calls::calls`]), from the caller's `OFFER` until it ends. The caller's home shard
//!   keeps only which of its devices is in an outgoing call ([`Calls::outgoing`]), so that a
//!   user who is calling someone answers busy to a third party, and so that the caller's
//!   disconnect hangs the call up.
//! * **States** (the state machine of `docs/protocol.md` §21): `Ringing { until }` → `Active
//!   { device }` on the first `ANSWER` (the callee's other devices get `ANSWERED_ELSEWHERE`) →
//!   gone on `HANGUP`, on the answering device's or the caller's disconnect, or after
//!   `call_max_ms`. `Ringing` → gone on `REJECT` / `BUSY` / the caller's `HANGUP`, or after
//!   `call_ring_timeout_ms` (`MISSED` to both sides and a missed-call message queued for
//!   every device of the callee, with a push for the offline ones).
//! * **Bounded and expiring.** At most `calls_max` calls per shard (`CallLimit`); every call
//!   has a deadline in an index swept at each Tick.
//! * **Volatile.** Nothing here is written to the log: a restart forgets every call and every
//!   outgoing mark, so a `kill -9` mid-call leaves no stuck state (both sides' connections
//!   dropped; a later signal for the call gets `CallUnknown`, which ends it on the client).
//! * **TURN credentials** follow coturn's REST scheme (`use-auth-secret`): username
//!   `expiry:user`, password base64(HMAC-SHA1(`turn_secret`, username)), rate-limited per
//!   user (`turn_requests_per_user_per_minute`, `TurnRateLimited`).

use crate::types::HashMap;
use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use protocol::presence::TurnAuth;
use protocol::{DeviceAddr, DeviceId, UserId};
use sha1::Sha1;

use crate::limits::RateTable;
use crate::ConnRef;

/// Where a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallState {
    /// Ringing the callee's devices.
    Ringing,
    /// Answered by this device of the callee.
    Active(DeviceId),
}

/// One call, on the callee's home shard.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Call {
    pub caller: DeviceAddr,
    pub caller_conn: ConnRef,
    pub state: CallState,
    /// The callee blocked the caller: nothing rings, the caller hears `MISSED` at the timeout.
    pub silent: bool,
    /// When the call ends by itself (ring timeout, or `call_max_ms` once answered).
    pub deadline_ms: u64,
}

/// A call's key: (callee, call_id).
pub(crate) type CallKey = (UserId, u64);

/// The limits this state enforces (from [`crate::Config`]).
#[derive(Clone, Debug)]
struct Limits {
    calls_max: usize,
    ring_timeout_ms: u64,
    call_max_ms: u64,
    turn_secret: String,
    turn_uris: Vec<String>,
    turn_ttl_s: u32,
    turn_per_minute: u32,
    rate_table_max: usize,
}

/// Calls of the users homed here.
#[derive(Debug)]
pub(crate) struct Calls {
    limits: Limits,
    calls: BTreeMap<CallKey, Call>,
    /// (deadline_ms, callee, call_id) of every call.
    deadlines: BTreeSet<(u64, UserId, u64)>,
    /// Devices homed here in an outgoing call: (call_id, callee, deadline_ms).
    outgoing: HashMap<DeviceAddr, (u64, UserId, u64)>,
    turn_rate: RateTable<UserId>,
    /// Counters (see [`crate::ShardStats`]).
    pub offers: u64,
    pub answered: u64,
    pub missed: u64,
    pub busy: u64,
    pub refused_limit: u64,
    pub turn_issued: u64,
    pub turn_rate_limited: u64,
    pub turn_unavailable: u64,
}

impl Calls {
    pub fn new(cfg: &crate::Config) -> Self {
        Self {
            limits: Limits {
                calls_max: cfg.calls_max,
                ring_timeout_ms: cfg.call_ring_timeout_ms,
                call_max_ms: cfg.call_max_ms,
                turn_secret: cfg.turn_secret.clone(),
                turn_uris: cfg.turn_uris.clone(),
                turn_ttl_s: cfg.turn_ttl_s,
                turn_per_minute: cfg.turn_requests_per_user_per_minute,
                rate_table_max: cfg.presence_rate_table_max_entries,
            },
            calls: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            outgoing: HashMap::default(),
            turn_rate: RateTable::new(60_000),
            offers: 0,
            answered: 0,
            missed: 0,
            busy: 0,
            refused_limit: 0,
            turn_issued: 0,
            turn_rate_limited: 0,
            turn_unavailable: 0,
        }
    }

    /// Calls held here (gauge).
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn get(&self, k: CallKey) -> Option<&Call> {
        self.calls.get(&k)
    }

    pub fn is_full(&self) -> bool {
        self.calls.len() >= self.limits.calls_max
    }

    /// Whether `user` (homed here, with these devices) is in a call: one it was offered and
    /// has not ended (silent ones excepted), or one one of its devices is making.
    pub fn engaged(&self, user: UserId, devices: &[DeviceId]) -> bool {
        let incoming = self
            .calls
            .range((user, 0)..=(user, u64::MAX))
            .any(|(_, c)| !c.silent);
        incoming
            || devices
                .iter()
                .any(|&d| self.outgoing.contains_key(&DeviceAddr::new(user, d)))
    }

    /// A new call, ringing until the ring timeout.
    pub fn insert(&mut self, now_ms: u64, k: CallKey, mut call: Call) {
        call.deadline_ms = now_ms.saturating_add(self.limits.ring_timeout_ms);
        call.state = CallState::Ringing;
        self.deadlines.insert((call.deadline_ms, k.0, k.1));
        self.calls.insert(k, call);
        self.offers = self.offers.saturating_add(1);
    }

    /// The first answer: `device` has the call until it ends (at most `call_max_ms`).
    pub fn answer(&mut self, now_ms: u64, k: CallKey, device: DeviceId) {
        let max = self.limits.call_max_ms;
        if let Some(c) = self.calls.get_mut(&k) {
            self.deadlines.remove(&(c.deadline_ms, k.0, k.1));
            c.state = CallState::Active(device);
            c.deadline_ms = now_ms.saturating_add(max);
            self.deadlines.insert((c.deadline_ms, k.0, k.1));
            self.answered = self.answered.saturating_add(1);
        }
    }

    pub fn remove(&mut self, k: CallKey) -> Option<Call> {
        let c = self.calls.remove(&k)?;
        self.deadlines.remove(&(c.deadline_ms, k.0, k.1));
        Some(c)
    }

    /// The calls of `callee` answered by `device` (it disconnected).
    pub fn answered_by(&self, device: DeviceAddr) -> Vec<CallKey> {
        self.calls
            .range((device.user, 0)..=(device.user, u64::MAX))
            .filter(|(_, c)| c.state == CallState::Active(device.device))
            .map(|(&k, _)| k)
            .collect()
    }

    /// Calls whose deadline passed, in deadline order (removed).
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<(CallKey, Call)> {
        let mut out = Vec::new();
        while let Some(&(at, callee, id)) = self.deadlines.first() {
            if at > now_ms {
                break;
            }
            self.deadlines.pop_first();
            if let Some(c) = self.calls.remove(&(callee, id)) {
                out.push(((callee, id), c));
            }
        }
        out
    }

    // ----- caller side ---------------------------------------------------------------------

    /// `caller` (homed here) offered `call_id` to `callee`.
    pub fn outgoing_started(
        &mut self,
        now_ms: u64,
        caller: DeviceAddr,
        call_id: u64,
        callee: UserId,
    ) {
        let until = now_ms
            .saturating_add(self.limits.ring_timeout_ms)
            .saturating_add(self.limits.call_max_ms);
        self.outgoing.insert(caller, (call_id, callee, until));
    }

    /// The outgoing call of `caller`: (call_id, callee).
    pub fn outgoing_of(&self, caller: DeviceAddr) -> Option<(u64, UserId)> {
        self.outgoing
            .get(&caller)
            .map(|&(id, callee, _)| (id, callee))
    }

    /// `caller`'s outgoing call `call_id` ended.
    pub fn outgoing_ended(&mut self, caller: DeviceAddr, call_id: u64) {
        if self
            .outgoing
            .get(&caller)
            .is_some_and(|&(id, _, _)| id == call_id)
        {
            self.outgoing.remove(&caller);
        }
    }

    /// Tick: forgets outgoing marks past their deadline (their call is gone at the callee's
    /// home by then), and ended TURN rate windows.
    pub fn sweep(&mut self, now_ms: u64) {
        if !self.outgoing.is_empty() {
            self.outgoing.retain(|_, &mut (_, _, until)| until > now_ms);
        }
        self.turn_rate.sweep(now_ms);
    }

    // ----- TURN ----------------------------------------------------------------------------

    /// TURN credentials for `user` at `now_ms`: `Err(TurnUnavailable)` without a secret,
    /// `Err(TurnRateLimited)` past the per-user rate.
    pub fn turn(
        &mut self,
        now_ms: u64,
        user: UserId,
    ) -> Result<(u32, TurnAuth), protocol::ErrorCode> {
        if self.limits.turn_secret.is_empty() {
            self.turn_unavailable = self.turn_unavailable.saturating_add(1);
            return Err(protocol::ErrorCode::TurnUnavailable);
        }
        let (limit, max) = (self.limits.turn_per_minute, self.limits.rate_table_max);
        if !self.turn_rate.hit(user, now_ms, limit, max) {
            self.turn_rate_limited = self.turn_rate_limited.saturating_add(1);
            return Err(protocol::ErrorCode::TurnRateLimited);
        }
        let ttl_s = self.limits.turn_ttl_s;
        let expiry_s = (now_ms / 1000).saturating_add(u64::from(ttl_s));
        let auth = turn_auth(
            &self.limits.turn_secret,
            expiry_s,
            user,
            &self.limits.turn_uris,
        );
        self.turn_issued = self.turn_issued.saturating_add(1);
        Ok((ttl_s, auth))
    }
}

/// coturn's REST credentials: username `expiry_s:user`, password
/// base64(HMAC-SHA1(secret, username)) (coturn's `use-auth-secret` / `static-auth-secret`).
pub fn turn_auth(secret: &str, expiry_s: u64, user: UserId, uris: &[String]) -> TurnAuth {
    let username = format!("{expiry_s}:{user}");
    let password = turn_password(secret, &username);
    TurnAuth {
        username,
        password,
        uris: uris
            .iter()
            .take(protocol::presence::TURN_URIS_MAX)
            .cloned()
            .collect(),
    }
}

/// base64(HMAC-SHA1(secret, username)).
pub fn turn_password(secret: &str, username: &str) -> String {
    // HMAC accepts a key of any length, so this never fails.
    let mut mac = match <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}
