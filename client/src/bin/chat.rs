//! `chat`: the Switchboard command-line client.
//!
//! ```text
//! chat register --server 127.0.0.1:7300 --state DIR --phone 14155550100 [--code N | --code-file PATH | --data-dir DIR]
//! chat send     --server 127.0.0.1:7300 --state DIR --to 14155550101 --text "hi" [--wait-ack] [--accept-identity-change]
//! chat recv     --server 127.0.0.1:7300 --state DIR --count N [--timeout-s T] [--read] [--accept-identity-change]
//! chat talk     --server 127.0.0.1:7300 --state DIR --to 14155550101      (alias: interactive)
//! chat safety-number --state DIR --contact 14155550101
//! chat link     --server 127.0.0.1:7300 --state NEWDIR                  (new device: show a link string, wait)
//! chat link     --server 127.0.0.1:7300 --state DIR --approve LINK_STRING (primary: approve it)
//! chat devices  --server 127.0.0.1:7300 --state DIR [--user 14155550101] [--json]
//! chat unlink   --server 127.0.0.1:7300 --state DIR ID
//! chat send-file  --server 127.0.0.1:7300 --state DIR --to 14155550101 PATH [--caption TEXT]
//! chat recv-files --server 127.0.0.1:7300 --state DIR --dir OUT [--count N]
//! chat status post --server 127.0.0.1:7300 --state DIR --to 14155550101 --text "hi" | --file PATH
//! chat status list --server 127.0.0.1:7300 --state DIR [--dir OUT]
//! chat group    create NAME --members A,B | add G --members C | remove G --members C |
//!               leave G | info G | send G --text "hi"      (see chat/group.rs)
//! chat talk     --server 127.0.0.1:7300 --state DIR --group G
//! ```
//!
//! Linked devices: an account has a primary device (0, the one that registered) and up to a
//! few companions. `chat link` on the new device prints a link string (`swb-link:1:…`) and
//! waits; `chat link --approve` on the primary approves it; then the new device saves the
//! account and publishes its prekeys. Messages go to every device of the recipient, and a
//! copy to the sender's other devices (shown as sent from another device). Senders and
//! receipts name the device (`14155550100/1`).
//!
//! Messages are end-to-end encrypted (X3DH + Double Ratchet, `docs/e2ee.md`); the encryption
//! state lives in the same state directory (`e2ee/`). `register` publishes the device's
//! prekeys. A contact whose identity key changed is refused with a warning until the change is
//! accepted (`--accept-identity-change`, or `/accept` in `talk`) after comparing safety numbers
//! (`safety-number`). `--plaintext` turns encryption off (the server can read everything).
//!
//! Machine-readable results go to stdout as one JSON object per line; progress, receipts and
//! errors go to stderr. Exit status: 0 success, 1 error, 2 usage error, 3 timeout.
#![forbid(unsafe_code)]

#[path = "chat/group.rs"]
mod group;
#[path = "chat/media.rs"]
mod media;
#[path = "chat/status.rs"]
mod status;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use switchboard_client::protocol::presence::{ContactOp, TypingState};
use switchboard_client::protocol::DeviceAddr;
use switchboard_client::protocol::{ErrorCode, UserId};
use switchboard_client::protocol::{Message, MsgType};
use switchboard_client::registration::{parse_code, parse_phone, CodeFile};
use switchboard_client::{
    secure, Account, Connection, DeviceList, Error, Event, Identity, LinkString, ServerKeyPolicy,
    Session, SessionOptions, Timeouts,
};

/// Exit status for a timeout.
const EXIT_TIMEOUT: u8 = 3;

/// How often `chat talk` looks at stdin while waiting for the server.
const TALK_POLL: Duration = Duration::from_millis(100);

/// Reconnect attempts before `recv` / `talk` give up.
const RECONNECT_ATTEMPTS_MAX: u32 = 8;

/// Longest pause between reconnect attempts.
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(10);

/// Wrong codes a person may type before `chat register` gives up.
const CODE_PROMPT_ATTEMPTS_MAX: u32 = 3;

/// One-time prekeys `chat register` publishes.
const REGISTER_PREKEYS: usize = 100;

