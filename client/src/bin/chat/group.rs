//! `chat group …` and `chat talk --group`: the group commands of the CLI (`docs/protocol.md`
//! §18). Group ids are printed and taken as decimal numbers.
//!
//! ```text
//! chat group create NAME --members 14155550101,14155550102   (prints {"group": ID, ...})
//! chat group add    GROUP --members 14155550103
//! chat group remove GROUP --members 14155550103
//! chat group leave  GROUP
//! chat group info   GROUP                                      (members, admins, subject)
//! chat group send   GROUP --text "hi all" [--wait-ack]
//! chat talk --group GROUP
//! ```

use std::sync::mpsc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use switchboard_client::groups::{GroupClient, GroupUpdate};
use switchboard_client::protocol::group::{GroupId, GroupOp};
use switchboard_client::protocol::UserId;
use switchboard_client::registration::parse_phone;
use switchboard_client::{Event, Session, SessionOptions};

use super::{login, out, CliResult, Common, Failure};

#[derive(Args)]
pub struct GroupArgs {
    #[command(subcommand)]
    cmd: GroupCmd,
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Create a group (you are its admin), name it, and print its id.
    Create(CreateArgs),
    /// Add members (admins only, unless the group lets every member).
    Add(MembersArgs),
    /// Remove members; your next message goes under a new sender key.
    Remove(MembersArgs),
    /// Leave the group.
    Leave(GroupOnlyArgs),
    /// Print the members, admins and subject.
    Info(GroupOnlyArgs),
    /// Send one message to every member (one upload, end-to-end encrypted with Sender Keys).
    Send(GroupSendArgs),
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    common: Common,
    /// Log in as this number (default: the account in the state directory).
    #[arg(long)]
    phone: Option<String>,
    /// The group's name (stored end-to-end encrypted).
    name: String,
    /// The other members, comma separated.
    #[arg(long, value_delimiter = ',')]
    members: Vec<String>,
}

#[derive(Args)]
struct MembersArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    phone: Option<String>,
    /// The group id.
    group: GroupId,
    /// Members, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    members: Vec<String>,
}

#[derive(Args)]
struct GroupOnlyArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    phone: Option<String>,
    /// The group id.
    group: GroupId,
}

#[derive(Args)]
struct GroupSendArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    phone: Option<String>,
    /// The group id.
    group: GroupId,
    /// The message text.
    #[arg(long)]
    text: String,
    /// Wait for the server's ✓.
    #[arg(long)]
    wait_ack: bool,
    /// Seconds to wait for the ✓ with --wait-ack.
    #[arg(long, default_value_t = 10)]
    ack_timeout_s: u64,
}

fn e2ee_only(c: &Common) -> CliResult {
    if c.plaintext {
        return Err(Failure {
            message: "groups need end-to-end encryption (drop --plaintext)".into(),
            status: 2,
        });
    }
    Ok(())
}

fn phones(list: &[String]) -> Result<Vec<UserId>, Failure> {
    list.iter()
        .map(|p| parse_phone(p).map_err(Failure::from))
        .collect()
}

fn session(c: &Common, phone: Option<&str>) -> Result<Session, Failure> {
    e2ee_only(c)?;
    Ok(login(c, phone, SessionOptions::default())?)
}

