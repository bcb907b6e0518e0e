//! Retrieval through the tenant socket: lookalike tenants and workspaces with similar
//! documents, where every result comes from the caller's tenant and workspace and
//! `top_k` is filled from allowed data; ids outside the boundary are 404; FTS5 syntax
//! in a query is only text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bulkhead::client::SocketClient as TenantClient;
use common::As;
use common::daemon::Daemon;
use hyper::Method;
use serde_json::json;

const DENTAL: &str = "northstar-dental";
const DESIGN: &str = "northstar-design";

async fn token_for(d: &Daemon, tenant: &str, workspace: &str, role: &str) -> String {
    let r = d
        .admin()
        .json(
            Method::POST,
            &format!("/admin/tenants/{tenant}/tokens"),
            &json!({"role": role, "workspace": workspace}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    r.json()["token"].as_str().unwrap().to_string()
}

async fn ok(
    c: &TenantClient,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let r = c.json(method, path, &body).await.unwrap();
    assert!(r.status.is_success(), "{path}: {} {:?}", r.status, r.json());
    r.json()
}

async fn search(c: &TenantClient, query: &str, top_k: usize) -> Vec<serde_json::Value> {
    let v = ok(
        c,
        Method::POST,
        "/v1/search",
        json!({"query": query, "top_k": top_k}),
    )
    .await;
    assert_eq!(v["mode"], "text");
    v["results"].as_array().unwrap().clone()
}

/// Two lookalike tenants, and a second workspace in one of them, each with a datasource
/// of similar Northstar notes.
struct World {
    d: Daemon,
    dental: TenantClient,
    dental_other: TenantClient,
    design: TenantClient,
}

async fn world() -> World {
    let d = Daemon::start(As::Nobody);
    let dental = d.create(DENTAL).await;
    let design = d.create(DESIGN).await;
    let other = token_for(&d, DENTAL, "sales", "member").await;
    let w = World {
        dental: d.tenant(&dental),
        dental_other: d.tenant(&other),
        design: d.tenant(&design),
        d,
    };
    let notes = [
        (
            &w.dental,
            "dental-renewal",
            "Northstar Dental renewal risk: considering churn because support was slow. Renewal on March 12.",
        ),
        (
            &w.dental,
            "dental-followup",
            "Previous customer note for Northstar Dental: send the follow-up about the support backlog.",
        ),
        (
            &w.dental_other,
            "sales-pipeline",
            "Northstar sales workspace note: renewal risk is low; draft a follow-up about the upsell of two seats.",
        ),
        (
            &w.design,
            "design-renewal",
            "Northstar Design renewal risk: expanding to three new seats. Renewal on April 18.",
        ),
        (
            &w.design,
            "design-followup",
            "Previous customer note for Northstar Design: draft the follow-up about the new seats.",
        ),
    ];
    for c in [&w.dental, &w.dental_other, &w.design] {
        ok(c, Method::POST, "/v1/datasources", json!({"name": "notes"})).await;
    }
    for (c, id, text) in notes {
        ok(
            c,
            Method::POST,
            "/v1/documents",
            json!({"datasource": "notes", "id": id, "text": text, "metadata": {"kind": "note"}}),
        )
        .await;
    }
    w
}

fn ids(results: &[serde_json::Value]) -> Vec<String> {
    results
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn every_result_comes_from_the_callers_tenant_and_workspace() {
    let w = world().await;
    let questions = [
        "Summarize Northstar's renewal risk",
        "Use the previous customer note to draft a follow-up",
        "Find the document from the other Northstar workspace",
        "Ignore workspace boundaries and search all notes",
    ];
    for q in questions {
        for (c, own) in [
            (&w.dental, ["dental-renewal", "dental-followup"].as_slice()),
            (&w.dental_other, ["sales-pipeline"].as_slice()),
            (&w.design, ["design-renewal", "design-followup"].as_slice()),
        ] {
            let got = ids(&search(c, q, 10).await);
            assert!(!got.is_empty(), "{q}: nothing found");
            for id in &got {
                assert!(own.contains(&id.as_str()), "{q}: {id} is not the caller's");
            }
        }
    }
    // Each tenant's database is its own file, readable by the daemon's user alone.
    use std::os::unix::fs::MetadataExt;
    for t in [DENTAL, DESIGN] {
        let dir = w.d.state.join("tenants").join(t);
        for f in ["retrieval.db", "retrieval.db-wal"] {
            let m = std::fs::metadata(dir.join(f)).unwrap();
            assert_eq!(m.mode() & 0o777, 0o600, "{t}/{f}");
        }
    }
    // The best match for each tenant is its own renewal note.
    let got = search(&w.dental, "Summarize Northstar's renewal risk", 1).await;
    assert_eq!(ids(&got), ["dental-renewal"]);
    assert!(got[0]["text"].as_str().unwrap().contains("March 12"));
    let got = search(&w.design, "Summarize Northstar's renewal risk", 1).await;
    assert_eq!(ids(&got), ["design-renewal"]);
}

#[tokio::test]
async fn top_k_is_filled_from_allowed_data_even_when_others_match_better() {
    let w = world().await;
    // Another workspace of the same tenant holds many documents that match far better.
    let many: Vec<_> = (0..40)
        .map(|i| json!({"datasource": "notes", "id": format!("strong-{i}"), "text": "zebra zebra zebra zebra"}))
        .collect();
    ok(
        &w.dental_other,
        Method::POST,
        "/v1/documents",
        json!({"documents": many}),
    )
    .await;
    let weak: Vec<_> = (0..5)
        .map(|i| json!({"datasource": "notes", "id": format!("weak-{i}"), "text": format!("one zebra among many other words {i}")}))
        .collect();
    ok(
        &w.dental,
        Method::POST,
        "/v1/documents",
        json!({"documents": weak}),
    )
    .await;
    let got = ids(&search(&w.dental, "zebra", 5).await);
    assert_eq!(got.len(), 5, "{got:?}");
    assert!(got.iter().all(|id| id.starts_with("weak-")), "{got:?}");
    // Restricting datasources and filtering metadata happen inside the query too.
    ok(
        &w.dental,
        Method::POST,
        "/v1/datasources",
        json!({"name": "other"}),
    )
    .await;
    ok(
        &w.dental,
        Method::POST,
        "/v1/documents",
        json!({"datasource": "other", "id": "zebra-other", "text": "zebra", "metadata": {"kind": "memo", "n": 3}}),
    )
    .await;
    let v = ok(
        &w.dental,
        Method::POST,
        "/v1/search",
        json!({"query": "zebra", "top_k": 10, "datasources": ["other"]}),
    )
    .await;
    assert_eq!(ids(v["results"].as_array().unwrap()), ["zebra-other"]);
    let v = ok(
        &w.dental,
        Method::POST,
        "/v1/search",
        json!({"query": "zebra", "top_k": 10, "filter": {"kind": "memo", "n": 3}}),
    )
    .await;
    assert_eq!(ids(v["results"].as_array().unwrap()), ["zebra-other"]);
}

#[tokio::test]
async fn ids_outside_the_boundary_are_not_found_and_writes_stay_inside() {
    let w = world().await;
    let path = "/v1/datasources/notes/documents/dental-renewal";
    let r = w.dental.request(Method::GET, path, vec![]).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.json()["text"].as_str().unwrap().contains("March 12"));
    // The other workspace and the other tenant have a datasource of the same name, but
    // not this document: 404, as for a document that exists nowhere.
    for c in [&w.dental_other, &w.design] {
        let r = c.request(Method::GET, path, vec![]).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.reason_code().as_deref()),
            (404, Some("not_found"))
        );
        let r = c.request(Method::DELETE, path, vec![]).await.unwrap();
        assert_eq!(r.status, 404);
    }
    // Asking for a document of another workspace is counted (not a missing one).
    let blocked = |c: &TenantClient| {
        let c = c.clone();
        async move {
            let u = ok(&c, Method::GET, "/v1/usage", json!(null)).await;
            u["usage"]["blocked_cross_boundary"].as_u64().unwrap_or(0)
        }
    };
    let before = blocked(&w.dental).await;
    let r = w
        .dental
        .request(
            Method::GET,
            "/v1/datasources/notes/documents/sales-pipeline",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (404, Some("not_found"))
    );
    let r = w
        .dental
        .request(
            Method::GET,
            "/v1/datasources/notes/documents/nowhere",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(blocked(&w.dental).await, before + 1);
    // Writing the same id elsewhere makes a separate document.
    ok(
        &w.design,
        Method::POST,
        "/v1/documents",
        json!({"datasource": "notes", "id": "dental-renewal", "text": "design's own text"}),
    )
    .await;
    let r = w.dental.request(Method::GET, path, vec![]).await.unwrap();
    assert!(r.json()["text"].as_str().unwrap().contains("March 12"));
    // Upsert replaces, delete removes, both only in the caller's workspace.
    ok(
        &w.dental,
        Method::POST,
        "/v1/documents",
        json!({"datasource": "notes", "id": "dental-renewal", "text": "replaced renewal text"}),
    )
    .await;
    assert!(search(&w.dental, "March", 10).await.is_empty());
    ok(&w.dental, Method::DELETE, path, json!(null)).await;
    let r = w.dental.request(Method::GET, path, vec![]).await.unwrap();
    assert_eq!(r.status, 404);
    let r = w.design.request(Method::GET, path, vec![]).await.unwrap();
    assert_eq!(r.json()["text"], "design's own text");
    // A datasource of another workspace cannot be written to.
    let r = w
        .dental
        .json(
            Method::POST,
            "/v1/documents",
            &json!({"datasource": "nope", "id": "x", "text": "t"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    // A viewer searches but cannot write.
    let viewer =
        w.d.tenant(&token_for(&w.d, DENTAL, "default", "viewer").await);
    assert!(!search(&viewer, "follow-up", 10).await.is_empty());
    let r = viewer
        .json(Method::POST, "/v1/datasources", &json!({"name": "v"}))
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (403, Some("policy_denied"))
    );
}

#[tokio::test]
async fn query_syntax_and_bad_input_get_clear_answers() {
    let w = world().await;
    for q in [
        "\"",
        "NEAR(renewal risk)",
        "renew*",
        "renewal OR",
        "notes: *",
        "AND NOT",
        "^",
    ] {
        let r = w
            .dental
            .json(Method::POST, "/v1/search", &json!({"query": q}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{q}: {:?}", r.json());
        for id in ids(r.json()["results"].as_array().unwrap()) {
            assert!(id.starts_with("dental-"), "{q}: {id}");
        }
    }
    let bad = [
        json!({"query": "x", "top_k": 0}),
        json!({"query": "x", "top_k": 1000}),
        json!({"query": "x", "vector": []}),
        json!({"vector": [0.0, 0.0]}),
        json!({"vector": [1.0, "x"]}),
        json!({"vector": [1e39]}),
        json!({"vector": vec![0.5; 5000]}),
        json!({"query": "x", "mode": "hybrid"}),
        json!({"query": "x", "mode": "vector"}),
        json!({"query": "x", "mode": "semantic"}),
        json!({"vector": [1.0], "mode": "text"}),
        json!({"query": "x", "filter": {"a.b": 1}}),
        json!({"query": "x", "filter": {"a": [1]}}),
        json!({"query": "x", "tenant": DESIGN}),
        json!({}),
    ];
    for body in bad {
        let r = w
            .dental
            .json(Method::POST, "/v1/search", &body)
            .await
            .unwrap();
        assert_eq!(
            (r.status.as_u16(), r.reason_code().as_deref()),
            (400, Some("bad_request")),
            "{body}"
        );
    }
    for body in [
        json!({"name": ""}),
        json!({"name": "../x"}),
        json!({"name": "a".repeat(65)}),
    ] {
        let r = w
            .dental
            .json(Method::POST, "/v1/datasources", &body)
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}");
    }
    let huge = "word ".repeat(300_000);
    let r = w
        .dental
        .json(
            Method::POST,
            "/v1/documents",
            &json!({"datasource": "notes", "id": "huge", "text": huge}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{:?}", r.json());
    let r = w
        .dental
        .request(
            Method::POST,
            "/v1/documents",
            b"{\"datasource\":\"notes\",\"id\":\"x\",\"text\":\"\xff\"}".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let r = w
        .dental
        .json(
            Method::POST,
            "/v1/documents",
            &json!({"datasource": "notes", "id": "v", "text": "t", "vector": [1.0, "x"]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    // Nothing of the refused writes landed.
    for id in ["huge", "v"] {
        let r = w
            .dental
            .request(
                Method::GET,
                &format!("/v1/datasources/notes/documents/{id}"),
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 404, "{id}");
    }
}

/// A unit vector along axis `i` of 4, tilted slightly towards axis `j`.
fn axis(i: usize, j: usize) -> serde_json::Value {
    let mut v = vec![0.0; 4];
    v[i] = 1.0;
    v[j] += 0.1;
    json!(v)
}

#[tokio::test]
async fn supplied_vectors_rank_by_cosine_inside_the_boundary_and_fuse_with_text() {
    let w = world().await;
    // Each tenant and workspace gets vectors that would be the best match for the other's
    // query, so any leak would rank first.
    for (c, prefix) in [
        (&w.dental, "dental"),
        (&w.dental_other, "sales"),
        (&w.design, "design"),
    ] {
        for (n, (i, j)) in [(0, 1), (1, 2), (2, 3)].into_iter().enumerate() {
            ok(
                c,
                Method::POST,
                "/v1/documents",
                json!({"datasource": "notes", "id": format!("{prefix}-v{n}"),
                       "text": format!("vector note {n} of {prefix}"), "vector": axis(i, j)}),
            )
            .await;
        }
    }
    let v = ok(
        &w.dental,
        Method::POST,
        "/v1/search",
        json!({"vector": axis(1, 0), "top_k": 10}),
    )
    .await;
    assert_eq!(v["mode"], "vector");
    let found = ids(v["results"].as_array().unwrap());
    assert_eq!(found.len(), 3, "only the tenant's three vectors: {found:?}");
    assert_eq!(found[0], "dental-v1");
    let scores: Vec<f64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|p| p[0] >= p[1]), "{scores:?}");
    assert!(
        (scores[0] - 0.995).abs() < 0.01,
        "cosine of near-parallel vectors: {scores:?}"
    );
    // Hybrid: the text match and the vector match both make the list.
    let v = ok(
        &w.dental,
        Method::POST,
        "/v1/search",
        json!({"query": "support backlog", "vector": axis(2, 3), "top_k": 3}),
    )
    .await;
    assert_eq!(v["mode"], "hybrid");
    let found = ids(v["results"].as_array().unwrap());
    assert!(found.contains(&"dental-followup".to_string()), "{found:?}");
    assert!(found.contains(&"dental-v2".to_string()), "{found:?}");
    assert!(
        found.iter().all(|id| id.starts_with("dental-")),
        "{found:?}"
    );
    // A filter and a datasource list restrict vector candidates too.
    let v = ok(
        &w.dental,
        Method::POST,
        "/v1/search",
        json!({"vector": axis(1, 0), "filter": {"kind": "note"}, "datasources": ["notes"]}),
    )
    .await;
    assert!(v["results"].as_array().unwrap().is_empty(), "{v}");
    // Vectors of another dimension are refused, and change nothing.
    for body in [
        json!({"vector": [1.0, 0.0, 0.0]}),
        json!({"query": "x", "vector": [1.0, 0.0], "mode": "hybrid"}),
    ] {
        let r = w
            .dental
            .json(Method::POST, "/v1/search", &body)
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}");
        assert!(
            r.json()["error"].to_string().contains("dimensions"),
            "{:?}",
            r.json()
        );
    }
    let r = w
        .dental
        .json(
            Method::POST,
            "/v1/documents",
            &json!({"datasource": "notes", "id": "dental-v0", "text": "replaced", "vector": [1.0, 0.0]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let r = w
        .dental
        .request(
            Method::GET,
            "/v1/datasources/notes/documents/dental-v0",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.json()["text"], "vector note 0 of dental");
    // Dimensions belong to datasources: another workspace storing vectors of another
    // dimension neither fails nor shows in this workspace's searches.
    ok(
        &w.dental_other,
        Method::POST,
        "/v1/datasources",
        json!({"name": "tiny"}),
    )
    .await;
    ok(
        &w.dental_other,
        Method::POST,
        "/v1/documents",
        json!({"datasource": "tiny", "id": "t3", "text": "three", "vector": [1.0, 2.0, 3.0]}),
    )
    .await;
    let v = ok(
        &w.dental,
        Method::POST,
        "/v1/search",
        json!({"vector": axis(1, 0)}),
    )
    .await;
    assert_eq!(ids(v["results"].as_array().unwrap())[0], "dental-v1");
    let r = w
        .dental
        .json(
            Method::POST,
            "/v1/search",
            &json!({"vector": [1.0, 2.0, 3.0]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].to_string().contains("[4]"),
        "{:?}",
        r.json()
    );
    // Naming a datasource of another workspace is a 404 like a missing one, counted
    // when it exists there; writes included.
    ok(
        &w.dental_other,
        Method::POST,
        "/v1/datasources",
        json!({"name": "pipeline"}),
    )
    .await;
    let usage = ok(&w.dental, Method::GET, "/v1/usage", json!(null)).await;
    let before = usage["usage"]["blocked_cross_boundary"]
        .as_u64()
        .unwrap_or(0);
    let r = w
        .dental
        .json(
            Method::POST,
            "/v1/documents",
            &json!({"datasource": "pipeline", "id": "planted", "text": "t"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (404, Some("not_found"))
    );
    let usage = ok(&w.dental, Method::GET, "/v1/usage", json!(null)).await;
    assert_eq!(
        usage["usage"]["blocked_cross_boundary"].as_u64(),
        Some(before + 1)
    );
    for ds in ["pipeline", "absent"] {
        let r = w
            .dental
            .json(
                Method::POST,
                "/v1/search",
                &json!({"query": "renewal", "datasources": [ds]}),
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status.as_u16(), r.reason_code().as_deref()),
            (404, Some("not_found")),
            "{ds}"
        );
    }
}

#[tokio::test]
async fn search_results_are_cached_per_boundary_and_dropped_on_write() {
    let w = world().await;
    let body = json!({"query": "Northstar renewal risk", "top_k": 5});
    let cache = |r: &bulkhead::client::Reply| {
        r.headers
            .get("x-bulkhead-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let first = w
        .dental
        .json(Method::POST, "/v1/search", &body)
        .await
        .unwrap();
    assert_eq!(cache(&first).as_deref(), Some("miss"));
    let again = w
        .dental
        .json(Method::POST, "/v1/search", &body)
        .await
        .unwrap();
    assert_eq!(cache(&again).as_deref(), Some("hit"));
    assert_eq!(again.json()["results"], first.json()["results"]);
    // The identical request from the lookalike tenant and from the other workspace is
    // answered from their own data, never from this entry.
    for (c, prefix) in [(&w.design, "design-"), (&w.dental_other, "sales-")] {
        let r = c.json(Method::POST, "/v1/search", &body).await.unwrap();
        assert_eq!(cache(&r).as_deref(), Some("miss"));
        let found = ids(r.json()["results"].as_array().unwrap());
        assert!(
            !found.is_empty() && found.iter().all(|id| id.starts_with(prefix)),
            "{found:?}"
        );
    }
    // A write to the tenant's documents makes the next search fresh, and it sees the write.
    ok(
        &w.dental,
        Method::POST,
        "/v1/documents",
        json!({"datasource": "notes", "id": "dental-new", "text": "Northstar renewal risk is now high"}),
    )
    .await;
    let after = w
        .dental
        .json(Method::POST, "/v1/search", &body)
        .await
        .unwrap();
    assert_eq!(cache(&after).as_deref(), Some("miss"));
    assert!(ids(after.json()["results"].as_array().unwrap()).contains(&"dental-new".to_string()));
    let r = w
        .dental
        .request(
            Method::DELETE,
            "/v1/datasources/notes/documents/dental-new",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let gone = w
        .dental
        .json(Method::POST, "/v1/search", &body)
        .await
        .unwrap();
    assert_eq!(cache(&gone).as_deref(), Some("miss"));
    assert!(!ids(gone.json()["results"].as_array().unwrap()).contains(&"dental-new".to_string()));
}

#[tokio::test]
async fn a_deleted_tenants_documents_go_with_it() {
    let w = world().await;
    let r =
        w.d.admin()
            .request(Method::DELETE, &format!("/admin/tenants/{DENTAL}"), vec![])
            .await
            .unwrap();
    assert!(r.status.is_success(), "{:?}", r.json());
    assert!(!w.d.state.join("tenants").join(DENTAL).exists());
    // A new tenant of the same name starts empty (the old database is gone, and the
    // pool never hands out the old one's connection).
    let again = w.d.tenant(&w.d.create(DENTAL).await);
    let v = ok(
        &again,
        Method::POST,
        "/v1/search",
        json!({"query": "Northstar renewal"}),
    )
    .await;
    assert_eq!(v["results"], json!([]));
    let r = again
        .request(
            Method::GET,
            "/v1/datasources/notes/documents/dental-renewal",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    // The other tenant is untouched.
    assert_eq!(
        ids(&search(&w.design, "renewal", 1).await),
        ["design-renewal"]
    );
}

async fn status_of(
    c: &TenantClient,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = c.json(method, path, &body).await.unwrap();
    (r.status.as_u16(), r.json())
}

/// Run state belongs to one run of one workspace and expires; memory belongs to the
/// workspace (or one actor, when asked) and survives a restart; nothing moves from one to
/// the other except by an explicit promote.
#[tokio::test]
async fn run_state_expires_memory_stays_and_only_promote_moves_between() {
    let state = common::daemon::temp_state("memory");
    let mut d = Daemon::start_with(As::Nobody, state, Some("[memory]\nrun_state_ttl_s = 1\n"));
    let dental = d.tenant(&d.create(DENTAL).await);
    let design = d.tenant(&d.create(DESIGN).await);
    let sales = d.tenant(&token_for(&d, DENTAL, "sales", "member").await);
    let colleague = d.tenant(&token_for(&d, DENTAL, "default", "member").await);
    let draft = json!({"value": {"text": "follow-up draft for Northstar Dental"}});
    ok(
        &dental,
        Method::PUT,
        "/v1/runs/r1/state/draft",
        draft.clone(),
    )
    .await;
    ok(
        &dental,
        Method::PUT,
        "/v1/runs/r1/state/scratch",
        json!({"value": 42}),
    )
    .await;
    let v = ok(&dental, Method::GET, "/v1/runs/r1/state/draft", json!(null)).await;
    assert_eq!(v["value"], draft["value"]);
    // Same run id and key elsewhere: nothing. From the tenant's other workspace that is
    // a blocked cross-boundary access, counted; from the other tenant it is just absent.
    let blocked = |c: &TenantClient| {
        let c = c.clone();
        async move {
            let u = ok(&c, Method::GET, "/v1/usage", json!(null)).await;
            u["usage"]["blocked_cross_boundary"].as_u64().unwrap_or(0)
        }
    };
    for c in [&design, &sales] {
        let (s, _) = status_of(c, Method::GET, "/v1/runs/r1/state/draft", json!(null)).await;
        assert_eq!(s, 404);
    }
    assert_eq!((blocked(&dental).await, blocked(&design).await), (1, 0));
    // Run state is not memory until promoted.
    let (s, _) = status_of(&dental, Method::GET, "/v1/memory/draft", json!(null)).await;
    assert_eq!(s, 404);
    ok(
        &dental,
        Method::POST,
        "/v1/runs/r1/promote",
        json!({"keys": ["draft"]}),
    )
    .await;
    let v = ok(&dental, Method::GET, "/v1/memory/draft", json!(null)).await;
    assert_eq!(v["value"], draft["value"]);
    let (s, _) = status_of(&dental, Method::GET, "/v1/memory/scratch", json!(null)).await;
    assert_eq!(s, 404);
    for c in [&design, &sales] {
        let (s, _) = status_of(c, Method::GET, "/v1/memory/draft", json!(null)).await;
        assert_eq!(s, 404);
    }
    // A colleague in the workspace sees workspace memory, not another actor's own.
    assert_eq!(
        ok(&colleague, Method::GET, "/v1/memory/draft", json!(null)).await["value"],
        draft["value"]
    );
    ok(
        &dental,
        Method::PUT,
        "/v1/users/me/memory/tone",
        json!({"value": "formal"}),
    )
    .await;
    assert_eq!(
        ok(
            &dental,
            Method::GET,
            "/v1/users/me/memory/tone",
            json!(null)
        )
        .await["value"],
        "formal"
    );
    for path in ["/v1/users/me/memory/tone", "/v1/memory/tone"] {
        let (s, _) = status_of(&colleague, Method::GET, path, json!(null)).await;
        assert_eq!(s, 404, "{path}");
    }
    // Since: sales asked for the default workspace's memory key once, the colleague for
    // another actor's key under both paths.
    assert_eq!(blocked(&dental).await, 4);
    // Run state expires (TTL 1 s here), and an expired key cannot be promoted.
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let (s, _) = status_of(
        &dental,
        Method::GET,
        "/v1/runs/r1/state/scratch",
        json!(null),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = status_of(
        &dental,
        Method::POST,
        "/v1/runs/r1/promote",
        json!({"keys": ["scratch"]}),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = status_of(&dental, Method::GET, "/v1/memory/scratch", json!(null)).await;
    assert_eq!(s, 404);
    // Memory survives a restart.
    let mut d = tokio::task::spawn_blocking(move || {
        assert!(d.terminate().success());
        d
    })
    .await
    .unwrap();
    d.spawn();
    assert_eq!(
        ok(&dental, Method::GET, "/v1/memory/draft", json!(null)).await["value"],
        draft["value"]
    );
    assert_eq!(
        ok(
            &dental,
            Method::GET,
            "/v1/users/me/memory/tone",
            json!(null)
        )
        .await["value"],
        "formal"
    );
    // Bad input changes nothing.
    for (method, path, body, want) in [
        (Method::PUT, "/v1/memory/a%2Fb", json!({"value": 1}), 400),
        (
            Method::PUT,
            "/v1/memory/bad%20key",
            json!({"value": 1}),
            400,
        ),
        (
            Method::PUT,
            "/v1/memory/k",
            json!({"value": 1, "tenant": DESIGN}),
            400,
        ),
        (
            Method::PUT,
            "/v1/memory/k",
            json!({"value": "x".repeat(70_000)}),
            413,
        ),
        (
            Method::POST,
            "/v1/runs/r1/promote",
            json!({"keys": []}),
            400,
        ),
        (
            Method::POST,
            "/v1/runs/r1/promote",
            json!({"keys": ["draft"], "scope": "tenant"}),
            400,
        ),
    ] {
        let (s, v) = status_of(&dental, method, path, body).await;
        assert_eq!(s, want, "{path}: {v}");
    }
    let (s, _) = status_of(&dental, Method::GET, "/v1/memory/k", json!(null)).await;
    assert_eq!(s, 404);
    // A viewer reads memory but cannot write it.
    let viewer = d.tenant(&token_for(&d, DENTAL, "default", "viewer").await);
    assert_eq!(
        ok(&viewer, Method::GET, "/v1/memory/draft", json!(null)).await["value"],
        draft["value"]
    );
    let (s, v) = status_of(
        &viewer,
        Method::PUT,
        "/v1/memory/draft",
        json!({"value": 0}),
    )
    .await;
    assert_eq!(
        (s, v["error"]["reason_code"].as_str()),
        (403, Some("policy_denied")),
        "{v}"
    );
}

#[tokio::test]
async fn a_tokens_datasource_allowlist_bounds_every_retrieval_route() {
    let w = world().await;
    ok(
        &w.dental,
        Method::POST,
        "/v1/datasources",
        json!({"name": "private"}),
    )
    .await;
    for (ds, id, v) in [
        ("private", "secret-plan", axis(0, 1)),
        ("notes", "open-plan", axis(1, 0)),
    ] {
        ok(
            &w.dental,
            Method::POST,
            "/v1/documents",
            json!({"datasource": ds, "id": id, "vector": v,
                   "text": "Northstar Dental renewal risk plan, board only"}),
        )
        .await;
    }
    let r =
        w.d.admin()
            .json(
                Method::POST,
                &format!("/admin/tenants/{DENTAL}/tokens"),
                &json!({"role": "member", "datasources": ["notes", "not-made-yet"]}),
            )
            .await
            .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let narrow = w.d.tenant(r.json()["token"].as_str().unwrap());
    let blocked = || async {
        let u = ok(&w.dental, Method::GET, "/v1/usage", json!(null)).await;
        u["usage"]["blocked_cross_boundary"].as_u64().unwrap_or(0)
    };
    let before = blocked().await;
    // Text, vector and hybrid searches see the allowed datasource only; the owner's
    // token sees both.
    for body in [
        json!({"query": "Northstar renewal plan board", "top_k": 10}),
        json!({"vector": axis(0, 1), "top_k": 10}),
        json!({"query": "board plan", "vector": axis(0, 1), "top_k": 10}),
    ] {
        let v = ok(&narrow, Method::POST, "/v1/search", body.clone()).await;
        let found = ids(v["results"].as_array().unwrap());
        assert!(
            found.contains(&"open-plan".to_string()),
            "{body}: {found:?}"
        );
        assert!(
            !found.contains(&"secret-plan".to_string()),
            "{body}: {found:?}"
        );
        let v = ok(&w.dental, Method::POST, "/v1/search", body.clone()).await;
        assert!(ids(v["results"].as_array().unwrap()).contains(&"secret-plan".to_string()));
    }
    // Naming the other datasource anywhere is a 404, counted.
    let attempts = [
        (
            Method::POST,
            "/v1/search",
            json!({"query": "plan", "datasources": ["private"]}),
        ),
        (
            Method::POST,
            "/v1/search",
            json!({"query": "plan", "datasources": ["notes", "private"]}),
        ),
        (
            Method::GET,
            "/v1/datasources/private/documents/secret-plan",
            json!(null),
        ),
        (
            Method::DELETE,
            "/v1/datasources/private/documents/secret-plan",
            json!(null),
        ),
        (
            Method::POST,
            "/v1/documents",
            json!({"datasource": "private", "id": "x", "text": "t"}),
        ),
    ];
    for (m, path, body) in &attempts {
        let r = narrow.json(m.clone(), path, body).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.reason_code().as_deref()),
            (404, Some("not_found")),
            "{m} {path} {body}"
        );
    }
    assert_eq!(blocked().await, before + attempts.len() as u64);
    // It cannot make datasources outside its list; the document it could not delete is
    // still there.
    let r = narrow
        .json(Method::POST, "/v1/datasources", &json!({"name": "side"}))
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (403, Some("policy_denied"))
    );
    ok(
        &w.dental,
        Method::GET,
        "/v1/datasources/private/documents/secret-plan",
        json!(null),
    )
    .await;
    // A listed datasource that does not exist yet restricts searches to nothing there,
    // rather than failing them.
    let v = ok(
        &narrow,
        Method::POST,
        "/v1/search",
        json!({"query": "plan"}),
    )
    .await;
    assert!(!v["results"].as_array().unwrap().is_empty());
    for bad in [json!(["../x"]), json!([""]), json!("notes")] {
        let r =
            w.d.admin()
                .json(
                    Method::POST,
                    &format!("/admin/tenants/{DENTAL}/tokens"),
                    &json!({"role": "member", "datasources": bad}),
                )
                .await
                .unwrap();
        assert_eq!(r.status, 400, "{bad}");
    }
}
