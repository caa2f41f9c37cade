//! `chat presence`, `chat privacy`, `chat block` / `chat unblock`, `chat contacts` and
//! `chat call`: presence, privacy and call signalling (`docs/protocol.md` §20, §21). Typing in
//! `chat talk` is in `chat.rs` (`/typing`, `/recording`, and the partner's notices).

use super::*;
use bytes::Bytes;
use switchboard_client::protocol::presence::{CallKind, ContactOp, PresenceState, Visibility};

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

/// `chat call`: signalling only. Prints the TURN credentials, rings (or waits for a ring),
/// answers, prints every state as a JSON line, hangs up after `--seconds`.
pub(crate) fn call(a: CallArgs) -> CliResult {
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let turn_id = session.request_turn()?;
    let mut current: Option<(u64, UserId)> = None;
    if let Some(to) = &a.to {
        let peer = parse_phone(to)?;
        let call_id = rand::random::<u64>() | 1;
        session.call_signal(call_id, peer, CallKind::OFFER, Bytes::new())?;
        out(json!({ "call_id": call_id, "state": "calling", "peer": peer }))?;
        current = Some((call_id, peer));
    }
    let mut deadline = Instant::now() + Duration::from_secs(a.seconds);
    loop {
        if Instant::now() >= deadline {
            if let Some((id, peer)) = current {
                session.call_signal(id, peer, CallKind::HANGUP, Bytes::new())?;
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
                out(json!({
                    "call_id": e.call_id,
                    "state": kind_name(e.kind),
                    "from_user": e.from.user,
                    "from_device": e.from.device,
                }))?;
                match e.kind {
                    CallKind::OFFER if current.is_none() && a.answer => {
                        session.call_signal(
                            e.call_id,
                            e.from.user,
                            CallKind::ANSWER,
                            Bytes::new(),
                        )?;
                        out(json!({ "call_id": e.call_id, "state": "answered" }))?;
                        current = Some((e.call_id, e.from.user));
                        deadline = Instant::now() + Duration::from_secs(a.seconds);
                    }
                    CallKind::ANSWER => {
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
