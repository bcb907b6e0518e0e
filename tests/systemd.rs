//! The systemd units in `systemd/` pass `systemd-analyze verify` with nothing to say
//! (unknown or misspelled settings are only warnings there, so any output fails).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn units_verify_cleanly() {
    let dir = std::env::temp_dir().join(format!("bulkhead-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let service = std::fs::read_to_string(format!("{root}/systemd/bulkhead.service")).unwrap();
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let rewritten = service.replace(
        "ExecStart=/usr/local/bin/bulkhead ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_bulkhead")),
    );
    assert_ne!(
        rewritten, service,
        "ExecStart=/usr/local/bin/bulkhead not found in the unit"
    );
    std::fs::write(dir.join("bulkhead.service"), rewritten).unwrap();
    std::fs::copy(
        format!("{root}/systemd/bulkhead.socket"),
        dir.join("bulkhead.socket"),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join("bulkhead.service"))
        .arg(dir.join("bulkhead.socket"))
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed; .ci/run installs it");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze had remarks: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
