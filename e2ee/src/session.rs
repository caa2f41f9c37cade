//! Sessions as typed states (rustls style: a transition consumes the old state).
//!
//! ```text
//!   initiator:  InitiatorPending --(first reply decrypts)--> Established
//!   responder:  Established::respond(PreKeyMessage)   ---> Established
//! ```
//!
//! An [`InitiatorPending`] session sends [`PreKeyMessage`]s (X3DH fields + ratchet message)
//! until the first message from the responder decrypts; [`InitiatorPending::decrypt`] then
//! consumes it and returns an [`Established`] session, which sends plain [`Message`]s. On a
//! decryption failure the pending state is handed back unchanged in [`Rejected`].

use rand::{CryptoRng, RngCore};
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::codec::{Put, Reader};
use crate::envelope::{Envelope, Message, PreKeyMessage, MAX_PLAINTEXT_BYTES};
use crate::error::{DecodeError, Error};
use crate::keys::{IdentityKeyPair, IdentityPublic, PreKeyBundle, PreKeyStore};
use crate::ratchet::RatchetState;
use crate::x3dh::{self, AssociatedData, Initiated, PreKeyInit};

/// A refused transition: the state that was consumed, handed back unchanged, and the error.
#[derive(Debug)]
pub struct Rejected<S> {
    /// The unchanged state (boxed: a session state is several hundred bytes).
    pub state: Box<S>,
    /// Why the transition was refused.
    pub error: Error,
}

fn check_len(plaintext: &[u8]) -> Result<(), Error> {
    if plaintext.len() > MAX_PLAINTEXT_BYTES {
        return Err(Error::PlaintextTooLarge {
            len: plaintext.len(),
            max: MAX_PLAINTEXT_BYTES,
        });
    }
    Ok(())
}

/// Initiator state before the responder answered.
#[derive(Clone, Debug)]
pub struct InitiatorPending {
    ratchet: RatchetState,
    ad: AssociatedData,
    init: PreKeyInit,
    remote: IdentityPublic,
}

impl InitiatorPending {
    /// Runs X3DH against `bundle` (refusing a bad signature) and `RatchetInitAlice`.
    pub fn start<R: RngCore + CryptoRng + ?Sized>(
        identity: &IdentityKeyPair,
        bundle: &PreKeyBundle,
        rng: &mut R,
    ) -> Result<Self, Error> {
        let x = x3dh::initiate(identity, bundle, rng)?;
        let ratchet = RatchetState::init_alice(&x.shared_key, &x.remote_ratchet_key, rng)?;
        Ok(Self::from_parts(x, ratchet))
    }

    /// From an X3DH result and a given first ratchet key pair (test vectors).
    pub fn from_x3dh(x: Initiated, ratchet_key: StaticSecret) -> Result<Self, Error> {
        let ratchet =
            RatchetState::init_alice_with_key(&x.shared_key, &x.remote_ratchet_key, ratchet_key)?;
        Ok(Self::from_parts(x, ratchet))
    }

    fn from_parts(x: Initiated, ratchet: RatchetState) -> Self {
        Self {
            ratchet,
            ad: x.ad,
            init: x.init,
            remote: x.remote_identity,
        }
    }

    /// Encrypts into a PreKeyMessage.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<PreKeyMessage, Error> {
        check_len(plaintext)?;
        let (header, ciphertext) = self.ratchet.encrypt(plaintext, self.ad.as_bytes())?;
        Ok(PreKeyMessage {
            init: self.init,
            message: Message { header, ciphertext },
        })
    }

    /// Decrypts the responder's first reply; on success the session is established.
    pub fn decrypt<R: RngCore + CryptoRng + ?Sized>(
        mut self,
        message: &Message,
        rng: &mut R,
    ) -> Result<(Established, Zeroizing<Vec<u8>>), Rejected<Self>> {
        match self.ratchet.decrypt(
            &message.header,
            &message.ciphertext,
            self.ad.as_bytes(),
            rng,
        ) {
            Ok(plaintext) => Ok((
                Established {
                    ratchet: self.ratchet,
                    ad: self.ad,
                    remote: self.remote,
                    base_key: self.init.base_key,
                },
                plaintext,
            )),
            Err(error) => Err(Rejected {
                state: Box::new(self),
                error,
            }),
        }
    }

    /// The responder's identity.
    pub fn remote_identity(&self) -> &IdentityPublic {
        &self.remote
    }

    /// The X3DH fields this session sends.
    pub fn init(&self) -> &PreKeyInit {
        &self.init
    }
}

/// An established session: both sides have a sending chain.
#[derive(Clone, Debug)]
pub struct Established {
    ratchet: RatchetState,
    ad: AssociatedData,
    remote: IdentityPublic,
    /// `EK_A` of the X3DH that created the session: a repeated PreKeyMessage with this base
    /// key belongs to this session.
    base_key: [u8; 32],
}

