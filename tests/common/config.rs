//! One builder for the gateway's TOML configuration in tests: every test file that writes a
//! `pacsgate.toml` says what it needs (`.upstream(..).role(..).user(..)`) instead of a template.
//!
//! Plain tables (`[gateway]`, `[tls]`, `[limits]`, ...) are kept once each, in the order first named,
//! and [`GatewayConfig::set`] adds a line to one wherever it is called; arrays of tables (`[[upstream]]`,
//! `[[role]]`, `[[user]]`, ...) and [`GatewayConfig::raw`] text come out in call order.

use super::Pki;
use std::path::Path;

enum Block {
    Table { header: String, lines: Vec<String> },
    Text(String),
}

/// A gateway configuration under construction; [`GatewayConfig::to_toml`] renders it.
#[derive(Default)]
pub struct GatewayConfig {
    blocks: Vec<Block>,
}

/// `"a", "b"` for a TOML array of strings.
fn list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

impl GatewayConfig {
    /// `[gateway] listen = "127.0.0.1:PORT"`.
    pub fn new(port: u16) -> GatewayConfig {
        GatewayConfig::listen(&format!("127.0.0.1:{port}"))
    }

    /// `[gateway] listen = "ADDRESS"`.
    pub fn listen(address: &str) -> GatewayConfig {
        GatewayConfig::default().set("gateway", &format!("listen = \"{address}\""))
    }

    /// Adds `line` to the table `[section]` (made here if it is not there yet).
    pub fn set(mut self, section: &str, line: &str) -> GatewayConfig {
        let header = format!("[{section}]");
        for block in &mut self.blocks {
            if let Block::Table { header: h, lines } = block
                && *h == header
            {
                lines.push(line.to_string());
                return self;
            }
        }
        self.blocks.push(Block::Table {
            header,
            lines: vec![line.to_string()],
        });
        self
    }

    /// `set` for a `key = "path"` line.
    pub fn path(self, section: &str, key: &str, path: &Path) -> GatewayConfig {
        self.set(section, &format!("{key} = \"{}\"", path.display()))
    }

    /// `[tls]` with the test PKI's server certificate and key.
    pub fn tls(self, pki: &Pki) -> GatewayConfig {
        self.tls_key(pki, &pki.server_key)
    }

    /// `[tls]` with the test PKI's server certificate and the private key at `key`.
    pub fn tls_key(self, pki: &Pki, key: &Path) -> GatewayConfig {
        self.path("tls", "certificate", &pki.server_cert)
            .path("tls", "private_key", key)
    }

    /// `tls.client_ca`: the test PKI's CA.
    pub fn client_ca(self, pki: &Pki) -> GatewayConfig {
        self.path("tls", "client_ca", &pki.ca_cert)
    }

    /// `[auth.jwt]`: issuer https://idp.test, audience pacsgate, the test PKI's public key.
    pub fn jwt(self, pki: &Pki) -> GatewayConfig {
        self.set("auth.jwt", "issuer = \"https://idp.test\"")
            .set("auth.jwt", "audience = \"pacsgate\"")
            .path("auth.jwt", "public_key", &pki.jwt_public_pem)
    }

    /// [`jwt`](Self::jwt) with `algorithms = ["ES256"]`.
    pub fn jwt_es256(self, pki: &Pki) -> GatewayConfig {
        self.jwt(pki).set("auth.jwt", "algorithms = [\"ES256\"]")
    }

    /// An array-of-tables entry `[[name]]` with `lines`, in call order.
    pub fn entry(mut self, name: &str, lines: &[String]) -> GatewayConfig {
        let mut text = format!("[[{name}]]\n");
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        self.blocks.push(Block::Text(text));
        self
    }

    /// `[[upstream]]` called AE `called_ae` at 127.0.0.1:`port`, whose AE title is `ae_title`.
    pub fn upstream(self, called_ae: &str, port: u16, ae_title: &str) -> GatewayConfig {
        self.upstream_with(called_ae, port, ae_title, &[])
    }

    /// [`upstream`](Self::upstream) with more `key = value` lines.
    pub fn upstream_with(
        self,
        called_ae: &str,
        port: u16,
        ae_title: &str,
        more: &[&str],
    ) -> GatewayConfig {
        let mut lines = vec![
            format!("called_ae = \"{called_ae}\""),
            format!("address = \"127.0.0.1:{port}\""),
            format!("ae_title = \"{ae_title}\""),
        ];
        lines.extend(more.iter().map(|l| l.to_string()));
        self.entry("upstream", &lines)
    }

    /// `[[destination]]` `ae_title` at 127.0.0.1:`port`.
    pub fn destination(self, ae_title: &str, port: u16) -> GatewayConfig {
        self.entry(
            "destination",
            &[
                format!("ae_title = \"{ae_title}\""),
                format!("address = \"127.0.0.1:{port}\""),
            ],
        )
    }

    /// `[[role]]` `name` allowed `allow`.
    pub fn role(self, name: &str, allow: &[&str]) -> GatewayConfig {
        self.role_with(name, allow, &[])
    }

    /// [`role`](Self::role) with more `key = value` lines (`unrestricted_queries = true`, ...).
    pub fn role_with(self, name: &str, allow: &[&str], more: &[&str]) -> GatewayConfig {
        let mut lines = vec![
            format!("name = \"{name}\""),
            format!("allow = {}", list(allow)),
        ];
        lines.extend(more.iter().map(|l| l.to_string()));
        self.entry("role", &lines)
    }

    /// `[[user]]` `name` with `password_hash` and `roles`.
    pub fn user(self, name: &str, password_hash: &str, roles: &[&str]) -> GatewayConfig {
        self.user_with(name, password_hash, roles, &[])
    }

    /// [`user`](Self::user) with more `key = value` lines.
    pub fn user_with(
        self,
        name: &str,
        password_hash: &str,
        roles: &[&str],
        more: &[&str],
    ) -> GatewayConfig {
        let mut lines = vec![
            format!("name = \"{name}\""),
            format!("password_hash = \"{password_hash}\""),
            format!("roles = {}", list(roles)),
        ];
        lines.extend(more.iter().map(|l| l.to_string()));
        self.entry("user", &lines)
    }

    /// `[[user]]` `name` with `roles` and no password (a client certificate or a JWT names them).
    pub fn user_cert(self, name: &str, roles: &[&str]) -> GatewayConfig {
        self.entry(
            "user",
            &[
                format!("name = \"{name}\""),
                format!("roles = {}", list(roles)),
            ],
        )
    }

    /// TOML text appended as it is (a test's `extra`), after what came before.
    pub fn raw(mut self, text: &str) -> GatewayConfig {
        self.blocks.push(Block::Text(text.to_string()));
        self
    }

    /// The configuration file's text.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for block in &self.blocks {
            match block {
                Block::Table { header, lines } => {
                    out.push_str(header);
                    out.push('\n');
                    for line in lines {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
                Block::Text(text) => out.push_str(text),
            }
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push('\n');
        }
        out
    }
}
