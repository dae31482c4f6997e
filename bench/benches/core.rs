//! Core benchmarks, each on one core: sealing and opening a 1,400-byte packet (the
//! session's channel, and the two AEAD implementations it could use side by side), a
//! full handshake as the gateway performs it, reattach validation at the gateway, and
//! cutting a TUN super-packet into checksummed segments.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use jvpn_bench::{connect, endpoint, gateway, initiation, UNIX_T0};
use jvpn_core::crypto::{
    plaintext, Channel, Cipher, Initiation, KeyLimits, Keypair, Response, HANDSHAKE_PROLOGUE,
};
use jvpn_core::gateway::Received;
use jvpn_core::ids::{Protocol, StateVersion, TransportId};
use jvpn_core::offload::{segments, VnetHeader, VNET_HDR_LEN};
use jvpn_core::policy::Policy;
use jvpn_core::reason::ReasonCode;
use jvpn_core::wire::{parse, Control, Datagram, ReattachRequest};

fn seal_open(c: &mut Criterion) {
    let mut group = c.benchmark_group("packet");
    group.throughput(Throughput::Bytes(1_400));
    // The session's channel under each cipher it may agree: the key objects built per
    // use, as the channel does.
    for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
        let client = Keypair::generate().expect("keys");
        let gw = Keypair::generate().expect("keys");
        let (init, msg1) =
            Initiation::start(&client, &gw.public(), HANDSHAKE_PROLOGUE, &[]).expect("start");
        let (msg2, gw_keys) = Response::read(&gw, HANDSHAKE_PROLOGUE, &msg1)
            .and_then(|r| r.finish(&[]))
            .expect("respond");
        let (_, client_keys) = init.finish(&msg2).expect("finish");
        let now = Instant::now();
        let limits = KeyLimits::from_policy(&Policy::default());
        let id = jvpn_core::ids::SessionId(1);
        let mut tx = Channel::new(id, (cipher, client_keys), limits, now);
        let mut rx = Channel::new(id, (cipher, gw_keys), limits, now);
        let packet = vec![0x45u8; 1_400];
        let mut wire_bytes = Vec::with_capacity(1_500);
        group.bench_function(format!("seal+open 1400 B {cipher}"), |b| {
            b.iter(|| {
                tx.seal(&Control::Data(&packet), now, &mut wire_bytes)
                    .expect("seal");
                let Ok(Datagram::Session { header, .. }) = parse(&wire_bytes) else {
                    panic!("parse");
                };
                rx.open_in_place(&header, &mut wire_bytes, now)
                    .expect("open");
                black_box(plaintext(&wire_bytes).len())
            })
        });
    }
    group.finish();
}

