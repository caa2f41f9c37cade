//! Rule tests of call signalling and TURN credentials, through the public API with the
//! synchronous in-memory cluster: an offer rings every device of the callee and the first
//! answer wins (the others hear "answered elsewhere"), a ring times out into a missed call for
//! both sides (queued for offline devices, with a push), a callee in a call answers busy, a
//! block rings nothing, disconnects hang up, calls are volatile (a restart forgets them), and
//! TURN credentials follow coturn's REST scheme with a per-user rate.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use bytes::Bytes;
use common::{key, user_on, Cluster};
use protocol::frame::{self, CallEvent, CallSignal, ContactsEdit, TurnRequest};
use protocol::presence::{CallKind, ContactOp};
use protocol::{capability, DeviceAddr, ErrorCode, Frame, MsgType};
use switchboard_shards::{home_shard, turn_password, Action, ConnId};

const CAPS: u64 = capability::MESSAGING | capability::PRESENCE | capability::CALLS;
const CALL: u64 = 0xCA11;

fn events(frames: &[Frame]) -> Vec<(u64, DeviceAddr, CallKind)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::CallEvent(e) => Some((e.call_id, e.from, e.kind)),
            _ => None,
        })
        .collect()
}

fn kinds(frames: &[Frame]) -> Vec<CallKind> {
    events(frames).into_iter().map(|e| e.2).collect()
}

fn errors(frames: &[Frame]) -> Vec<(ErrorCode, u64)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Error(e) => Some((ErrorCode::from_u16(e.code).unwrap(), e.ref_id)),
            _ => None,
        })
        .collect()
}

fn signal(c: &mut Cluster, conn: ConnId, peer: u64, call_id: u64, kind: CallKind) {
    c.frame(
        conn,
        Frame::CallSignal(CallSignal {
            call_id,
            peer,
            kind,
            payload: Bytes::from_static(b"sealed sdp"),
        }),
    );
    c.settle();
}

/// Caller and callee on different shards (and a third user), logged in with `CAPS`.
fn pair(tweak: impl Fn(&mut switchboard_shards::Config)) -> (Cluster, [u64; 3], [ConnId; 3]) {
    let mut c = Cluster::new(3, tweak);
    let u = [user_on(0, 3, 0), user_on(1, 3, 0), user_on(2, 3, 0)];
    let mut conns = [0; 3];
    for i in 0..3 {
        c.register(u[i], key(i as u64 + 1));
        conns[i] = c.login_caps(u[i], key(i as u64 + 1), CAPS).0;
    }
    c.settle();
    (c, u, conns)
}

#[test]
fn offer_rings_answer_wins_others_hear_answered_elsewhere() {
    let (mut c, u, [a, b, _]) = pair(|_| {});
    signal(&mut c, a, u[1], CALL, CallKind::OFFER);
    let fa = c.frames(a);
    assert_eq!(
        events(&fa),
        vec![(CALL, DeviceAddr::new(u[1], 0), CallKind::RINGING)]
    );
    let fb = c.frames(b);
    let offer = fb.iter().find_map(|f| match f {
        Frame::CallEvent(e) => Some(e.clone()),
        _ => None,
    });
    assert_eq!(
        offer,
        Some(CallEvent {
            call_id: CALL,
            from: DeviceAddr::new(u[0], 0),
            kind: CallKind::OFFER,
            payload: Bytes::from_static(b"sealed sdp"),
        })
    );
    signal(&mut c, b, u[0], CALL, CallKind::ANSWER);
    assert_eq!(kinds(&c.frames(a)), vec![CallKind::ANSWER]);
    signal(&mut c, a, u[1], CALL, CallKind::ICE);
    assert_eq!(kinds(&c.frames(b)), vec![CallKind::ICE]);
    signal(&mut c, b, u[0], CALL, CallKind::ICE);
    assert_eq!(kinds(&c.frames(a)), vec![CallKind::ICE]);
    let home = usize::from(home_shard(u[1], 3));
    assert_eq!(c.shards[home].stats().calls_active, 1);
    signal(&mut c, a, u[1], CALL, CallKind::HANGUP);
    assert_eq!(kinds(&c.frames(b)), vec![CallKind::HANGUP]);
    assert_eq!(c.shards[home].stats().calls_active, 0);
    // The call is over: another step is refused.
    signal(&mut c, b, u[0], CALL, CallKind::ICE);
    assert_eq!(errors(&c.frames(b)), vec![(ErrorCode::CallUnknown, CALL)]);
}

