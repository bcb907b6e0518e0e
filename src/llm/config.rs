//! The admin config's LLM tables: `[providers.NAME]`, `[models."NAME"]` and
//! `[rate_card."NAME"]` (USD per million tokens). Keys are never in the file: a provider
//! names the environment variable or file that holds its key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::secret::Secret;

/// The API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// OpenAI's API, or a compatible server (vLLM, Ollama, ...).
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
}

/// One upstream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The API it speaks.
    pub kind: Kind,
    /// Base URL, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8081/v1`.
    pub base_url: String,
    /// Environment variable holding the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// File holding the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// Per-attempt timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// PEM file of the certificate authorities an https provider is checked against,
    /// instead of the system's (a private CA in front of a self-hosted model server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_timeout_ms() -> u64 {
    120_000
}

/// A public model name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The provider serving it.
    pub provider: String,
    /// The model's name upstream.
    pub upstream: String,
    /// Public model names tried in order when this one answers 429 or 5xx or times out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Input (prompt) tokens.
    pub input: f64,
    /// Output (completion) tokens.
    pub output: f64,
    /// Cached input tokens (defaults to the input price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
}

/// The three tables together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlmConfig {
    /// Providers by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Models by public name.
    pub models: BTreeMap<String, ModelConfig>,
    /// Prices by public model name.
    pub rate_card: BTreeMap<String, Rate>,
}

impl LlmConfig {
    /// Checks references and values: every model's provider exists, fallbacks name
    /// models, every model has a price (calls cannot be charged otherwise), prices are
    /// finite and not negative, base URLs are http(s), and each provider names at most
    /// one key source.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in &self.providers {
            let url = p.base_url.as_str();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "providers.{name}.base_url must be http:// or https://"
                ));
            }
            if p.api_key_env.is_some() && p.api_key_file.is_some() {
                return Err(format!(
                    "providers.{name}: api_key_env and api_key_file are exclusive"
                ));
            }
            if p.timeout_ms == 0 || p.timeout_ms > 3_600_000 {
                return Err(format!("providers.{name}.timeout_ms must be 1..=3600000"));
            }
        }
        for (name, m) in &self.models {
            if !self.providers.contains_key(&m.provider) {
                return Err(format!(
                    "models.{name:?}: no provider {:?} in [providers]",
                    m.provider
                ));
            }
            if let Some(f) = m.fallbacks.iter().find(|f| !self.models.contains_key(*f)) {
                return Err(format!("models.{name:?}: fallback {f:?} is not a model"));
            }
            if !self.rate_card.contains_key(name) {
                return Err(format!("models.{name:?}: no [rate_card.{name:?}] entry"));
            }
        }
        for (name, r) in &self.rate_card {
            let ok = |v: f64| v.is_finite() && (0.0..=1_000_000.0).contains(&v);
            if !ok(r.input) || !ok(r.output) || !r.cached_input.is_none_or(ok) {
                return Err(format!(
                    "rate_card.{name:?}: prices must be finite, 0..=1000000 USD per million tokens"
                ));
            }
        }
        Ok(())
    }

    /// Reads each provider's key from the variable or file the admin named.
    pub fn load_keys(&self) -> Result<BTreeMap<String, Option<Secret>>, String> {
        let mut keys = BTreeMap::new();
        for (name, p) in &self.providers {
            let key = match (&p.api_key_env, &p.api_key_file) {
                (Some(var), _) => Some(
                    std::env::var(var)
                        .map(|v| Secret::new(&v))
                        .map_err(|_| format!("providers.{name}: ${var} is not set"))?,
                ),
                (None, Some(file)) => Some(
                    std::fs::read_to_string(file)
                        .map(|v| Secret::new(&v))
                        .map_err(|e| format!("providers.{name}: {}: {e}", file.display()))?,
                ),
                (None, None) => None,
            };
            keys.insert(name.clone(), key);
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LlmConfig, String> {
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(default)]
            providers: BTreeMap<String, ProviderConfig>,
            #[serde(default)]
            models: BTreeMap<String, ModelConfig>,
            #[serde(default)]
            rate_card: BTreeMap<String, Rate>,
        }
        let t: T = toml::from_str(text).map_err(|e| e.to_string())?;
        let c = LlmConfig {
            providers: t.providers,
            models: t.models,
            rate_card: t.rate_card,
        };
        c.validate().map(|()| c)
    }

    #[test]
    fn references_and_prices_are_checked() {
        let good = "[providers.p]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\n[models.m]\nprovider = \"p\"\nupstream = \"u\"\n[rate_card.m]\ninput = 1\noutput = 2\n";
        assert!(parse(good).is_ok());
        for (bad, why) in [
            (
                good.replace("provider = \"p\"", "provider = \"q\""),
                "no provider",
            ),
            (
                good.replace("[rate_card.m]", "[rate_card.n]"),
                "no [rate_card",
            ),
            (
                good.replace("upstream = \"u\"", "upstream = \"u\"\nfallbacks = [\"z\"]"),
                "not a model",
            ),
            (good.replace("input = 1", "input = -1"), "prices"),
            (good.replace("http://x/v1", "ftp://x"), "http"),
            (
                good.replace("kind = \"openai\"", "kind = \"other\""),
                "unknown variant",
            ),
            (
                good.replace(
                    "base_url",
                    "api_key_env = \"A\"\napi_key_file = \"/k\"\nbase_url",
                ),
                "exclusive",
            ),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