/// The AEAD implementations the channel could use, on the same work (seal a 1,400-byte
/// payload in place with a 20-byte header as associated data, then open it), with the
/// key object built once: ChaCha20-Poly1305 from RustCrypto, ring and aws-lc, AES-GCM from
/// ring and aws-lc. The channel uses ring's, the fastest of each cipher.
fn aead(c: &mut Criterion) {
    let key = [7u8; 32];
    let aad = [1u8; 20];
    let mut group = c.benchmark_group("aead");
    group.throughput(Throughput::Bytes(1_400));

    let rust_crypto = {
        use chacha20poly1305::aead::KeyInit;
        chacha20poly1305::ChaCha20Poly1305::new((&key).into())
    };
    let mut buf = vec![0x45u8; 1_400];
    let mut counter = 0u64;
    group.bench_function("RustCrypto chacha20poly1305 seal+open 1400 B", |b| {
        use chacha20poly1305::aead::AeadInPlace;
        b.iter(|| {
            counter += 1;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&counter.to_le_bytes());
            let tag = rust_crypto
                .encrypt_in_place_detached((&n).into(), &aad, &mut buf)
                .expect("seal");
            rust_crypto
                .decrypt_in_place_detached((&n).into(), &aad, &mut buf, &tag)
                .expect("open");
            black_box(buf[0])
        })
    });

    let mut sealed = vec![0x45u8; 1_400 + 16];
    for (name, alg) in [
        (
            "ring chacha20poly1305 seal+open 1400 B",
            &ring::aead::CHACHA20_POLY1305,
        ),
        (
            "ring aes-256-gcm seal+open 1400 B",
            &ring::aead::AES_256_GCM,
        ),
        (
            "ring aes-128-gcm seal+open 1400 B",
            &ring::aead::AES_128_GCM,
        ),
    ] {
        let ring_key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(alg, &key[..alg.key_len()]).expect("key"),
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                counter += 1;
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&counter.to_le_bytes());
                let nonce = || ring::aead::Nonce::assume_unique_for_key(n);
                let (body, tag_space) = sealed.split_at_mut(1_400);
                let tag = ring_key
                    .seal_in_place_separate_tag(nonce(), ring::aead::Aad::from(&aad), body)
                    .expect("seal");
                tag_space.copy_from_slice(tag.as_ref());
                let plain = ring_key
                    .open_in_place(nonce(), ring::aead::Aad::from(&aad), &mut sealed)
                    .expect("open");
                black_box(plain[0])
            })
        });
    }
    for (name, alg) in [
        (
            "aws-lc chacha20poly1305 seal+open 1400 B",
            &aws_lc_rs::aead::CHACHA20_POLY1305,
        ),
        (
            "aws-lc aes-256-gcm seal+open 1400 B",
            &aws_lc_rs::aead::AES_256_GCM,
        ),
    ] {
        let aws_key = aws_lc_rs::aead::LessSafeKey::new(
            aws_lc_rs::aead::UnboundKey::new(alg, &key).expect("key"),
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                counter += 1;
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&counter.to_le_bytes());
                let nonce = || aws_lc_rs::aead::Nonce::assume_unique_for_key(n);
                let (body, tag_space) = sealed.split_at_mut(1_400);
                let tag = aws_key
                    .seal_in_place_separate_tag(nonce(), aws_lc_rs::aead::Aad::from(&aad), body)
                    .expect("seal");
                tag_space.copy_from_slice(tag.as_ref());
                let plain = aws_key
                    .open_in_place(nonce(), aws_lc_rs::aead::Aad::from(&aad), &mut sealed)
                    .expect("open");
                black_box(plain[0])
            })
        });
    }
    group.finish();
}

fn handshakes(c: &mut Criterion) {
    let gw_key = Keypair::generate().expect("keys");
    let client = Keypair::generate().expect("keys");
    let t0 = Instant::now();
    let mut gw = gateway(
        Policy::default(),
        &gw_key,
        std::slice::from_ref(&client),
        t0,
    );
    let mut secs = 1u64;
    let mut at = t0;
    let mut group = c.benchmark_group("handshake");
    // What the gateway does per handshake: read message 1, authorize, create the session
    // (table record included), write message 2. Each initiation is fresh (a newer
    // timestamp), so each one replaces the previous session as a real reconnect does.
    let mut packets: Vec<Vec<u8>> = Vec::new();
    group.bench_function("gateway accept", |b| {
        b.iter_custom(|iters| {
            packets.clear();
            for _ in 0..iters {
                secs += 1;
                packets.push(initiation(&client, &gw_key, secs).1);
            }
            let start = Instant::now();
            for p in &packets {
                // One source's budget refills by one initiation every 50 ms: the clock
                // moves on that much per handshake, so every one gets its Diffie-Hellman.
                at += Duration::from_millis(50);
                let r = gw.handle_datagram(endpoint(1), p, at);
                assert!(matches!(r, Received::Reply(_)));
            }
            start.elapsed()
        })
    });
    group.finish();
}

fn reattach_validation(c: &mut Criterion) {
    let gw_key = Keypair::generate().expect("keys");
    let client = Keypair::generate().expect("keys");
    let t0 = Instant::now();
    let mut gw = gateway(
        Policy::default(),
        &gw_key,
        std::slice::from_ref(&client),
        t0,
    );
    let (mut channel, _, version) = connect(&mut gw, &client, &gw_key, 1, t0);
    // Every request is fresh and authentic and passes checks 1 to 8; it names a binding
    // version the gateway does not hold, so check 9 refuses it and the binding stays:
    // the whole validation runs every time, with no cooldown in the way.
    let stale = StateVersion(version.0 + 1_000);
    let mut out = Vec::with_capacity(128);
    let mut group = c.benchmark_group("reattach");
    group.bench_function("validate (all 9 checks)", |b| {
        b.iter_custom(|iters| {
            let mut packets = Vec::with_capacity(iters as usize);
            for _ in 0..iters {
                let request = ReattachRequest {
                    timestamp_ms: UNIX_T0,
                    expected_version: stale,
                    transport_id: TransportId(2),
                    protocol: Protocol::Udp,
                    cause: ReasonCode::HeartbeatTimeout,
                };
                channel
                    .seal(&Control::ReattachRequest(request), t0, &mut out)
                    .expect("seal");
                packets.push(out.clone());
            }
            let start = Instant::now();
            for p in &packets {
                // On the bound path: requests from elsewhere are budgeted before they
                // reach the session (100 a second), which would measure the budget.
                let r = gw.handle_datagram(endpoint(1), p, t0);
                assert!(matches!(r, Received::Reply(_)));
            }
            let elapsed = start.elapsed();
            let _ = gw.drain_events();
            elapsed
        })
    });
    group.finish();
}

