//! omnictl's behaviour before it reaches a server: usage errors and local checks.

use std::process::Command;

fn omnictl(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_omnictl"))
        .args(args)
        .env_remove("OMNI_API_KEY")
        .env("OMNI_SERVER", "http://127.0.0.1:1")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn missing_api_key_is_one_clear_line() {
    let (code, stdout, stderr) = omnictl(&["instance", "list"]);
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    assert_eq!(stderr, "error: no API key: set OMNI_API_KEY or pass --api-key\n");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, stderr) =
        omnictl(&["instance", "create", "acme", "--channel", "telegram", "--agent-url", "http://a"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid value 'telegram' for '--channel <CHANNEL>'"), "{stderr}");
    let (code, _, stderr) = omnictl(&["apikey", "create", "--scope", "admin", "--instances", "a*"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let (code, _, stderr) = omnictl(&["access", "remove", "acme", "one"]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn help_lists_the_commands() {
    let (code, stdout, _) = omnictl(&["--help"]);
    assert_eq!(code, 0);
    for command in ["instance", "access", "apikey"] {
        assert!(stdout.contains(command), "{stdout}");
    }
}
