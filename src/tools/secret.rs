//! Passwords and tokens for the tools: from an environment variable, a file, or a prompt on the
//! terminal with echo off. Never from the command line, where `ps` and shell history would show them.

use std::io::{BufRead, Write};
use std::path::Path;

use super::ToolError;

/// Read a file holding one secret; a trailing newline (and surrounding whitespace for tokens) is dropped.
fn from_file(path: &Path, what: &str) -> Result<String, ToolError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ToolError::Secret(format!(
            "cannot read the {what} file {}: {e}",
            path.display()
        ))
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(ToolError::Secret(format!(
            "the {what} file {} is empty",
            path.display()
        )));
    }
    Ok(text.to_string())
}

fn from_env(var: &str, what: &str) -> Result<String, ToolError> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(v),
        Ok(_) => Err(ToolError::Secret(format!(
            "the environment variable {var} (the {what}) is empty"
        ))),
        Err(_) => Err(ToolError::Secret(format!(
            "the environment variable {var} (the {what}) is not set"
        ))),
    }
}

/// The password for `user`: from `env`, from `file`, or asked for on the terminal.
pub fn password(user: &str, env: Option<&str>, file: Option<&Path>) -> Result<String, ToolError> {
    if let Some(var) = env {
        return from_env(var, "password");
    }
    if let Some(path) = file {
        return from_file(path, "password");
    }
    prompt(&format!("password for {user}: "))
}

/// A JWT from `env` or `file` (whitespace around it dropped); `None` when neither is given.
pub fn token(env: Option<&str>, file: Option<&Path>) -> Result<Option<String>, ToolError> {
    let raw = match (env, file) {
        (Some(var), _) => from_env(var, "token")?,
        (None, Some(path)) => from_file(path, "token")?,
        (None, None) => return Ok(None),
    };
    let token = raw.trim().to_string();
    if token.split('.').count() != 3 {
        return Err(ToolError::Secret(
            "the token is not a JWT (three base64url parts separated by dots)".into(),
        ));
    }
    Ok(Some(token))
}

/// Ask on the controlling terminal (/dev/tty) with echo turned off by `stty`.
fn prompt(text: &str) -> Result<String, ToolError> {
    let no_terminal = |e: std::io::Error| {
        ToolError::Secret(format!(
            "no terminal to ask for the password ({e}); use --password-env VAR or --password-file FILE"
        ))
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(no_terminal)?;
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(
                tty.try_clone()
                    .map(std::process::Stdio::from)
                    .unwrap_or(std::process::Stdio::null()),
            )
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let mut out = &tty;
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    let hidden = stty("-echo");
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    if hidden {
        stty("echo");
    }
    let _ = out.write_all(b"\n");
    read.map_err(no_terminal)?;
    let line = line.trim_end_matches(['\n', '\r']).to_string();
    if line.is_empty() {
        return Err(ToolError::Secret("empty password".into()));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_lose_their_trailing_newline_and_tokens_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret with spaces \n").expect("write");
        assert_eq!(
            password("u", None, Some(&pw)).expect("password"),
            "s3cret with spaces "
        );
        let tok = dir.path().join("tok");
        std::fs::write(&tok, "  aaa.bbb.ccc\n").expect("write");
        assert_eq!(
            token(None, Some(&tok)).expect("token").as_deref(),
            Some("aaa.bbb.ccc")
        );
        std::fs::write(&tok, "not a token").expect("write");
        assert!(token(None, Some(&tok)).is_err());
        assert!(token(None, None).expect("none").is_none());
        std::fs::write(&pw, "").expect("write");
        assert!(password("u", None, Some(&pw)).is_err());
    }
}
