//! Every decoder on arbitrary bytes: the datagram classifier, every session plaintext
//! type, and both handshake payloads. Any panic is a bug.
#![no_main]

use jvpn_core::wire::{parse, Control, Datagram, InitPayload, PacketType, RespPayload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Datagram::Session { header, sealed, .. }) = parse(data) {
        let _ = Control::decode(header.ptype, sealed);
    }
    if let Some((&first, rest)) = data.split_first() {
        if let Ok(ptype) = PacketType::from_byte(first) {
            if let Ok(control) = Control::decode(ptype, rest) {
                // What decodes must encode back to the same bytes.
                let mut again = Vec::new();
                control.encode(&mut again);
                assert_eq!(again, rest);
            }
        }
    }
    let _ = InitPayload::decode(data);
    let _ = RespPayload::decode(data);
});
