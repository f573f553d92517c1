//! `consilium simulate`: a researcher's local try of a plan, from an experiment file.

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use serde_json::Value;
use std::process::Command;

fn consilium(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_consilium"))
        .args(args)
        .env_remove("CONSILIUM_TEST_PG")
        .env_remove("CONSILIUM_CONFIG")
        .output()
        .expect("consilium runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes the ready-to-run example into `dir/try`; returns its folder and experiment file.
fn example_in(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let example = dir.join("try");
    let (code, out, err) = consilium(&["simulate", "--example", example.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
    let config = example.join("experiment.toml");
    (example, config)
}

/// Runs the example experiment, two rounds, with `edits` (text, replacement) made to its
/// configuration; it must complete. Returns the example's folder and the JSON report.
fn simulate_edited(dir: &std::path::Path, edits: &[(&str, &str)]) -> (std::path::PathBuf, Value) {
    let (example, config) = example_in(dir);
    let mut text = std::fs::read_to_string(&config)
        .expect("experiment")
        .replace("rounds = 3", "rounds = 2");
    for (from, to) in edits {
        assert!(text.contains(from), "the example has no {from:?}");
        text = text.replace(from, to);
    }
    std::fs::write(&config, &text).expect("write");
    let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("completed after"), "{out}");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(example.join("simulation-report.json")).expect("report"),
    )
    .expect("JSON report");
    assert_eq!(report["run"]["status"], "completed");
    (example, report)
}

/// The final model's held-out accuracy over all sites, from the report.
fn final_accuracy(report: &Value) -> f64 {
    report["final_model"]["evaluation"]["global"]["accuracy"]
        .as_f64()
        .expect("accuracy")
}

/// The simulation's artifact store.
fn store_of(example: &std::path::Path) -> consilium_worker::artifacts::ArtifactStore {
    consilium_worker::artifacts::ArtifactStore::open(
        example
            .join("run")
            .join("artifacts")
            .to_str()
            .expect("path"),
    )
    .expect("the simulation's store")
}

/// A model or update in the simulation's store, by hash.
async fn stored_weights(
    store: &consilium_worker::artifacts::ArtifactStore,
    hash: &str,
) -> consilium_core::aggregate::Weights {
    consilium_backend::engine::weights::from_safetensors(
        &store.get(hash).await.expect("in the store"),
    )
    .expect("safetensors")
}

/// Partial sharing of the classifier, as the lineage and the store show it: every contribution
/// to the final model says `fc` stayed at its site, and its update holds the shared layers and
/// no classifier.
async fn assert_the_classifier_stayed_at_the_sites(
    store: &consilium_worker::artifacts::ArtifactStore,
    report: &Value,
) {
    let contributions = report["final_model"]["contributions"]
        .as_array()
        .expect("contributions");
    assert!(contributions.len() > 1, "{contributions:?}");
    for c in contributions {
        assert_eq!(c["kept_at_site"], serde_json::json!(["fc"]), "{c}");
        let update = stored_weights(store, c["update_hash"].as_str().expect("update")).await;
        assert!(
            update.contains_key("conv1.weight"),
            "the shared layers are sent"
        );
        assert!(
            !update.keys().any(|n| n.starts_with("fc.")),
            "the classifier never leaves the site: {:?}",
            update.keys().collect::<Vec<_>>()
        );
    }
}

/// SGD with momentum (the strategies that count local SGD steps need it).
const SGD: [(&str, &str); 2] = [
    ("name = \"adamw\"", "name = \"sgd\"\nmomentum = 0.9"),
    ("learning_rate = 0.003", "learning_rate = 0.01"),
];

#[tokio::test]
async fn a_simulation_trains_the_plan_on_local_folders_and_writes_a_report() {
    let dir = tempfile::tempdir().expect("dir");
    let example = dir.path().join("try");
    let (code, out, err) = consilium(&["simulate", "--example", example.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
    let config = example.join("experiment.toml");
    assert!(out.contains(&format!("consilium simulate --config {}", config.display())));

    let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("north            160 images"), "{out}");
    assert!(out.contains("completed after"), "{out}");
    assert!(out.contains("verification: intact"), "{out}");

    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(example.join("simulation-report.json")).expect("report"),
    )
    .expect("JSON report");
    assert_eq!(report["simulation"], true);
    assert_eq!(report["run"]["status"], "completed");
    assert_eq!(report["rounds"].as_array().map(Vec::len), Some(3));
    assert_eq!(report["models"].as_array().map(Vec::len), Some(3));
    let acc = final_accuracy(&report);
    assert!(acc > 0.7, "above chance: {acc}");
    assert_eq!(report["audit"]["ok"], true);

    // Marked as a simulation in its own audit trail, kept in its own database.
    let db = Database::connect(format!(
        "sqlite://{}?mode=ro",
        example.join("run").join("consilium.db").display()
    ))
    .await
    .expect("the simulation's database");
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT action FROM audit_events WHERE action = 'simulation.started'".to_string(),
        ))
        .await
        .expect("audit events");
    assert_eq!(rows.len(), 1);
    let studies = db
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT title FROM studies".to_string(),
        ))
        .await
        .expect("studies");
    let title: String = studies[0].try_get("", "title").expect("title");
    assert_eq!(title, "[simulation] Lesion classifier, first try");
}

