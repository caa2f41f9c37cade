//! Media slots: the home shard's side of encrypted media (docs/protocol.md §19).
//!
//! The shard grants upload slots and download URLs; it never sees a byte of media. A slot
//! request is checked against its class's size limit, the user's daily byte quota and the
//! user's request rate, and answered with a URL whose token (`protocol::media::Token`) is
//! signed with the media secret: the HTTP endpoint trusts the token alone, so the shard and
//! the endpoint share no state at run time.
//!
//! Decisions:
//! * Quota and rate windows live in memory (bounded tables, failing closed when full). A
//!   restart forgets them, which at worst lets a user be granted one more day's quota; the
//!   blobs themselves are bounded by the endpoint's TTL sweep.
//! * Slot ids grow strictly per shard: `max(last + 1, now_ms << 16)`, so they stay unique
//!   across restarts as long as the clock does not step back by more than the downtime.
//! * Download URLs are granted to any logged-in user that names the hash: the hash of an
//!   encrypted blob travels only inside end-to-end encrypted messages, so knowing it is the
//!   capability (as in WhatsApp's media model).

use protocol::frame::{MediaDownload, MediaDownloadRequest, MediaSlot, MediaSlotRequest, MediaUrl};
use protocol::media::{MediaClass, Token, TokenOp};
use protocol::{capability, DeviceAddr, ErrorCode, Frame, UserId};

use crate::limits::RateTable;
use crate::out::Out;
use crate::types::HashMap;
use crate::ConnId;

/// The media secret; its `Debug` never prints it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct MediaSecret(pub [u8; 32]);

impl std::fmt::Debug for MediaSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaSecret(..)")
    }
}

/// Media limits and the secret, from the daemon's configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct MediaConfig {
    /// HMAC key of the tokens (`<data_dir>/media.key`). All zeros: media is off
    /// (`MediaUnavailable`).
    pub secret: MediaSecret,
    /// Base of the URLs handed out, e.g. `http://127.0.0.1:7302` (`media_public_url`).
    pub public_url: String,
    /// Largest image (`media_image_bytes_max`).
    pub image_bytes_max: u64,
    /// Largest video (`media_video_bytes_max`).
    pub video_bytes_max: u64,
    /// Largest audio file (`media_audio_bytes_max`).
    pub audio_bytes_max: u64,
    /// Largest document (`media_document_bytes_max`).
    pub document_bytes_max: u64,
    /// Bytes of slots one user may be granted per day window (`media_quota_bytes_per_day`).
    pub quota_bytes_per_day: u64,
    /// Media requests (slots and downloads) per user per minute (`media_requests_per_minute`).
    pub requests_per_minute: u32,
    /// Lifetime of an upload or download URL (`media_url_ttl_s`, in ms here).
    pub url_ttl_ms: u64,
    /// Most users each media table (rate, quota) tracks per shard; when full, requests from
    /// new users are refused with `MediaRateLimited` until the tick sweeps ended windows.
    pub table_entries_max: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            secret: MediaSecret::default(),
            public_url: String::new(),
            image_bytes_max: 16 << 20,
            video_bytes_max: 100 << 20,
            audio_bytes_max: 16 << 20,
            document_bytes_max: 100 << 20,
            quota_bytes_per_day: 2 << 30,
            requests_per_minute: 60,
            url_ttl_ms: 3_600_000,
            table_entries_max: 100_000,
        }
    }
}

impl MediaConfig {
    /// Whether the endpoint is configured (a secret and a URL).
    pub fn enabled(&self) -> bool {
        self.secret.0 != [0u8; 32] && !self.public_url.is_empty()
    }

    /// The size limit of `class`.
    pub fn class_bytes_max(&self, class: MediaClass) -> u64 {
        match class {
            MediaClass::IMAGE => self.image_bytes_max,
            MediaClass::VIDEO => self.video_bytes_max,
            MediaClass::AUDIO => self.audio_bytes_max,
            _ => self.document_bytes_max,
        }
    }
}

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 24 * 3600 * 1000;

/// One user's quota window.
#[derive(Clone, Copy, Debug)]
struct Quota {
    start_ms: u64,
    bytes: u64,
}

/// The media sub-state of a shard.
#[derive(Debug)]
pub(crate) struct Media {
    rate: RateTable<UserId>,
    quota: HashMap<UserId, Quota>,
    last_slot_id: u64,
    /// Slots granted.
    pub slots_granted: u64,
    /// Bytes of slots granted.
    pub slot_bytes_granted: u64,
    /// Slot requests refused (any reason).
    pub slots_refused: u64,
    /// Download URLs granted.
    pub downloads_granted: u64,
}

impl Media {
    pub fn new() -> Self {
        Self {
            rate: RateTable::new(MINUTE_MS),
            quota: HashMap::default(),
            last_slot_id: 0,
            slots_granted: 0,
            slot_bytes_granted: 0,
            slots_refused: 0,
            downloads_granted: 0,
        }
    }