impl Established {
    /// Responder side: X3DH `respond` (deleting the one-time prekey), `RatchetInitBob` with the
    /// signed prekey, then the first message. Transactional: the one-time prekey is deleted
    /// from `prekeys` only if the first message decrypts.
    pub fn respond<R: RngCore + CryptoRng + ?Sized>(
        identity: &IdentityKeyPair,
        prekeys: &mut PreKeyStore,
        message: &PreKeyMessage,
        rng: &mut R,
    ) -> Result<(Self, Zeroizing<Vec<u8>>), Error> {
        let mut staged = prekeys.clone();
        let x = x3dh::respond(identity, &mut staged, &message.init)?;
        let mut ratchet = RatchetState::init_bob(&x.shared_key, x.ratchet_key.clone());
        let plaintext = ratchet.decrypt(
            &message.message.header,
            &message.message.ciphertext,
            x.ad.as_bytes(),
            rng,
        )?;
        *prekeys = staged;
        Ok((
            Self {
                ratchet,
                ad: x.ad,
                remote: x.remote_identity,
                base_key: message.init.base_key,
            },
            plaintext,
        ))
    }

    /// Encrypts into a normal Message.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Message, Error> {
        check_len(plaintext)?;
        let (header, ciphertext) = self.ratchet.encrypt(plaintext, self.ad.as_bytes())?;
        Ok(Message { header, ciphertext })
    }

    /// Decrypts a message; on error the session is unchanged.
    pub fn decrypt<R: RngCore + CryptoRng + ?Sized>(
        &mut self,
        message: &Message,
        rng: &mut R,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.ratchet.decrypt(
            &message.header,
            &message.ciphertext,
            self.ad.as_bytes(),
            rng,
        )
    }

    /// The peer's identity.
    pub fn remote_identity(&self) -> &IdentityPublic {
        &self.remote
    }

    /// The ratchet state (for inspection).
    pub fn ratchet(&self) -> &RatchetState {
        &self.ratchet
    }
}

/// Either state, for storing sessions side by side.
#[derive(Clone, Debug)]
pub enum Session {
    /// Initiator, no reply yet.
    Pending(InitiatorPending),
    /// Established.
    Established(Established),
}

impl Session {
    /// The peer's identity.
    pub fn remote_identity(&self) -> &IdentityPublic {
        match self {
            Session::Pending(s) => &s.remote,
            Session::Established(s) => &s.remote,
        }
    }

    /// The X3DH base key that created the session.
    pub fn base_key(&self) -> &[u8; 32] {
        match self {
            Session::Pending(s) => &s.init.base_key,
            Session::Established(s) => &s.base_key,
        }
    }

    /// Whether the session is established.
    pub fn is_established(&self) -> bool {
        matches!(self, Session::Established(_))
    }

    /// Encrypts: a PreKeyMessage while pending, a Message once established.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Envelope, Error> {
        match self {
            Session::Pending(s) => s.encrypt(plaintext).map(Envelope::PreKey),
            Session::Established(s) => s.encrypt(plaintext).map(Envelope::Message),
        }
    }

    /// Decrypts a Message, moving a pending session to established on success. On error the
    /// returned session is the one given, unchanged.
    pub fn decrypt<R: RngCore + CryptoRng + ?Sized>(
        self,
        message: &Message,
        rng: &mut R,
    ) -> (Session, Result<Zeroizing<Vec<u8>>, Error>) {
        match self {
            Session::Pending(p) => match p.decrypt(message, rng) {
                Ok((est, pt)) => (Session::Established(est), Ok(pt)),
                Err(Rejected { state, error }) => (Session::Pending(*state), Err(error)),
            },
            Session::Established(mut e) => {
                let r = e.decrypt(message, rng);
                (Session::Established(e), r)
            }
        }
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        match self {
            Session::Pending(s) => {
                out.put_u8(1);
                s.ratchet.put(out);
                out.put(s.ad.as_bytes());
                s.remote.put(out);
                s.init.identity.put(out);
                out.put(&s.init.base_key);
                out.put_u32(s.init.signed_prekey_id);
                out.put_flag(s.init.one_time_prekey_id.is_some());
                out.put_u32(s.init.one_time_prekey_id.unwrap_or(0));
            }
            Session::Established(s) => {
                out.put_u8(2);
                s.ratchet.put(out);
                out.put(s.ad.as_bytes());
                s.remote.put(out);
                out.put(&s.base_key);
            }
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.u8("session_state")? {
            1 => {
                let ratchet = RatchetState::read(r)?;
                let ad = AssociatedData::read(r)?;
                let remote = IdentityPublic::read(r)?;
                let identity = IdentityPublic::read(r)?;
                let base_key = r.array("base_key")?;
                let signed_prekey_id = r.u32("signed_prekey_id")?;
                let has = r.flag("one_time_prekey_used")?;
                let id = r.u32("one_time_prekey_id")?;
                Ok(Session::Pending(InitiatorPending {
                    ratchet,
                    ad,
                    remote,
                    init: PreKeyInit {
                        identity,
                        base_key,
                        signed_prekey_id,
                        one_time_prekey_id: has.then_some(id),
                    },
                }))
            }
            2 => Ok(Session::Established(Established {
                ratchet: RatchetState::read(r)?,
                ad: AssociatedData::read(r)?,
                remote: IdentityPublic::read(r)?,
                base_key: r.array("base_key")?,
            })),
            _ => Err(DecodeError::InvalidValue {
                field: "session_state",
            }),
        }
    }
}
