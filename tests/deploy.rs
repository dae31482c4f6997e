//! The operators' files under deploy/: the Grafana dashboard's structure (Grafana itself
//! is not installable here; lab/tests/e2e.rs evaluates its expressions on a real
//! Prometheus), and that it uses the provisioned datasource; the client's systemd unit.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_dashboard_is_well_formed_and_uses_the_provisioned_datasource() {
    let dashboard: Value =
        serde_json::from_str(&deploy("grafana/dashboards/jvpn.json")).expect("JSON");
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert_eq!(dashboard["uid"], "jvpn");
    let datasource = deploy("grafana/provisioning/datasources/prometheus.yml");
    assert!(datasource.contains("uid: jvpn-prometheus"), "{datasource}");
    let provider = deploy("grafana/provisioning/dashboards/jvpn.yml");
    assert!(
        provider.contains("path: /var/lib/grafana/dashboards"),
        "{provider}"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut ids = HashSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "{title}: id repeated"
        );
        assert_eq!(p["datasource"]["uid"], "jvpn-prometheus", "{title}");
        for key in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no target");
        let mut refs = HashSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "{title}: refId repeated"
            );
            assert_eq!(t["datasource"]["uid"], "jvpn-prometheus", "{title}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(expr.contains("jvpn_"), "{title}: {expr}");
        }
    }
    // Every metric of spec/metrics.md is on the dashboard (packets only as bytes).
    let spec =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("spec/metrics.md"))
            .expect("spec");
    let all = serde_json::to_string(&dashboard).expect("text");
    for line in spec.lines().filter(|l| l.starts_with("| jvpn_")) {
        let name = line.split('|').nth(1).unwrap_or_default().trim();
        if name == "jvpn_packets_total" {
            continue;
        }
        assert!(all.contains(name), "{name} is on no panel");
    }
}

/// The values of `key` in a systemd unit.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_client_unit_is_a_notify_service_with_net_admin_alone_and_a_command_line_that_parses() {
    let unit = deploy("systemd/jvpn-client.service");
    let one = |key: &str| {
        let values = unit_values(&unit, key);
        assert_eq!(values.len(), 1, "{key}: {values:?}");
        values[0].clone()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_ADMIN");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_ADMIN");
    assert_eq!(one("DeviceAllow"), "/dev/net/tun rw");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("KillSignal"), "SIGTERM");
    // The key is a credential, named by the environment; the configuration is read in
    // place (a credential is a copy made at start: a reload would not see an edit).
    assert_eq!(one("LoadCredential"), "client.key:/etc/jvpn/client.key");
    assert_eq!(one("Environment"), "JVPN_PRIVATE_KEY_FILE=%d/client.key");
    let exec = one("ExecStart");
    assert!(exec.contains("--config /etc/jvpn/client.toml"), "{exec}");
    // The command line is one the binary accepts, and the environment's key file takes
    // the place of the file's: with the key present and no gateway running, the client
    // gets past its configuration and gives up on the connection only.
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("client.key");
    let keygen = std::process::Command::new(env!("CARGO_BIN_EXE_jvpn"))
        .arg("keygen")
        .output()
        .expect("keygen");
    std::fs::write(&key, &keygen.stdout).expect("key");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/client.toml");
    let exec = exec
        .replace("/etc/jvpn/client.toml", &sample.display().to_string())
        .replace("--connect-timeout 60", "--connect-timeout 1");
    let mut argv = exec.split_whitespace();
    assert_eq!(argv.next(), Some("/usr/local/bin/jvpn"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jvpn"))
        .args(argv)
        .env("JVPN_PRIVATE_KEY_FILE", &key)
        .env("JVPN_ADMIN__SOCKET", dir.path().join("client.sock"))
        .env("JVPN_EVENTS__OUTPUT", dir.path().join("events.jsonl"))
        .output()
        .expect("jvpn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no session with the gateway"), "{err}");
    // systemd's own check of the unit, where systemd is installed.
    let Ok(verify) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: systemd-analyze (Debian systemd) is missing"
        );
        eprintln!("systemd-analyze is not installed: the unit's own check is skipped");
        return;
    };
    assert!(verify.status.success());
    let dir = tempfile::tempdir().expect("dir");
    let copy = dir.path().join("jvpn-client.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/jvpn", env!("CARGO_BIN_EXE_jvpn")),
    )
    .expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The names in the first column of spec/`file`'s table rows that start with `prefix`.
fn spec_names(file: &str, starts: impl Fn(&str) -> bool) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("spec")
        .join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.strip_prefix("| ")?.split(" |").next())
        .filter(|name| starts(name))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_readme_lists_every_metric_and_every_event_type() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let metrics = spec_names("metrics.md", |n| n.starts_with("jvpn_"));
    let events = spec_names("events.md", |n| {
        n.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && !n.contains(' ')
    });
    assert!(metrics.len() >= 19, "{metrics:?}");
    assert!(events.len() >= 14, "{events:?}");
    for name in metrics.iter().chain(&events) {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README misses {name}"
        );
    }
}
