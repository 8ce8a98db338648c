//! The log's one quoting rule: a field value is written bare only when it is a plain token (a number, an
//! address, a word); anything else (spaces, quotes, `=`, control characters, the empty string) is written
//! as a quoted, escaped string, whether the call site formatted it with `?` or `%`. So every line parses
//! as `key=value` pairs and a peer's text cannot forge a field or a line.

use std::fmt;

use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{FormatFields, Writer};

/// The characters a bare value may hold.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '.' | '_' | ':' | '/' | '-' | '[' | ']' | '@' | '+' | ',')
        })
}

/// Is `text` exactly one Rust string literal as `{:?}` writes it (`"..."`, inner quotes escaped)?
fn is_quoted(text: &str) -> bool {
    let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
        return false;
    };
    let mut escaped = false;
    for c in inner.chars() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return false,
            (false, c) if c.is_control() => return false,
            _ => {}
        }
    }
    !escaped
}

/// The text written for one field's value: bare, already quoted, or quoted now.
pub fn value_text(text: &str) -> String {
    if is_token(text) || is_quoted(text) {
        text.to_string()
    } else {
        format!("{text:?}")
    }
}

/// The field formatter for `tracing_subscriber::fmt().fmt_fields(...)`.
pub fn fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    tracing_subscriber::fmt::format::debug_fn(
        |w: &mut Writer<'_>, field, value: &dyn fmt::Debug| {
            let text = format!("{value:?}");
            if field.name() == "message" {
                write!(w, "{text}")
            } else {
                write!(w, "{}={}", field.name(), value_text(&text))
            }
        },
    )
    .delimited(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_bare_tokens_or_quoted_strings() {
        assert_eq!(value_text("127.0.0.1:4000"), "127.0.0.1:4000");
        assert_eq!(value_text("42"), "42");
        assert_eq!(value_text("\"dr.house\""), "\"dr.house\"");
        assert_eq!(
            value_text("wrong password (1/2/1)"),
            "\"wrong password (1/2/1)\""
        );
        assert_eq!(value_text("reader1 x"), "\"reader1 x\"");
        assert_eq!(value_text(""), "\"\"");
        assert_eq!(value_text("a=b"), "\"a=b\"");
        // Displayed text that merely starts with a quote is quoted again, escaped.
        assert_eq!(
            value_text("\"X\" maps to no upstream"),
            "\"\\\"X\\\" maps to no upstream\""
        );
        assert_eq!(value_text("line\nbreak"), "\"line\\nbreak\"");
        assert_eq!(value_text("\"a\nb\""), "\"\\\"a\\nb\\\"\"");
    }
}

/// The tracing targets (the module name printed after the level, and what `RUST_LOG` filters match) of
/// lines whose code moved in the issue 14 layout: they keep the module they were logged from before,
/// so an admin's `RUST_LOG=pacsgate::server=warn` or a log search on `pacsgate::session:` still works.
pub mod targets {
    /// The gateway's association, accept, reload and drain lines (once `src/server.rs`).
    pub const SERVER: &str = "pacsgate::server";
    /// The DIMSE policy's lines (once `src/session.rs`).
    pub const SESSION: &str = "pacsgate::session";
    /// The C-MOVE return path's lines (once in `src/moves.rs`).
    pub const MOVES: &str = "pacsgate::moves";
    /// The web door's forwarding lines (once `src/web.rs`).
    pub const WEB: &str = "pacsgate::web";
    /// The audit trail's syslog lines (once in `src/audit.rs`).
    pub const AUDIT: &str = "pacsgate::audit";
    /// `pacsgate run`'s start and stop lines (once in `src/main.rs`).
    pub const RUN: &str = "pacsgate";
    /// `pacsgate connect`'s start lines (once in `src/connect/cli.rs`).
    pub const CONNECT_CLI: &str = "pacsgate::connect::cli";
    /// connect's local storage lines (once in `src/connect/retrieve.rs`).
    pub const CONNECT_RETRIEVE: &str = "pacsgate::connect::retrieve";
}
