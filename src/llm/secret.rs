//! Provider API keys: a type that never shows its value.

/// A secret string (a provider API key). `Debug` and `Display` print `[redacted]`; the
/// value is reachable only through [`Secret::expose`], at the one place that sends it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value, trimming the line break a key file usually ends with.
    pub fn new(value: &str) -> Secret {
        Secret(value.trim_end_matches(['\n', '\r']).to_string())
    }

    /// The value, for the request header that carries it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("sk-live-1234\n");
        assert_eq!(s.expose(), "sk-live-1234");
        assert_eq!(
            format!("{s} {s:?} {:?}", Some(&s)),
            "[redacted] [redacted] Some([redacted])"
        );
    }
}
