//! Registration: one-time codes per number (home side), rate limits per number and per source
//! address, and verifications waiting for the key registry.
//!
//! Codes live in memory only: a restart invalidates them (`NoPendingCode`) and the client asks
//! again. A verification whose key claim gets no answer within `registration_code_ttl_ms` (or
//! whose key shard restarts) fails with `StorageUnavailable`.

use crate::types::HashMap;
use std::net::IpAddr;

use protocol::addr::is_valid_user_id;
use protocol::frame::RegisterCodeSent;
use protocol::{DeviceAddr, ErrorCode, Frame, UserId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::limits::RateTable;
use crate::out::Out;
use crate::types::StaticKey;
use crate::{
    home_shard, key_shard, Action, ClaimKey, Config, ConnId, ConnRef, MeshMsg, RegisterVerify,
    ShardId,
};

/// Registration rate windows are per hour (`register_per_*_per_hour`).
const HOUR_MS: u64 = 3_600_000;
/// Registration codes have six digits.
const CODE_MIN: u32 = 100_000;
const CODE_MAX: u32 = 999_999;

/// An outstanding registration code (volatile: a restart invalidates it).
#[derive(Clone, Copy, Debug)]
struct PendingCode {
    code: u32,
    expires_at_ms: u64,
    wrong: u32,
}

/// A verified code waiting for the key registry's answer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingVerify {
    pub reply: ConnRef,
    pub phone: UserId,
    pub static_key: StaticKey,
    pub claim_shard: ShardId,
    pub started_ms: u64,
}

/// Registration state of one shard.
#[derive(Debug)]
pub(crate) struct Registration {
    /// Outstanding codes per number (home side).
    codes: HashMap<UserId, PendingCode>,
    number_limits: RateTable<UserId>,
    /// Per-address limit (accepting side).
    ip_limits: RateTable<IpAddr>,
    /// Verifications waiting for `KeyClaimed`, by token.
    verifies: HashMap<u64, PendingVerify>,
    next_token: u64,
    /// The only randomness of the shard: registration codes.
    rng: StdRng,
}

