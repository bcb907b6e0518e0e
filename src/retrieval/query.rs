//! Turning a user's question into an FTS5 expression. User text is never spliced into
//! the expression as syntax: it is cut into words of letters and digits, each word is
//! quoted (a word of letters and digits holds no quote), common stopwords are dropped,
//! and the words are OR-ed, so natural questions find documents and BM25 ranks them.
#![forbid(unsafe_code)]

/// Words kept from one query; the rest are ignored.
pub const MAX_WORDS: usize = 32;

/// English words too common to help ranking (OR-ing them makes FTS5 visit most rows).
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "am",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "did",
    "do",
    "does",
    "doing",
    "down",
    "during",
    "each",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "i",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "itself",
    "just",
    "me",
    "might",
    "more",
    "most",
    "my",
    "myself",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "same",
    "she",
    "should",
    "so",
    "some",
    "such",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "to",
    "too",
    "under",
    "until",
    "up",
    "us",
    "use",
    "very",
    "was",
    "we",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "would",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
];

/// The FTS5 expression for `question`, or `None` when no searchable word is left.
pub fn fts_expression(question: &str) -> Option<String> {
    let mut words: Vec<String> = Vec::new();
    for raw in question.split(|c: char| !c.is_alphanumeric()) {
        if raw.is_empty() {
            continue;
        }
        let w = raw.to_lowercase();
        if STOPWORDS.contains(&w.as_str()) || words.contains(&w) {
            continue;
        }
        words.push(w);
        if words.len() == MAX_WORDS {
            break;
        }
    }
    if words.is_empty() {
        return None;
    }
    Some(
        words
            .iter()
            .map(|w| format!("\"{w}\""))
            .collect::<Vec<_>>()
            .join(" OR "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_become_quoted_words_without_stopwords() {
        assert_eq!(
            fts_expression("Summarize Northstar's renewal risk").as_deref(),
            Some("\"summarize\" OR \"northstar\" OR \"s\" OR \"renewal\" OR \"risk\"")
        );
        assert_eq!(fts_expression("which of the"), None);
        assert_eq!(fts_expression(""), None);
    }

    #[test]
    fn fts5_syntax_in_a_question_stays_text() {
        for q in [
            "\"unbalanced",
            "a NEAR b",
            "pre*",
            "x OR y AND NOT z",
            "col:term",
            "^start",
            "(group)",
            "a\u{0}b",
        ] {
            let e = fts_expression(q).unwrap();
            for part in e.split(" OR ") {
                let inner = part
                    .strip_prefix('"')
                    .and_then(|p| p.strip_suffix('"'))
                    .unwrap();
                assert!(inner.chars().all(char::is_alphanumeric), "{q:?} -> {e}");
            }
        }
    }

    #[test]
    fn long_questions_are_capped() {
        let q: String = (0..100).map(|i| format!("w{i} ")).collect();
        assert_eq!(fts_expression(&q).unwrap().split(" OR ").count(), MAX_WORDS);
    }
}
