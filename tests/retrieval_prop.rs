//! Property: whatever is stored across tenants, workspaces and datasources, every search
//! result — text, vector or hybrid, with or without a metadata filter — lies inside the
//! caller's boundary (its tenant's database, its workspace, the datasources it chose,
//! the filter) and `top_k` is filled whenever enough allowed matches exist. Vector
//! results are also the exact nearest allowed vectors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use bulkhead::retrieval::vectors::{dot, normalized};
use bulkhead::retrieval::{Mode, NewDocument, Retrieval, Search};
use proptest::prelude::*;

const WORDS: [&str; 6] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
const WORKSPACES: [&str; 2] = ["default", "sales"];
const SOURCES: [&str; 3] = ["notes", "mail", "wiki"];
const DIM: usize = 8;

/// (tenant, workspace, datasource, words, tag, vector)
type Doc = (usize, usize, usize, BTreeSet<usize>, u8, Option<Vec<f32>>);

fn vector() -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(-1.0f32..1.0, DIM)
        .prop_filter("not all zero", |v| v.iter().any(|x| x.abs() > 1e-3))
}

fn doc() -> impl Strategy<Value = Doc> {
    (
        0..2usize,
        0..2usize,
        0..3usize,
        proptest::collection::btree_set(0..WORDS.len(), 1..4),
        0..2u8,
        proptest::option::weighted(0.8, vector()),
    )
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Text), Just(Mode::Vector), Just(Mode::Hybrid)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_result_is_inside_the_boundary_and_top_k_is_filled(
        docs in proptest::collection::vec(doc(), 1..60),
        query in proptest::collection::btree_set(0..WORDS.len(), 1..3),
        query_vector in vector(),
        mode in mode(),
        tenant in 0..2usize,
        workspace in 0..2usize,
        chosen in proptest::option::of(proptest::collection::btree_set(0..3usize, 1..3)),
        tag in proptest::option::of(0..2u8),
        top_k in 1..12usize,
    ) {
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-prop-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let r = Retrieval::new(4);
        let db = |t: usize| dir.join(format!("t{t}.db"));
        // Tenant 1 has one workspace only, so a search of it sees the whole file (the
        // path that checks no match); tenant 0 has two.
        let docs: Vec<Doc> = docs
            .into_iter()
            .map(|mut d| {
                if d.0 == 1 {
                    d.1 = 0;
                }
                d
            })
            .collect();
        for t in 0..2 {
            for w in &WORKSPACES[..2 - t] {
                for s in SOURCES {
                    r.create_datasource(&format!("t{t}"), &db(t), w, s).unwrap();
                }
            }
        }
        for (i, (t, w, s, words, tag, v)) in docs.iter().enumerate() {
            let text: Vec<&str> = words.iter().map(|x| WORDS[*x]).collect();
            r.put_documents(
                &format!("t{t}"),
                &db(*t),
                WORKSPACES[*w],
                &[NewDocument {
                    datasource: SOURCES[*s].to_string(),
                    id: format!("t{t}-w{w}-s{s}-{i}"),
                    text: text.join(" "),
                    metadata: Some(serde_json::json!({"tag": tag})),
                    vectors: v.iter().map(|v| normalized(v).unwrap()).collect(),
                }],
            )
            .unwrap();
        }
        let allowed: BTreeSet<usize> = chosen.clone().unwrap_or_else(|| (0..3).collect());
        let q: Vec<&str> = query.iter().map(|x| WORDS[*x]).collect();
        let qv = normalized(&query_vector).unwrap();
        let searched = r.search(
                &format!("t{tenant}"),
                &db(tenant),
                WORKSPACES[workspace],
                &Search {
                    query: q.join(" "),
                    vector: Some(qv.clone()),
                    mode,
                    top_k,
                    datasources: chosen
                        .as_ref()
                        .map(|c| c.iter().map(|s| SOURCES[*s].to_string()).collect()),
                    filter: tag
                        .iter()
                        .map(|t| ("tag".to_string(), serde_json::json!(t)))
                        .collect(),
                },
            );
        let (hits, _) = searched.unwrap();
        for h in &hits {
            let s = SOURCES.iter().position(|x| *x == h.datasource).unwrap();
            prop_assert!(allowed.contains(&s), "datasource {} not chosen", h.datasource);
            let prefix = format!("t{tenant}-w{workspace}-s{s}-");
            prop_assert!(h.id.starts_with(&prefix), "{} outside {prefix}", h.id);
            if let Some(t) = tag {
                prop_assert_eq!(h.metadata.as_ref().and_then(|m| m["tag"].as_u64()), Some(u64::from(t)));
            }
        }
        let inside = |d: &&Doc| {
            d.0 == tenant && d.1 == workspace && allowed.contains(&d.2) && tag.is_none_or(|t| t == d.4)
        };
        let by_text: BTreeSet<usize> = docs
            .iter()
            .enumerate()
            .filter(|(_, d)| inside(d) && !d.3.is_disjoint(&query))
            .map(|(i, _)| i)
            .collect();
        let mut by_vector: Vec<(f32, usize)> = docs
            .iter()
            .enumerate()
            .filter(|(_, d)| inside(d) && d.5.is_some())
            .map(|(i, d)| (dot(&qv, &normalized(d.5.as_ref().unwrap()).unwrap()), i))
            .collect();
        by_vector.sort_by(|a, b| b.0.total_cmp(&a.0));
        let matching = match mode {
            Mode::Text => by_text.len(),
            Mode::Vector => by_vector.len(),
            Mode::Hybrid => by_text.union(&by_vector.iter().map(|(_, i)| *i).collect()).count(),
        };
        prop_assert_eq!(hits.len(), matching.min(top_k));
        if mode == Mode::Vector {
            for (h, (want, _)) in hits.iter().zip(&by_vector) {
                prop_assert!((h.score - f64::from(*want)).abs() < 1e-4, "{} vs exact {}", h.score, want);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