#[derive(Parser)]
#[command(
    name = "chat",
    version,
    about = "Switchboard command-line client",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Register this device for a phone number (one-time code), and remember the account.
    Register(RegisterArgs),
    /// Log in, send one text message, optionally wait for the server's ✓.
    Send(SendArgs),
    /// Log in and print incoming messages as JSON lines until COUNT have arrived.
    Recv(RecvArgs),
    /// Interactive conversation: type lines to send them; see messages and ticks as they come.
    #[command(alias = "interactive")]
    Talk(TalkArgs),
    /// Print the safety number with a contact (compare it with theirs out of band).
    SafetyNumber(SafetyNumberArgs),
    /// Link devices: without --approve, make this (new) device a companion of an account
    /// (prints a link string, waits for approval); with --approve, approve one on the primary.
    Link(LinkArgs),
    /// List the devices of an account (this one by default).
    Devices(DevicesArgs),
    /// Remove a linked device from this account (the primary removes any companion, a
    /// companion only itself).
    Unlink(UnlinkArgs),
    /// Send a file, end-to-end encrypted, through the server's media endpoint.
    SendFile(media::SendFileArgs),
    /// Receive messages; write received files to a directory.
    RecvFiles(media::RecvFilesArgs),
    /// 24-hour status posts: post, list, delete.
    Status(status::StatusArgs),
    /// Groups: create, add, remove, leave, info, send.
    Group(group::GroupArgs),
    /// Watch users' presence (online, last seen) and print it as JSON lines.
    Presence(presence::PresenceArgs),
    /// Who may see your last seen and online status.
    Privacy(presence::PrivacyArgs),
    /// Block users: no presence, messages or calls from them (they still see ✓).
    Block(presence::ContactArgs),
    /// Unblock users.
    Unblock(presence::ContactArgs),
    /// Add users to (or remove them from) the contact list kept on the server.
    Contacts(presence::ContactsArgs),
    /// Call signalling, sealed end to end: ring a user with an SDP offer (or wait for a call
    /// and --answer with an SDP answer), send an ICE candidate, print the states with the
    /// opened payloads and the TURN credentials, hang up.
    Call(presence::CallArgs),
}

#[path = "chat/presence.rs"]
mod presence;

#[derive(Args)]
struct LinkArgs {
    #[command(flatten)]
    common: Common,
    /// On the primary: the link string the new device printed.
    #[arg(long, value_name = "LINK_STRING")]
    approve: Option<String>,
    /// With --approve: log in as this number (default: the account in the state directory).
    #[arg(long, requires = "approve")]
    phone: Option<String>,
    /// New device: give up (exit status 3) after this many seconds without approval (a new
    /// link string is printed each time the code expires).
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

#[derive(Args)]
struct DevicesArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// Whose devices (default: this account's).
    #[arg(long)]
    user: Option<String>,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct UnlinkArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// The device id to remove (1, 2, …; see `chat devices`).
    device: u16,
}

#[derive(Args)]
struct Common {
    /// Server address, host:port.
    #[arg(long, env = "SWITCHBOARD_SERVER", default_value = "127.0.0.1:7300")]
    server: String,
    /// State directory: device key (identity.key), pinned server key (server.pub), account.
    #[arg(long, env = "SWITCHBOARD_STATE")]
    state: PathBuf,
    /// Accept a server key different from the pinned one, and pin the new key.
    #[arg(long)]
    allow_server_key_change: bool,
    /// Seconds allowed for connecting, the handshake, and each reply from the server.
    #[arg(long, default_value_t = 10)]
    connect_timeout_s: u64,
    /// No end-to-end encryption: the server (and anyone with its disk) can read the messages.
    #[arg(long)]
    plaintext: bool,
}

#[derive(Args)]
struct RegisterArgs {
    #[command(flatten)]
    common: Common,
    /// The phone number to register, E.164 digits (14155550100 or +1 415 555 0100).
    #[arg(long)]
    phone: String,
    /// The code received out of band.
    #[arg(long, conflicts_with_all = ["code_file", "data_dir"])]
    code: Option<String>,
    /// Poll this file for the code (one code per line, newest last).
    #[arg(long, conflicts_with = "data_dir")]
    code_file: Option<PathBuf>,
    /// The development server's data directory: poll <DATA_DIR>/sms/<PHONE>.txt for the code.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seconds to wait for the code to appear in the code file.
    #[arg(long, default_value_t = 60)]
    code_timeout_s: u64,
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// Recipient phone number.
    #[arg(long)]
    to: String,
    /// The message text.
    #[arg(long)]
    text: String,
    /// Wait for the server's ✓ and print its timestamp.
    #[arg(long)]
    wait_ack: bool,
    /// Seconds to wait for the ✓ with --wait-ack.
    #[arg(long, default_value_t = 10)]
    ack_timeout_s: u64,
    /// Accept the recipient's changed identity key (after comparing safety numbers).
    #[arg(long)]
    accept_identity_change: bool,
}

#[derive(Args)]
struct RecvArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// Number of messages to wait for.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Give up (exit status 3) after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// Send a read receipt for each message printed.
    #[arg(long)]
    read: bool,
    /// Accept senders' changed identity keys (after comparing safety numbers).
    #[arg(long)]
    accept_identity_change: bool,
}

