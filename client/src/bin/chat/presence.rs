//! `chat presence`, `chat privacy`, `chat block` / `chat unblock`, `chat contacts` and
//! `chat call`: presence, privacy and call signalling (`docs/protocol.md` §20, §21; call
//! payloads sealed end to end, `docs/e2ee.md` §17). Typing in `chat talk` is in `chat.rs`
//! (`/typing`, `/recording`, and the partner's notices).

use super::*;
use switchboard_client::calls::{CallPayload, PLACEHOLDER_ANSWER_SDP, PLACEHOLDER_SDP};
use switchboard_client::protocol::presence::{CallKind, ContactOp, PresenceState, Visibility};

/// The ICE candidate `chat call` sends once the call is answered (a documentation address,
/// RFC 5737: signalling only, no media flows).
const PLACEHOLDER_CANDIDATE: &str = "candidate:1 1 udp 2122260223 192.0.2.1 54400 typ host";

#[derive(Args)]
pub(crate) struct PresenceArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// Whose presence to watch (repeat for several).
    #[arg(long, required = true)]
    user: Vec<String>,
    /// Watch this long, printing every change as a JSON line (the subscription is renewed).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

#[derive(Args)]
pub(crate) struct PrivacyArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// Who may see when you were last online: everyone, contacts or nobody.
    #[arg(long, value_parser = parse_visibility)]
    last_seen: Visibility,
    /// Who may see that you are online: everyone, contacts or nobody.
    #[arg(long, value_parser = parse_visibility)]
    online: Visibility,
}

#[derive(Args)]
pub(crate) struct ContactArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// The users (phone numbers).
    #[arg(required = true)]
    users: Vec<String>,
}

#[derive(Args)]
pub(crate) struct ContactsArgs {
    /// add or remove.
    #[arg(value_parser = ["add", "remove"])]
    action: String,
    #[command(flatten)]
    args: ContactArgs,
}

#[derive(Args)]
pub(crate) struct CallArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// Call this number; without it, wait for an incoming call.
    #[arg(long)]
    to: Option<String>,
    /// Answer an incoming call (without --to).
    #[arg(long)]
    answer: bool,
    /// Hang up after this many seconds in the call (or give up waiting).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The SDP to send (the offer with --to, the answer with --answer), sealed end to end;
    /// default: a small built-in placeholder SDP offer (or answer).
    #[arg(long, value_name = "FILE")]
    sdp: Option<std::path::PathBuf>,
}

fn parse_visibility(s: &str) -> Result<Visibility, String> {
    match s {
        "everyone" => Ok(Visibility::EVERYONE),
        "contacts" => Ok(Visibility::CONTACTS),
        "nobody" => Ok(Visibility::NOBODY),
        other => Err(format!("{other:?}: expected everyone, contacts or nobody")),
    }
}

fn visibility_name(v: Visibility) -> &'static str {
    match v {
        Visibility::EVERYONE => "everyone",
        Visibility::CONTACTS => "contacts",
        _ => "nobody",
    }
}

fn state_name(s: PresenceState) -> &'static str {
    match s {
        PresenceState::ONLINE => "online",
        PresenceState::OFFLINE => "offline",
        _ => "unavailable",
    }
}

/// `chat presence`: subscribe and print the states as JSON lines.
pub(crate) fn presence(a: PresenceArgs) -> CliResult {
    let users: Vec<UserId> = a
        .user
        .iter()
        .map(|u| parse_phone(u))
        .collect::<Result<_, _>>()?;
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    // Renew at half the TTL the server grants at most (600 s).
    let ttl_s = 120u32;
    let mut renew_at = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= renew_at {
            for &u in &users {
                session.subscribe_presence(u, ttl_s)?;
            }
            renew_at = Instant::now() + Duration::from_secs(u64::from(ttl_s / 2));
        }
        match session.recv(Some(TALK_POLL))? {
            Some(Event::Presence(p)) => out(json!({
                "user": p.user,
                "state": state_name(p.state),
                "last_seen_ms": p.last_seen_ms,
                "change": p.request_id == 0,
            }))?,
            Some(Event::ServerError { code, text, .. }) => {
                eprintln!("chat: server refused: {code} {text}")
            }
            _ => {}
        }
    }
    session.close()?;
    Ok(())
}

/// Waits for the `PrivacySaved` answering `request_id` and prints it.
fn wait_saved(session: &mut Session, request_id: u64) -> CliResult {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match session.recv(Some(TALK_POLL))? {
            Some(Event::PrivacySaved(s)) if s.request_id == request_id => {
                out(json!({
                    "last_seen": visibility_name(s.last_seen),
                    "online": visibility_name(s.online),
                    "contacts": s.contacts,
                    "blocked": s.blocked,
                }))?;
                return Ok(());
            }
            Some(Event::ServerError { code, ref_id, text }) if ref_id == request_id => {
                return Err(Failure {
                    message: format!("refused: {code} {text}"),
                    status: 1,
                })
            }
            _ => {}
        }
    }
    Err(Failure {
        message: "no answer from the server".into(),
        status: EXIT_TIMEOUT,
    })
}

/// `chat privacy`.
pub(crate) fn privacy(a: PrivacyArgs) -> CliResult {
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let id = session.set_privacy(a.last_seen, a.online)?;
    wait_saved(&mut session, id)?;
    session.close()?;
    Ok(())
}

