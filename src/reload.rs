//! What a reloaded client configuration (SIGHUP) may change on a live session: the
//! policy, and only the policy. Everything else — keys, candidates, the tunnel, routes,
//! the admin socket, metrics, events — was used to build what runs, and changing it
//! needs a new session, which a reload never starts on its own: it says so and changes
//! nothing.

use jvpn_core::policy::Policy;

use crate::config::ClientSetup;

/// What to do with a reloaded configuration.
#[derive(Debug, PartialEq)]
pub enum Reload {
    /// Nothing changed.
    Nothing,
    /// These keys changed, which needs a restart; nothing is applied.
    NeedsRestart(Vec<&'static str>),
    /// The policy changed but kept its version, so events could not tell the two
    /// apart; nothing is applied.
    SameVersion(String),
    /// Put this policy in force.
    Apply(Box<Policy>),
}

/// Decides what a reload from `old` to `new` does.
pub fn plan(old: &ClientSetup, new: &ClientSetup) -> Reload {
    // Every field named, so that a new one cannot be added without deciding here
    // whether a reload may change it.
    let ClientSetup {
        keypair,
        gateway,
        gateway_tls_pin,
        on_end,
        candidates,
        tunnel,
        networks,
        full_tunnel,
        fwmark,
        admin_socket,
        metrics,
        events,
        policy: _,
    } = new;
    let changed: Vec<&'static str> = [
        ("private_key", old.keypair.public() != keypair.public()),
        ("gateway_public_key", old.gateway != *gateway),
        ("gateway_tls_pin", old.gateway_tls_pin != *gateway_tls_pin),
        ("on_session_end", old.on_end != *on_end),
        ("candidates", old.candidates != *candidates),
        ("tunnel", old.tunnel != *tunnel),
        ("routes.networks", old.networks != *networks),
        ("routes.full_tunnel", old.full_tunnel != *full_tunnel),
        ("routes.fwmark", old.fwmark != *fwmark),
        ("admin.socket", old.admin_socket != *admin_socket),
        ("metrics.listen", old.metrics != *metrics),
        ("events", old.events != *events),
    ]
    .into_iter()
    .filter_map(|(key, differs)| differs.then_some(key))
    .collect();
    if !changed.is_empty() {
        Reload::NeedsRestart(changed)
    } else if old.policy == new.policy {
        Reload::Nothing
    } else if old.policy.version() == new.policy.version() {
        Reload::SameVersion(new.policy.version().to_string())
    } else {
        Reload::Apply(Box::new(new.policy.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_client;

    const KEY: &str = "private_key = \"kPcQBpmF9y1DZAgkvZJrwMqkaMRvJqFnO0GW0Tl7FF4=\"\ngateway_public_key = \"fTvmLaY9K6CrY+3BrRi2XB7IEhGZvsDSh3pIyDsV0WY=\"\n[[candidates]]\nendpoint = \"127.0.0.1:51820\"\n";

    fn setup(dir: &std::path::Path, text: &str) -> ClientSetup {
        let file = dir.join("client.toml");
        std::fs::write(&file, format!("{KEY}{text}")).expect("write");
        load_client(&file, Some(Default::default())).expect("valid config")
    }

    #[test]
    fn only_a_new_policy_version_applies_and_anything_else_needs_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let base = setup(dir.path(), "");
        assert_eq!(plan(&base, &setup(dir.path(), "")), Reload::Nothing);
        let faster = setup(
            dir.path(),
            "[policy]\nversion = \"2\"\n[policy.switching]\nswitch_cooldown_ms = 500\n",
        );
        match plan(&base, &faster) {
            Reload::Apply(p) => assert_eq!(p.version(), "2"),
            other => panic!("{other:?}"),
        }
        let unversioned = setup(dir.path(), "[policy.switching]\nswitch_cooldown_ms = 500\n");
        assert_eq!(
            plan(&base, &unversioned),
            Reload::SameVersion(base.policy.version().to_string())
        );
        let moved = setup(
            dir.path(),
            "[[candidates]]\nendpoint = \"127.0.0.1:443\"\n[tunnel]\nmtu = 1300\n[policy]\nversion = \"2\"\n",
        );
        assert_eq!(
            plan(&base, &moved),
            Reload::NeedsRestart(vec!["candidates", "tunnel"])
        );
    }
}
