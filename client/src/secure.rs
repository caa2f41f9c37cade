//! End-to-end encryption in the SDK: the device's `switchboard-e2ee` state, opened from the
//! state directory, and the helpers [`crate::Session`] uses to encrypt before `Send`, decrypt
//! after `Deliver`, keep prekeys uploaded, and surface identity changes.
//!
//! Turn it on with [`crate::SessionOptions::e2ee`]. Then:
//!
//! * **State.** `<state>/e2ee/` holds `e2ee.key` and the encrypted `e2ee.state`
//!   (`docs/e2ee.md` §7); a restarted client continues its sessions. Without a state directory
//!   (an ephemeral [`crate::Identity`]) the state lives in memory only.
//! * **Prekeys.** The session announces the `PREKEYS` capability and, at login, publishes an
//!   identity the server never acknowledged (a new device, or a wiped state: `e2ee/published`
//!   names the last identity the server confirmed). When the server says the
//!   device has fewer one-time prekeys than its low-water mark (right after login, or when
//!   others' fetches use them up) the session uploads [`crate::SessionOptions::prekey_top_up`]
//!   new ones by itself; [`crate::Session::upload_prekeys`] does it explicitly and waits for the
//!   server's answer (registration does this once).
//! * **Sending.** [`crate::Session::send`] encrypts with the session it has for the peer, or
//!   fetches the peer's bundle ([`crate::Session::fetch_bundle`]), verifies its signature,
//!   checks the identity against the one recorded for that contact, and starts a session
//!   (X3DH). The envelope, not the plaintext, goes into the outbox, so a retry resends the
//!   same bytes and the ratchet never steps twice for one message.
//! * **Receiving.** A `Deliver` is decrypted when [`crate::Session::recv`] hands it out, with
//!   `decrypt_deferred`; the state is saved before the `Ack` that follows (with the dedup
//!   cache), so a crash in between means a redelivery that decrypts again, never a lost
//!   message.
//! * **Identity changes are never silent.** A bundle or a first message whose identity
//!   differs from the recorded one is refused: `send` fails with
//!   [`crate::Error::IdentityChanged`], `recv` returns [`crate::Event::IdentityChanged`] and
//!   holds the message (unacknowledged) until the caller calls
//!   [`crate::Session::accept_identity`] after the user compared safety numbers; then the held
//!   messages are decrypted and handed out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use protocol::frame::{DeviceKeys, OneTimePrekey};
use protocol::{DeviceId, UserId};
use switchboard_e2ee::{
    Address as PeerAddress, E2ee, IdentityPublic, PreKeyBundle, SafetyNumber, StateStore,
};

use crate::error::{Error, Result};
use crate::state::Identity;

/// Directory (inside the state directory) holding the E2EE state.
pub const E2EE_DIR: &str = "e2ee";

/// File (in the E2EE directory) naming the identity the server acknowledged an upload of.
pub const PUBLISHED_FILE: &str = "published";

/// One-time prekeys uploaded per automatic top-up by default.
pub const PREKEY_TOP_UP_DEFAULT: u32 = 100;

/// The E2EE address of a protocol address.
pub fn peer(user: UserId, device: DeviceId) -> PeerAddress {
    PeerAddress::new(user, device)
}

/// The E2EE state directory of a client state directory.
pub fn state_dir(client_state: &Path) -> PathBuf {
    client_state.join(E2EE_DIR)
}

/// Opens (or creates) the E2EE state of `(user, device)`: in `<state>/e2ee/` when `identity`
/// has a state directory, in memory otherwise.
pub fn open(identity: &Identity, user: UserId, device: DeviceId) -> Result<E2ee> {
    match identity.state_dir() {
        Some(dir) => {
            let store = StateStore::open_dir(&state_dir(dir))?;
            Ok(E2ee::new(store, peer(user, device))?)
        }
        None => Ok(E2ee::in_memory(peer(user, device))),
    }
}

/// Saves a freshly linked device's E2EE state (the identity its link string carried) in
/// `<client_state>/e2ee/`, replacing whatever state was there (a state directory without an
/// account has nothing worth keeping), and forgets any earlier published identity.
pub fn save_linked(client_state: &Path, e2ee: &E2ee) -> Result<()> {
    let dir = state_dir(client_state);
    let store = StateStore::open_dir(&dir)?;
    store.save(&e2ee.export_state())?;
    let published = dir.join(PUBLISHED_FILE);
    if published.exists() {
        std::fs::remove_file(&published).map_err(|e| Error::state(&published, e))?;
    }
    Ok(())
}

/// Opens the E2EE state of the account saved in `identity`'s state directory, without
/// connecting (safety numbers, inspection).
pub fn open_saved(identity: &Identity) -> Result<E2ee> {
    let account = identity.require_account()?;
    open(identity, account.user, account.device)
}

