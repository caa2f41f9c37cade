//! The media token vectors of `docs/protocol.md` §19: the documented token bytes, their
//! base64url text and the HMAC inputs are what `protocol::media::Token` produces under the
//! documented example secret, and the documented tokens verify (and fail when expired, under
//! another secret, or for the other operation).
//!
//! To print the lines after a deliberate change:
//! `SWB_PRINT_VECTORS=1 cargo test -p switchboard-protocol --test media_vectors -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

extern crate switchboard_protocol as protocol;

mod common;

use common::media::*;
use protocol::media::{Token, TokenError, TokenOp, TOKEN_BYTES, TOKEN_TEXT_BYTES};

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));

/// `token NAME: HEX` lines (with indented hex continuation lines) and `text NAME: B64` lines.
fn documented(kind: &str, name: &str) -> String {
    let prefix = format!("{kind} {name}:");
    let mut lines = DOC
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(&prefix));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("docs/protocol.md has no `{prefix}` line"));
    let mut v = first.trim_start()[prefix.len()..].trim().to_owned();
    for l in lines {
        if !l.starts_with("    ") || l.trim().is_empty() || l.contains(':') {
            break;
        }
        v.push(' ');
        v.push_str(l.trim());
    }
    v
}

fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n    ")
}

#[test]
fn documented_tokens_are_the_codes() {
    let cases = [
        ("media_upload_token", upload_token(), TokenOp::UPLOAD),
        ("media_download_token", download_token(), TokenOp::DOWNLOAD),
    ];
    if std::env::var_os("SWB_PRINT_VECTORS").is_some() {
        for (name, t, _) in cases {
            println!("token {name}: {}", hex_lines(&t.to_bytes(&MEDIA_SECRET)));
            println!("text {name}: {}", t.to_text(&MEDIA_SECRET));
        }
    }
    for (name, t, op) in cases {
        let bytes = t.to_bytes(&MEDIA_SECRET);
        let text = t.to_text(&MEDIA_SECRET);
        assert_eq!(bytes.len(), TOKEN_BYTES);
        assert_eq!(text.len(), TOKEN_TEXT_BYTES);
        let doc_hex: String = documented("token", name).split_whitespace().collect();
        assert_eq!(doc_hex, hex::encode(bytes), "token {name}");
        assert_eq!(documented("text", name), text, "text {name}");
        let now = MEDIA_EXPIRES_S;
        assert_eq!(Token::verify(&text, &MEDIA_SECRET, op, now), Ok(t));
        let later = Token::verify(&text, &MEDIA_SECRET, op, now + 1);
        assert_eq!(later, Err(TokenError::Expired));
        assert_eq!(
            Token::verify(&text, &[0u8; 32], op, now),
            Err(TokenError::BadMac)
        );
        let other = if op == TokenOp::UPLOAD {
            TokenOp::DOWNLOAD
        } else {
            TokenOp::UPLOAD
        };
        assert_eq!(
            Token::verify(&text, &MEDIA_SECRET, other, now),
            Err(TokenError::WrongOp)
        );
    }
    let secret: String = documented("token", "media_secret")
        .split_whitespace()
        .collect();
    assert_eq!(secret, hex::encode(MEDIA_SECRET));
}