#[test]
fn a_broken_experiment_file_names_every_problem() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("experiment.toml");
    std::fs::write(
        &config,
        r#"
name = "broken"
[plan]
local_epochs = 1
batch_size = 0
rounds = 1
[plan.model]
architecture = "small_cnn"
num_classes = 2
[plan.preprocessing]
image_size = 28
[plan.optimiser]
name = "sgd"
learning_rate = 0.01
[plan.aggregation]
strategy = "fedavg"

[[sites]]
name = "north"
[sites.dataset]
kind = "images"
root = "nowhere"
labels = "nowhere/labels.csv"

[[sites]]
name = "North"
[sites.dataset]
kind = "images"
root = "."
labels = "labels.csv"
"#,
    )
    .expect("write");
    let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("can't be run"), "{err}");
    assert!(err.contains("nowhere does not exist"), "{err}");
    assert!(
        err.contains("the site name \"North\" appears twice"),
        "{err}"
    );
    assert!(err.contains("plan: "), "{err}");
    assert!(err.contains("batch_size"), "{err}");

    let (code, _, err) = consilium(&["simulate", "--config", "/no/such/experiment.toml"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot read the experiment file /no/such/experiment.toml"),
        "{err}"
    );
}

/// The shipped server binary reads real hospital formats the way the site worker does (its
/// own decoding child, the same allocator): every image in the worker's DICOM and NIfTI test
/// files, JPEG 2000 included, reaches a simulated site.
#[tokio::test]
async fn a_simulation_reads_every_dicom_and_nifti_test_file() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, config) = example_in(dir.path());
    let text = std::fs::read_to_string(&config).expect("experiment");
    let plan = text
        .split("[[sites]]")
        .next()
        .expect("plan")
        .replace("rounds = 3", "rounds = 1");
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/data");
    let mut sites = String::new();
    for (name, kind) in [("dicom", "dicom"), ("nifti", "nifti")] {
        let root = tests.join(name);
        let labels = dir.path().join(format!("{name}.csv"));
        let mut rows = String::from("file,label\n");
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .expect("test data")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for (i, f) in names.iter().enumerate() {
            rows.push_str(&format!("{f},{}\n", i % 2));
        }
        std::fs::write(&labels, rows).expect("labels");
        sites.push_str(&format!(
            "\n[[sites]]\nname = \"{name}\"\n[sites.dataset]\nkind = \"{kind}\"\nroot = \"{}\"\nlabels = \"{}\"\nholdout = 0.5\n",
            root.display(),
            labels.display()
        ));
    }
    std::fs::write(&config, format!("{plan}{sites}")).expect("write");
    let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("dicom            69 images of 14 patients (dicom"),
        "{out}"
    );
    assert!(
        out.contains("nifti            68 images of 4 patients (nifti"),
        "{out}"
    );
    assert!(out.contains("completed after"), "{out}");
}

