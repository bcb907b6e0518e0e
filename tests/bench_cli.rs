//! The benchmark is a product command: it must run and report every variant. (Its
//! figures are not asserted here: timing belongs to benchmarks, not tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn coldstart_json_reports_each_variant() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["bench", "coldstart", "--runs", "5", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let variants = v["variants"].as_object().unwrap();
    assert!(
        v["process_command"]
            .as_str()
            .unwrap()
            .ends_with("/bulkhead-sandbox"),
        "{v}"
    );
    for name in [
        "bulkhead_process",
        "bulkhead_subcommand",
        "bulkhead_library",
        "plain_spawn",
        "bulkhead_daemon_exec",
    ] {
        let s = &variants[name];
        assert_eq!(s["runs"], 5, "{v}");
        let (p50, p90, p99) = (
            s["p50_us"].as_u64().unwrap(),
            s["p90_us"].as_u64().unwrap(),
            s["p99_us"].as_u64().unwrap(),
        );
        assert!(p50 > 0 && p50 <= p90 && p90 <= p99, "{v}");
    }
    let has_bwrap = Command::new("sh")
        .args(["-c", "command -v bwrap"])
        .output()
        .unwrap()
        .status
        .success();
    assert_eq!(variants.contains_key("bwrap"), has_bwrap, "{v}");
    if has_bwrap {
        assert!(v["ratios_to_bwrap"]["bulkhead_library"].is_array(), "{v}");
    } else {
        eprintln!(
            "NOTE: bubblewrap is not installed; the comparison row is absent (.ci/run installs it)"
        );
    }
    // The benchmark ran unprivileged even though the test runs as root.
    assert_eq!(v["uid"], 65534, "{v}");
}

#[test]
fn files_benchmark_reports_throughput_latency_and_rss() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args([
            "bench",
            "files",
            "--tenants",
            "5",
            "--clients",
            "5",
            "--requests",
            "50",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"], 50, "{v}");
    assert_eq!(v["tenants"], 5, "{v}");
    assert!(v["requests_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v["p50_us"].as_u64().unwrap() <= v["p99_us"].as_u64().unwrap(),
        "{v}"
    );
    assert!(v["peak_rss_mib"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn noisy_neighbour_benchmark_reports_both_phases_and_b_sees_no_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["bench", "noisy", "--runs", "10", "--flood", "16", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for phase in ["b_idle", "b_flooded"] {
        assert_eq!(v[phase]["runs"], 10, "{v}");
        assert!(v[phase]["p99_us"].as_u64().unwrap() > 0, "{v}");
    }
    assert_eq!(v["b_errors"], serde_json::json!([]), "{v}");
    // A really flooded: its requests were answered while B ran.
    let answered: u64 = v["a_answers"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(answered > 0, "{v}");
}

#[test]
fn throughput_benchmark_reports_runs_per_second_and_cell_memory() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args([
            "bench",
            "throughput",
            "--clients",
            "3",
            "--seconds",
            "0.3",
            "--rounds",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    assert!(v["daemon_runs_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["bwrap_runs_per_s"].as_f64().unwrap() > 0.0, "{v}");
    // One held cell per client's tenant, its memory read from the holder.
    assert_eq!(v["cells"], 3, "{v}");
    let (rss, uss) = (
        v["cell_rss_kib"].as_f64().unwrap(),
        v["cell_uss_kib"].as_f64().unwrap(),
    );
    assert!(rss > 0.0 && uss > 0.0 && uss <= rss, "{v}");
}

#[test]
fn llm_benchmark_reports_direct_and_routed_latency() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args([
            "bench",
            "llm",
            "--requests",
            "40",
            "--clients",
            "1,4",
            "--paced-rate",
            "400",
            "--streams",
            "20",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2, "{v}");
    for l in levels {
        for path in ["direct", "bulkhead", "stream_direct", "stream_bulkhead"] {
            let (p50, p99, rps) = (
                l[path][0].as_u64().unwrap(),
                l[path][1].as_u64().unwrap(),
                l[path][2].as_f64().unwrap(),
            );
            assert!(p50 > 0 && p50 <= p99 && rps > 0.0, "{v}");
        }
    }
    let paced = &v["paced"];
    assert_eq!(paced["clients"], 200, "{v}");
    for path in ["direct", "bulkhead"] {
        let (p50, p99) = (
            paced[path][0].as_u64().unwrap(),
            paced[path][1].as_u64().unwrap(),
        );
        assert!(p50 > 0 && p50 <= p99, "{v}");
    }
    // Every held stream was open at once, and the daemon grew while they were.
    let m = &v["stream_memory"];
    assert_eq!(m["streams"], 20, "{v}");
    assert!(
        m["rss_open_kib"].as_u64().unwrap() >= m["rss_before_kib"].as_u64().unwrap(),
        "{v}"
    );
}

#[test]
fn retrieval_benchmark_reports_search_ingest_and_size() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args([
            "bench",
            "retrieval",
            "--chunks",
            "2000",
            "--queries",
            "20",
            "--tenants",
            "5",
            "--tenant-chunks",
            "50",
            "--pool",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["chunks"], 2000, "{v}");
    assert!(v["ingest_chunks_per_s"].as_f64().unwrap() > 0.0, "{v}");
    for k in ["search_us", "search_common_us"] {
        let (p50, p99) = (v[k][0].as_u64().unwrap(), v[k][1].as_u64().unwrap());
        assert!(p50 > 0 && p50 <= p99, "{v}");
    }
    assert!(v["db_bytes"].as_u64().unwrap() > 0, "{v}");
    // The pool stayed within its bound while five tenants were searched.
    assert!(v["many_tenants"][1].as_u64().unwrap() <= 2, "{v}");
}
