//! `[http]`: where the HTTP server listens and the tokens of its protected routes.
//!
//! Each token comes from the file itself, an environment variable or a file, read once at
//! load. A route group whose token is not configured is not served at all: no admin token, no
//! management API; no producer token, no `POST /v1/events`. Metrics and health need no token.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::config::SecretText;

/// The address served when `listen` is not set. A failure to bind it is logged, not fatal, so
/// that two runs on one host (tests, a local cluster) do not stop each other.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// Shortest accepted token, in characters: a token is a password guessed over the network.
pub const MIN_TOKEN_CHARS: usize = 16;

/// `[http]`: the HTTP server inside `hookflow run`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve HTTP at all. Default true: metrics and health are on unless turned off.
    pub enabled: bool,
    /// `host:port` to listen on, such as `127.0.0.1:9464` or `0.0.0.0:8080`; port 0 picks a
    /// free port. The bound address is logged and written to `<data-dir>/http.addr`. When
    /// not set, `127.0.0.1:9464` is tried and a failure to bind it only logged.
    pub listen: Option<String>,
    /// The bearer token of the management API, in the file.
    pub admin_token: Option<SecretText>,
    /// The environment variable holding the admin token, instead of `admin_token`.
    pub admin_token_env: Option<String>,
    /// The file holding the admin token (relative to the config file), instead.
    pub admin_token_file: Option<PathBuf>,
    /// The bearer token of `POST /v1/events`, in the file.
    pub producer_token: Option<SecretText>,
    /// The environment variable holding the producer token.
    pub producer_token_env: Option<String>,
    /// The file holding the producer token (relative to the config file).
    pub producer_token_file: Option<PathBuf>,
    /// The tokens as read at load.
    #[serde(skip)]
    resolved: ResolvedTokens,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: None,
            admin_token: None,
            admin_token_env: None,
            admin_token_file: None,
            producer_token: None,
            producer_token_env: None,
            producer_token_file: None,
            resolved: ResolvedTokens::default(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct ResolvedTokens {
    admin: Option<ApiToken>,
    producer: Option<ApiToken>,
}

/// A bearer token. `Debug` never shows it and comparison takes the same time wherever the
/// first difference is.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    /// Wraps a token that passed [`check_token`].
    pub fn new(token: impl Into<String>) -> Self {
        ApiToken(token.into())
    }

    /// Compares `presented` with the token in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(presented.as_bytes()))
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// The address the server listens on, and whether it was configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Do not serve HTTP.
    Off,
    /// The address the operator set: failing to bind it stops the run.
    Configured(SocketAddr),
    /// The default address: failing to bind it is logged and the run goes on.
    Default(SocketAddr),
}

impl HttpConfig {
    /// Checks the fields and reads the tokens; `base_dir` is the config file's directory.
    /// Returns the field and problem of the first bad field.
    pub(crate) fn validate(&mut self, base_dir: &Path) -> Result<(), (String, String)> {
        self.listen()?;
        let admin = resolve_token(
            "http.admin_token",
            &self.admin_token,
            &self.admin_token_env,
            &self.admin_token_file,
            base_dir,
        )?;
        let producer = resolve_token(
            "http.producer_token",
            &self.producer_token,
            &self.producer_token_env,
            &self.producer_token_file,
            base_dir,
        )?;
        // One token for both would let every producer manage endpoints.
        if let (Some(admin), Some(producer)) = (&admin, &producer) {
            if admin.matches(&producer.0) {
                return Err((
                    "http.producer_token".to_string(),
                    "is the same as the admin token; give producers a token of their own"
                        .to_string(),
                ));
            }
        }
        self.resolved = ResolvedTokens { admin, producer };
        Ok(())
    }

    /// Returns the address to listen on, or the field and problem.
    pub fn listen(&self) -> Result<Listen, (String, String)> {
        if !self.enabled {
            return Ok(Listen::Off);
        }
        match &self.listen {
            None => DEFAULT_LISTEN
                .parse()
                .map(Listen::Default)
                .map_err(|_| ("http.listen".to_string(), "bad default".to_string())),
            Some(text) => text.trim().parse().map(Listen::Configured).map_err(|_| {
                (
                    "http.listen".to_string(),
                    format!("`{text}` is not an address such as `127.0.0.1:9464` or `0.0.0.0:8080` (a host name is not accepted)"),
                )
            }),
        }
    }

    /// Returns the admin token, when the management API is on.
    pub fn admin_token(&self) -> Option<&ApiToken> {
        self.resolved.admin.as_ref()
    }

    /// Returns the producer token, when `POST /v1/events` is on.
    pub fn producer_token(&self) -> Option<&ApiToken> {
        self.resolved.producer.as_ref()
    }
}

