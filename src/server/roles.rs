//! Access control as ChatStream's client roles: `--roles FILE` holds ChatStream's
//! `client_roles` dictionary as JSON. A role allows a set of APIs and is reached by one auth
//! method: `nothing` (the default role for browsers with a session, or for programs without
//! one), a UI pass phrase typed as a chat message, or a header phrase sent by programs in
//! `X-ChatStream-Auth-Header` (with `X-FastSession-Skip: skip`). Phrases are compared in
//! constant time through their SHA-256 digests.

use std::collections::HashSet;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Every API name a role may allow.
pub const API_NAMES: &[&str] = &[
    "chat_stream",
    "clear_context",
    "get_prompt",
    "set_generation_params",
    "get_generation_params",
    "set_feedback",
    "get_load",
    "get_resource_usage",
    "webui_index",
    "webui_js",
    "metrics",
];

/// A secret phrase, kept as its SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Secret([u8; 32]);

impl Secret {
    fn of_phrase(phrase: &str) -> Secret {
        Secret(Sha256::digest(phrase.as_bytes()).into())
    }

    fn from_hex(hex: &str) -> Option<Secret> {
        let hex = hex.trim();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Secret(out))
    }

    /// Constant-time comparison of `phrase`'s digest with this one.
    fn matches(&self, phrase: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(phrase.as_bytes()).into();
        d.iter().zip(&self.0).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    Nothing,
    UiPhrase(Secret),
    HeaderPhrase(Secret),
}

/// One role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// Its name in the file.
    pub name: String,
    /// Allowed API names (`None`: all).
    allow: Option<HashSet<String>>,
    auth: Auth,
    /// Whether its clients keep a session (browsers) or not (programs).
    pub use_session: bool,
    /// Whether the grant answer enables the UI's developer tools.
    pub enable_dev_tool: bool,
}

impl Role {
    /// Whether this role may call `api`.
    pub fn allows(&self, api: &str) -> bool {
        self.allow.as_ref().is_none_or(|a| a.contains(api))
    }
}

/// All roles of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roles {
    roles: Vec<Role>,
    /// Warnings for the start-up log (phrases kept in clear).
    pub warnings: Vec<String>,
}

impl Default for Roles {
    /// ChatStream's default: browsers may use the web UI, chat_stream, clear_context and
    /// set_feedback; programs without a session get nothing.
    fn default() -> Roles {
        Roles::from_json(&json!({"user": {"apis": {
            "allow": ["chat_stream", "clear_context", "set_feedback", "webui_index", "webui_js"],
            "auth_method": "nothing", "use_session": true}}}))
        .expect("the default roles are valid")
    }
}