/// An attacking simulated site: named in the terminal and the report, its update rewritten
/// (its share of each model recorded), and a label flip reads a flipped copy of the labels.
#[tokio::test]
async fn a_simulated_site_attacks_and_the_report_says_so() {
    let dir = tempfile::tempdir().expect("dir");
    let (example, config) = example_in(dir.path());
    let text = std::fs::read_to_string(&config)
        .expect("experiment")
        .replace("rounds = 3", "rounds = 1")
        .replace("strategy = \"fedavg\"", "strategy = \"median\"");
    // The last site (east) attacks.
    std::fs::write(
        &config,
        format!("{text}[sites.attack]\nkind = \"scaling\"\nfactor = 100\n"),
    )
    .expect("write");
    let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ATTACKS (simulated): scaling ×100"), "{out}");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(example.join("simulation-report.json")).expect("report"),
    )
    .expect("JSON report");
    assert_eq!(
        report["attacks"][0]["site"], "east",
        "{}",
        report["attacks"]
    );
    assert_eq!(report["attacks"][0]["attack"]["kind"], "scaling");
    let contributions = report["final_model"]["contributions"]
        .as_array()
        .expect("contributions");
    let east = contributions
        .iter()
        .find(|c| c["site_name"] == "east")
        .expect("east's update");
    // Median of three: east's ×100 update is the median in no coordinate, or hardly any.
    assert!(east["weight"].as_f64().expect("weight") < 0.05, "{east}");
    assert!(east["score"].as_f64().expect("score") > 0.9, "{east}");

    // A label flip: a flipped copy of east's labels in the simulation's folder.
    std::fs::write(
        &config,
        format!("{text}[sites.attack]\nkind = \"label_flip\"\n"),
    )
    .expect("write");
    let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
    let original = std::fs::read_to_string(example.join("sites/east/labels.csv")).expect("labels");
    let flipped =
        std::fs::read_to_string(example.join("run/attacks/site-3-labels.csv")).expect("flipped");
    let second = |t: &str| -> Vec<String> {
        t.lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap_or("").to_string())
            .collect()
    };
    let (a, b) = (second(&original), second(&flipped));
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter()
            .zip(&b)
            .all(|(x, y)| (x == "0" && y == "1") || (x == "1" && y == "0"))
    );

    // A setting an attack does not take is refused, and so is an attack by every site.
    std::fs::write(
        &config,
        format!("{text}[sites.attack]\nkind = \"sign_flip\"\nfactor = 2\n"),
    )
    .expect("write");
    let (code, _, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown field: found `factor`"), "{err}");
    let every = text.replace(
        "holdout = 0.25\n",
        "holdout = 0.25\n[sites.attack]\nkind = \"sign_flip\"\n",
    );
    std::fs::write(&config, every).expect("write");
    let (code, _, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_ne!(code, 0);
    assert!(err.contains("every site has an [sites.attack]"), "{err}");
}

/// FedNova end to end: sites of different sizes take different numbers of local SGD steps,
/// and each update counts by its normalised change, not by its samples.
#[tokio::test]
async fn a_simulation_aggregates_with_fednova() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, report) = simulate_edited(
        dir.path(),
        &[
            SGD[0],
            SGD[1],
            ("strategy = \"fedavg\"", "strategy = \"fednova\""),
        ],
    );
    assert_eq!(report["final_model"]["strategy"], "fednova");
    let contributions = report["final_model"]["contributions"]
        .as_array()
        .expect("contributions");
    let samples: Vec<f64> = contributions
        .iter()
        .map(|c| c["samples"].as_f64().expect("samples"))
        .collect();
    let total: f64 = samples.iter().sum();
    let shares: Vec<f64> = contributions
        .iter()
        .map(|c| c["weight"].as_f64().expect("weight"))
        .collect();
    assert!(
        (shares.iter().sum::<f64>() - 1.0).abs() < 1e-6,
        "{shares:?}"
    );
    assert!(
        samples.iter().any(|s| (s - samples[0]).abs() > 0.0),
        "the example's sites differ in size: {samples:?}"
    );
    assert!(
        shares
            .iter()
            .zip(&samples)
            .any(|(w, n)| (w - n / total).abs() > 0.01),
        "FedNova's shares {shares:?} are not the sample shares of {samples:?}"
    );
    let acc = final_accuracy(&report);
    assert!(acc > 0.6, "above chance: {acc}");
}

