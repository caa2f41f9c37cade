//! The SDK's multi-device parsers over arbitrary input: the link string a new device shows
//! (`LinkString::parse`), the sync-copy wrapper inside a decrypted payload (`unwrap_sync`), and
//! a server's `DeviceList` as the SDK checks it (`DeviceList::from_entries`). None panics; a
//! link string that parses encodes back to the same canonical text, and a sync wrapper that
//! unwraps wraps back to the same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::Frame;
use switchboard_client::devices::{unwrap_sync, wrap_sync, DeviceList, LinkString};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(link) = LinkString::parse(text) {
            let again = LinkString::parse(&link.encode()).expect("own encoding parses");
            assert_eq!(again, link);
            assert_eq!(link.encode(), text.trim(), "one text per link string");
        }
    }
    if let Some((to_user, payload)) = unwrap_sync(data) {
        assert_eq!(wrap_sync(to_user, payload), data);
    }
    if let Ok(Frame::DeviceList(list)) = Frame::decode(Bytes::copy_from_slice(data)) {
        let view = DeviceList::from_entries(list.user, list.version, &list.devices);
        assert_eq!(view.devices.len(), list.devices.len());
    }
});
