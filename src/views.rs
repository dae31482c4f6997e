//! Status views: the JSON the admin socket answers with (`jvpn status --json`), and its
//! human-readable rendering, in the manner of `wg show`.

use std::fmt::Write;
use std::time::Duration;

use jvpn_actors::agent::AgentView;
use jvpn_actors::runtime::TransitionNote;
use jvpn_actors::session::SessionStatus;
use jvpn_core::wire::TunnelAddrs;
use serde_json::{json, Value};

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn transitions(recent: &[TransitionNote]) -> Value {
    recent
        .iter()
        .map(|t| {
            json!({
                "ts_ms": t.ts_ms,
                "from": t.from.as_str(),
                "to": t.to.as_str(),
                "reason_code": t.reason.as_str(),
            })
        })
        .collect()
}

/// A gateway's sessions.
pub fn gateway(node_id: &str, sessions: &[SessionStatus]) -> Value {
    let sessions: Vec<Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "session_id": s.id.to_string(),
                // The node that forwards it: this one, for every session it lists.
                "owner": node_id,
                "state": s.state.as_str(),
                "state_version": s.state_version,
                "tunnel_addresses": addresses(Some(s.tunnel)),
                "active_transport": s.binding.map(|b| format!("{} {}", b.protocol.as_str(), b.addr)),
                "cipher": s.cipher.name(),
                "rx_bytes": s.rx_bytes,
                "tx_bytes": s.tx_bytes,
                "recent_transitions": transitions(&s.recent),
            })
        })
        .collect();
    json!({ "ok": true, "role": "gateway", "node_id": node_id, "sessions": sessions })
}

/// A client's session and candidates.
pub fn client(view: &AgentView) -> Value {
    let s = &view.status;
    let candidates: Vec<Value> = view
        .candidates
        .iter()
        .map(|c| {
            let h = c.health.as_ref();
            json!({
                "id": c.id.0,
                "gateway": c.gateway.to_string(),
                "active": c.active,
                "loss_ratio": h.map(|h| h.loss_ratio),
                "samples": h.map(|h| h.samples),
                "srtt_ms": h.and_then(|h| h.srtt).map(ms),
                "rtt_p95_ms": h.and_then(|h| h.rtt_p95).map(ms),
                "heartbeat_age_ms": h.map(|h| ms(h.heartbeat_age)),
                "dead": h.map(|h| h.dead),
                "path_room": c.path_room,
            })
        })
        .collect();
    json!({
        "ok": true,
        "role": "client",
        "session_id": s.session_id.map(|i| i.to_string()),
        "state": s.state.as_str(),
        "state_version": view.state_version,
        "tunnel_addresses": addresses(s.tunnel),
        "active_transport": s.active.map(|t| t.0),
        "path_room": s.path_room,
        "cipher": s.cipher.map(|c| c.name()),
        "sessions_established": s.sessions,
        "last_end": s.last_end.map(|r| r.as_str()),
        "last_reattach_ms": s.last_reattach.map(ms),
        "rx_bytes": view.rx_bytes,
        "tx_bytes": view.tx_bytes,
        "candidates": candidates,
        "recent_transitions": transitions(&view.recent),
    })
}

/// Tunnel addresses as the answers carry them: a list of "ADDR/PREFIX", IPv4 first
/// (empty before the gateway assigned any).
fn addresses(tunnel: Option<TunnelAddrs>) -> Value {
    Value::from(
        tunnel
            .iter()
            .flat_map(TunnelAddrs::iter)
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
    )
}

/// A value for a person: null as "-", strings bare, a list space-separated.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

/// A duration in milliseconds as a person reads it: "120 ms", "3.4 s", "5 min 12 s",
/// "2 h 5 min"; "-" for none.
fn duration(ms: &Value) -> String {
    let Some(ms) = ms.as_f64().filter(|m| m.is_finite() && *m >= 0.0) else {
        return "-".into();
    };
    let secs = (ms / 1_000.0) as u64;
    match ms {
        m if m < 1_000.0 => format!("{m:.0} ms"),
        m if m < 60_000.0 => format!("{:.1} s", m / 1_000.0),
        _ if secs < 3_600 => format!("{} min {} s", secs / 60, secs % 60),
        _ => format!("{} h {} min", secs / 3_600, secs % 3_600 / 60),
    }
}

/// How long ago the Unix-millisecond time `ts_ms` was, at `now_ms`.
fn ago(ts_ms: &Value, now_ms: u64) -> String {
    match ts_ms.as_u64() {
        Some(ts) if ts <= now_ms => format!("{} ago", duration(&Value::from(now_ms - ts))),
        Some(_) => "just now".into(),
        None => "-".into(),
    }
}

fn render_transitions(out: &mut String, v: &Value, now_ms: u64) {
    if let Some(list) = v.as_array() {
        for t in list {
            let _ = writeln!(
                out,
                "    {:>14}  {} -> {} ({})",
                ago(&t["ts_ms"], now_ms),
                text(&t["from"]),
                text(&t["to"]),
                text(&t["reason_code"])
            );
        }
    }
}

/// The human-readable form of a status answer, with times relative to now (`--json`
/// keeps the answer's own Unix milliseconds).
pub fn render(v: &Value) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    render_at(v, now_ms)
}