/// SCAFFOLD end to end: round 2's jobs carry each site's correction, and the lineage names it.
#[test]
fn a_simulation_aggregates_with_scaffold() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, report) = simulate_edited(
        dir.path(),
        &[
            SGD[0],
            SGD[1],
            ("strategy = \"fedavg\"", "strategy = \"scaffold\""),
        ],
    );
    assert_eq!(report["final_model"]["strategy"], "scaffold");
    assert_eq!(report["final_model"]["round"], 2);
    // Round 2: every site trained with its own correction, which the lineage names.
    let corrections: Vec<&str> = report["final_model"]["contributions"]
        .as_array()
        .expect("contributions")
        .iter()
        .map(|c| c["correction"].as_str().expect("a correction in round 2"))
        .collect();
    let distinct: std::collections::BTreeSet<&&str> = corrections.iter().collect();
    assert!(
        corrections.len() > 1 && distinct.len() == corrections.len(),
        "{corrections:?}"
    );
    let acc = final_accuracy(&report);
    assert!(acc > 0.6, "above chance: {acc}");
}

/// The same experiment and seed give the same model, round by round: each site's batch order
/// mixes in its id, and a simulation derives its sites' ids from the experiment instead of
/// drawing them. Another seed gives another model.
#[test]
fn a_simulation_gives_the_same_model_for_the_same_seed() {
    let dir = tempfile::tempdir().expect("dir");
    let (example, config) = example_in(dir.path());
    let text = std::fs::read_to_string(&config).expect("experiment");
    for from in ["rounds = 3", "seed = 1", SGD[0].0, SGD[1].0] {
        assert!(text.contains(from), "the example has no {from:?}");
    }
    let text = text
        .replace("rounds = 3", "rounds = 2")
        .replace(SGD[0].0, SGD[0].1)
        .replace(SGD[1].0, SGD[1].1);
    let run = |seed: u32| -> Value {
        std::fs::write(&config, text.replace("seed = 1", &format!("seed = {seed}")))
            .expect("write");
        let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
        assert_eq!(code, 0, "{out}{err}");
        serde_json::from_str(
            &std::fs::read_to_string(example.join("simulation-report.json")).expect("report"),
        )
        .expect("JSON report")
    };
    let models = |report: &Value| -> Vec<String> {
        report["models"]
            .as_array()
            .expect("models")
            .iter()
            .map(|m| m["hash"].as_str().expect("hash").to_string())
            .collect()
    };
    let sites = |report: &Value| -> Vec<(String, String)> {
        report["final_model"]["contributions"]
            .as_array()
            .expect("contributions")
            .iter()
            .map(|c| {
                let field = |k: &str| c[k].as_str().expect(k).to_string();
                (field("site_id"), field("update_hash"))
            })
            .collect()
    };
    let first = run(1);
    let again = run(1);
    assert_eq!(models(&first).len(), 2);
    assert_eq!(models(&first), models(&again));
    assert_eq!(sites(&first), sites(&again));
    assert_eq!(final_accuracy(&first), final_accuracy(&again));
    let other = run(2);
    assert_eq!(
        sites(&first).iter().map(|s| &s.0).collect::<Vec<_>>(),
        sites(&other).iter().map(|s| &s.0).collect::<Vec<_>>(),
        "the same experiment's sites keep their ids"
    );
    assert_ne!(models(&first).last(), models(&other).last());
}