/// The safety number with `contact` (device 0), from the identity recorded for it. `None` when
/// no identity is recorded yet (no message exchanged).
pub fn safety_number(e2ee: &E2ee, contact: UserId) -> Option<SafetyNumber> {
    e2ee.safety_number(peer(contact, 0)).ok()
}

/// The safety number `e2ee` would have with `contact` if `their` identity were accepted.
pub fn safety_number_with(e2ee: &E2ee, contact: UserId, their: &IdentityPublic) -> SafetyNumber {
    SafetyNumber::new(e2ee.local_address().user, &e2ee.identity(), contact, their)
}

/// The e2ee crate's bundle from the fields of a `PrekeyBundle` frame.
pub fn bundle_from_frame(keys: &DeviceKeys, one_time: Option<OneTimePrekey>) -> PreKeyBundle {
    PreKeyBundle {
        identity_dh: keys.identity_dh,
        identity_sign: keys.identity_sign,
        signed_prekey_id: keys.signed_prekey_id,
        signed_prekey: keys.signed_prekey,
        signed_prekey_sig: keys.signed_prekey_sig,
        one_time_prekey: one_time.map(|k| (k.id, k.key)),
    }
}

/// What the server last said about this device's one-time prekeys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrekeyCount {
    /// One-time prekeys the server holds for this device.
    pub one_time_remaining: u32,
    /// The server's low-water mark.
    pub low_water: u32,
}

/// A delivery held back until an identity change is accepted.
#[derive(Debug)]
pub(crate) struct Held<Q> {
    pub peer: PeerAddress,
    pub item: Q,
}

/// The session's E2EE side.
pub(crate) struct Secure<Q> {
    pub e2ee: E2ee,
    /// Where the acknowledged identity is remembered (none without a state directory).
    pub published_path: Option<PathBuf>,
    /// Whether the server acknowledged an upload of this identity.
    pub published: bool,
    /// Deferred decryptions not saved yet (saved before the next `Ack`).
    pub dirty: bool,
    /// Keys per automatic top-up (0: never by itself).
    pub top_up: u32,
    pub upload_in_flight: bool,
    /// The outcome of the last upload, once the server answered it.
    pub upload_result: Option<std::result::Result<PrekeyCount, Error>>,
    pub last_count: Option<PrekeyCount>,
    /// Identities presented by peers and refused, awaiting `accept_identity`.
    pub pending_identity: HashMap<PeerAddress, IdentityPublic>,
    /// A bundle refused for an identity change, used after acceptance (no second fetch).
    pub bundle_cache: HashMap<PeerAddress, PreKeyBundle>,
    /// Deliveries held for a pending identity change, in arrival order.
    pub held: Vec<Held<Q>>,
    /// Fetches sent and not answered: request id -> peer.
    pub fetches: HashMap<u64, (UserId, DeviceId)>,
    /// Answers to fetches, by request id.
    pub answers: HashMap<u64, std::result::Result<PreKeyBundle, Error>>,
}

impl<Q> std::fmt::Debug for Secure<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secure")
            .field("e2ee", &self.e2ee)
            .field("held", &self.held.len())
            .field("pending_identity", &self.pending_identity.len())
            .finish_non_exhaustive()
    }
}

impl<Q> Secure<Q> {
    pub fn new(e2ee: E2ee, top_up: u32, client_state: Option<&Path>) -> Self {
        let published_path = client_state.map(|d| state_dir(d).join(PUBLISHED_FILE));
        let mine = hex::encode(e2ee.identity().dh);
        let published = published_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .is_some_and(|t| t.trim() == mine);
        Self {
            e2ee,
            published_path,
            published,
            dirty: false,
            top_up,
            upload_in_flight: false,
            upload_result: None,
            last_count: None,
            pending_identity: HashMap::new(),
            bundle_cache: HashMap::new(),
            held: Vec::new(),
            fetches: HashMap::new(),
            answers: HashMap::new(),
        }
    }

    /// The server acknowledged an upload: remember that this identity is published (so a
    /// wiped or replaced state is noticed at the next login and published again).
    pub fn mark_published(&mut self) {
        if self.published {
            return;
        }
        self.published = true;
        if let Some(path) = &self.published_path {
            let tmp = path.with_extension("tmp");
            let text = format!("{}\n", hex::encode(self.e2ee.identity().dh));
            let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                // Only costs an extra upload at the next login.
                tracing::warn!(path = %path.display(), error = %e, "could not record the published identity");
            }
        }
    }

    /// Saves deferred decryptions (before acknowledging them).
    pub fn save_if_dirty(&mut self) -> Result<()> {
        if self.dirty {
            self.e2ee.save()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Records a refused identity; returns the typed error for the caller.
    pub fn identity_changed(&mut self, peer: PeerAddress, received: IdentityPublic) -> Error {
        let safety_number = safety_number_with(&self.e2ee, peer.user, &received).grouped();
        self.pending_identity.insert(peer, received);
        Error::IdentityChanged {
            user: peer.user,
            device: peer.device,
            safety_number,
        }
    }
}