/// [`render`] at the Unix-millisecond time `now_ms`.
pub fn render_at(v: &Value, now_ms: u64) -> String {
    let mut out = String::new();
    if v["ok"] == false {
        let _ = writeln!(out, "error: {}", text(&v["error"]));
        return out;
    }
    match v["role"].as_str() {
        Some("gateway") => {
            let sessions = v["sessions"].as_array().cloned().unwrap_or_default();
            let _ = writeln!(
                out,
                "gateway {}: {} session(s)",
                text(&v["node_id"]),
                sessions.len()
            );
            for s in &sessions {
                let _ = writeln!(
                    out,
                    "\nsession {} (owner {})",
                    text(&s["session_id"]),
                    text(&s["owner"])
                );
                let _ = writeln!(
                    out,
                    "  state: {} (version {})",
                    text(&s["state"]),
                    text(&s["state_version"])
                );
                let _ = writeln!(out, "  tunnel: {}", text(&s["tunnel_addresses"]));
                let _ = writeln!(out, "  transport: {}", text(&s["active_transport"]));
                let _ = writeln!(out, "  cipher: {}", text(&s["cipher"]));
                let _ = writeln!(
                    out,
                    "  transfer: {} B received, {} B sent",
                    text(&s["rx_bytes"]),
                    text(&s["tx_bytes"])
                );
                let _ = writeln!(out, "  last transitions:");
                render_transitions(&mut out, &s["recent_transitions"], now_ms);
            }
        }
        Some("client") => {
            let _ = writeln!(out, "session {}", text(&v["session_id"]));
            let _ = writeln!(
                out,
                "  state: {} (version {})",
                text(&v["state"]),
                text(&v["state_version"])
            );
            let _ = writeln!(out, "  tunnel: {}", text(&v["tunnel_addresses"]));
            let _ = writeln!(out, "  active transport: {}", text(&v["active_transport"]));
            if let Some(room) = v["path_room"].as_u64() {
                let _ = writeln!(
                    out,
                    "  its path carries tunnel packets of up to {room} bytes (size probes)"
                );
            }
            let _ = writeln!(out, "  cipher: {}", text(&v["cipher"]));
            let _ = writeln!(
                out,
                "  transfer: {} B received, {} B sent",
                text(&v["rx_bytes"]),
                text(&v["tx_bytes"])
            );
            let _ = writeln!(
                out,
                "  last reattach took: {}; sessions established: {}",
                duration(&v["last_reattach_ms"]),
                text(&v["sessions_established"])
            );
            let _ = writeln!(out, "  candidates:");
            for c in v["candidates"].as_array().cloned().unwrap_or_default() {
                let _ = writeln!(
                    out,
                    "    {}{} {}: loss {} over {} samples, srtt {} ms, p95 {} ms, heard {} ago{}{}",
                    if c["active"] == true { "*" } else { " " },
                    text(&c["id"]),
                    text(&c["gateway"]),
                    text(&c["loss_ratio"]),
                    text(&c["samples"]),
                    text(&c["srtt_ms"]),
                    text(&c["rtt_p95_ms"]),
                    duration(&c["heartbeat_age_ms"]),
                    if c["dead"] == true { ", DEAD" } else { "" },
                    c["path_room"]
                        .as_u64()
                        .map(|room| format!(", carries up to {room}"))
                        .unwrap_or_default()
                );
            }
            let _ = writeln!(out, "  last transitions:");
            render_transitions(&mut out, &v["recent_transitions"], now_ms);
        }
        _ => {
            let _ = writeln!(out, "{v}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_reads_them() {
        let d = |ms: f64| duration(&json!(ms));
        assert_eq!(d(0.0), "0 ms");
        assert_eq!(d(120.4), "120 ms");
        assert_eq!(d(3_400.0), "3.4 s");
        assert_eq!(d(312_000.0), "5 min 12 s");
        assert_eq!(d(7_500_000.0), "2 h 5 min");
        assert_eq!(duration(&Value::Null), "-");
        assert_eq!(duration(&json!(-5)), "-");
        assert_eq!(ago(&json!(1_000), 181_000), "3 min 0 s ago");
        assert_eq!(ago(&json!(2_000), 1_000), "just now");
    }

    /// Times in the text are relative to now; the JSON keeps the epoch milliseconds.
    #[test]
    fn a_status_shows_times_relative_to_now() {
        let now = 1_800_000_000_000u64;
        let answer = json!({
            "ok": true, "role": "client", "session_id": "00000000000000aa",
            "state": "ATTACHED", "state_version": 4, "tunnel_addresses": ["10.77.0.2/24"],
            "active_transport": 1, "path_room": 1332, "cipher": "aes-256-gcm",
            "rx_bytes": 1, "tx_bytes": 2,
            "last_reattach_ms": 312.0, "sessions_established": 1,
            "candidates": [{"id": 1, "gateway": "192.0.2.1:51820", "active": true,
                "loss_ratio": 0.0, "samples": 10, "srtt_ms": 0.8, "rtt_p95_ms": 1.2,
                "heartbeat_age_ms": 120.0, "dead": false, "path_room": 1332},
                {"id": 2, "gateway": "192.0.2.2:51820", "active": false,
                "loss_ratio": 0.0, "samples": 3, "srtt_ms": 0.9, "rtt_p95_ms": 1.0,
                "heartbeat_age_ms": 900.0, "dead": false, "path_room": null}],
            "recent_transitions": [{"ts_ms": now - 180_000, "from": "BIRTH", "to": "ATTACHED",
                "reason_code": "attached_to_transport"}],
        });
        let text = render_at(&answer, now);
        assert!(text.contains("3 min 0 s ago  BIRTH -> ATTACHED"), "{text}");
        assert!(text.contains("heard 120 ms ago"), "{text}");
        assert!(text.contains("last reattach took: 312 ms"), "{text}");
        assert!(text.contains("cipher: aes-256-gcm"), "{text}");
        assert!(
            text.contains("tunnel packets of up to 1332 bytes"),
            "{text}"
        );
        assert!(
            text.contains("heard 120 ms ago, carries up to 1332\n"),
            "{text}"
        );
        assert!(text.contains("heard 900 ms ago\n"), "{text}");
        assert!(!text.contains(&now.to_string()), "{text}");
    }
}