#[derive(Args)]
struct TalkArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// Who to talk to.
    #[arg(long, required_unless_present = "group", conflicts_with = "group")]
    to: Option<String>,
    /// Talk in this group instead (its id, see `chat group create`).
    #[arg(long)]
    group: Option<u64>,
    /// Accept changed identity keys without asking (after comparing safety numbers).
    #[arg(long)]
    accept_identity_change: bool,
}

#[derive(Args)]
struct SafetyNumberArgs {
    /// State directory of this device.
    #[arg(long, env = "SWITCHBOARD_STATE")]
    state: PathBuf,
    /// The contact's phone number.
    #[arg(long)]
    contact: String,
}

/// A failure with the exit status it maps to.
struct Failure {
    message: String,
    status: u8,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = if matches!(e, Error::Timeout { .. }) {
            EXIT_TIMEOUT
        } else {
            1
        };
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let s_text = s.to_string();
            if !message.contains(&s_text) {
                message.push_str(": ");
                message.push_str(&s_text);
            }
            source = s.source();
        }
        match &e {
            Error::ServerKeyChanged { .. } => {
                message.push_str("\nhint: if the operator replaced the server key, rerun with --allow-server-key-change")
            }
            Error::NotRegistered { .. } => message.push_str("\nhint: run `chat register` first, or pass --phone"),
            Error::Server { code, .. } if code.is(ErrorCode::UnknownKey) => {
                message.push_str("\nhint: this device is not registered for that number (or it was unlinked); run `chat register`, or `chat link` with a new --state directory")
            }
            Error::DeviceRemoved { .. } => message.push_str(
                "\nhint: this device was unlinked from the account; to use it again, run `chat link` with a new --state directory",
            ),
            Error::AlreadyRegistered { .. } => message.push_str(
                "\nhint: pass a new --state directory for the device to link",
            ),
            Error::LinkRefused { .. } | Error::InvalidLinkString(_) => message.push_str(
                "\nhint: copy the whole link string the new device printed (it starts with swb-link:1:); if its code expired, it prints a new one",
            ),
            Error::UnverifiedDevice { .. } => message.push_str(
                "\nWARNING: the server lists a device the account's primary did not sign; the message was not sent",
            ),
            Error::MultiDeviceUnsupported => {
                message.push_str("\nhint: this server does not support linked devices")
            }
            Error::IdentityChanged { user, .. } => message.push_str(&format!(
                "\nWARNING: this may be an attack, or +{user} reinstalled the app. Compare the safety number \
                 with them in person or on a call; if it matches, rerun with --accept-identity-change"
            )),
            Error::E2eeUnsupported => {
                message.push_str("\nhint: this server cannot relay end-to-end encrypted messages")
            }
            _ => {}
        }
        Failure { message, status }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure {
            message: format!("output: {e}"),
            status: 1,
        }
    }
}

