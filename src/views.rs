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
                "state": s.state.as_str(),
                "state_version": s.state_version,
                "tunnel_addresses": addresses(Some(s.tunnel)),
                "active_transport": s.binding.map(|b| format!("{} {}", b.protocol.as_str(), b.addr)),
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

fn render_transitions(out: &mut String, v: &Value) {
    if let Some(list) = v.as_array() {
        for t in list {
            let _ = writeln!(
                out,
                "    {} {} -> {} ({})",
                text(&t["ts_ms"]),
                text(&t["from"]),
                text(&t["to"]),
                text(&t["reason_code"])
            );
        }
    }
}

/// The human-readable form of a status answer.
pub fn render(v: &Value) -> String {
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
                let _ = writeln!(out, "\nsession {}", text(&s["session_id"]));
                let _ = writeln!(
                    out,
                    "  state: {} (version {})",
                    text(&s["state"]),
                    text(&s["state_version"])
                );
                let _ = writeln!(out, "  tunnel: {}", text(&s["tunnel_addresses"]));
                let _ = writeln!(out, "  transport: {}", text(&s["active_transport"]));
                let _ = writeln!(
                    out,
                    "  transfer: {} B received, {} B sent",
                    text(&s["rx_bytes"]),
                    text(&s["tx_bytes"])
                );
                let _ = writeln!(out, "  last transitions:");
                render_transitions(&mut out, &s["recent_transitions"]);
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
            let _ = writeln!(
                out,
                "  transfer: {} B received, {} B sent",
                text(&v["rx_bytes"]),
                text(&v["tx_bytes"])
            );
            let _ = writeln!(
                out,
                "  last reattach: {} ms; sessions established: {}",
                text(&v["last_reattach_ms"]),
                text(&v["sessions_established"])
            );
            let _ = writeln!(out, "  candidates:");
            for c in v["candidates"].as_array().cloned().unwrap_or_default() {
                let _ = writeln!(
                    out,
                    "    {}{} {}: loss {} over {} samples, srtt {} ms, p95 {} ms, heard {} ms ago{}",
                    if c["active"] == true { "*" } else { " " },
                    text(&c["id"]),
                    text(&c["gateway"]),
                    text(&c["loss_ratio"]),
                    text(&c["samples"]),
                    text(&c["srtt_ms"]),
                    text(&c["rtt_p95_ms"]),
                    text(&c["heartbeat_age_ms"]),
                    if c["dead"] == true { ", DEAD" } else { "" }
                );
            }
            let _ = writeln!(out, "  last transitions:");
            render_transitions(&mut out, &v["recent_transitions"]);
        }
        _ => {
            let _ = writeln!(out, "{v}");
        }
    }
    out
}