    /// Why a request from `key` (with `capabilities`) is refused before its own checks.
    fn gate(
        &mut self,
        now_ms: u64,
        key: DeviceAddr,
        capabilities: u64,
        cfg: &MediaConfig,
    ) -> Result<(), (ErrorCode, &'static str)> {
        if capabilities & capability::MEDIA == 0 {
            return Err((
                ErrorCode::MediaUnavailable,
                "MEDIA capability not announced",
            ));
        }
        if !cfg.enabled() {
            return Err((ErrorCode::MediaUnavailable, "media endpoint not configured"));
        }
        let (limit, max) = (cfg.requests_per_minute, cfg.table_entries_max);
        if !self.rate.hit(key.user, now_ms, limit, max) {
            return Err((ErrorCode::MediaRateLimited, "media_requests_per_minute"));
        }
        Ok(())
    }

    /// `MediaSlotRequest` from the logged-in device `key` on `conn`.
    pub fn slot_request(
        &mut self,
        now_ms: u64,
        (conn, key, capabilities): (ConnId, DeviceAddr, u64),
        req: &MediaSlotRequest,
        cfg: &MediaConfig,
        out: &mut Out,
    ) {
        let checked = self
            .gate(now_ms, key, capabilities, cfg)
            .and_then(|()| self.check_slot(now_ms, key.user, req, cfg));
        if let Err((code, text)) = checked {
            self.slots_refused += 1;
            return out.send(conn, Frame::error(code, req.request_id, text));
        }
        self.last_slot_id = self.last_slot_id.saturating_add(1).max(now_ms << 16);
        let expires_at_s = now_ms.saturating_add(cfg.url_ttl_ms) / 1000;
        let token = Token {
            op: TokenOp::UPLOAD,
            user: key.user,
            slot_id: self.last_slot_id,
            size: req.size,
            sha256: req.sha256,
            expires_at_s,
            class: req.class,
        };
        let url = format!(
            "{}/v1/upload/{}",
            cfg.public_url,
            token.to_text(&cfg.secret.0)
        );
        self.slots_granted += 1;
        self.slot_bytes_granted += req.size;
        let slot = MediaSlot {
            request_id: req.request_id,
            slot_id: self.last_slot_id,
            expires_at_ms: expires_at_s * 1000,
            url: MediaUrl(url),
        };
        out.send(conn, slot.into());
    }

    /// Class limit, then the daily quota (charged only when every check passed).
    fn check_slot(
        &mut self,
        now_ms: u64,
        user: UserId,
        req: &MediaSlotRequest,
        cfg: &MediaConfig,
    ) -> Result<(), (ErrorCode, &'static str)> {
        if req.size == 0 || req.size > cfg.class_bytes_max(req.class) {
            return Err((ErrorCode::MediaTooLarge, "size over the class limit (or 0)"));
        }
        if !self.quota.contains_key(&user) && self.quota.len() >= cfg.table_entries_max {
            return Err((ErrorCode::MediaRateLimited, "media quota table full"));
        }
        let q = self.quota.entry(user).or_insert(Quota {
            start_ms: now_ms,
            bytes: 0,
        });
        if now_ms.saturating_sub(q.start_ms) >= DAY_MS {
            *q = Quota {
                start_ms: now_ms,
                bytes: 0,
            };
        }
        let after = q.bytes.saturating_add(req.size);
        if after > cfg.quota_bytes_per_day {
            return Err((ErrorCode::MediaQuotaExceeded, "media_quota_bytes_per_day"));
        }
        q.bytes = after;
        Ok(())
    }

    /// `MediaDownloadRequest` from the logged-in device `key` on `conn`.
    pub fn download_request(
        &mut self,
        now_ms: u64,
        (conn, key, capabilities): (ConnId, DeviceAddr, u64),
        req: &MediaDownloadRequest,
        cfg: &MediaConfig,
        out: &mut Out,
    ) {
        if let Err((code, text)) = self.gate(now_ms, key, capabilities, cfg) {
            return out.send(conn, Frame::error(code, req.request_id, text));
        }
        let expires_at_s = now_ms.saturating_add(cfg.url_ttl_ms) / 1000;
        let token = Token {
            op: TokenOp::DOWNLOAD,
            user: key.user,
            slot_id: 0,
            size: 0,
            sha256: req.sha256,
            expires_at_s,
            class: MediaClass(0),
        };
        let url = format!(
            "{}/v1/blob/{}",
            cfg.public_url,
            token.to_text(&cfg.secret.0)
        );
        self.downloads_granted += 1;
        let answer = MediaDownload {
            request_id: req.request_id,
            expires_at_ms: expires_at_s * 1000,
            url: MediaUrl(url),
        };
        out.send(conn, answer.into());
    }

    /// Forgets ended windows.
    pub fn sweep(&mut self, now_ms: u64) {
        self.rate.sweep(now_ms);
        self.quota
            .retain(|_, q| now_ms.saturating_sub(q.start_ms) < DAY_MS);
    }
}
