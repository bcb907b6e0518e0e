//! Property: whatever is stored across tenants, workspaces and datasources, every search
//! result lies inside the caller's boundary (its tenant's database, its workspace, the
//! datasources it chose) and `top_k` is filled whenever enough allowed matches exist.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use bulkhead::retrieval::{NewDocument, Retrieval, Search};
use proptest::prelude::*;

const WORDS: [&str; 6] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
const WORKSPACES: [&str; 2] = ["default", "sales"];
const SOURCES: [&str; 3] = ["notes", "mail", "wiki"];

/// (tenant, workspace, datasource, words)
type Doc = (usize, usize, usize, BTreeSet<usize>);

fn doc() -> impl Strategy<Value = Doc> {
    (
        0..2usize,
        0..2usize,
        0..3usize,
        proptest::collection::btree_set(0..WORDS.len(), 1..4),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_result_is_inside_the_boundary_and_top_k_is_filled(
        docs in proptest::collection::vec(doc(), 1..60),
        query in proptest::collection::btree_set(0..WORDS.len(), 1..3),
        tenant in 0..2usize,
        workspace in 0..2usize,
        chosen in proptest::option::of(proptest::collection::btree_set(0..3usize, 1..3)),
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
        for t in 0..2 {
            for w in WORKSPACES {
                for s in SOURCES {
                    r.create_datasource(&format!("t{t}"), &db(t), w, s).unwrap();
                }
            }
        }
        for (i, (t, w, s, words)) in docs.iter().enumerate() {
            let text: Vec<&str> = words.iter().map(|x| WORDS[*x]).collect();
            r.put_documents(
                &format!("t{t}"),
                &db(*t),
                WORKSPACES[*w],
                &[NewDocument {
                    datasource: SOURCES[*s].to_string(),
                    id: format!("t{t}-w{w}-s{s}-{i}"),
                    text: text.join(" "),
                    metadata: None,
                }],
            )
            .unwrap();
        }
        let allowed: BTreeSet<usize> = chosen.clone().unwrap_or_else(|| (0..3).collect());
        let q: Vec<&str> = query.iter().map(|x| WORDS[*x]).collect();
        let hits = r
            .search(
                &format!("t{tenant}"),
                &db(tenant),
                WORKSPACES[workspace],
                &Search {
                    query: q.join(" "),
                    top_k,
                    datasources: chosen
                        .as_ref()
                        .map(|c| c.iter().map(|s| SOURCES[*s].to_string()).collect()),
                    filter: Vec::new(),
                },
            )
            .unwrap();
        for h in &hits {
            let s = SOURCES.iter().position(|x| *x == h.datasource).unwrap();
            prop_assert!(allowed.contains(&s), "datasource {} not chosen", h.datasource);
            let prefix = format!("t{tenant}-w{workspace}-s{s}-");
            prop_assert!(h.id.starts_with(&prefix), "{} outside {prefix}", h.id);
        }
        let matching = docs
            .iter()
            .filter(|(t, w, s, words)| {
                *t == tenant && *w == workspace && allowed.contains(s) && !words.is_disjoint(&query)
            })
            .count();
        prop_assert_eq!(hits.len(), matching.min(top_k));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