pub fn run(a: GroupArgs) -> CliResult {
    let mut g = GroupClient::new();
    match a.cmd {
        GroupCmd::Create(a) => {
            let members = phones(&a.members)?;
            let mut s = session(&a.common, a.phone.as_deref())?;
            let info = g.create(&mut s, &members)?;
            g.set_subject(&mut s, info.group, &a.name)?;
            let users: Vec<UserId> = info.roster.members.iter().map(|m| m.user).collect();
            out(json!({ "group": info.group, "name": a.name, "members": users }))?;
            s.close()?;
        }
        GroupCmd::Add(a) | GroupCmd::Remove(a) if a.members.is_empty() => {
            return Err(Failure {
                message: format!("no members given for group {}", a.group),
                status: 2,
            })
        }
        GroupCmd::Add(a) => change(&mut g, &a, GroupOp::ADD)?,
        GroupCmd::Remove(a) => change(&mut g, &a, GroupOp::REMOVE)?,
        GroupCmd::Leave(a) => {
            let mut s = session(&a.common, a.phone.as_deref())?;
            let d = g.leave(&mut s, a.group)?;
            out(json!({ "group": a.group, "left": true, "version": d.version }))?;
            s.close()?;
        }
        GroupCmd::Info(a) => {
            let mut s = session(&a.common, a.phone.as_deref())?;
            // Sender keys waiting in the mailbox first (the subject is encrypted with one).
            while let Some(ev) = s.recv(Some(Duration::from_millis(300)))? {
                g.handle(&mut s, &ev);
            }
            let info = g.info(&mut s, a.group)?;
            let subject = GroupClient::subject(&mut s, &info);
            let members: Vec<UserId> = info.roster.members.iter().map(|m| m.user).collect();
            let admins: Vec<UserId> = info
                .roster
                .members
                .iter()
                .filter(|m| m.admin)
                .map(|m| m.user)
                .collect();
            out(json!({
                "group": info.group,
                "version": info.version,
                "seq": info.seq,
                "subject": subject,
                "members": members,
                "admins": admins,
                "admins_only": info.flags & 1 != 0,
                "created_ms": info.created_ms,
                "changed_ms": info.changed_ms,
            }))?;
            s.close()?;
        }
        GroupCmd::Send(a) => {
            let mut s = session(&a.common, a.phone.as_deref())?;
            let id = g.send(&mut s, a.group, a.text.as_bytes())?;
            if a.wait_ack {
                let ts = s.wait_server_ack(id, Duration::from_secs(a.ack_timeout_s))?;
                out(json!({ "group": a.group, "client_msg_id": id, "server_ts_ms": ts }))?;
            } else {
                out(json!({ "group": a.group, "client_msg_id": id }))?;
            }
            s.close()?;
        }
    }
    Ok(())
}

fn change(g: &mut GroupClient, a: &MembersArgs, op: GroupOp) -> CliResult {
    let members = phones(&a.members)?;
    let mut s = session(&a.common, a.phone.as_deref())?;
    let d = g.change(&mut s, a.group, op, &members)?;
    out(
        json!({ "group": a.group, "op": format!("{op:?}"), "members": members, "version": d.version }),
    )?;
    s.close()?;
    Ok(())
}

/// One line for a group update.
fn describe(u: &GroupUpdate) -> Option<String> {
    match u {
        GroupUpdate::Message {
            from, plaintext, ..
        } => Some(format!(
            "[+{}/{}] {}",
            from.user,
            from.device,
            String::from_utf8_lossy(plaintext)
        )),
        GroupUpdate::Event { event, .. } => Some(format!(
            "* +{} {:?} {}",
            event.actor,
            event.op,
            event
                .users
                .iter()
                .map(|u| format!("+{u}"))
                .collect::<Vec<_>>()
                .join(" ")
        )),
        GroupUpdate::Undecryptable { from, reason, .. } => Some(format!(
            "[+{}/{}] <cannot decrypt: {reason}>",
            from.user, from.device
        )),
        GroupUpdate::KeyReceived { .. } => None,
        _ => None,
    }
}

/// `chat talk --group GROUP`: lines typed are sent to the group; its messages and events are
/// printed as they come (other events as one line each).
pub fn talk(common: &Common, phone: Option<&str>, group: GroupId) -> CliResult {
    let mut s = session(common, phone)?;
    let mut g = GroupClient::new();
    let info = g.info(&mut s, group)?;
    eprintln!(
        "chat: logged in as +{}; talking in group {group} ({} members). Type a line and press Enter to send; /quit or Ctrl-D to leave.",
        s.user(),
        info.roster.members.len()
    );
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    'outer: loop {
        loop {
            match lines_rx.try_recv() {
                Ok(line) => {
                    let line = line.trim_end();
                    if line == "/quit" {
                        break 'outer;
                    }
                    if line.is_empty() {
                        continue;
                    }
                    match g.send(&mut s, group, line.as_bytes()) {
                        Ok(_) => out(format!("→ {line}"))?,
                        Err(e) => eprintln!("chat: not sent: {e}"),
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => break 'outer,
            }
        }
        match s.recv(Some(super::TALK_POLL))? {
            None => {}
            Some(ev) => match g.handle(&mut s, &ev) {
                Some(u) => {
                    if let Some(line) = describe(&u) {
                        out(line)?;
                    }
                }
                None => {
                    if !matches!(ev, Event::ServerAck { .. } | Event::Delivered { .. }) {
                        eprintln!("chat: {ev:?}");
                    }
                }
            },
        }
    }
    s.close()?;
    Ok(())
}
