//! The exporter serves the metrics on its configured address (loopback only).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use jvpn_actors::telemetry::{self, Direction};
use jvpn_core::ids::Protocol;

fn free_loopback_port() -> SocketAddr {
    let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    probe.local_addr().expect("addr")
}

fn scrape(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

#[test]
fn metrics_are_served_on_the_configured_address() {
    let addr = free_loopback_port();
    telemetry::install(addr).expect("install");
    telemetry::TrafficMeter::new(Direction::Rx, Protocol::Udp).record(1, 100);
    // The listener starts on a background thread: poll, bounded in count and time.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        last = scrape(addr);
        if last
            .as_deref()
            .is_some_and(|b| b.contains("jvpn_packets_total"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = last.expect("the exporter answered");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(r#"jvpn_packets_total{direction="rx",protocol="udp"} 1"#),
        "{body}"
    );
    assert!(body.contains("# HELP jvpn_packets_total"), "{body}");
    // A second exporter on the same address is refused with a clear error.
    let again = telemetry::install(addr).expect_err("second install");
    assert!(again.to_string().contains(&addr.to_string()), "{again}");
}