/// `chat block`, `chat unblock`, `chat contacts add|remove`.
pub(crate) fn edit(a: ContactArgs, op: ContactOp) -> CliResult {
    let users: Vec<UserId> = a
        .users
        .iter()
        .map(|u| parse_phone(u))
        .collect::<Result<_, _>>()?;
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let id = session.edit_contacts(op, &users)?;
    wait_saved(&mut session, id)?;
    session.close()?;
    Ok(())
}

pub(crate) fn contacts(a: ContactsArgs) -> CliResult {
    let op = if a.action == "add" {
        ContactOp::ADD
    } else {
        ContactOp::REMOVE
    };
    edit(a.args, op)
}

fn kind_name(k: CallKind) -> String {
    k.name().map_or_else(|| format!("{k:?}"), str::to_lowercase)
}

/// A call event as a JSON line: the state, who, and the opened payload (`payload`, UTF-8) or
/// why it did not open (`payload_error`); `sealed_bytes` is what the server relayed.
fn call_json(e: &switchboard_client::CallEvent) -> serde_json::Value {
    let mut v = serde_json::Map::new();
    v.insert("call_id".into(), json!(e.call_id));
    v.insert("state".into(), json!(kind_name(e.kind)));
    v.insert("from_user".into(), json!(e.from.user));
    v.insert("from_device".into(), json!(e.from.device));
    v.insert("sealed_bytes".into(), json!(e.relayed.len()));
    match &e.payload {
        CallPayload::Opened(p) => {
            v.insert("payload".into(), json!(String::from_utf8_lossy(p)));
        }
        CallPayload::Failed(err) => {
            v.insert("payload_error".into(), json!(err.to_string()));
        }
        CallPayload::Empty => {}
    }
    serde_json::Value::Object(v)
}

/// `chat call`: prints the TURN credentials, rings (or waits for a ring) with a sealed SDP
/// offer, answers with a sealed SDP answer, sends one sealed ICE candidate once answered,
/// prints every state with the opened payload as a JSON line, hangs up after `--seconds`.
pub(crate) fn call(a: CallArgs) -> CliResult {
    if a.common.plaintext {
        return Err(Failure {
            message: "calls are sealed end to end: drop --plaintext".into(),
            status: 2,
        });
    }
    let sdp = match &a.sdp {
        Some(path) => std::fs::read(path).map_err(|e| Failure {
            message: format!("{}: {e}", path.display()),
            status: 2,
        })?,
        None if a.to.is_some() => PLACEHOLDER_SDP.as_bytes().to_vec(),
        None => PLACEHOLDER_ANSWER_SDP.as_bytes().to_vec(),
    };
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let turn_id = session.request_turn()?;
    let mut current: Option<(u64, UserId)> = None;
    if let Some(to) = &a.to {
        let peer = parse_phone(to)?;
        let call_id = session.call_offer(peer, &sdp)?;
        out(
            json!({ "call_id": call_id, "state": "calling", "peer": peer, "sdp_bytes": sdp.len() }),
        )?;
        current = Some((call_id, peer));
    }
    let mut deadline = Instant::now() + Duration::from_secs(a.seconds);
    loop {
        if Instant::now() >= deadline {
            if let Some((id, peer)) = current {
                if session.call_end(id, CallKind::HANGUP).is_err() {
                    // No key any more (the call was refused): an unsealed, empty hangup.
                    session.call_signal(id, peer, CallKind::HANGUP, Default::default())?;
                }
                out(json!({ "call_id": id, "state": "hung up" }))?;
            }
            break;
        }
        let Some(event) = session.recv(Some(TALK_POLL))? else {
            continue;
        };
        match event {
            Event::TurnCredentials(t) if t.request_id == turn_id => out(json!({
                "turn": {
                    "username": t.auth.username,
                    "password": t.auth.password,
                    "uris": t.auth.uris,
                    "ttl_s": t.ttl_s,
                }
            }))?,
            Event::ServerError { code, ref_id, text } if ref_id == turn_id => {
                eprintln!("chat: no TURN credentials: {code} {text}")
            }
            Event::ServerError { code, ref_id, text } => {
                out(json!({ "call_id": ref_id, "error": format!("{code} {text}") }))?;
                if current.is_some_and(|(id, _)| id == ref_id) {
                    break;
                }
            }
            Event::Call(e) => {
                out(call_json(&e))?;
                match e.kind {
                    CallKind::OFFER
                        if current.is_none() && a.answer && e.payload.opened().is_some() =>
                    {
                        session.call_answer(e.call_id, &sdp)?;
                        session.call_ice(e.call_id, PLACEHOLDER_CANDIDATE.as_bytes())?;
                        out(
                            json!({ "call_id": e.call_id, "state": "answered", "sdp_bytes": sdp.len() }),
                        )?;
                        current = Some((e.call_id, e.from.user));
                        deadline = Instant::now() + Duration::from_secs(a.seconds);
                    }
                    CallKind::ANSWER if current.is_some_and(|(id, _)| id == e.call_id) => {
                        session.call_ice(e.call_id, PLACEHOLDER_CANDIDATE.as_bytes())?;
                        deadline = Instant::now() + Duration::from_secs(a.seconds);
                    }
                    CallKind::REJECT
                    | CallKind::BUSY
                    | CallKind::HANGUP
                    | CallKind::MISSED
                    | CallKind::ANSWERED_ELSEWHERE
                        if current.is_none_or(|(id, _)| id == e.call_id) =>
                    {
                        break
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    session.close()?;
    Ok(())
}
