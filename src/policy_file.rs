//! Loading a policy from a TOML file, with `JVPN_POLICY__SECTION__KEY` environment
//! overrides, into a validated [`Policy`]. Every error names the file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use jvpn_core::policy::{Policy, PolicyConfig};

/// Reads, parses and validates the policy at `path`, with overrides from the process
/// environment.
pub fn load(path: &Path) -> Result<Policy> {
    load_with_env(path, None)
}

/// As [`load`], with the overrides taken from `env` instead of the process environment
/// when given (tests must not change the environment other tests read). `path` is a
/// policy file, or a gateway or client file, whose `[policy]` is checked as the gateway
/// and the client read it (starter values for keys left out, the same `JVPN_POLICY__…`
/// overrides).
pub fn load_with_env(path: &Path, env: Option<HashMap<String, String>>) -> Result<Policy> {
    let file = || config::File::from(path).format(config::FileFormat::Toml);
    let nested = config::Config::builder()
        .add_source(file())
        .build()
        .with_context(|| format!("{}: cannot read policy", path.display()))?
        .get_table("policy")
        .is_ok();
    // A whole configuration: the overrides name `policy.…` keys under the JVPN_ prefix.
    let (prefix, prefix_separator, key_of_protocols) = if nested {
        ("JVPN", "_", "policy.transport.allowed_protocols")
    } else {
        ("JVPN_POLICY", "__", "transport.allowed_protocols")
    };
    let mut builder = config::Config::builder();
    if nested {
        // As the gateway and client read it: keys left out keep the starter values.
        builder = builder.add_source(
            crate::config::PolicyDefaults::source()
                .with_context(|| format!("{}: cannot read policy", path.display()))?,
        );
    }
    let raw = builder
        .add_source(file())
        .add_source(
            config::Environment::with_prefix(prefix)
                .prefix_separator(prefix_separator)
                .separator("__")
                .list_separator(",")
                .with_list_parse_key(key_of_protocols)
                .try_parsing(true)
                .source(env),
        )
        .build()
        .with_context(|| format!("{}: cannot read policy", path.display()))?;
    let parsed: Result<PolicyConfig, _> = if nested {
        raw.try_deserialize::<Nested>().map(|n| n.policy)
    } else {
        raw.try_deserialize()
    };
    let parsed = parsed.with_context(|| {
        format!(
            "{}: the policy does not match the schema (spec/policy.md)",
            path.display()
        )
    })?;
    parsed
        .validate()
        .with_context(|| format!("{}: the policy is refused", path.display()))
}

/// A gateway or client file, as far as its policy goes (its other keys are not this
/// command's to check).
#[derive(serde::Deserialize)]
struct Nested {
    policy: PolicyConfig,
}

#[cfg(test)]
mod tests {
    use super::*;
    use jvpn_core::ids::Protocol;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        f.write_all(text.as_bytes()).expect("write temp file");
        f
    }

    #[test]
    fn the_example_policy_file_is_the_starter_set() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
        let p = load(&path).expect("example policy loads");
        assert_eq!(p, Policy::default());
    }

    /// `jvpn check-policy` on a gateway or client file checks its `[policy]`, with the
    /// overrides the gateway and client take, and ignores the rest of the file.
    #[test]
    fn the_policy_of_a_gateway_or_client_file_is_checked() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for name in ["gateway.toml", "client.toml"] {
            let p = load_with_env(&dir.join(name), Some(HashMap::new()));
            assert!(p.is_ok(), "{name}: {:?}", p.err());
        }
        let env = HashMap::from([
            (
                "JVPN_POLICY__SWITCHING__SWITCH_COOLDOWN_MS".to_owned(),
                "2500".to_owned(),
            ),
            ("JVPN_BIN".to_owned(), "/usr/bin/jvpn".to_owned()),
        ]);
        let p = load_with_env(&dir.join("gateway.toml"), Some(env)).expect("policy");
        assert_eq!(p.switch_cooldown(), std::time::Duration::from_millis(2_500));
        let bad = file("node_id = \"gw\"\n[policy.switching]\nswitch_cooldown_ms = \"soon\"\n");
        let err = format!(
            "{:#}",
            load_with_env(bad.path(), Some(HashMap::new())).expect_err("bad")
        );
        assert!(err.contains("switch_cooldown_ms"), "{err}");
    }

    #[test]
    fn environment_overrides_reach_scalar_and_list_keys() {
        let env = HashMap::from([
            (
                "JVPN_POLICY__SWITCHING__SWITCH_COOLDOWN_MS".to_owned(),
                "2500".to_owned(),
            ),
            (
                "JVPN_POLICY__TRANSPORT__ALLOWED_PROTOCOLS".to_owned(),
                "udp,tcp".to_owned(),
            ),
        ]);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
        let p = load_with_env(&path, Some(env)).expect("policy with overrides");
        assert_eq!(p.switch_cooldown(), std::time::Duration::from_millis(2_500));
        assert_eq!(p.allowed_protocols(), [Protocol::Udp, Protocol::Tcp]);
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let f = file("[session]\nmax_lifetime_ms = 60000\n");
        let err = format!("{:#}", load(f.path()).expect_err("accepted"));
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        assert!(
            err.contains("session.transport_lost_ttl_ms: required key is missing"),
            "{err}"
        );

        let f = file("[session]\nmax_lifetime = 60000\n");
        let err = format!("{:#}", load(f.path()).expect_err("accepted"));
        assert!(err.contains("unknown field `max_lifetime`"), "{err}");

        let f = file("[volatility]\nloss_volatile_threshold = \"high\"\n");
        let err = format!("{:#}", load(f.path()).expect_err("accepted"));
        assert!(err.contains("loss_volatile_threshold"), "{err}");
    }
}
