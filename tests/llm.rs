//! LLM routing through the tenant socket, driven by the official `openai` package, against
//! a fake upstream (tests/python/fake_openai.py) that records every request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead;

use common::As;
use common::daemon::{Daemon, temp_state};
use hyper::Method;

fn ensure_openai() {
    let has = || {
        std::process::Command::new("python3")
            .args(["-c", "import openai, httpx, anthropic, httpx2"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !has() {
        let st = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "openai",
                "httpx",
                "anthropic",
            ])
            .status()
            .unwrap();
        assert!(
            st.success() && has(),
            "openai could not be installed for python3"
        );
    }
}

/// The fake upstream: its port, its request log, and the process (killed on drop).
struct Fake {
    port: u16,
    log: std::path::PathBuf,
    child: std::process::Child,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Fake {
    fn start(dir: &std::path::Path) -> Fake {
        Fake::start_with(dir, &[])
    }

    /// With `tls` = [certificate chain, key], the fake speaks https only.
    fn start_with(dir: &std::path::Path, tls: &[&std::path::Path]) -> Fake {
        let log = dir.join("upstream.jsonl");
        let mut child = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/fake_openai.py"
            ))
            .arg(&log)
            .args(tls)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Fake {
            port: line.trim().parse().unwrap(),
            log,
            child,
        }
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A daemon (as uid 65534) routing to a fresh fake upstream whose key file holds `key`.
fn with_fake(tag: &str, key: &str) -> (Daemon, Fake) {
    with_fake_and(tag, key, "")
}

/// Like [`with_fake`], with `extra` appended to the daemon's config.
fn with_fake_and(tag: &str, key: &str, extra: &str) -> (Daemon, Fake) {
    let state = temp_state(tag);
    let dir = state.with_extension("fake");
    std::fs::create_dir_all(&dir).unwrap();
    let fake = Fake::start(&dir);
    let key_file = dir.join("key");
    std::fs::write(&key_file, key).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(&key_file, Some(65534), Some(65534)).unwrap();
    let config = config(fake.port, &key_file) + extra;
    let d = Daemon::start_with(As::Nobody, state, Some(&config));
    (d, fake)
}

fn config(port: u16, key_file: &std::path::Path) -> String {
    format!(
        r#"
[providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
api_key_file = "{}"

[models."fast"]
provider = "fake"
upstream = "up-fast"

[models."flaky"]
provider = "fake"
upstream = "flaky-upstream"
fallbacks = ["fast"]

[models."slow"]
provider = "fake"
upstream = "slow"

[providers.anth]
kind = "anthropic"
base_url = "http://127.0.0.1:{port}/v1"
api_key_file = "{}"

[models."claude"]
provider = "anth"
upstream = "up-claude"

[rate_card."claude"]
input = 3.0
output = 15.0

[rate_card."fast"]
input = 0.15
output = 0.60

[rate_card."flaky"]
input = 1.0
output = 2.0

[rate_card."slow"]
input = 1000.0
output = 1000.0
"#,
        key_file.display(),
        key_file.display()
    )
}

#[tokio::test]
async fn the_openai_sdk_works_through_the_socket_and_nothing_of_the_tenant_goes_upstream() {
    ensure_openai();
    let (d, fake) = with_fake("llm", "sk-upstream-secret\n");
    let a = d.create("acme").await;
    let b = d.create("beta").await;
    // acme's overlay: a system prompt and a max_tokens cap; beta has neither.
    let r = d
        .tenant(&a)
        .json(
            Method::PUT,
            "/v1/config",
            &serde_json::json!({"system_prompt": "Answer in one careful sentence.", "max_tokens": 50}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());

    let mut results = Vec::new();
    for token in [&a, &b] {
        let out = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/openai_sdk.py"
            ))
            .arg(d.state.join("bulkhead.sock"))
            .arg(token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        results.push(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap());
    }
    for v in &results {
        assert_eq!(v["content"], "hi from upstream", "{v}");
        assert_eq!(v["model"], "fast", "{v}");
        assert_eq!(
            v["models"],
            serde_json::json!(["claude", "fast", "flaky", "slow"]),
            "{v}"
        );
        assert_eq!(v["tool"], "get_weather", "{v}");
        assert_eq!(v["fallback_model"], "fast", "{v}");
        assert_eq!(v["embeddings"], serde_json::json!([2, 3]), "{v}");
        assert_eq!(v["stream"][0], "hi from upstream", "{v}");
        assert_eq!(v["stream"][1], "fast", "{v}");
        assert!(v["stream"][2].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["unknown"], "model_not_found", "{v}");
        assert_eq!(v["bad"], "bad_request", "{v}");
        // The cost header is usage × the rate card: input 0.15, output 0.60 USD/M.
        let (pt, ct) = (
            v["prompt_tokens"].as_u64().unwrap(),
            v["completion_tokens"].as_u64().unwrap(),
        );
        let micro = ((pt as f64) * 0.15).ceil() as u64 + ((ct as f64) * 0.60).ceil() as u64;
        assert_eq!(v["cost"], format!("0.{micro:06}"), "{v}");
    }
    // The overlay applied to acme's call and not to beta's.
    assert_eq!(results[0]["completion_tokens"], 50);
    assert_eq!(results[1]["completion_tokens"], 1000);

    let reqs = fake.requests();
    // 2 tenants × (chat, tool call, stream, embeddings, flaky, its fallback).
    assert_eq!(reqs.len(), 12, "{reqs:?}");
    // Streams ask for usage upstream: it is what they are charged.
    let streamed: Vec<serde_json::Value> = reqs
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(r["body"].as_str().unwrap()).unwrap())
        .filter(|b| b["stream"] == true)
        .collect();
    assert_eq!(streamed.len(), 2);
    for s in &streamed {
        assert_eq!(s["stream_options"]["include_usage"], true, "{s}");
    }
    assert_eq!(
        reqs.iter()
            .filter(|r| r["path"] == "/v1/embeddings")
            .count(),
        2
    );
    let raw = std::fs::read_to_string(&fake.log).unwrap();
    for secret in [a.as_str(), b.as_str(), "acme", "beta", "tk_"] {
        assert!(!raw.contains(secret), "{secret} went upstream");
    }
    let trace_ids: Vec<String> = std::fs::read_to_string(d.state.join("audit.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["trace_id"].as_str().map(String::from))
        .collect();
    assert!(!trace_ids.is_empty());
    for t in &trace_ids {
        assert!(!raw.contains(t.as_str()), "trace id {t} went upstream");
    }
    for r in &reqs {
        assert_eq!(r["headers"]["authorization"], "Bearer sk-upstream-secret");
        let body: serde_json::Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
        assert!(body.get("user").is_none());
    }
    // acme's script ran first: the first request is acme's chat.
    let acme_first: serde_json::Value =
        serde_json::from_str(reqs[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        acme_first["messages"][0]["content"],
        "Answer in one careful sentence."
    );
    assert_eq!(acme_first["max_tokens"], 50);
    assert_eq!(acme_first["model"], "up-fast");
    let beta_calls: Vec<serde_json::Value> = reqs
        .iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .map(|r| serde_json::from_str::<serde_json::Value>(r["body"].as_str().unwrap()).unwrap())
        .filter(|b| b["messages"][0]["role"] != "system")
        .collect();
    assert_eq!(beta_calls.len(), 5);
    assert!(
        beta_calls
            .iter()
            .any(|b| b["tools"][0]["function"]["name"] == "get_weather")
    );

    // Spend is counted per tenant; no key appears in the audit log.
    for (token, calls) in [(&a, 5), (&b, 5)] {
        let u = d
            .tenant(token)
            .request(Method::GET, "/v1/usage", vec![])
            .await
            .unwrap()
            .json();
        assert_eq!(u["usage"]["llm_calls"], calls, "{u}");
        assert!(u["usage"]["spend_micro_today"].as_u64().unwrap() > 0, "{u}");
    }
    let audit = std::fs::read_to_string(d.state.join("audit.jsonl")).unwrap();
    assert!(!audit.contains("sk-upstream-secret"));
    assert!(!audit.contains("hi from upstream"));
}

#[tokio::test]
async fn a_budget_holds_under_100_parallel_calls() {
    let (d, fake) = with_fake("budget", "k");
    let g = d.create("gamma").await;
    let body = serde_json::json!({"model": "slow", "max_tokens": 10,
        "messages": [{"role": "user", "content": "count"}]});
    // One call alone: the fake reports exactly the daemon's worst case, so this is also
    // what each call reserves.
    let r = d
        .tenant(&g)
        .json(Method::POST, "/v1/chat/completions", &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    let cost: f64 = r.header("x-bulkhead-cost-usd").unwrap().parse().unwrap();
    assert!(cost > 0.0);
    // Room for ten more and half of an eleventh.
    let cap = cost * 11.5;
    let r = d
        .admin()
        .json(
            Method::PUT,
            "/admin/tenants/gamma/limits",
            &serde_json::json!({"daily_budget_usd": cap}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let c = d.tenant(&g);
            let body = body.clone();
            tokio::spawn(async move {
                let r = c
                    .json(Method::POST, "/v1/chat/completions", &body)
                    .await
                    .unwrap();
                (r.status.as_u16(), r.reason_code())
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            (200, _) => ok += 1,
            (402, Some(code)) if code == "tenant_budget_exceeded" => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((ok, refused), (10, 90));
    let u = d
        .tenant(&g)
        .request(Method::GET, "/v1/usage", vec![])
        .await
        .unwrap()
        .json();
    let spent = u["usage"]["spend_micro_today"].as_u64().unwrap();
    assert!(spent as f64 <= cap * 1e6, "{u}");
    assert_eq!(u["usage"]["llm_calls"], 11, "{u}");
    // The upstream saw exactly the calls that were charged.
    assert_eq!(fake.requests().len(), 11);
}

/// Per-actor budgets: each token of a tenant has its own cap, which holds under
/// concurrency and leaves the tenant's other actors alone.
#[tokio::test]
async fn each_actor_has_its_own_budget_under_the_tenants() {
    let (d, fake) = with_fake("actor-budget", "k");
    let first = d.create("delta").await;
    let mint = || async {
        let r = d
            .admin()
            .json(
                Method::POST,
                "/admin/tenants/delta/tokens",
                &serde_json::json!({"role": "member"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json());
        r.json()["token"].as_str().unwrap().to_string()
    };
    let (second, third) = (mint().await, mint().await);
    let body = serde_json::json!({"model": "slow", "max_tokens": 10,
        "messages": [{"role": "user", "content": "count"}]});
    let call = |token: &str| {
        let (c, body) = (d.tenant(token), body.clone());
        async move {
            let r = c
                .json(Method::POST, "/v1/chat/completions", &body)
                .await
                .unwrap();
            (
                r.status.as_u16(),
                r.reason_code(),
                r.header("x-bulkhead-cost-usd").map(str::to_string),
            )
        }
    };
    let (status, _, cost) = call(&first).await;
    assert_eq!(status, 200);
    let cost: f64 = cost.unwrap().parse().unwrap();
    // Each actor may spend three calls' worth (and a half) a day; the tenant far more.
    let r = d
        .admin()
        .json(
            Method::PUT,
            "/admin/tenants/delta/limits",
            &serde_json::json!({"actor_daily_budget_usd": cost * 3.5, "daily_budget_usd": cost * 100.0}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    // The first actor has two calls left.
    for want in [200, 200, 402] {
        let (status, code, _) = call(&first).await;
        assert_eq!(status, want, "{code:?}");
        if status == 402 {
            assert_eq!(code.as_deref(), Some("actor_budget_exceeded"));
        }
    }
    // Twenty calls at once from the second actor: exactly three are charged.
    let calls: Vec<_> = (0..20).map(|_| tokio::spawn(call(&second))).collect();
    let mut ok = 0;
    for c in calls {
        match c.await.unwrap() {
            (200, _, _) => ok += 1,
            (402, Some(code), _) if code == "actor_budget_exceeded" => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ok, 3);
    // The third actor has spent nothing and still gets its own three.
    for _ in 0..3 {
        assert_eq!(call(&third).await.0, 200);
    }
    let u = d
        .tenant(&third)
        .request(Method::GET, "/v1/usage", vec![])
        .await
        .unwrap()
        .json();
    assert_eq!(u["usage"]["llm_calls"], 9, "{u}");
    let actors = u["usage"]["actors"].as_object().unwrap();
    assert_eq!(actors.len(), 3, "{u}");
    for a in actors.values() {
        let spent = a["spend_micro_today"].as_u64().unwrap() as f64;
        assert!(spent <= cost * 3.5 * 1e6, "{u}");
    }
    assert_eq!(fake.requests().len(), 9);
    // A bad per-actor cap changes nothing.
    let r = d
        .admin()
        .json(
            Method::PUT,
            "/admin/tenants/delta/limits",
            &serde_json::json!({"actor_monthly_budget_usd": -1}),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (400, Some("bad_request")),
        "{:?}",
        r.json()
    );
}

#[tokio::test]
async fn the_anthropic_sdk_works_through_the_socket() {
    ensure_openai();
    let (d, fake) = with_fake("anthropic", "sk-ant-secret");
    let a = d.create("acme").await;
    let r = d
        .tenant(&a)
        .json(
            Method::PUT,
            "/v1/config",
            &serde_json::json!({"system_prompt": "Be brief.", "max_tokens": 60}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/anthropic_sdk.py"
        ))
        .arg(d.state.join("bulkhead.sock"))
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["text"], "hi from upstream", "{v}");
    assert_eq!(v["model"], "claude", "{v}");
    assert_eq!(v["output_tokens"], 60, "{v}");
    assert_eq!(
        v["stream"],
        serde_json::json!(["hi from upstream", "claude", 60]),
        "{v}"
    );
    assert_eq!(
        v["wrong_api"],
        serde_json::json!([400, "invalid_request_error", "bad_request"]),
        "{v}"
    );
    assert_eq!(
        v["unknown"],
        serde_json::json!([404, "not_found_error", "model_not_found"]),
        "{v}"
    );
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for r in &reqs {
        assert_eq!(r["path"], "/v1/messages");
        assert_eq!(r["headers"]["x-api-key"], "sk-ant-secret");
        assert_eq!(r["headers"]["anthropic-version"], "2023-06-01");
        let body: serde_json::Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["system"], "Be brief.");
        assert_eq!(body["max_tokens"], 60);
        assert_eq!(body["model"], "up-claude");
    }
    let raw = std::fs::read_to_string(&fake.log).unwrap();
    assert!(!raw.contains(a.as_str()) && !raw.contains("acme"));
    let u = d
        .tenant(&a)
        .request(Method::GET, "/v1/usage", vec![])
        .await
        .unwrap()
        .json();
    assert_eq!(u["usage"]["llm_calls"], 2, "{u}");
    assert_eq!(u["usage"]["llm_output_tokens"], 120, "{u}");
}

#[tokio::test]
async fn every_llm_route_needs_the_llm_scope() {
    let d = Daemon::start(As::Nobody);
    d.create("acme").await;
    let r = d
        .admin()
        .json(
            Method::POST,
            "/admin/tenants/acme/tokens",
            &serde_json::json!({"role": "member", "tools": ["exec"]}),
        )
        .await
        .unwrap();
    let token = r.json()["token"].as_str().unwrap().to_string();
    let c = d.tenant(&token);
    for (method, path) in [
        (Method::GET, "/v1/models"),
        (Method::POST, "/v1/chat/completions"),
        (Method::POST, "/v1/embeddings"),
        (Method::POST, "/v1/messages"),
    ] {
        let r = c.request(method, path, b"{}".to_vec()).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.reason_code().as_deref()),
            (403, Some("policy_denied")),
            "{path}"
        );
    }
}

#[tokio::test]
async fn rpm_and_tpm_hold_for_one_tenant_and_not_the_other() {
    let (d, fake) = with_fake("rpm", "k");
    let a = d.create("acme").await;
    let b = d.create("beta").await;
    let body = serde_json::json!({"model": "fast", "max_tokens": 1000,
        "messages": [{"role": "user", "content": "x"}]});
    let call = |t: &str| {
        let c = d.tenant(t);
        let body = body.clone();
        async move {
            let r = c
                .json(Method::POST, "/v1/chat/completions", &body)
                .await
                .unwrap();
            (
                r.status.as_u16(),
                r.reason_code(),
                r.header("retry-after").map(str::to_string),
            )
        }
    };
    let set = |v: serde_json::Value| {
        let admin = d.admin();
        async move {
            let r = admin
                .json(Method::PUT, "/admin/tenants/acme/limits", &v)
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{:?}", r.json());
        }
    };
    set(serde_json::json!({"rpm": 3})).await;
    for _ in 0..3 {
        assert_eq!(call(&a).await.0, 200);
    }
    let (status, code, retry) = call(&a).await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    assert!(retry.is_some());
    for _ in 0..5 {
        assert_eq!(call(&b).await.0, 200, "beta has no rpm");
    }
    // tpm: each call takes its worst case (~1,100 tokens) up front: two fit in 2,500.
    set(serde_json::json!({"rpm": null, "tpm": 2500})).await;
    assert_eq!(call(&a).await.0, 200);
    assert_eq!(call(&a).await.0, 200);
    let (status, code, _) = call(&a).await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    assert_eq!(call(&b).await.0, 200);
    // Bad values are refused and change nothing.
    for bad in [
        serde_json::json!({"rpm": 0}),
        serde_json::json!({"tpm": -5}),
        serde_json::json!({"daily_budget_usd": -1.0}),
        serde_json::json!({"allowed_models": [""]}),
    ] {
        let r = d
            .admin()
            .json(Method::PUT, "/admin/tenants/acme/limits", &bad)
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{bad}");
    }
    drop(fake);
}

/// The audit lines carrying `trace`, in log order.
fn audit_lines_of(d: &Daemon, trace: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.state.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["trace_id"] == trace)
        .collect()
}

/// Waits (bounded) for the call's settlement line to follow its admission line.
async fn settled_lines_of(d: &Daemon, trace: &str) -> Vec<serde_json::Value> {
    let asked = std::time::Instant::now();
    loop {
        let lines = audit_lines_of(d, trace);
        if lines.len() >= 2 || asked.elapsed() > std::time::Duration::from_secs(5) {
            return lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn every_call_is_admitted_on_disk_before_its_answer_and_settled_after() {
    use http_body_util::BodyExt;
    let (d, _fake) = with_fake("admit", "k");
    let a = d.create("acme").await;
    let c = d.tenant(&a);
    let ask = |stream: bool| {
        serde_json::json!({"model": "fast", "max_tokens": 7, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]})
    };

    // A whole answer: its admission line is on disk when the answer arrives.
    let r = c
        .json(Method::POST, "/v1/chat/completions", &ask(false))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    let trace = r.header("x-trace-id").unwrap().to_string();
    let admitted = audit_lines_of(&d, &trace);
    assert_eq!(admitted[0]["action"], "llm.admit", "{admitted:?}");
    assert_eq!(admitted[0]["outcome"], "ok");
    assert_eq!(admitted[0]["target"], "fast");
    assert_eq!(admitted[0]["llm"]["cost_usd"], "0.000000");
    let reserved = admitted[0]["llm"]["reserved_usd"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reserved.parse::<f64>().unwrap() > 0.0, "{reserved}");
    let lines = settled_lines_of(&d, &trace).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let settled = &lines[1];
    assert_eq!(settled["action"], "llm");
    assert!(settled["seq"].as_u64() > admitted[0]["seq"].as_u64());
    assert_eq!(settled["llm"]["output_tokens"], 7);
    assert_eq!(settled["llm"]["reserved_usd"], reserved.as_str());
    assert_eq!(
        settled["llm"]["cost_usd"].as_str(),
        r.header("x-bulkhead-cost-usd")
    );

    // A stream: its admission line is on disk when the head arrives, before any event.
    let resp = c
        .open(
            Method::POST,
            "/v1/chat/completions",
            serde_json::to_vec(&ask(true)).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_string();
    let admitted = audit_lines_of(&d, &trace);
    assert_eq!(admitted[0]["action"], "llm.admit", "{admitted:?}");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("upstream"),
        "{body:?}"
    );
    let lines = settled_lines_of(&d, &trace).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        (&lines[1]["action"], &lines[1]["outcome"]),
        (&serde_json::json!("llm"), &serde_json::json!("ok"))
    );
    assert_eq!(lines[1]["llm"]["output_tokens"], 7);

    // A refused call (unknown model) reserves nothing and admits nothing.
    let r = c
        .json(
            Method::POST,
            "/v1/chat/completions",
            &serde_json::json!({"model": "nope", "messages": []}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{:?}", r.json());
    let trace = r.header("x-trace-id").unwrap().to_string();
    assert!(
        audit_lines_of(&d, &trace)
            .iter()
            .all(|l| l["action"] != "llm.admit")
    );
    let report = bulkhead::audit::verify_file(&d.state.join("audit.jsonl")).unwrap();
    assert!(report.lines >= 5, "{report:?}");
}

#[tokio::test]
async fn identifying_fields_and_odd_bounds_never_reach_upstream() {
    let (d, fake) = with_fake("fields", "k");
    let a = d.create("acme").await;
    let c = d.tenant(&a);
    let body = serde_json::json!({"model": "fast", "messages": [{"role": "user", "content": "x"}],
        "user": "u1", "metadata": {"k": "v"}, "safety_identifier": "s1",
        "prompt_cache_key": "p1", "store": true, "service_tier": "priority",
        "max_completion_tokens": 5, "max_tokens": 1_000_000, "n": 3});
    let r = c
        .json(Method::POST, "/v1/chat/completions", &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    let sent: serde_json::Value =
        serde_json::from_str(fake.requests()[0]["body"].as_str().unwrap()).unwrap();
    for k in [
        "user",
        "metadata",
        "safety_identifier",
        "prompt_cache_key",
        "store",
        "service_tier",
    ] {
        assert!(sent.get(k).is_none(), "{k} went upstream: {sent}");
    }
    // Both output bounds carry the effective one.
    assert_eq!(
        (&sent["max_completion_tokens"], &sent["max_tokens"]),
        (&serde_json::json!(5), &serde_json::json!(5))
    );
    for bad in [
        serde_json::json!({"model": "fast", "messages": [], "stream": "true"}),
        serde_json::json!({"model": "fast", "messages": [], "n": 0}),
        serde_json::json!({"model": "fast", "messages": [], "n": 1000}),
        serde_json::json!({"model": "fast", "messages": [], "n": "2"}),
    ] {
        let r = c
            .json(Method::POST, "/v1/chat/completions", &bad)
            .await
            .unwrap();
        assert_eq!(
            (r.status.as_u16(), r.reason_code().as_deref()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn cached_answers_are_only_for_tenants_that_opt_in_and_never_cross_boundaries() {
    let (d, fake) = with_fake("llmcache", "k");
    let a = d.create("acme").await;
    let b = d.create("beta").await;
    let plain = d.create("plain").await;
    for t in [&a, &b] {
        let r = d
            .tenant(t)
            .json(
                Method::PUT,
                "/v1/config",
                &serde_json::json!({"llm_cache_ttl_s": 60}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    let r = d
        .tenant(&a)
        .json(
            Method::PUT,
            "/v1/config",
            &serde_json::json!({"llm_cache_ttl_s": 0}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "a ttl of 0 is refused: {:?}", r.json());
    let body = serde_json::json!({"model": "fast", "messages": [{"role": "user", "content": "same question"}]});
    let ask = |token: &str| {
        let c = d.tenant(token);
        let body = body.clone();
        async move {
            let r = c
                .json(Method::POST, "/v1/chat/completions", &body)
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{:?}", r.json());
            let h = |k: &str| {
                r.headers
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            (h("x-bulkhead-cache"), h("x-bulkhead-cost-usd"))
        }
    };
    let first = ask(&a).await;
    assert_eq!(first.0.as_deref(), Some("miss"));
    assert_ne!(first.1.as_deref(), Some("0"));
    assert_eq!(fake.requests().len(), 1);
    // The same request again from acme: answered from its entry, free, not sent.
    assert_eq!(ask(&a).await, (Some("hit".into()), Some("0".into())));
    assert_eq!(fake.requests().len(), 1);
    // The identical request from another tenant that also opted in is its own miss.
    assert_eq!(ask(&b).await.0.as_deref(), Some("miss"));
    assert_eq!(fake.requests().len(), 2);
    // Another actor of acme (a new token) does not share acme's first actor's entry.
    let other = d
        .admin()
        .json(
            Method::POST,
            "/admin/tenants/acme/tokens",
            &serde_json::json!({"role": "member"}),
        )
        .await
        .unwrap();
    let other = other.json()["token"].as_str().unwrap().to_string();
    assert_eq!(ask(&other).await.0.as_deref(), Some("miss"));
    assert_eq!(fake.requests().len(), 3);
    // A tenant that did not opt in is never cached.
    assert_eq!(ask(&plain).await.0, None);
    assert_eq!(ask(&plain).await.0, None);
    assert_eq!(fake.requests().len(), 5);
    // A new system prompt is a new prompt version: no stale answer.
    let r = d
        .tenant(&a)
        .json(
            Method::PUT,
            "/v1/config",
            &serde_json::json!({"llm_cache_ttl_s": 60, "system_prompt": "Be terse."}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(ask(&a).await.0.as_deref(), Some("miss"));
    assert_eq!(fake.requests().len(), 6);
}

/// A throwaway CA and a certificate it signed for `localhost` and 127.0.0.1, made with
/// the openssl command: (CA certificate, server chain, server key).
fn test_pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=bulkhead test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("srv.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "srv.ext",
    ]);
    for f in ["ca.pem", "srv.pem", "srv.key"] {
        std::os::unix::fs::chown(dir.join(f), Some(65534), Some(65534)).unwrap();
    }
    (dir.join("ca.pem"), dir.join("srv.pem"), dir.join("srv.key"))
}

/// An https upstream is reached over TLS and checked against the provider's own CA; the
/// same server is refused (and nothing charged) for a provider that trusts only the
/// system's roots, and a provider whose CA file is unusable stops the daemon at start.
#[tokio::test]
async fn https_upstreams_are_verified_against_the_providers_roots() {
    let state = temp_state("llm-tls");
    let dir = state.with_extension("fake");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, chain, key) = test_pki(&dir);
    let fake = Fake::start_with(&dir, &[&chain, &key]);
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let config = format!(
        r#"
[providers.private]
kind = "openai"
base_url = "https://localhost:{port}/v1"
ca_file = "{ca}"

[providers.public]
kind = "openai"
base_url = "https://localhost:{port}/v1"

[models."trusted"]
provider = "private"
upstream = "up-fast"

[models."untrusted"]
provider = "public"
upstream = "up-fast"

[rate_card."trusted"]
input = 1.0
output = 1.0

[rate_card."untrusted"]
input = 1.0
output = 1.0
"#,
        port = fake.port,
        ca = ca.display()
    );
    let d = Daemon::start_with(As::Nobody, state, Some(&config));
    let t = d.create("tls").await;
    let call = |model: &str| {
        serde_json::json!({"model": model, "max_tokens": 5,
            "messages": [{"role": "user", "content": "hello over TLS"}]})
    };
    let r = d
        .tenant(&t)
        .json(Method::POST, "/v1/chat/completions", &call("trusted"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["model"], "trusted");
    let seen = fake.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["path"], "/v1/chat/completions");
    // The fake's CA is not among the system's roots: the handshake fails, the call is
    // not forwarded, and nothing is charged.
    let r = d
        .tenant(&t)
        .json(Method::POST, "/v1/chat/completions", &call("untrusted"))
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.reason_code().as_deref()),
        (502, Some("upstream_unavailable")),
        "{:?}",
        r.json()
    );
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("UnknownIssuer"), "{message}");
    assert_eq!(fake.requests().len(), 1);
    let u = d
        .tenant(&t)
        .request(Method::GET, "/v1/usage", vec![])
        .await
        .unwrap()
        .json();
    assert_eq!(u["usage"]["llm_calls"], 1, "{u}");
    drop(d);

    // A CA file that is not there, or holds no certificate, is a start-up error.
    let dir = std::env::temp_dir().join(format!("bulkhead-bad-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("srv.ext"), "not a certificate\n").unwrap();
    for (what, path) in [
        ("missing", dir.join("nope.pem")),
        ("empty", dir.join("srv.ext")),
    ] {
        let bad = config.replace(&ca.display().to_string(), &path.display().to_string());
        let bad_state = temp_state(&format!("llm-tls-{what}"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .args(["serve", "--state-dir"])
            .arg(&bad_state)
            .arg("--config")
            .arg({
                let f = std::env::temp_dir().join(format!(
                    "bulkhead-bad-ca-{}-{what}.toml",
                    std::process::id()
                ));
                std::fs::write(&f, &bad).unwrap();
                f
            })
            .output()
            .unwrap();
        assert!(!out.status.success(), "{what}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("providers.private.ca_file"), "{what}: {err}");
        let _ = std::fs::remove_dir_all(&bad_state);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `x-bulkhead-cost-usd` header of a reply, in micro-USD.
fn cost_micro(r: &bulkhead::client::Reply) -> u64 {
    let usd: f64 = r
        .headers
        .get("x-bulkhead-cost-usd")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no x-bulkhead-cost-usd in {:?}", r.headers));
    (usd * 1e6).round() as u64
}

#[tokio::test]
async fn a_providers_embeddings_model_feeds_retrieval_charged_to_the_tenant_it_embeds_for() {
    let extra = r#"
[models."embed"]
provider = "fake"
upstream = "bow-embed"

[rate_card."embed"]
input = 1000.0
output = 0.0

[retrieval]
embeddings_model = "embed"
"#;
    let (d, fake) = with_fake_and("llmembed", "k", extra);
    let send =
        |c: bulkhead::client::SocketClient,
         method: Method,
         path: &'static str,
         body: serde_json::Value| async move { c.json(method, path, &body).await.unwrap() };
    let a = d.create("acme").await;
    let b = d.create("beta").await;
    let embeddings = |fake: &Fake| {
        fake.requests()
            .into_iter()
            .filter(|r| r["path"] == "/v1/embeddings")
            .count()
    };
    let put = |token: &str, docs: serde_json::Value| {
        let c = d.tenant(token);
        async move {
            c.json(
                Method::POST,
                "/v1/documents",
                &serde_json::json!({ "documents": docs }),
            )
            .await
            .unwrap()
        }
    };
    let mut trace_ids = Vec::new();
    let mut charged = [0u64; 2];
    for (i, (t, churn)) in [
        (
            &a,
            "the customer Northstar may cancel its renewal next quarter",
        ),
        (
            &b,
            "the customer Polaris may cancel its renewal next quarter",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let r = send(
            d.tenant(t),
            Method::POST,
            "/v1/datasources",
            serde_json::json!({"name": "notes"}),
        )
        .await;
        assert_eq!(r.status, 201, "{:?}", r.json());
        let r = put(
            t,
            serde_json::json!([
                {"datasource": "notes", "id": "churn", "text": churn},
                {"datasource": "notes", "id": "lunch", "text": "pasta and salad for the team lunch"},
            ]),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        charged[i] += cost_micro(&r);
        trace_ids.push(r.headers["x-trace-id"].to_str().unwrap().to_string());
    }
    assert_eq!(embeddings(&fake), 2, "one upstream call per batch");
    assert!(charged.iter().all(|c| *c > 0), "{charged:?}");

    // Vector search over provider vectors finds each tenant's own churn note first,
    // and only its own documents.
    for (t, want) in [(&a, "Northstar"), (&b, "Polaris")] {
        let r = send(
            d.tenant(t),
            Method::POST,
            "/v1/search",
            serde_json::json!({"query": "will a customer cancel the renewal?", "mode": "vector"}),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        let v = r.json();
        assert_eq!(v["mode"], "vector");
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{v}");
        assert_eq!(results[0]["id"], "churn", "{v}");
        assert!(results[0]["text"].as_str().unwrap().contains(want), "{v}");
        let other = if want == "Northstar" {
            "Polaris"
        } else {
            "Northstar"
        };
        assert!(!v.to_string().contains(other), "{v}");
        charged[usize::from(want == "Polaris")] += cost_micro(&r);
        trace_ids.push(r.headers["x-trace-id"].to_str().unwrap().to_string());
    }
    assert_eq!(embeddings(&fake), 4, "one call per query");

    // Each tenant paid for its own calls, and exactly what its replies said.
    for (i, t) in [&a, &b].into_iter().enumerate() {
        let u = d
            .tenant(t)
            .request(Method::GET, "/v1/usage", vec![])
            .await
            .unwrap()
            .json();
        assert_eq!(
            u["usage"]["spend_micro_today"].as_u64(),
            Some(charged[i]),
            "{u}"
        );
    }
    // Nothing of either tenant went upstream: not the names, tokens or trace ids.
    let traffic = std::fs::read_to_string(&fake.log).unwrap();
    for secret in [a.as_str(), b.as_str(), "acme", "beta"]
        .into_iter()
        .chain(trace_ids.iter().map(String::as_str))
    {
        assert!(!traffic.contains(secret), "{secret:?} went upstream");
    }

    // Text already embedded for the tenant is not embedded (or paid for) again.
    let r = put(
        &a,
        serde_json::json!([{"datasource": "notes", "id": "lunch", "text": "pasta and salad for the team lunch"}]),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(cost_micro(&r), 0);
    assert_eq!(embeddings(&fake), 4);
    // A text acme embedded first is embedded again, and paid for, on beta's first
    // write of it: beta never reads acme's cache.
    let offsite = serde_json::json!([{"datasource": "notes", "id": "offsite", "text": "agenda for the planning offsite"}]);
    for (i, t) in [&a, &b].into_iter().enumerate() {
        let r = put(t, offsite.clone()).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        assert!(cost_micro(&r) > 0);
        charged[i] += cost_micro(&r);
        assert_eq!(embeddings(&fake), 5 + i);
    }

    // Another workspace of acme (another actor) does not reuse acme's cached vector: it
    // pays for its own, so a cost of 0 never tells it what the other workspace stored.
    let r = send(
        d.admin(),
        Method::POST,
        "/admin/tenants/acme/tokens",
        serde_json::json!({"role": "member", "workspace": "ws2"}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let ws2 = r.json()["token"].as_str().unwrap().to_string();
    let r = send(
        d.tenant(&ws2),
        Method::POST,
        "/v1/datasources",
        serde_json::json!({"name": "notes"}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let r = put(&ws2, offsite.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert!(cost_micro(&r) > 0, "a cache hit across workspaces");
    charged[0] += cost_micro(&r);
    assert_eq!(embeddings(&fake), 7);

    // Out of budget: the write is refused before anything is sent or stored.
    let r = send(
        d.admin(),
        Method::PUT,
        "/admin/tenants/acme/limits",
        serde_json::json!({"daily_budget_usd": charged[0] as f64 / 1e6}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let r = put(
        &a,
        serde_json::json!([{"datasource": "notes", "id": "new", "text": "a brand new note"}]),
    )
    .await;
    assert_eq!(r.status, 402, "{:?}", r.json());
    assert_eq!(r.json()["error"]["reason_code"], "tenant_budget_exceeded");
    assert_eq!(embeddings(&fake), 7);
    let r = d
        .tenant(&a)
        .request(Method::GET, "/v1/datasources/notes/documents/new", vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    // A datasource that does not exist is refused before embedding is paid for.
    let r = put(
        &b,
        serde_json::json!([{"datasource": "nope", "id": "x", "text": "some text"}]),
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.json());
    assert_eq!(embeddings(&fake), 7);

    // A tenant whose model allowlist leaves the embeddings model out gets no vectors:
    // its searches are full-text and say why; nothing is sent for it.
    let r = send(
        d.admin(),
        Method::PUT,
        "/admin/tenants/beta/limits",
        serde_json::json!({"allowed_models": ["fast"]}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let r = send(
        d.tenant(&b),
        Method::POST,
        "/v1/search",
        serde_json::json!({"query": "cancel renewal"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let v = r.json();
    assert_eq!(v["mode"], "text", "{v}");
    assert!(v["note"].as_str().unwrap().contains("not allowed"), "{v}");
    let r = send(
        d.tenant(&b),
        Method::POST,
        "/v1/search",
        serde_json::json!({"query": "cancel renewal", "mode": "vector"}),
    )
    .await;
    assert_eq!(r.status, 403, "{:?}", r.json());
    assert_eq!(r.json()["error"]["reason_code"], "model_not_allowed");
    assert_eq!(embeddings(&fake), 7);

    // The trace names the tool each request used, under its trace id.
    let log = d.log_text();
    for id in &trace_ids {
        let line = log
            .lines()
            .find(|l| {
                l.contains(id.as_str()) && l.contains("bulkhead::trace") && l.contains("tool")
            })
            .unwrap_or_else(|| panic!("no tool trace for {id}"));
        assert!(line.contains("retrieval."), "{line}");
    }
}