/// The last run's artifacts are cleared before a simulation; where they cannot be, it stops with
/// the reason instead of mixing them with the new run's.
#[test]
fn a_simulation_whose_old_artifacts_cannot_be_cleared_says_so() {
    let dir = tempfile::tempdir().expect("dir");
    let (example, config) = example_in(dir.path());
    let run = example.join("run");
    std::fs::create_dir_all(&run).expect("run folder");
    // A file where the artifact folder goes: it cannot be removed as a folder.
    std::fs::write(run.join("artifacts"), "not a folder").expect("write");
    let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("cannot be removed") && err.contains("choose another data_dir"),
        "{out}{err}"
    );
}

/// A learning rate that blows the model up: the run fails in the first round with the sites'
/// reason and what to change, not after the round's deadline with "no update".
#[test]
fn a_simulation_whose_model_diverges_fails_with_the_sites_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let (example, config) = example_in(dir.path());
    let text = std::fs::read_to_string(&config).expect("experiment");
    for from in [
        "name = \"adamw\"",
        "learning_rate = 0.003",
        "round_timeout_seconds = 600",
    ] {
        assert!(text.contains(from), "the example has no {from:?}");
    }
    let text = text
        .replace("name = \"adamw\"", "name = \"sgd\"\nmomentum = 0.9")
        .replace("learning_rate = 0.003", "learning_rate = 1000000.0");
    std::fs::write(&config, &text).expect("write");
    let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_ne!(code, 0, "{out}{err}");
    let said = format!("{out}{err}");
    assert!(
        said.contains("Round 1 failed")
            && said.contains("the model has diverged")
            && said.contains("lower the plan's learning rate"),
        "{out}{err}"
    );
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(example.join("simulation-report.json")).expect("report"),
    )
    .expect("JSON report");
    assert_eq!(report["run"]["status"], "failed");
}

/// HarmoFL's amplitude normalisation end to end: in round 1 each site's update carries its
/// training split's mean amplitude spectrum (as the test computes it from the site's images),
/// the model carries their sample-weighted mean, and round 2 leaves it as it is.
#[tokio::test]
async fn a_simulation_normalises_amplitudes_to_the_sites_mean_spectrum() {
    use consilium_worker::harmonise::{AMPLITUDE, mean_amplitude};
    let dir = tempfile::tempdir().expect("dir");
    let (example, report) = simulate_edited(
        dir.path(),
        &[(
            "normalisation = \"zscore\"",
            "normalisation = \"zscore\"\namplitude_normalisation = { band = 0.2 }",
        )],
    );
    let store = store_of(&example);
    let spectrum = |hash: String| {
        let store = &store;
        async move { stored_weights(store, &hash).await[AMPLITUDE].data.clone() }
    };
    let models = report["models"].as_array().expect("models");
    assert_eq!(models.len(), 2, "two rounds");
    let hash = |v: &Value, key: &str| v[key].as_str().expect("hash").to_string();
    // Round 1: each site's own spectrum, from its training images.
    let mut weighted = vec![0f64; 28 * 28];
    let mut total = 0f64;
    for c in models[0]["contributions"]
        .as_array()
        .expect("contributions")
    {
        let site = c["site_name"].as_str().expect("site");
        let key = site.split_whitespace().next().expect("name").to_lowercase();
        let root = example.join("sites").join(&key);
        let data = consilium_worker::data::load(
            &consilium_worker::data::DatasetSpec {
                kind: consilium_worker::data::DataKind::Images,
                root: root.clone(),
                labels: root.join("labels.csv"),
                label_key: consilium_worker::data::LabelKey::Path,
                masks: false,
                holdout: 0.25,
                window: None,
                decoding: Default::default(),
            },
            28,
            &consilium_worker::decode::Decoder::program(env!("CARGO_BIN_EXE_consilium")),
        )
        .expect("the site's images");
        let expected = mean_amplitude(data.train().map(|s| s.pixels.as_slice()), 28);
        let sent = spectrum(hash(c, "update_hash")).await;
        assert!(
            expected[0] > 0.05,
            "{site}: the mean pixel leads the spectrum"
        );
        for (i, (a, b)) in sent.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "{site}, frequency {i}: {a} against {b}"
            );
        }
        let n = c["samples"].as_f64().expect("samples");
        for (w, a) in weighted.iter_mut().zip(&sent) {
            *w += n * f64::from(*a);
        }
        total += n;
    }
    let first = spectrum(hash(&models[0], "hash")).await;
    for (i, (a, w)) in first.iter().zip(&weighted).enumerate() {
        let mean = w / total;
        assert!(
            (f64::from(*a) - mean).abs() < 1e-5,
            "frequency {i}: {a} against {mean}"
        );
    }
    // Round 2: every site normalised to that mean, which neither training nor averaging moves.
    for c in models[1]["contributions"]
        .as_array()
        .expect("contributions")
    {
        let sent = spectrum(hash(c, "update_hash")).await;
        assert_eq!(sent, first, "{}", c["site_name"]);
    }
    let last = spectrum(hash(&models[1], "hash")).await;
    for (a, b) in last.iter().zip(&first) {
        assert!((a - b).abs() < 1e-6, "{a} against {b}");
    }
    let acc = final_accuracy(&report);
    assert!(acc > 0.6, "above chance: {acc}");
}