impl Registration {
    pub fn new(seed: u64) -> Self {
        Self {
            codes: HashMap::default(),
            number_limits: RateTable::new(HOUR_MS),
            ip_limits: RateTable::new(HOUR_MS),
            verifies: HashMap::default(),
            next_token: 1,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A draw from the shard's RNG (link codes use it too).
    pub fn draw(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.rng)
    }

    /// `RegisterRequest` on the accepting shard: check the number and the per-address limit,
    /// then ask the number's home shard. `peer` is `None` for a connection already gone.
    pub fn request_frame(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        phone: UserId,
        peer: Option<IpAddr>,
        cfg: &Config,
        out: &mut Out,
    ) {
        if !is_valid_user_id(phone) {
            let error = Frame::error(ErrorCode::InvalidNumber, 0, "not an E.164 number");
            return out.send(conn, error);
        }
        let Some(peer_ip) = peer else {
            return;
        };
        let (limit, max) = (cfg.register_per_ip_per_hour, cfg.register_table_max_entries);
        if !self.ip_limits.hit(peer_ip, now_ms, limit, max) {
            let text = "too many registrations from this address";
            return out.send(conn, Frame::error(ErrorCode::RegisterRateLimited, 0, text));
        }
        let reply = out.here(conn);
        let home = home_shard(phone, cfg.shards);
        out.mesh(home, MeshMsg::RegisterRequest { reply, phone });
    }

    /// `RegisterVerify` on the accepting shard: forward it with the connection's static key.
    pub fn verify_frame(
        conn: ConnId,
        phone: UserId,
        code: u32,
        static_key: Option<StaticKey>,
        cfg: &Config,
        out: &mut Out,
    ) {
        if !is_valid_user_id(phone) {
            let error = Frame::error(ErrorCode::InvalidNumber, 0, "not an E.164 number");
            return out.send(conn, error);
        }
        let Some(static_key) = static_key else {
            return;
        };
        let verify = RegisterVerify {
            reply: out.here(conn),
            phone,
            code,
            static_key,
        };
        out.mesh(
            home_shard(phone, cfg.shards),
            MeshMsg::RegisterVerify(verify),
        );
    }

    /// Home side of step 1: rate-limit the number, draw a code, send it out of band.
    pub fn on_request(
        &mut self,
        now_ms: u64,
        reply: ConnRef,
        phone: UserId,
        poisoned: bool,
        cfg: &Config,
        out: &mut Out,
    ) {
        if !is_valid_user_id(phone) || home_shard(phone, cfg.shards) != cfg.shard {
            return out.reply_error(reply, ErrorCode::InvalidNumber, "not an E.164 number");
        }
        if poisoned {
            return out.reply_error(reply, ErrorCode::StorageUnavailable, "storage unavailable");
        }
        let max = cfg.register_table_max_entries;
        if !self
            .number_limits
            .hit(phone, now_ms, cfg.register_per_number_per_hour, max)
            || (!self.codes.contains_key(&phone) && self.codes.len() >= max)
        {
            let text = "too many registrations for this number";
            return out.reply_error(reply, ErrorCode::RegisterRateLimited, text);
        }
        let code = self.rng.gen_range(CODE_MIN..=CODE_MAX);
        let ttl = cfg.registration_code_ttl_ms;
        // A new request replaces an outstanding code (and its wrong-try count).
        let pending = PendingCode {
            code,
            expires_at_ms: now_ms.saturating_add(ttl),
            wrong: 0,
        };
        self.codes.insert(phone, pending);
        out.push(Action::SendSms { phone, code });
        let expires_in_s = u32::try_from(ttl / 1000).unwrap_or(u32::MAX);
        out.reply(
            reply,
            RegisterCodeSent {
                phone,
                expires_in_s,
            }
            .into(),
        );
    }

    /// Home side of step 2: check the code, then ask the key's shard to bind the key.
    pub fn on_verify(
        &mut self,
        now_ms: u64,
        v: RegisterVerify,
        poisoned: bool,
        cfg: &Config,
        out: &mut Out,
    ) {
        if poisoned {
            return out.reply_error(
                v.reply,
                ErrorCode::StorageUnavailable,
                "storage unavailable",
            );
        }
        if let Err((code, text)) = self.check_code(now_ms, v.phone, v.code, cfg) {
            return out.reply_error(v.reply, code, text);
        }
        if self.verifies.len() >= cfg.register_table_max_entries {
            // Checked before consuming the code, so the client can simply retry.
            let text = "too many registrations in progress";
            return out.reply_error(v.reply, ErrorCode::RegisterRateLimited, text);
        }
        // Consumed: a replay of the same code gets NoPendingCode.
        self.codes.remove(&v.phone);
        let token = self.next_token;
        self.next_token = self.next_token.saturating_add(1);
        let claim_shard = key_shard(&v.static_key, cfg.shards);
        let pending = PendingVerify {
            reply: v.reply,
            phone: v.phone,
            static_key: v.static_key,
            claim_shard,
            started_ms: now_ms,
        };
        self.verifies.insert(token, pending);
        let claim = ClaimKey {
            reply_shard: cfg.shard,
            token,
            static_key: v.static_key,
            addr: DeviceAddr::new(v.phone, 0),
        };
        out.mesh(claim_shard, MeshMsg::ClaimKey(claim));
    }

    /// Whether `code` is the outstanding code of `phone`; counts and burns wrong ones.
    fn check_code(
        &mut self,
        now_ms: u64,
        phone: UserId,
        code: u32,
        cfg: &Config,
    ) -> Result<(), (ErrorCode, &'static str)> {
        let Some(pending) = self.codes.get_mut(&phone) else {
            let text = "no outstanding code for this number";
            return Err((ErrorCode::NoPendingCode, text));
        };
        if now_ms >= pending.expires_at_ms {
            self.codes.remove(&phone);
            return Err((ErrorCode::CodeExpired, "code expired"));
        }
        if pending.code != code {
            pending.wrong = pending.wrong.saturating_add(1);
            if pending.wrong >= cfg.register_verify_attempts_max {
                // Burnt: guessing must start over with a new (rate-limited) code.
                self.codes.remove(&phone);
            }
            return Err((ErrorCode::WrongCode, "wrong code"));
        }
        Ok(())
    }

    /// The verification `token` got its `KeyClaimed`.
    pub fn take_verify(&mut self, token: u64) -> Option<PendingVerify> {
        self.verifies.remove(&token)
    }

    /// Timer: forget ended rate windows, stale codes and verifications the registry never
    /// answered. `fetch_limits` is swept by the caller first, as before.
    pub fn sweep(&mut self, now_ms: u64, cfg: &Config, out: &mut Out) {
        self.ip_limits.sweep(now_ms);
        self.number_limits.sweep(now_ms);
        // Keep an expired code one more lifetime so the late verify gets CodeExpired rather
        // than NoPendingCode.
        let ttl = cfg.registration_code_ttl_ms;
        self.codes
            .retain(|_, c| now_ms < c.expires_at_ms.saturating_add(ttl));
        self.fail_verifies(
            |v| now_ms.saturating_sub(v.started_ms) >= ttl,
            "key registry did not answer; register again",
            out,
        );
    }

    /// Answers `StorageUnavailable` to every pending verification `pred` selects (in token
    /// order, for determinism) and forgets it.
    pub fn fail_verifies(
        &mut self,
        pred: impl Fn(&PendingVerify) -> bool,
        text: &str,
        out: &mut Out,
    ) {
        let mut tokens: Vec<u64> = self
            .verifies
            .iter()
            .filter(|(_, v)| pred(v))
            .map(|(&t, _)| t)
            .collect();
        tokens.sort_unstable();
        for token in tokens {
            if let Some(v) = self.verifies.remove(&token) {
                out.reply_error(v.reply, ErrorCode::StorageUnavailable, text);
            }
        }
    }
}
