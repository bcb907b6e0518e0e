//! Token usage and what it costs, in micro-dollars (integers, so that sums and limits
//! are exact).

use super::config::Rate;

/// Tokens of one call, as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TokenUsage {
    /// Prompt tokens (cached ones included).
    pub input: u64,
    /// Of those, served from the provider's cache.
    pub cached_input: u64,
    /// Completion tokens.
    pub output: u64,
}

impl TokenUsage {
    /// Reads an OpenAI-shaped `usage` object (`prompt_tokens`, `completion_tokens`,
    /// `prompt_tokens_details.cached_tokens`); `None` when there is none.
    pub fn from_openai(usage: &serde_json::Value) -> Option<TokenUsage> {
        let input = usage.get("prompt_tokens")?.as_u64()?;
        let output = usage
            .get("completion_tokens")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let cached_input = usage
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
            .min(input);
        Some(TokenUsage {
            input,
            cached_input,
            output,
        })
    }
}

impl TokenUsage {
    /// Reads an Anthropic `usage` object (`input_tokens`, `output_tokens`,
    /// `cache_read_input_tokens`, `cache_creation_input_tokens`); cache reads count as
    /// cached input, cache writes as input.
    pub fn from_anthropic(usage: &serde_json::Value) -> Option<TokenUsage> {
        let n = |k: &str| usage.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        usage.get("input_tokens")?.as_u64()?;
        let cached = n("cache_read_input_tokens");
        Some(TokenUsage {
            input: n("input_tokens") + cached + n("cache_creation_input_tokens"),
            cached_input: cached,
            output: n("output_tokens"),
        })
    }
}

/// Micro-dollars for `tokens` at `price` USD per million tokens (rounded up).
fn micro(tokens: u64, price: f64) -> u64 {
    // price USD / 1e6 tokens = price micro-USD per token.
    (tokens as f64 * price).ceil().clamp(0.0, u64::MAX as f64) as u64
}

/// What `u` costs under `rate`, in micro-dollars.
pub fn cost_micro(u: TokenUsage, rate: Rate) -> u64 {
    let cached = u.cached_input.min(u.input);
    micro(u.input - cached, rate.input)
        .saturating_add(micro(cached, rate.cached_input.unwrap_or(rate.input)))
        .saturating_add(micro(u.output, rate.output))
}

/// The most a call can cost: every byte of the request counted as an input token (a
/// token is never shorter than one byte) and `max_tokens` of output.
pub fn worst_case_micro(request_bytes: u64, max_tokens: u64, rate: Rate) -> u64 {
    micro(request_bytes, rate.input).saturating_add(micro(max_tokens, rate.output))
}

/// Micro-dollars as a decimal USD string (`0.000150`).
pub fn usd(micro: u64) -> String {
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs() {
        let rate = Rate {
            input: 0.15,
            output: 0.60,
            cached_input: Some(0.075),
        };
        let u = TokenUsage {
            input: 1000,
            cached_input: 200,
            output: 500,
        };
        // 800 × 0.15 + 200 × 0.075 + 500 × 0.60 = 120 + 15 + 300 micro-USD.
        assert_eq!(cost_micro(u, rate), 435);
        assert_eq!(usd(435), "0.000435");
        assert_eq!(usd(12_345_678), "12.345678");
        assert!(worst_case_micro(4000, 500, rate) >= cost_micro(u, rate));
        let v = serde_json::json!({"prompt_tokens": 10, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 99}});
        assert_eq!(
            TokenUsage::from_openai(&v),
            Some(TokenUsage {
                input: 10,
                cached_input: 10,
                output: 5
            })
        );
        assert_eq!(TokenUsage::from_openai(&serde_json::json!({})), None);
    }
}