type CliResult = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.cmd {
        Cmd::Register(a) => register(a),
        Cmd::Send(a) => send(a),
        Cmd::Recv(a) => recv(a),
        Cmd::Talk(a) => talk(a),
        Cmd::SafetyNumber(a) => safety_number(a),
        Cmd::Link(a) => link(a),
        Cmd::Devices(a) => devices(a),
        Cmd::Unlink(a) => unlink(a),
        Cmd::SendFile(a) => media::send_file(a),
        Cmd::RecvFiles(a) => media::recv_files(a),
        Cmd::Status(a) => status::status(a),
        Cmd::Group(a) => group::run(a),
        Cmd::Presence(a) => presence::presence(a),
        Cmd::Privacy(a) => presence::privacy(a),
        Cmd::Block(a) => presence::edit(a, ContactOp::BLOCK),
        Cmd::Unblock(a) => presence::edit(a, ContactOp::UNBLOCK),
        Cmd::Contacts(a) => presence::contacts(a),
        Cmd::Call(a) => presence::call(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("chat: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}

/// Writes one line to stdout and flushes it (a closed pipe is an error, not a panic).
fn out(line: impl std::fmt::Display) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

fn timeouts(c: &Common) -> Timeouts {
    let t = Duration::from_secs(c.connect_timeout_s.max(1));
    Timeouts {
        connect: t,
        handshake: t,
        request: t,
        ..Timeouts::default()
    }
}

fn connect(c: &Common, identity: &Identity) -> Result<Connection, Error> {
    let policy = if c.allow_server_key_change {
        ServerKeyPolicy::Repin
    } else {
        ServerKeyPolicy::TrustOnFirstUse
    };
    Connection::connect_with(c.server.as_str(), identity, timeouts(c), policy)
}

fn login(c: &Common, phone: Option<&str>, mut options: SessionOptions) -> Result<Session, Error> {
    options.e2ee = !c.plaintext;
    let identity = Identity::load_or_create(&c.state)?;
    let (user, device) = match phone {
        Some(p) => {
            let user = parse_phone(p)?;
            let device = identity
                .account()?
                .filter(|a| a.user == user)
                .map_or(0, |a| a.device);
            (user, device)
        }
        None => {
            let a = identity.require_account()?;
            (a.user, a.device)
        }
    };
    connect(c, &identity)?.login_with(user, device, options)
}

fn register(a: RegisterArgs) -> CliResult {
    let phone = parse_phone(&a.phone)?;
    let identity = Identity::load_or_create(&a.common.state)?;
    let mut conn = connect(&a.common, &identity)?;
    // Watch the code file before asking, so the new code is told apart from older ones.
    let watcher = a
        .code_file
        .clone()
        .or_else(|| {
            a.data_dir
                .as_ref()
                .map(|d| CodeFile::default_path(d, phone))
        })
        .map(CodeFile::watch);
    let sent = conn.register_request(phone)?;
    eprintln!(
        "chat: a code was sent to +{phone} (valid for {} s)",
        sent.expires_in_s
    );
    let account = if let Some(code) = &a.code {
        verify(&mut conn, &a.common, &identity, phone, parse_code(code)?)?
    } else if let Some(w) = &watcher {
        eprintln!("chat: waiting for the code in {}", w.path().display());
        let code = w.wait_new(
            Duration::from_secs(a.code_timeout_s),
            Duration::from_millis(100),
        )?;
        verify(&mut conn, &a.common, &identity, phone, code)?
    } else {
        prompt_and_verify(&mut conn, &a.common, &identity, phone)?
    };
    publish_and_report(conn, &account, a.common.plaintext)
}

fn safety_number(a: SafetyNumberArgs) -> CliResult {
    let contact = parse_phone(&a.contact)?;
    let identity = Identity::load_or_create(&a.state)?;
    let e2ee = secure::open_saved(&identity)?;
    match secure::safety_number(&e2ee, contact) {
        Some(sn) => {
            out(json!({ "contact": contact, "safety_number": sn.grouped() }))?;
            Ok(())
        }
        None => Err(Failure {
            message: format!("no identity recorded for +{contact} yet: exchange a message first"),
            status: 1,
        }),
    }
}

/// `session.send`, accepting a changed identity of the recipient first when `accept` (and
/// saying so on stderr).
fn send_text(session: &mut Session, to: UserId, text: &str, accept: bool) -> Result<u64, Error> {
    match session.send(to, text.as_bytes(), MsgType::TEXT) {
        Err(Error::IdentityChanged {
            user,
            device,
            safety_number,
        }) if accept => {
            eprintln!(
                "chat: WARNING: the identity key of +{user} changed (new safety number {safety_number}); accepted (--accept-identity-change)"
            );
            session.accept_identity(user, device)?;
            session.send(to, text.as_bytes(), MsgType::TEXT)
        }
        other => other,
    }
}

/// `register_verify`, once more on a fresh connection if the first one was lost meanwhile (the
/// server may close an idle unauthenticated connection while a person looks for the code).
fn verify(
    conn: &mut Connection,
    c: &Common,
    identity: &Identity,
    phone: UserId,
    code: u32,
) -> Result<Account, Error> {
    match conn.register_verify(phone, code) {
        Err(e) if e.is_transient() => {
            eprintln!("chat: connection lost ({e}); reconnecting to verify the code");
            *conn = connect(c, identity)?;
            conn.register_verify(phone, code)
        }
        result => result,
    }
}

fn prompt_and_verify(
    conn: &mut Connection,
    c: &Common,
    identity: &Identity,
    phone: UserId,
) -> Result<Account, Failure> {
    let stdin = std::io::stdin();
    let mut attempt = 0;
    loop {
        attempt += 1;
        eprint!("Enter the code sent to +{phone}: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Err(Failure {
                message: "no code given (end of input)".into(),
                status: 1,
            });
        }
        let code = match parse_code(&line) {
            Ok(c) => c,
            Err(e) if attempt < CODE_PROMPT_ATTEMPTS_MAX => {
                eprintln!("chat: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match verify(conn, c, identity, phone, code) {
            Ok(account) => return Ok(account),
            Err(Error::Server { code, .. })
                if code.is(ErrorCode::WrongCode) && attempt < CODE_PROMPT_ATTEMPTS_MAX =>
            {
                eprintln!("chat: wrong code, try again");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn send(a: SendArgs) -> CliResult {
    let to = parse_phone(&a.to)?;
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let id = send_text(&mut session, to, &a.text, a.accept_identity_change)?;
    if a.wait_ack {
        let ts = session.wait_server_ack(id, Duration::from_secs(a.ack_timeout_s))?;
        out(json!({ "client_msg_id": id, "server_ts_ms": ts }))?;
    } else {
        out(json!({ "client_msg_id": id }))?;
    }
    session.close()?;
    Ok(())
}

/// `14155550100/1`: a device address as shown to a person.
fn addr_text(a: DeviceAddr) -> String {
    format!("{}/{}", a.user, a.device)
}

/// The JSON line printed for a message: `text` when the payload is UTF-8, else `payload_hex`.
/// `sync_to` is set for a sync copy (a message another device of this account sent to that
/// user): then `"sync": true` and `"to"`.
fn message_json(m: &Message, sync_to: Option<UserId>) -> serde_json::Value {
    let (payload_key, payload) = match std::str::from_utf8(&m.payload) {
        Ok(text) => ("text", json!(text)),
        Err(_) => ("payload_hex", json!(hex::encode(&m.payload))),
    };
    let mut map = serde_json::Map::from_iter([
        ("from".to_owned(), json!(m.from.user)),
        ("device".to_owned(), json!(m.from.device)),
        ("sender".to_owned(), json!(addr_text(m.from))),
        ("client_msg_id".to_owned(), json!(m.client_msg_id)),
        ("server_ts_ms".to_owned(), json!(m.server_ts_ms)),
        ("msg_type".to_owned(), json!(m.msg_type.0)),
        (payload_key.to_owned(), payload),
    ]);
    if let Some(to) = sync_to {
        map.insert("sync".to_owned(), json!(true));
        map.insert("to".to_owned(), json!(to));
    }
    serde_json::Value::Object(map)
}

/// Reconnects after `first_delay` (plus jitter), backing off exponentially, at most
/// [`RECONNECT_ATTEMPTS_MAX`] times and never past `deadline`.
fn reconnect(
    session: &mut Session,
    first_delay: Duration,
    deadline: Option<Instant>,
) -> Result<(), Error> {
    let mut delay = first_delay.max(Duration::from_millis(200));
    let mut last = Error::Closed;
    for _ in 0..RECONNECT_ATTEMPTS_MAX {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left <= delay {
                return Err(Error::Timeout {
                    what: "messages (reconnecting)",
                });
            }
        }
        // Up to 50 % random jitter, so clients sent away together do not return together.
        let jitter_ms = rand::random::<u64>() % (delay.as_millis() as u64 / 2 + 1);
        std::thread::sleep(delay + Duration::from_millis(jitter_ms));
        match session.reconnect() {
            Ok(resent) => {
                eprintln!(
                    "chat: reconnected{}",
                    if resent > 0 {
                        format!(", resent {resent} message(s)")
                    } else {
                        String::new()
                    }
                );
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                eprintln!("chat: reconnect failed: {e}");
                last = e;
                delay = (delay * 2).min(RECONNECT_DELAY_MAX);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

fn recv(a: RecvArgs) -> CliResult {
    let options = SessionOptions {
        persist_dedup: true,
        ..SessionOptions::default()
    };
    let mut session = login(&a.common, a.phone.as_deref(), options)?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let mut got = 0usize;
    let mut failure = None;
    while got < a.count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let event = match session.recv(Some(left)) {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) if e.is_transient() => {
                eprintln!("chat: connection lost: {e}");
                if let Err(e) = reconnect(&mut session, Duration::from_secs(1), Some(deadline)) {
                    failure = Some(Failure::from(e));
                    break;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match event {
            Event::SyncCopy { to_user, message } => {
                out(message_json(&message, Some(to_user)))?;
                got += 1;
            }
            Event::Message(m) => {
                out(message_json(&m, None))?;
                got += 1;
                if a.read {
                    // Ack first so the sender sees ✓✓ before the read receipt. A lost
                    // connection shows up at the next recv, which reconnects.
                    if let Err(e) = session
                        .flush_acks()
                        .and_then(|()| session.mark_read_device(m.from, m.client_msg_id))
                    {
                        if !e.is_transient() {
                            return Err(e.into());
                        }
                    }
                }
            }
            Event::GoAway {
                code,
                reconnect_after_ms,
            } => {
                eprintln!("chat: server going away ({code})");
                if let Err(e) = reconnect(
                    &mut session,
                    Duration::from_millis(reconnect_after_ms.into()),
                    Some(deadline),
                ) {
                    failure = Some(Failure::from(e));
                    break;
                }
            }
            Event::IdentityChanged {
                user,
                device,
                safety_number,
            } => {
                if a.accept_identity_change {
                    eprintln!(
                        "chat: WARNING: the identity key of +{user} changed (new safety number {safety_number}); accepted (--accept-identity-change)"
                    );
                    session.accept_identity(user, device)?;
                } else {
                    failure = Some(Failure::from(Error::IdentityChanged {
                        user,
                        device,
                        safety_number,
                    }));
                    break;
                }
            }
            other => eprintln!("chat: {}", describe(&other, &HashMap::new())),
        }
    }
    // Acknowledge what was printed even when stopping early.
    if !session.is_closed() {
        session.close()?;
    }
    if let Some(f) = failure {
        return Err(f);
    }
    if got < a.count {
        return Err(Failure {
            message: format!(
                "timed out after {} s with {got} of {} message(s)",
                a.timeout_s, a.count
            ),
            status: EXIT_TIMEOUT,
        });
    }
    Ok(())
}

/// One line describing an event for a person. `local` maps this run's message ids to the
/// short numbers shown to the person.
fn describe(event: &Event, local: &HashMap<u64, usize>) -> String {
    let name = |id: &u64| {
        local
            .get(id)
            .map_or_else(|| format!("message {id}"), |n| format!("#{n}"))
    };
    match event {
        Event::Message(m) => match std::str::from_utf8(&m.payload) {
            Ok(text) => format!("[+{}] {text}", addr_text(m.from)),
            Err(_) => format!(
                "[+{}] <{} bytes of binary>",
                addr_text(m.from),
                m.payload.len()
            ),
        },
        Event::SyncCopy { to_user, message } => {
            let body = match std::str::from_utf8(&message.payload) {
                Ok(text) => text.to_owned(),
                Err(_) => format!("<{} bytes of binary>", message.payload.len()),
            };
            format!(
                "[you → +{to_user}, sent from your device {}] {body}",
                message.from.device
            )
        }
        Event::ServerAck { client_msg_id, .. } => format!("{} ✓", name(client_msg_id)),
        Event::Delivered {
            client_msg_id,
            by,
            first,
            ..
        } => format!(
            "{} ✓✓{} (+{})",
            name(client_msg_id),
            if *first { "" } else { " also" },
            addr_text(*by)
        ),
        Event::Read {
            client_msg_id, by, ..
        } => format!("{} ✓✓ read (+{})", name(client_msg_id), addr_text(*by)),
        Event::ReadElsewhere {
            from,
            client_msg_id,
            ..
        } => format!(
            "message {client_msg_id} from +{} was read on another of your devices",
            addr_text(*from)
        ),
        Event::DevicesChanged {
            user,
            version,
            added,
            removed,
        } => format!(
            "devices of +{user} changed (version {version}): added {added:?}, removed {removed:?}"
        ),
        Event::SendFailed {
            client_msg_id,
            code,
            text,
        } => format!("{} ✗ not sent: {code} {text}", name(client_msg_id)),
        Event::ServerError { code, text, .. } => format!("server error: {code} {text}"),
        Event::Undecodable { message, reason } => {
            format!("[+{}] <undecodable message: {reason}>", message.from.user)
        }
        Event::IdentityChanged {
            user,
            safety_number,
            ..
        } => format!(
            "WARNING: the identity key of +{user} changed (new safety number {safety_number}). \
             Their messages are held. Compare the safety number with them; type /accept to accept"
        ),
        Event::GoAway {
            code,
            reconnect_after_ms,
        } => {
            format!("server going away ({code}); reconnecting in {reconnect_after_ms} ms")
        }
        Event::Typing { from_user, state } => match *state {
            TypingState::COMPOSING => format!("+{from_user} is typing…"),
            TypingState::RECORDING => format!("+{from_user} is recording audio…"),
            _ => format!("+{from_user} stopped typing"),
        },
        other => format!("{other:?}"),
    }
}

fn talk(a: TalkArgs) -> CliResult {
    if let Some(g) = a.group {
        return group::talk(&a.common, a.phone.as_deref(), g);
    }
    let to = parse_phone(a.to.as_deref().unwrap_or_default())?;
    let options = SessionOptions {
        persist_dedup: true,
        ..SessionOptions::default()
    };
    let mut session = login(&a.common, a.phone.as_deref(), options)?;
    eprintln!(
        "chat: logged in as +{}; talking to +{to}{}. Type a line and press Enter to send; /typing, /recording and /paused tell +{to} what you are doing; /accept accepts a changed identity key; /quit or Ctrl-D to leave.",
        session.user(),
        if session.is_e2ee() { " (end-to-end encrypted)" } else { " (NOT encrypted)" }
    );
    // Stdin is read on its own thread; the session stays on this one and polls both.
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut local: HashMap<u64, usize> = HashMap::new();
    'outer: loop {
        loop {
            match lines_rx.try_recv() {
                Ok(line) => {
                    let line = line.trim_end();
                    if line == "/quit" {
                        break 'outer;
                    }
                    if line == "/accept" {
                        let pending = session.pending_identity_changes();
                        if pending.is_empty() {
                            eprintln!("chat: no identity change to accept");
                        }
                        for (user, device) in pending {
                            session.accept_identity(user, device)?;
                            eprintln!("chat: accepted the new identity key of +{user}");
                        }
                        continue;
                    }
                    if line == "/typing" || line == "/recording" || line == "/paused" {
                        let state = match line {
                            "/typing" => TypingState::COMPOSING,
                            "/recording" => TypingState::RECORDING,
                            _ => TypingState::PAUSED,
                        };
                        if let Err(e) = session.typing(to, state) {
                            eprintln!("chat: typing not sent: {e}");
                        }
                        continue;
                    }
                    if line.is_empty() {
                        continue;
                    }
                    match send_text(&mut session, to, line, a.accept_identity_change) {
                        Ok(id) => {
                            let n = local.len() + 1;
                            local.insert(id, n);
                            out(format!("#{n} → {line}"))?;
                        }
                        // The message is in the outbox; the reconnect below resends it.
                        Err(e) if e.is_transient() => break,
                        Err(Error::IdentityChanged {
                            user,
                            safety_number,
                            ..
                        }) => eprintln!(
                            "chat: not sent: WARNING: the identity key of +{user} changed (new safety number {safety_number}). Compare it with them; type /accept to accept, then send again"
                        ),
                        Err(e) => eprintln!("chat: not sent: {e}"),
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => break 'outer,
            }
        }
        match session.recv(Some(TALK_POLL)) {
            Ok(None) => {}
            Ok(Some(event)) => {
                out(describe(&event, &local))?;
                match event {
                    Event::Message(m) => {
                        // Ack first so the sender sees ✓✓ before the read receipt. A lost
                        // connection shows up at the next recv, which reconnects.
                        if let Err(e) = session
                            .flush_acks()
                            .and_then(|()| session.mark_read_device(m.from, m.client_msg_id))
                        {
                            if !e.is_transient() {
                                return Err(e.into());
                            }
                        }
                    }
                    Event::GoAway {
                        reconnect_after_ms, ..
                    } => reconnect(
                        &mut session,
                        Duration::from_millis(reconnect_after_ms.into()),
                        None,
                    )?,
                    Event::IdentityChanged { user, device, .. } if a.accept_identity_change => {
                        session.accept_identity(user, device)?;
                        eprintln!("chat: accepted (--accept-identity-change)");
                    }
                    _ => {}
                }
            }
            Err(e) if e.is_transient() => {
                eprintln!("chat: connection lost: {e}; reconnecting");
                reconnect(&mut session, Duration::from_secs(1), None)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !session.outbox().is_empty() {
        eprintln!(
            "chat: {} message(s) still without ✓ on exit",
            session.outbox().len()
        );
    }
    session.close()?;
    Ok(())
}

fn link(a: LinkArgs) -> CliResult {
    match &a.approve {
        Some(text) => approve_link(&a, text),
        None => link_new_device(&a),
    }
}

/// Primary: approve the new device's link string.
fn approve_link(a: &LinkArgs, text: &str) -> CliResult {
    let link = LinkString::parse(text).map_err(Error::from)?;
    if a.common.plaintext {
        return Err(Failure {
            message: "approving a device needs end-to-end encryption (drop --plaintext)".into(),
            status: 2,
        });
    }
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let addr = session.approve_link(&link)?;
    eprintln!("chat: linked device {} to +{}", addr.device, addr.user);
    out(json!({ "user": addr.user, "device": addr.device }))?;
    session.close()?;
    Ok(())
}

/// New device: print a link string, wait for the primary's approval, save the account and
/// publish the prekeys.
fn link_new_device(a: &LinkArgs) -> CliResult {
    let identity = Identity::load_or_create(&a.common.state)?;
    let mut conn = connect(&a.common, &identity)?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let account = loop {
        let offer = conn.request_link()?;
        let link = offer.link.to_string();
        out(json!({
            "link": link,
            "code": offer.code,
            "expires_in_s": offer.expires_in_s,
        }))?;
        eprintln!(
            "chat: to link this device, run on your primary device (valid for {} s):\n\n  chat link --approve {link}\n\nchat: waiting for approval…",
            offer.expires_in_s
        );
        let left = deadline.saturating_duration_since(Instant::now());
        // A little past the code's lifetime, so an approval at the last second still lands.
        let wait = left.min(Duration::from_secs(u64::from(offer.expires_in_s) + 2));
        match conn.wait_linked(wait) {
            Ok(account) => break account,
            Err(Error::Timeout { .. }) if Instant::now() + Duration::from_secs(1) < deadline => {
                eprintln!("chat: the code expired; here is a new link string");
            }
            Err(Error::Timeout { .. }) => {
                return Err(Failure {
                    message: format!("not approved within {} s", a.timeout_s),
                    status: EXIT_TIMEOUT,
                })
            }
            // The server gives a connection that has not logged in `preauth_timeout_ms` (120 s
            // by default), and the code dies with it: connect again for a new one.
            Err(Error::Server { code, .. })
                if code.is(ErrorCode::NotAuthenticated)
                    && Instant::now() + Duration::from_secs(1) < deadline =>
            {
                eprintln!("chat: the server closed the waiting connection; reconnecting");
                conn = connect(&a.common, &identity)?;
            }
            Err(e) if e.is_transient() && Instant::now() + Duration::from_secs(1) < deadline => {
                eprintln!("chat: connection lost ({e}); reconnecting");
                conn = connect(&a.common, &identity)?;
            }
            Err(e) => return Err(e.into()),
        }
    };
    eprintln!(
        "chat: linked as device {} of +{}",
        account.device, account.user
    );
    publish_and_report(conn, &account, a.common.plaintext)
}

fn devices(a: DevicesArgs) -> CliResult {
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let user = match &a.user {
        Some(u) => parse_phone(u)?,
        None => session.user(),
    };
    let list = session.devices(user)?;
    let me = DeviceAddr::new(session.user(), session.device());
    if a.json {
        out(devices_json(&list, me))?;
    } else {
        out(devices_table(&list, me))?;
    }
    session.close()?;
    Ok(())
}

/// `chat devices --json`: `{"user", "version", "devices": [{"device", "linked_at_ms",
/// "identity_dh", "identity_sign", "verified", "this_device"}]}`.
fn devices_json(list: &DeviceList, me: DeviceAddr) -> serde_json::Value {
    let devices: Vec<serde_json::Value> = list
        .devices
        .iter()
        .map(|d| {
            json!({
                "device": d.device,
                "linked_at_ms": d.linked_at_ms,
                "identity_dh": hex::encode(d.identity.dh),
                "identity_sign": hex::encode(d.identity.sign),
                "verified": d.verified,
                "this_device": me == DeviceAddr::new(list.user, d.device),
            })
        })
        .collect();
    json!({ "user": list.user, "version": list.version, "devices": devices })
}

fn devices_table(list: &DeviceList, me: DeviceAddr) -> String {
    let mut t = format!(
        "devices of +{} (version {})\n{:<7} {:<21} {:<9} {}",
        list.user, list.version, "DEVICE", "LINKED (UTC)", "VERIFIED", "IDENTITY"
    );
    for d in &list.devices {
        let role = if d.device == 0 { " primary" } else { "" };
        let this = if me == DeviceAddr::new(list.user, d.device) {
            " (this device)"
        } else {
            ""
        };
        let fp = hex::encode(d.identity.sign);
        t.push_str(&format!(
            "\n{:<7} {:<21} {:<9} {}…{role}{this}",
            d.device,
            utc_text(d.linked_at_ms),
            if d.verified { "yes" } else { "NO" },
            fp.get(..16).unwrap_or(&fp),
        ));
    }
    t
}

/// `2026-12-01 09:23:16` from ms since the Unix epoch (UTC).
fn utc_text(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn unlink(a: UnlinkArgs) -> CliResult {
    let mut session = login(&a.common, a.phone.as_deref(), SessionOptions::default())?;
    let (user, me) = (session.user(), session.device());
    session.unlink(a.device)?;
    out(json!({ "user": user, "unlinked": a.device }))?;
    if a.device == me {
        eprintln!(
            "chat: this device was removed from +{user}; its state directory {} can be deleted",
            a.common.state.display()
        );
        // The server closes the connection now (DeviceRemoved).
        let _ = session.close();
    } else {
        eprintln!("chat: removed device {} from +{user}", a.device);
        session.close()?;
    }
    Ok(())
}

/// A device that just got its account (registered or linked): prints it as JSON and, unless
/// the session is plaintext, logs in and publishes its prekeys so others can start encrypted
/// sessions while it is offline.
fn publish_and_report(conn: Connection, account: &Account, plaintext: bool) -> Result<(), Failure> {
    let server_key = hex::encode(conn.server_key());
    if plaintext {
        out(json!({
            "user": account.user,
            "device": account.device,
            "server_key": server_key,
        }))?;
        conn.close();
        return Ok(());
    }
    let options = SessionOptions {
        e2ee: true,
        ..SessionOptions::default()
    };
    let mut session = conn.login_with(account.user, account.device, options)?;
    let count = session.upload_prekeys(REGISTER_PREKEYS)?;
    out(json!({
        "user": account.user,
        "device": account.device,
        "server_key": server_key,
        "prekeys": count.one_time_remaining,
    }))?;
    session.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_text_formats_epoch_ms() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00");
        assert_eq!(utc_text(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29 00:00:00");
    }
}
