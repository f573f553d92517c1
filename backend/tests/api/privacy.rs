//! `consilium privacy cost`, the researcher's planning command: ε for a DP-SGD schedule by both
//! conversions, the noise multiplier for a target ε, and clear refusals.

use serde_json::Value;
use std::process::Command;

fn consilium(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_consilium"))
        .args(args)
        .env_remove("CONSILIUM_CONFIG")
        .output()
        .expect("consilium runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_privacy_planner_reports_both_conversions_and_finds_the_noise() {
    // MNIST with TensorFlow Privacy's figures: 60,000 examples, batch 256, σ = 1.1, 60 epochs.
    let q = (256.0f64 / 60_000.0).to_string();
    let (code, out, err) = consilium(&[
        "privacy",
        "cost",
        "--sampling-rate",
        &q,
        "--noise-multiplier",
        "1.1",
        "--steps",
        "14063",
        "--delta",
        "1e-5",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    let classic = v["epsilon_classic"].as_f64().expect("classic");
    assert_eq!((classic * 100.0).round() / 100.0, 3.01, "{v}");
    let tight = v["epsilon"].as_f64().expect("epsilon");
    assert!(tight < classic, "{v}");

    // The σ for ε = 2 over the same schedule, and that σ costs at most ε = 2.
    let (code, out, err) = consilium(&[
        "privacy",
        "cost",
        "--sampling-rate",
        &q,
        "--epsilon",
        "2",
        "--steps",
        "14063",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    let sigma = v["noise_multiplier"].as_f64().expect("sigma");
    assert!(sigma > 1.1, "more noise for a smaller ε: {v}");
    let spent = v["epsilon"].as_f64().expect("epsilon");
    assert!(spent <= 2.0 && spent > 1.98, "{v}");

    // Text for people.
    let (code, out, _) = consilium(&[
        "privacy",
        "cost",
        "--sampling-rate",
        "0.01",
        "--noise-multiplier",
        "1.0",
        "--steps",
        "1000",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("what Consilium enforces") && out.contains("classic"),
        "{out}"
    );

    // Nonsense is refused with what was wrong.
    let (code, _, err) = consilium(&[
        "privacy",
        "cost",
        "--sampling-rate",
        "2",
        "--noise-multiplier",
        "1",
        "--steps",
        "10",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("sampling rate must lie in [0, 1]"), "{err}");
    let (code, _, err) = consilium(&["privacy", "cost", "--sampling-rate", "0.1", "--steps", "10"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--noise-multiplier") || err.contains("--epsilon"),
        "{err}"
    );
}