/// A personalised run of two rounds: each site's score of version 1 (the sites' evaluations of
/// it, their own models) differs from the score the same version gets at the same site as it
/// arrives for round 2 (the contributions' `evaluation`), which without personalisation are
/// the same model on the same images. Returns round 2's contributions.
fn assert_the_sites_score_their_own_models(report: &Value) -> Vec<Value> {
    let models = report["models"].as_array().expect("models");
    assert_eq!(models.len(), 2, "two rounds");
    let own: std::collections::BTreeMap<String, f64> = models[0]["evaluation"]["sites"]
        .as_array()
        .expect("the sites' evaluations of version 1")
        .iter()
        .map(|e| {
            (
                e["site_name"].as_str().expect("site").to_string(),
                e["metrics"]["loss"].as_f64().expect("loss"),
            )
        })
        .collect();
    let contributions = models[1]["contributions"]
        .as_array()
        .expect("contributions")
        .clone();
    assert!(contributions.len() > 1, "{contributions:?}");
    for c in &contributions {
        let site = c["site_name"].as_str().expect("site");
        let arrived = c["evaluation"]["loss"].as_f64().expect("loss");
        assert!(
            (arrived - own[site]).abs() > 1e-6,
            "{site}: its own model scores {}, the version as it arrived {arrived}",
            own[site]
        );
    }
    contributions
}

/// Ditto end to end: each site trains a model of its own beside the global one. The sites'
/// evaluations of a version score their own models, so they differ from the scores the same
/// global model gets at the same sites before the next round's training (the contributions'
/// `evaluation`), which without Ditto are the same model on the same images.
#[test]
fn a_simulation_personalises_with_ditto() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, report) = simulate_edited(
        dir.path(),
        &[(
            "strategy = \"fedavg\"",
            "strategy = \"fedavg\"\nditto = { lambda = 0.1 }",
        )],
    );
    for c in assert_the_sites_score_their_own_models(&report) {
        assert!(
            c["kept_at_site"].is_null(),
            "the whole global model is shared: {c}"
        );
    }
    let acc = final_accuracy(&report);
    assert!(acc > 0.6, "the sites' own models, above chance: {acc}");
}

/// Personalisation by fine-tuning end to end: training is that of the same experiment without
/// it (the same sites, seed and batches make the same updates and versions), and the sites'
/// evaluations of a version score their fine-tuned copies, so they differ from the scores the
/// same version gets at the same sites as it arrives for the next round (the contributions'
/// `evaluation`).
#[test]
fn a_simulation_personalises_by_fine_tuning() {
    let lineage = |report: &Value| -> Vec<String> {
        report["models"]
            .as_array()
            .expect("models")
            .iter()
            .flat_map(|m| {
                let updates = m["contributions"]
                    .as_array()
                    .expect("contributions")
                    .iter()
                    .map(|c| c["update_hash"].as_str().expect("update").to_string());
                std::iter::once(m["hash"].as_str().expect("hash").to_string()).chain(updates)
            })
            .collect()
    };
    let plain_dir = tempfile::tempdir().expect("dir");
    let (_, plain) = simulate_edited(plain_dir.path(), &[]);
    let dir = tempfile::tempdir().expect("dir");
    let (_, tuned) = simulate_edited(
        dir.path(),
        &[(
            "strategy = \"fedavg\"",
            "strategy = \"fedavg\"\nfine_tune_epochs = 2",
        )],
    );
    assert_eq!(lineage(&plain), lineage(&tuned), "training changed");
    assert_the_sites_score_their_own_models(&tuned);
    let acc = final_accuracy(&tuned);
    assert!(
        acc > 0.6,
        "the sites' fine-tuned copies, above chance: {acc}"
    );
}