/// Reads one token from exactly one of its value, environment variable and file.
fn resolve_token(
    field: &str,
    value: &Option<SecretText>,
    env: &Option<String>,
    file: &Option<PathBuf>,
    base_dir: &Path,
) -> Result<Option<ApiToken>, (String, String)> {
    let set = [value.is_some(), env.is_some(), file.is_some()]
        .iter()
        .filter(|set| **set)
        .count();
    if set > 1 {
        return Err((
            field.to_string(),
            format!("set only one of `{field}`, `{field}_env` and `{field}_file`")
                .replace("`http.", "`"),
        ));
    }
    let (name, text, origin) = match (value, env, file) {
        (Some(text), _, _) => (field.to_string(), text.0.clone(), String::new()),
        (_, Some(variable), _) => {
            let name = format!("{field}_env");
            let text = std::env::var(variable).map_err(|_| {
                (
                    name.clone(),
                    format!("environment variable `{variable}` is not set or not UTF-8"),
                )
            })?;
            (
                name,
                text,
                format!(" (in environment variable `{variable}`)"),
            )
        }
        (_, _, Some(path)) => {
            let name = format!("{field}_file");
            let path = base_dir.join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                (
                    name.clone(),
                    format!("cannot read token file {}: {e}", path.display()),
                )
            })?;
            (name, text, format!(" (in file {})", path.display()))
        }
        (None, None, None) => return Ok(None),
    };
    let token = text.trim();
    check_token(token).map_err(|problem| (name, format!("{problem}{origin}")))?;
    Ok(Some(ApiToken::new(token)))
}

/// Checks a token's shape without quoting it.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "the token is shorter than {MIN_TOKEN_CHARS} characters; use a long random string"
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the token may contain only visible ASCII characters (it is sent in a header)".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HttpConfig, (String, String)> {
        let mut config: HttpConfig =
            toml::from_str(text).map_err(|e| ("toml".into(), e.to_string()))?;
        config.validate(Path::new("/nonexistent-base"))?;
        Ok(config)
    }

    #[test]
    fn default_listens_on_loopback_without_tokens() {
        let config = parse("").expect("defaults");
        assert_eq!(
            config.listen().expect("listen"),
            Listen::Default("127.0.0.1:9464".parse().expect("address"))
        );
        assert!(config.admin_token().is_none());
        assert!(config.producer_token().is_none());
        assert_eq!(
            parse("enabled = false")
                .expect("off")
                .listen()
                .expect("listen"),
            Listen::Off
        );
    }

    #[test]
    fn tokens_from_value_env_and_file() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("producer.token");
        std::fs::write(&file, "producer-token-0123456789\n").expect("write");
        std::env::set_var("HOOKFLOW_TEST_ADMIN_TOKEN", "admin-token-from-env-0123");
        let mut config: HttpConfig = toml::from_str(&format!(
            "listen = \"127.0.0.1:0\"\nadmin_token_env = \"HOOKFLOW_TEST_ADMIN_TOKEN\"\nproducer_token_file = \"{}\"",
            file.display()
        ))
        .expect("toml");
        config.validate(dir.path()).expect("valid");
        assert!(config
            .admin_token()
            .expect("admin")
            .matches("admin-token-from-env-0123"));
        assert!(!config
            .admin_token()
            .expect("admin")
            .matches("admin-token-from-env-0124"));
        assert!(config
            .producer_token()
            .expect("producer")
            .matches("producer-token-0123456789"));
        assert_eq!(
            format!("{:?}", config.admin_token()),
            "Some(\"<redacted>\")"
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("admin-token-from-env"), "{debug}");
    }

    #[test]
    fn bad_values_name_the_field() {
        for (text, field, problem) in [
            (
                "listen = \"localhost:80\"",
                "http.listen",
                "is not an address",
            ),
            (
                "admin_token = \"short\"",
                "http.admin_token",
                "shorter than 16",
            ),
            (
                "producer_token = \"has a space in the token\"",
                "http.producer_token",
                "visible ASCII",
            ),
            (
                "admin_token = \"0123456789abcdef\"\nadmin_token_env = \"X\"",
                "http.admin_token",
                "set only one of `admin_token`, `admin_token_env` and `admin_token_file`",
            ),
            (
                "admin_token_env = \"HOOKFLOW_TEST_TOKEN_NOT_SET\"",
                "http.admin_token_env",
                "`HOOKFLOW_TEST_TOKEN_NOT_SET` is not set",
            ),
            (
                "producer_token_file = \"missing.token\"",
                "http.producer_token_file",
                "cannot read token file",
            ),
            (
                "admin_token = \"0123456789abcdef\"\nproducer_token = \"0123456789abcdef\"",
                "http.producer_token",
                "the same as the admin token",
            ),
        ] {
            let (got_field, got_problem) = parse(text).expect_err(text);
            assert_eq!(got_field, field, "{text}");
            assert!(got_problem.contains(problem), "{text}: {got_problem}");
            assert!(!got_problem.contains("has a space"), "{got_problem}");
        }
    }
}