#[test]
fn a_callee_in_a_call_is_busy_and_a_caller_in_a_call_too() {
    let (mut c, u, [a, b, x]) = pair(|_| {});
    signal(&mut c, a, u[1], CALL, CallKind::OFFER);
    signal(&mut c, b, u[0], CALL, CallKind::ANSWER);
    let _ = (c.frames(a), c.frames(b));
    signal(&mut c, x, u[1], 2, CallKind::OFFER);
    assert_eq!(
        events(&c.frames(x)),
        vec![(2, DeviceAddr::new(u[1], 0), CallKind::BUSY)]
    );
    assert!(events(&c.frames(b)).is_empty(), "busy rings nothing");
    // The caller is engaged too.
    signal(&mut c, x, u[0], 3, CallKind::OFFER);
    assert_eq!(kinds(&c.frames(x)), vec![CallKind::BUSY]);
    // Once the call ends, both can be called again.
    signal(&mut c, b, u[0], CALL, CallKind::HANGUP);
    assert_eq!(kinds(&c.frames(a)), vec![CallKind::HANGUP]);
    signal(&mut c, x, u[1], 4, CallKind::OFFER);
    assert_eq!(kinds(&c.frames(x)), vec![CallKind::RINGING]);
    assert_eq!(kinds(&c.frames(b)), vec![CallKind::OFFER]);
    let busy: u64 = c.shards.iter().map(|s| s.stats().calls_busy).sum();
    assert_eq!(busy, 2);
}

#[test]
fn a_ring_times_out_into_a_missed_call_for_both_sides() {
    let (mut c, u, [a, b, _]) = pair(|cfg| cfg.call_ring_timeout_ms = 45_000);
    c.close_conn(b);
    c.settle();
    signal(&mut c, a, u[1], CALL, CallKind::OFFER);
    assert_eq!(kinds(&c.frames(a)), vec![CallKind::RINGING]);
    let pushes = c.pushes();
    assert!(
        pushes
            .iter()
            .any(|p| matches!(p, Action::Push { to, msg_type, .. }
            if *to == DeviceAddr::new(u[1], 0) && *msg_type == MsgType::CALL)),
        "the offline callee gets a ring push: {pushes:?}"
    );
    let home = home_shard(u[1], 3);
    c.now += 44_000;
    c.tick(home);
    c.settle();
    assert!(kinds(&c.frames(a)).is_empty(), "still ringing");
    c.now += 2_000;
    c.tick(home);
    c.settle();
    assert_eq!(kinds(&c.frames(a)), vec![CallKind::MISSED]);
    let pushes = c.pushes();
    assert!(
        pushes
            .iter()
            .any(|p| matches!(p, Action::Push { msg_type, .. }
            if *msg_type == MsgType::MISSED_CALL)),
        "a missed-call push for the offline callee: {pushes:?}"
    );
    // The missed call waits in the callee's mailbox.
    let (b, frames) = c.login_caps(u[1], key(2), CAPS);
    c.settle();
    let mut all = frames;
    all.extend(c.frames(b));
    let missed = all.iter().find_map(|f| match f {
        Frame::Deliver(d) => Some(d.message.clone()),
        _ => None,
    });
    let m = missed.expect("missed call delivered");
    assert_eq!(
        (m.from, m.client_msg_id, m.msg_type),
        (DeviceAddr::new(u[0], 0), CALL, MsgType::MISSED_CALL)
    );
    assert_eq!(c.shards[usize::from(home)].stats().calls_missed, 1);
    assert_eq!(c.shards[usize::from(home)].stats().calls_active, 0);
}

#[test]
fn a_block_rings_nothing_and_the_caller_hears_missed() {
    let (mut c, u, [a, b, _]) = pair(|_| {});
    c.frame(
        b,
        Frame::ContactsEdit(ContactsEdit {
            request_id: 1,
            op: ContactOp::BLOCK,
            users: vec![u[0]],
        }),
    );
    c.settle();
    let _ = c.frames(b);
    signal(&mut c, a, u[1], CALL, CallKind::OFFER);
    assert_eq!(kinds(&c.frames(a)), vec![CallKind::RINGING]);
    assert!(events(&c.frames(b)).is_empty());
    c.now += 46_000;
    c.tick(home_shard(u[1], 3));
    c.settle();
    assert_eq!(kinds(&c.frames(a)), vec![CallKind::MISSED]);
    assert!(c.frames(b).is_empty(), "no missed call either");
}