/// Partial sharing end to end: the classifier stays at each site. No update in the store holds
/// it, the lineage says so, and the model keeps its own (first) values of it.
#[tokio::test]
async fn a_simulation_keeps_local_layers_at_the_sites() {
    let dir = tempfile::tempdir().expect("dir");
    let (example, report) = simulate_edited(
        dir.path(),
        &[(
            "strategy = \"fedavg\"",
            "strategy = \"fedavg\"\nlocal_layers = [\"fc\"]",
        )],
    );
    let store = store_of(&example);
    let last = &report["final_model"];
    assert_the_classifier_stayed_at_the_sites(&store, &report).await;
    // Both versions hold the same classifier: the one every site started from.
    let versions: Vec<&str> = report["models"]
        .as_array()
        .map(|v| v.iter().filter_map(|m| m["hash"].as_str()).collect())
        .unwrap_or_default();
    let fc = |w: &consilium_core::aggregate::Weights| w["fc.weight"].data.clone();
    let final_fc = fc(&stored_weights(&store, last["hash"].as_str().expect("hash")).await);
    for v in &versions {
        assert!(
            fc(&stored_weights(&store, v).await) == final_fc,
            "version {v} changed the classifier"
        );
    }
    let acc = last["evaluation"]["global"]["accuracy"]
        .as_f64()
        .expect("accuracy");
    assert!(
        acc > 0.6,
        "the sites' personalised models, above chance: {acc}"
    );
}

/// FLOP with `local_fit_epochs`: every round each site first fits its own classifier to the
/// shared layers that arrived, then trains the whole model. The same experiment without it
/// (same sites, seed and batches) sends other updates, and still no update holds the classifier.
#[tokio::test]
async fn a_simulation_fits_the_layers_kept_at_the_sites_first() {
    let updates = |report: &Value| -> std::collections::BTreeMap<String, String> {
        report["models"][0]["contributions"]
            .as_array()
            .expect("contributions")
            .iter()
            .map(|c| {
                (
                    c["site_name"].as_str().expect("site").to_string(),
                    c["update_hash"].as_str().expect("update").to_string(),
                )
            })
            .collect()
    };
    let plain_dir = tempfile::tempdir().expect("dir");
    let (_, plain) = simulate_edited(
        plain_dir.path(),
        &[(
            "strategy = \"fedavg\"",
            "strategy = \"fedavg\"\nlocal_layers = [\"fc\"]",
        )],
    );
    let dir = tempfile::tempdir().expect("dir");
    let (example, fitted) = simulate_edited(
        dir.path(),
        &[(
            "strategy = \"fedavg\"",
            "strategy = \"fedavg\"\nlocal_layers = [\"fc\"]\nlocal_fit_epochs = 2",
        )],
    );
    let (a, b) = (updates(&plain), updates(&fitted));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.len() > 1, "{a:?}");
    for (site, hash) in &a {
        assert_ne!(
            hash, &b[site],
            "{site}: fitting its classifier first changed nothing"
        );
    }
    assert_the_classifier_stayed_at_the_sites(&store_of(&example), &fitted).await;
    let acc = final_accuracy(&fitted);
    assert!(
        acc > 0.6,
        "the sites' personalised models, above chance: {acc}"
    );
}

