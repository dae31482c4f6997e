//! The `jvpn` binary's key commands, run as a user runs them.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn jvpn(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jvpn"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run jvpn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8")
}

#[test]
fn keygen_then_pubkey_gives_a_matching_key_pair() {
    let private = jvpn(&["keygen"], "");
    assert!(private.status.success());
    let private = stdout(&private);
    assert_eq!(private.trim().len(), 44, "{private:?}");
    let public = jvpn(&["pubkey"], &private);
    assert!(
        public.status.success(),
        "{}",
        String::from_utf8_lossy(&public.stderr)
    );
    let public = stdout(&public);
    let expected = jvpn_core::crypto::Keypair::from_base64(&private)
        .expect("parse")
        .public()
        .to_string();
    assert_eq!(public.trim(), expected);
    assert_ne!(public.trim(), private.trim());
    // Two keys are never the same.
    assert_ne!(stdout(&jvpn(&["keygen"], "")), private);
}

#[test]
fn pubkey_refuses_what_is_not_a_key_with_a_clear_message() {
    let out = jvpn(&["pubkey"], "not a key\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a private key"), "{err}");
}

#[test]
fn check_policy_names_the_file_and_key_of_a_bad_policy() {
    let dir = std::env::temp_dir().join(format!("jvpn-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[switching]\nmax_switches_per_min = 9999\n").expect("write");
    let out = jvpn(&["check-policy", file.to_str().expect("path")], "");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(
        err.contains("switching.max_switches_per_min = 9999"),
        "{err}"
    );
}
