//! Switchboard client SDK: blocking `std::net`, no async runtime.
//!
//! The wire format, framing and Noise handshake come from the sans-IO `protocol` crate (the
//! same code the gateway links); this crate adds sockets, timeouts, state on disk and the
//! client-side rules of the protocol (acks, dedup, keepalive, retries).
//!
//! ```no_run
//! use std::time::Duration;
//! use switchboard_client::protocol::MsgType;
//! use switchboard_client::{Connection, Event, Identity, SessionOptions, Timeouts};
//!
//! # fn main() -> switchboard_client::Result<()> {
//! // Device key in ./state/identity.key (created if missing); server key pinned on first use.
//! let identity = Identity::load_or_create("state")?;
//! let mut conn = Connection::connect("127.0.0.1:7300", &identity, Timeouts::default())?;
//!
//! // Once per device: register the number (the code arrives out of band).
//! conn.register_request(14155550100)?;
//! let code = 123456; // from the SMS, or `registration::CodeFile` with the dev server
//! let account = conn.register_verify(14155550100, code)?; // saved in state/account.json
//!
//! let mut session = conn.login_with(account.user, account.device, SessionOptions::default())?;
//! // Every device of the recipient gets it (one SendMulti when the server has MULTI_DEVICE).
//! let id = session.send(14155550101, b"hi", MsgType::TEXT)?;
//! session.wait_server_ack(id, Duration::from_secs(10))?; // ✓: durable on the server
//! while let Some(event) = session.recv(Some(Duration::from_secs(5)))? {
//!     if let Event::Message(m) = event {
//!         println!("{}: {}", m.from, String::from_utf8_lossy(&m.payload));
//!         session.mark_read(m.from.user, m.client_msg_id)?;
//!     }
//! }
//! session.close()
//! # }
//! ```
//!
//! Map of the crate:
//!
//! * [`Identity`] and the state directory ([`state`]): device key, pinned server key, account.
//! * [`Connection`]: TCP + preamble + Noise XX, server-key pinning ([`ServerKeyPolicy`]),
//!   registration, login.
//! * [`Session`]: send / recv / acks / dedup / keepalive / outbox / reconnect; the
//!   [`session`] module documentation says exactly when acks are sent.
//! * [`secure`]: end-to-end encryption (X3DH + Double Ratchet from `switchboard-e2ee`), on with
//!   [`SessionOptions::e2ee`]: prekey upload and top-up, bundle fetch, encrypt before `Send`,
//!   decrypt after `Deliver`, identity changes as typed errors and events, state in
//!   `<state>/e2ee/`.
//! * [`PayloadCodec`]: a payload transformation seam for sessions without E2EE (plaintext by
//!   default).
//! * [`DedupCache`], [`Outbox`]: the bounded client-side state, usable on their own.
//! * [`calls`]: end-to-end sealed call signalling ([`Session::call_offer`], `call_answer`,
//!   `call_ice`, `call_end`; [`Event::Call`] carries the opened payload), docs/e2ee.md §17.
//! * [`registration`]: phone and code parsing, and the development server's code file.
//! * [`devices`]: linked devices (capability `MULTI_DEVICE`). A new device calls
//!   [`Connection::request_link`] (a [`LinkOffer`] with a printable [`LinkString`]), the
//!   primary [`Session::approve_link`], the new device [`Connection::wait_linked`] and logs
//!   in. [`Session::devices`] fetches a user's signature-checked [`DeviceList`] (cached,
//!   updated by the server: [`Event::DevicesChanged`]); [`Session::unlink`] removes one
//!   ([`Error::DeviceRemoved`] on the removed device). [`Session::send`] then reaches every
//!   device of the recipient plus sync copies for this account's other devices
//!   ([`Event::SyncCopy`] there), retrying a stale device list under the same id; receipts
//!   name the device ([`Session::receipts`] per message, [`Event::ReadElsewhere`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod calls;
mod channel;
pub mod codec;
pub mod connection;
pub mod dedup;
pub mod devices;
pub mod error;
pub mod groups;
pub mod media;
pub mod media_session;
pub mod outbox;
pub mod presence;
pub mod registration;
pub mod secure;
pub mod session;
pub mod state;
pub mod status;

pub use calls::{CallEvent, CallOpenError, CallPayload};
pub use codec::{CodecError, PayloadCodec, PlaintextCodec};
pub use connection::{
    CodeSent, Connection, LinkOffer, ServerKeyPolicy, Timeouts, Welcome, CLIENT_CAPABILITIES,
};
pub use dedup::{DedupCache, MsgKey};
pub use devices::{
    DeviceInfo, DeviceList, DeviceListCache, LinkString, LinkStringError, MessageReceipts,
};
pub use error::{Error, LinkRefusal, ProtocolError, Result, ServerCode, UnlinkRefusal};
pub use outbox::{Outbox, PendingSend};
pub use secure::PrekeyCount;
pub use session::{new_client_msg_id, Event, Session, SessionOptions};
pub use state::{Account, Identity};

/// The protocol crate this SDK speaks, re-exported so callers can name frames, codes and
/// message types without a separate dependency.
pub use protocol;

/// The end-to-end encryption crate the SDK uses, re-exported (safety numbers, bundles,
/// identities).
pub use switchboard_e2ee as e2ee;