#[tokio::test]
async fn a_simulation_sums_masked_updates_under_secure_aggregation() {
    let dir = tempfile::tempdir().expect("dir");
    let (example, report) = simulate_edited(
        dir.path(),
        &[(
            "min_sites = 2",
            "min_sites = 3\n[plan.privacy]\nsecure_aggregation = true\nclip_norm = 1.0\nnoise_multiplier = 0.001",
        )],
    );
    let last = &report["final_model"];
    let record = &last["secure_aggregation"];
    assert_eq!(record["summed"].as_array().map(Vec::len), Some(3), "{last}");
    assert_eq!(record["dropped"], serde_json::json!([]));
    // Three sites: two neighbours each, and two of the three holders rebuild a secret.
    assert_eq!(
        (record["neighbours"].as_u64(), record["threshold"].as_u64()),
        (Some(2), Some(2))
    );
    // Each site added σ·C/√t: the sum of three carries σ·C·√(3/2).
    let noise = record["noise_std"].as_f64().expect("noise");
    assert!((noise - 0.001 * 1.5f64.sqrt()).abs() < 1e-9, "{noise}");
    let store = store_of(&example);
    for c in last["contributions"].as_array().expect("contributions") {
        let masked = store
            .get(c["update_hash"].as_str().expect("hash"))
            .await
            .expect("the masked input");
        assert!(
            consilium_backend::engine::weights::from_safetensors(&masked).is_err(),
            "a masked input, not the site's weights"
        );
    }
    let acc = last["evaluation"]["global"]["accuracy"]
        .as_f64()
        .expect("accuracy");
    assert!(acc > 0.6, "it trains: {acc}");
}

/// Segmentation end to end: the example's sites hold phantoms with lesion masks; a U-Net is
/// trained over them and every evaluation speaks Dice, IoU and HD95, at each site and for the
/// model as a whole.
#[test]
fn a_simulation_segments_lesions_with_a_unet_scored_by_dice() {
    let dir = tempfile::tempdir().expect("dir");
    let example = dir.path().join("segmentation");
    let (code, out, err) = consilium(&[
        "simulate",
        "--example-segmentation",
        example.to_str().expect("path"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let config = example.join("experiment.toml");
    let mask = example.join("sites/north/img00000_mask.png");
    assert!(mask.exists(), "the example writes each image's mask");
    let (code, out, err) = consilium(&["simulate", "--config", config.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("global Dice"), "{out}");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(example.join("simulation-report.json")).expect("report"),
    )
    .expect("JSON report");
    assert_eq!(report["run"]["status"], "completed");
    let models = report["models"].as_array().expect("models");
    assert_eq!(models.len(), 5);
    let dice = |m: &Value| {
        m["evaluation"]["global"]["segmentation"]["mean_dice"]
            .as_f64()
            .unwrap_or_else(|| panic!("a Dice: {m}"))
    };
    let (first, last) = (dice(&models[0]), dice(&models[4]));
    // All background would score 0; the lesions are found, and better after training on.
    assert!(last > 0.6, "the final model's Dice: {last}");
    assert!(
        last > first,
        "Dice {first} after round 1, {last} after round 5"
    );
    let global = &models[4]["evaluation"]["global"];
    assert!(global["auroc"].is_null(), "{global}");
    let seg = &global["segmentation"];
    assert_eq!(
        seg["dice"].as_array().map(Vec::len),
        Some(1),
        "one foreground class: {seg}"
    );
    assert!(
        seg["mean_iou"]
            .as_f64()
            .is_some_and(|v| v > 0.0 && v <= last),
        "{seg}"
    );
    assert!(seg["hd95"].as_f64().is_some_and(|v| v >= 0.0), "{seg}");
    // Each site's own evaluation, and each contribution's, carry their Dice too.
    for site in models[4]["evaluation"]["sites"].as_array().expect("sites") {
        assert!(
            site["metrics"]["segmentation"]["mean_dice"]
                .as_f64()
                .is_some(),
            "{site}"
        );
    }
    for c in models[4]["contributions"]
        .as_array()
        .expect("contributions")
    {
        assert!(
            c["evaluation"]["segmentation"]["mean_dice"]
                .as_f64()
                .is_some(),
            "{c}"
        );
    }
}
