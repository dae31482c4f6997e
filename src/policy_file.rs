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
/// when given (tests must not change the environment other tests read).
pub fn load_with_env(path: &Path, env: Option<HashMap<String, String>>) -> Result<Policy> {
    let raw = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("JVPN_POLICY")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("transport.allowed_protocols")
                .try_parsing(true)
                .source(env),
        )
        .build()
        .with_context(|| format!("{}: cannot read policy", path.display()))?;
    let parsed: PolicyConfig = raw.try_deserialize().with_context(|| {
        format!(
            "{}: the policy does not match the schema (spec/policy.md)",
            path.display()
        )
    })?;
    parsed
        .validate()
        .with_context(|| format!("{}: the policy is refused", path.display()))
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