/// The X25519 operations a handshake is made of (aws-lc's, as the handshake uses): its
/// floor. The gateway's side of Noise IK does four Diffie-Hellman operations (es, ss,
/// ee, se) and one key generation (a fixed-base multiplication); `ss` is kept per
/// authorized client after its first handshake, so three and one. ring's
/// Diffie-Hellman is measured beside aws-lc's for comparison only: ring offers no
/// static private keys (its keys are single-use), which es and ss need.
fn x25519(c: &mut Criterion) {
    use aws_lc_rs::agreement::{agree, PrivateKey, UnparsedPublicKey, X25519};
    let mine = PrivateKey::generate(&X25519).expect("key");
    let theirs = PrivateKey::generate(&X25519)
        .and_then(|k| k.compute_public_key())
        .expect("key");
    let mut group = c.benchmark_group("x25519");
    group.bench_function("Diffie-Hellman (variable base)", |b| {
        b.iter(|| {
            agree(
                &mine,
                UnparsedPublicKey::new(&X25519, theirs.as_ref()),
                (),
                |s| Ok(black_box(s[0])),
            )
            .expect("agree")
        })
    });
    group.bench_function("Diffie-Hellman (variable base), ring's", |b| {
        use ring::agreement as r;
        let rng = ring::rand::SystemRandom::new();
        // ring's private keys are single-use: each is made outside the timed part.
        b.iter_batched(
            || r::EphemeralPrivateKey::generate(&r::X25519, &rng).expect("key"),
            |k| {
                r::agree_ephemeral(
                    k,
                    &r::UnparsedPublicKey::new(&r::X25519, theirs.as_ref()),
                    |s| black_box(s[0]),
                )
                .expect("agree")
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("key generation (fixed base)", |b| {
        b.iter(|| {
            let k = PrivateKey::generate(&X25519).expect("key");
            black_box(k.compute_public_key().expect("public").as_ref()[0])
        })
    });
    group.finish();
}

/// What a client does with every read of its TUN under bulk TCP: one 64 KiB IPv4 TCP
/// super-packet (the kernel's TSO, checksum left to finish) cut into 1 380-byte segments,
/// each with its own IP and TCP headers and checksums.
fn offload(c: &mut Criterion) {
    const PAYLOAD: usize = 65_000;
    const MSS: u16 = 1_380;
    let mut read = vec![0u8; VNET_HDR_LEN];
    read[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    read[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    read[2..4].copy_from_slice(&40u16.to_le_bytes()); // header length
    read[4..6].copy_from_slice(&MSS.to_le_bytes());
    read[6..8].copy_from_slice(&20u16.to_le_bytes()); // checksum start: the TCP header
    read[8..10].copy_from_slice(&16u16.to_le_bytes()); // checksum offset in it
    let total = (40 + PAYLOAD) as u16;
    read.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    read[VNET_HDR_LEN + 2..VNET_HDR_LEN + 4].copy_from_slice(&total.to_be_bytes());
    read.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5_201u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    read.extend_from_slice(&tcp);
    read.extend((0..PAYLOAD).map(|i| (i % 251) as u8));
    let (header, packet) = VnetHeader::split(&read).expect("header");
    let mut scratch = Vec::new();
    let mut group = c.benchmark_group("offload");
    group.throughput(Throughput::Bytes(PAYLOAD as u64));
    group.bench_function("64 KiB TCP super-packet into 1380-byte segments", |b| {
        b.iter(|| {
            let mut n = 0usize;
            segments(&header, black_box(packet), &mut scratch, |s| {
                n += s.len();
                black_box(s[s.len() - 1]);
            })
            .expect("segments");
            assert_eq!(
                n,
                PAYLOAD + 48 * 40,
                "48 segments, 40 bytes of headers each"
            );
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = seal_open, aead, handshakes, reattach_validation, x25519, offload
}
criterion_main!(benches);
