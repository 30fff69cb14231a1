//! `shoal sim` from the command line: the shipped topologies run, bad ones are refused
//! with the line and field.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn shipped_small_topologies_run_and_report_json() {
    for name in ["home-lan", "university"] {
        let path = format!(
            "{}/../configs/topologies/{name}.toml",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut cmd = shoal();
        cmd.args(["sim", "--json", &path]);
        let (out, _) = run(cmd, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
        assert_eq!(r["topology"], name);
        assert!(
            r["tokens_generated"].as_u64().expect("tokens") > 1000,
            "{r}"
        );
        assert_eq!(r["generations_lost"], 0, "{r}");
        assert!(r["decode_step_latency_ms"]["p99"].as_f64().expect("p99") > 0.0);
    }
}

#[test]
fn a_malformed_topology_is_refused_with_line_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "name = \"bad\"\nmodel = \"smollm2-135m\"\n\n[[region]]\nname = \"x\"\nrtt_ms = { x = 1 }\n\n[[nodes]]\ncount = \"three\"\n",
    )
    .expect("write");
    let mut cmd = shoal();
    cmd.arg("sim").arg(&path);
    let (out, _) = run(cmd, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("line 9, field `count`"), "{err}");
}