#[test]
fn disconnects_hang_up_and_a_restart_forgets_calls() {
    let (mut c, u, [a, b, _]) = pair(|_| {});
    signal(&mut c, a, u[1], CALL, CallKind::OFFER);
    signal(&mut c, b, u[0], CALL, CallKind::ANSWER);
    let _ = (c.frames(a), c.frames(b));
    c.close_conn(a);
    c.settle();
    assert_eq!(kinds(&c.frames(b)), vec![CallKind::HANGUP]);
    let home = usize::from(home_shard(u[1], 3));
    assert_eq!(c.shards[home].stats().calls_active, 0);

    let (a, _) = c.login_caps(u[0], key(1), CAPS);
    signal(&mut c, a, u[1], 5, CallKind::OFFER);
    signal(&mut c, b, u[0], 5, CallKind::ANSWER);
    let _ = c.frames(a);
    c.close_conn(b);
    c.settle();
    assert_eq!(kinds(&c.frames(a)), vec![CallKind::HANGUP]);

    // Mid-call restart of the callee's home: nothing of the call survives.
    let (b, _) = c.login_caps(u[1], key(2), CAPS);
    signal(&mut c, a, u[1], 6, CallKind::OFFER);
    signal(&mut c, b, u[0], 6, CallKind::ANSWER);
    assert_eq!(c.shards[home].stats().calls_active, 1);
    let recovered = c.recovered(home as u16);
    assert_eq!(recovered.stats().calls_active, 0);
}

#[test]
fn invalid_steps_are_refused() {
    let (mut c, u, [a, b, x]) = pair(|_| {});
    signal(&mut c, a, u[0], 1, CallKind::OFFER);
    assert_eq!(errors(&c.frames(a)), vec![(ErrorCode::CallInvalid, 1)]);
    signal(&mut c, a, u[1], 2, CallKind::MISSED);
    assert_eq!(errors(&c.frames(a)), vec![(ErrorCode::CallInvalid, 2)]);
    signal(&mut c, a, u[1], 3, CallKind::ANSWER);
    assert_eq!(errors(&c.frames(a)), vec![(ErrorCode::CallUnknown, 3)]);
    // Another user cannot step into the call.
    signal(&mut c, a, u[1], 4, CallKind::OFFER);
    let _ = (c.frames(a), c.frames(b));
    signal(&mut c, x, u[1], 4, CallKind::HANGUP);
    assert_eq!(errors(&c.frames(x)), vec![(ErrorCode::CallUnknown, 4)]);
    assert!(events(&c.frames(b)).is_empty());
}

#[test]
fn calls_are_capped_per_shard() {
    let mut c = Cluster::new(1, |cfg| cfg.calls_max = 1);
    let u: Vec<u64> = (0..4).map(|i| user_on(0, 1, i)).collect();
    let mut conns = Vec::new();
    for (i, &user) in u.iter().enumerate() {
        c.register(user, key(i as u64 + 1));
        conns.push(c.login_caps(user, key(i as u64 + 1), CAPS).0);
    }
    signal(&mut c, conns[0], u[1], 1, CallKind::OFFER);
    signal(&mut c, conns[2], u[3], 2, CallKind::OFFER);
    assert_eq!(errors(&c.frames(conns[2])), vec![(ErrorCode::CallLimit, 2)]);
    assert_eq!(c.shards[0].stats().call_limit, 1);
}

#[test]
fn turn_credentials_follow_the_rest_scheme_and_are_rate_limited() {
    let mut c = Cluster::new(1, |cfg| {
        cfg.turn_secret = "north".into();
        cfg.turn_uris = vec!["turn:127.0.0.1:3478".into()];
        cfg.turn_ttl_s = 600;
        cfg.turn_requests_per_user_per_minute = 2;
    });
    let a = user_on(0, 1, 0);
    c.register(a, key(1));
    let (conn, _) = c.login_caps(a, key(1), CAPS);
    for id in 1..=3 {
        c.frame(conn, Frame::TurnRequest(TurnRequest { request_id: id }));
    }
    let f = c.frames(conn);
    let creds: Vec<frame::TurnCredentials> = f
        .iter()
        .filter_map(|f| match f {
            Frame::TurnCredentials(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(creds.len(), 2, "{f:?}");
    let t = &creds[0];
    assert_eq!(t.ttl_s, 600);
    assert_eq!(t.auth.username, format!("{}:{a}", c.now / 1000 + 600));
    assert_eq!(t.auth.password, turn_password("north", &t.auth.username));
    assert_eq!(t.auth.uris, vec!["turn:127.0.0.1:3478".to_owned()]);
    assert_eq!(errors(&f), vec![(ErrorCode::TurnRateLimited, 3)]);
    // RFC 2202 test case 2 (HMAC-SHA1, key "Jefe"), base64.
    assert_eq!(
        turn_password("Jefe", "what do ya want for nothing?"),
        "7/zfauXrL6LSdBbV8YTfnCWafHk="
    );
    // Without a secret: unavailable.
    let mut c = Cluster::new(1, |_| {});
    c.register(a, key(1));
    let (conn, _) = c.login_caps(a, key(1), CAPS);
    c.frame(conn, Frame::TurnRequest(TurnRequest { request_id: 9 }));
    assert_eq!(
        errors(&c.frames(conn)),
        vec![(ErrorCode::TurnUnavailable, 9)]
    );
}