impl Roles {
    /// Everything allowed to everyone, with and without a session (trusted networks, tests).
    pub fn open() -> Roles {
        Roles::from_json(&json!({
            "browser": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": true}},
            "program": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": false}}}))
        .expect("the open roles are valid")
    }

    /// Reads ChatStream's `client_roles` dictionary; unknown API names or auth methods, and
    /// more than one default role of a kind, are errors.
    pub fn from_json(v: &Value) -> Result<Roles, String> {
        let obj = v
            .as_object()
            .ok_or("roles: expected a JSON object of role names")?;
        let mut roles = Vec::new();
        let mut warnings = Vec::new();
        for (name, spec) in obj {
            let apis = spec
                .get("apis")
                .and_then(Value::as_object)
                .ok_or(format!("role '{name}': missing \"apis\" object"))?;
            let allow = match apis.get("allow") {
                Some(Value::String(s)) if s == "all" => None,
                Some(Value::Array(list)) => {
                    let mut set = HashSet::new();
                    for a in list {
                        let a = a
                            .as_str()
                            .ok_or(format!("role '{name}': API names must be strings"))?;
                        if !API_NAMES.contains(&a) {
                            return Err(format!(
                                "role '{name}': unknown API name '{a}' (known: {})",
                                API_NAMES.join(", ")
                            ));
                        }
                        set.insert(a.to_string());
                    }
                    Some(set)
                }
                _ => {
                    return Err(format!(
                        "role '{name}': \"allow\" must be \"all\" or a list of API names"
                    ))
                }
            };
            let method = apis
                .get("auth_method")
                .and_then(Value::as_str)
                .unwrap_or("nothing");
            let phrase = |key: &str| {
                apis.get(key).and_then(Value::as_str).ok_or(format!(
                    "role '{name}': auth_method {method} needs \"{key}\""
                ))
            };
            let hashed = |key: &str| {
                let hex = phrase(key)?;
                Secret::from_hex(hex).ok_or(format!(
                    "role '{name}': \"{key}\" must be 64 hex digits (SHA-256)"
                ))
            };
            let mut clear = |key: &str| -> Result<Secret, String> {
                warnings.push(format!("role '{name}': the {key} is kept in clear in the roles file; prefer {key}_sha256"));
                Ok(Secret::of_phrase(phrase(key)?))
            };
            let auth = match method {
                "nothing" => Auth::Nothing,
                "ui_pass_phrase" => Auth::UiPhrase(clear("ui_pass_phrase")?),
                "ui_pass_phrase_sha256" => Auth::UiPhrase(hashed("ui_pass_phrase_sha256")?),
                "header_phrase" => Auth::HeaderPhrase(clear("header_phrase")?),
                // ChatStream reads the digest under `header_phrase` too.
                "header_phrase_sha256" => Auth::HeaderPhrase(
                    hashed("header_phrase_sha256").or_else(|_| hashed("header_phrase"))?,
                ),
                other => {
                    return Err(format!(
                        "role '{name}': unknown auth_method '{other}' (known: nothing, ui_pass_phrase, \
                         ui_pass_phrase_sha256, header_phrase, header_phrase_sha256)"
                    ))
                }
            };
            let flag = |k: &str| apis.get(k).and_then(Value::as_bool).unwrap_or(false);
            roles.push(Role {
                name: name.clone(),
                allow,
                auth,
                use_session: flag("use_session"),
                enable_dev_tool: flag("enable_dev_tool"),
            });
        }
        for session in [true, false] {
            let n = roles
                .iter()
                .filter(|r| r.auth == Auth::Nothing && r.use_session == session)
                .count();
            if n > 1 {
                return Err(format!("roles: {n} default roles (auth_method nothing) with use_session {session}; at most one"));
            }
        }
        Ok(Roles { roles, warnings })
    }

    /// The role named `name`.
    pub fn get(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name == name)
    }

    /// The default role of browsers (with a session) or of programs (without).
    pub fn default_role(&self, use_session: bool) -> Option<&Role> {
        self.roles
            .iter()
            .find(|r| r.auth == Auth::Nothing && r.use_session == use_session)
    }

    /// The role whose UI pass phrase is `text`.
    pub fn by_ui_phrase(&self, text: &str) -> Option<&Role> {
        self.roles
            .iter()
            .find(|r| matches!(&r.auth, Auth::UiPhrase(s) if s.matches(text)))
    }

    /// The role whose header phrase is `value`.
    pub fn by_header_phrase(&self, value: &str) -> Option<&Role> {
        self.roles
            .iter()
            .find(|r| matches!(&r.auth, Auth::HeaderPhrase(s) if s.matches(value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_allows_the_browser_set_only() {
        let r = Roles::default();
        let user = r.default_role(true).unwrap();
        assert!(user.allows("chat_stream") && user.allows("webui_js") && !user.allows("get_load"));
        assert!(r.default_role(false).is_none());
    }

    #[test]
    fn phrases_match_in_clear_and_hashed_forms() {
        let hex: String = Sha256::digest(b"open sesame")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let r = Roles::from_json(&json!({
            "admin": {"apis": {"allow": "all", "auth_method": "ui_pass_phrase_sha256", "ui_pass_phrase_sha256": hex, "use_session": true}},
            "bot": {"apis": {"allow": ["get_load"], "auth_method": "header_phrase_sha256", "header_phrase": hex}},
            "ops": {"apis": {"allow": ["metrics"], "auth_method": "header_phrase", "header_phrase": "plain"}}
        }))
        .unwrap();
        assert_eq!(r.by_ui_phrase("open sesame").unwrap().name, "admin");
        assert!(r.by_ui_phrase("open sesame ").is_none());
        assert_eq!(r.by_header_phrase("open sesame").unwrap().name, "bot");
        assert_eq!(r.by_header_phrase("plain").unwrap().name, "ops");
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    }

    #[test]
    fn unknown_names_and_methods_are_start_up_errors() {
        let bad_api = json!({"x": {"apis": {"allow": ["chat"], "auth_method": "nothing"}}});
        assert!(Roles::from_json(&bad_api)
            .unwrap_err()
            .contains("unknown API name 'chat'"));
        let bad_method = json!({"x": {"apis": {"allow": "all", "auth_method": "password"}}});
        assert!(Roles::from_json(&bad_method)
            .unwrap_err()
            .contains("unknown auth_method 'password'"));
        let two = json!({"a": {"apis": {"allow": "all", "use_session": true}}, "b": {"apis": {"allow": "all", "use_session": true}}});
        assert!(Roles::from_json(&two).unwrap_err().contains("at most one"));
    }
}
