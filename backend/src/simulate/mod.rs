//! `consilium simulate --config experiment.toml`: a researcher tries a training plan on
//! local folders before asking for approval. Each folder plays one site; the run goes through
//! the same governance, orchestrator, broker, workers and aggregation as a real one, in a
//! database and artifact folder of the simulation's own (recreated every time), so nothing
//! it produces can reach a production registry. Results go to the terminal and a JSON report.

pub mod attacks;

use consilium_core::Role;
use consilium_core::attack::Attack;
use consilium_core::manifest::TrainingPlanManifest;
use consilium_worker::artifacts::SiteArtifacts;
use consilium_worker::data::{self, DatasetSpec};
use consilium_worker::decode::Decoder;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

use crate::audit;
use crate::configuration::Settings;
use crate::demo::{self, Scenario};
use crate::domain::Actor;
use crate::startup::Application;

/// An experiment file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// What is being tried (shown in the audit trail and the report).
    pub name: String,
    /// The simulation's own folder: database, artifacts, site worker state. Recreated.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where the JSON report goes.
    #[serde(default = "default_report")]
    pub report: PathBuf,
    /// How long a round waits for the simulated sites.
    #[serde(default = "default_timeout")]
    pub round_timeout_seconds: u64,
    /// The training plan, exactly as it would be submitted for approval.
    pub plan: TrainingPlanManifest,
    /// One entry per simulated site: a name and a dataset any site worker could read.
    pub sites: Vec<SimulatedSite>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedSite {
    pub name: String,
    pub dataset: DatasetSpec,
    /// A simulated attack by this site (`[sites.attack]`, `kind = "sign_flip"`, …): what a
    /// poisoned or broken site would send. Simulations only.
    #[serde(default)]
    pub attack: Option<Attack>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data/simulation")
}
fn default_report() -> PathBuf {
    PathBuf::from("simulation-report.json")
}
fn default_timeout() -> u64 {
    600
}

/// Which ready-to-run example `consilium simulate` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Example {
    /// Phantoms with or without a lesion, a classifier (`--example`).
    Classification,
    /// Phantoms with lesion masks, a U-Net (`--example-segmentation`).
    Segmentation,
}

/// The classification example's name and plan.
const CLASSIFICATION_PLAN: &str = r#"name = "Lesion classifier, first try"
data_dir = "run"                  # the simulation's own database and artifacts (recreated)
report = "simulation-report.json"
round_timeout_seconds = 600

# The training plan, exactly as it will be submitted for approval.
[plan]
local_epochs = 2
batch_size = 16
rounds = 3
seed = 1
[plan.model]
architecture = "small_cnn"       # or "resnet", "unet"
num_classes = 2
[plan.preprocessing]
image_size = 28
normalisation = "zscore"
[plan.optimiser]
name = "adamw"                   # or "sgd" (with momentum)
learning_rate = 0.003
weight_decay = 0.0001
[plan.aggregation]
strategy = "fedavg"              # fedadam, fedyogi, fednova (sgd), fedcostwavg, median, trimmed_mean, krum, multi_krum, bulyan, dos
min_sites = 2
"#;

/// The segmentation example's name and plan: a U-Net stopped and scored by Dice.
const SEGMENTATION_PLAN: &str = r#"name = "Lesion segmentation, first try"
data_dir = "run"                  # the simulation's own database and artifacts (recreated)
report = "simulation-report.json"
round_timeout_seconds = 600

# The training plan, exactly as it will be submitted for approval.
[plan]
local_epochs = 3
batch_size = 8
rounds = 5
seed = 1
[plan.model]
architecture = "unet"
num_classes = 2
labels = { "0" = "background", "1" = "lesion" }   # mask value = class name
hyper_parameters = { widths = [8, 16, 32], norm = "batch", upsampling = "transposed" }
[plan.preprocessing]
image_size = 32
normalisation = "zscore"
augmentations = ["flip"]
[plan.optimiser]
name = "adamw"
learning_rate = 0.01
weight_decay = 0.0001
[plan.aggregation]
strategy = "fedavg"              # fedprox (optimiser.proximal_mu), fedcostwavg, fedbn, …
min_sites = 2
"#;

impl Example {
    /// The example's name, settings and `[plan]`, as its experiment file begins.
    fn head(self) -> &'static str {
        match self {
            Example::Classification => CLASSIFICATION_PLAN,
            Example::Segmentation => SEGMENTATION_PLAN,
        }
    }

    /// The example's training plan, as `consilium simulate` submits it (the recipe other
    /// tools and tests start from).
    pub fn plan(self) -> anyhow::Result<TrainingPlanManifest> {
        #[derive(Deserialize)]
        struct Head {
            plan: TrainingPlanManifest,
        }
        let head: Head = figment::Figment::from(
            <figment::providers::Toml as figment::providers::Format>::string(self.head()),
        )
        .extract()?;
        Ok(head.plan)
    }
}

/// Writes a ready-to-run experiment into `dir`: three site folders of synthetic
/// chest-radiograph phantoms (PNG with a labels CSV; for segmentation a PNG mask of each
/// lesion beside its image, paired by the CSV) and `experiment.toml` naming them.
pub fn write_example(dir: &Path, scale: u32, kind: Example) -> anyhow::Result<PathBuf> {
    let mut sites = String::new();
    for (key, mut profile) in consilium_worker::synthetic::demo_sites(1) {
        let folder = dir.join("sites").join(key);
        if folder.exists() {
            std::fs::remove_dir_all(&folder)?;
        }
        let dataset = match kind {
            Example::Classification => {
                profile.images *= scale.max(1) as usize;
                consilium_worker::synthetic::write_site(&folder, 32, &profile)?;
                format!(
                    r#"kind = "images"              # or "dicom", "nifti"
root = "sites/{key}"
labels = "sites/{key}/labels.csv"
label_key = "path"           # or "sop_instance_uid" for DICOM"#
                )
            }
            Example::Segmentation => {
                profile.images = profile.images * scale.max(1) as usize / 2;
                // Most images show a lesion to outline.
                profile.lesion_fraction = profile.lesion_fraction.max(0.7);
                consilium_worker::synthetic::write_segmentation_site(&folder, 32, &profile)?;
                format!(
                    r#"kind = "images"              # or "nifti" (label volumes), "dicom" (with NIfTI or PNG masks)
root = "sites/{key}"
labels = "sites/{key}/labels.csv"   # image,mask: each image's mask, relative to root
masks = true"#
                )
            }
        };
        sites.push_str(&format!(
            "\n[[sites]]\nname = \"{key}\"\n[sites.dataset]\n{dataset}\nholdout = 0.25\n"
        ));
    }
    let plan = kind.head();
    let path = dir.join("experiment.toml");
    std::fs::write(
        &path,
        format!(
            "# A local simulation: `consilium simulate --config {}`\n{plan}{sites}",
            path.display()
        ),
    )?;
    Ok(path)
}

/// Reads and checks an experiment file; relative paths are taken from the file's folder.
pub fn load(path: &Path) -> anyhow::Result<Experiment> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the experiment file {}: {e}", path.display()))?;
    let mut exp: Experiment = figment::Figment::from(<figment::providers::Toml as figment::providers::Format>::string(&text))
        .extract()
        .map_err(|e| {
        anyhow::anyhow!(
            "the experiment file {} is not valid: {e}\nIt needs `name`, a `[plan]` table (the training plan manifest) and one or more `[[sites]]` with a `name` and a `[sites.dataset]`; see the README's \"Local simulation\".",
            path.display()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    resolve(&mut exp.data_dir);
    resolve(&mut exp.report);
    let mut problems = Vec::new();
    if exp.name.trim().is_empty() {
        problems.push("`name` is empty".to_string());
    }
    if exp.sites.is_empty() {
        problems.push("there is no `[[sites]]` entry: add at least one site folder".to_string());
    }
    let mut names = HashSet::new();
    for s in &mut exp.sites {
        resolve(&mut s.dataset.root);
        resolve(&mut s.dataset.labels);
        if s.name.trim().is_empty() {
            problems.push("a site has an empty `name`".to_string());
        } else if !names.insert(s.name.trim().to_lowercase()) {
            problems.push(format!("the site name {:?} appears twice", s.name));
        }
        if !s.dataset.root.is_dir() {
            problems.push(format!(
                "site {:?}: the folder {} does not exist",
                s.name,
                s.dataset.root.display()
            ));
        }
        if let Some(problem) = s.attack.as_ref().and_then(Attack::problem) {
            problems.push(format!("site {:?}: [sites.attack] {problem}", s.name));
        }
        if exp.plan.privacy.secure_aggregation
            && s.attack
                .as_ref()
                .is_some_and(|a| !matches!(a, Attack::LabelFlip {}))
        {
            problems.push(format!(
                "site {:?}: [sites.attack] rewrites the site's update, which secure aggregation masks before it leaves: use the label_flip attack, or set plan.privacy.secure_aggregation = false",
                s.name
            ));
        }
        if !s.dataset.labels.is_file() {
            problems.push(format!(
                "site {:?}: the labels file {} does not exist",
                s.name,
                s.dataset.labels.display()
            ));
        }
    }
    if !exp.sites.is_empty() && exp.sites.iter().all(|s| s.attack.is_some()) {
        problems.push(
            "every site has an [sites.attack]: leave at least one honest site to attack".into(),
        );
    }
    problems.extend(
        exp.plan
            .problems()
            .into_iter()
            .map(|e| format!("plan: {e}")),
    );
    if !problems.is_empty() {
        anyhow::bail!(
            "the experiment file {} can't be run:\n  - {}",
            path.display(),
            problems.join("\n  - ")
        );
    }
    Ok(exp)
}

/// The namespace of an experiment's site ids: its sites get the same ids in every simulation
/// of it (UUID v5 of this and the site's name), and each site's batch order mixes in its id,
/// so a plan's seed gives the same model twice. The simulation's database is its own, so no
/// id can meet a production site's.
pub fn site_namespace(experiment: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("urn:consilium:simulation:{experiment}").as_bytes(),
    )
}

/// Which simulated sites attacked, and how (the report and the audit trail say it).
fn attacks_of(exp: &Experiment) -> Vec<serde_json::Value> {
    exp.sites
        .iter()
        .filter_map(|s| {
            s.attack.as_ref().map(
                |a| serde_json::json!({"site": s.name, "attack": a, "description": a.describe()}),
            )
        })
        .collect()
}

/// Runs the experiment; returns the exit code (0 when the run completed).
pub async fn run(
    mut settings: Settings,
    config: &Path,
    example: Option<(&Path, Example)>,
    scale: u32,
) -> anyhow::Result<i32> {
    if let Some((dir, kind)) = example {
        let path = write_example(dir, scale, kind)?;
        println!(
            "Wrote an example experiment with three synthetic sites: {}",
            path.display()
        );
        println!(
            "Run it with: consilium simulate --config {}",
            path.display()
        );
        return Ok(0);
    }
    let exp = load(config)?;
    let plan = exp
        .plan
        .parse()
        .map_err(|p| anyhow::anyhow!("the plan: {}", p.join("; ")))?;
    let size = plan.image_size;
    println!("Simulation {:?} ({}):", exp.name, config.display());
    let mut cases = Vec::new();
    for s in &exp.sites {
        let ds = data::load(&s.dataset, size, &Decoder::this_program()?)
            .map_err(|e| anyhow::anyhow!("site {:?}: its data can't be read: {e}", s.name))?;
        println!("  {:<16} {}", s.name, ds.summary(s.dataset.kind));
        if let Some(a) = &s.attack {
            println!("      ATTACKS (simulated): {}", a.describe());
        }
        for skipped in ds.skipped.iter().take(5) {
            println!("      skipped {}: {}", skipped.file, skipped.reason);
        }
        let (train, holdout) = (ds.train().count(), ds.holdout().count());
        if train == 0 || holdout == 0 {
            anyhow::bail!(
                "site {:?} has {train} training and {holdout} held-out images; it needs both (check the labels file and `holdout`)",
                s.name
            );
        }
        cases.push(ds.samples.len() as u32);
    }
    println!();

    // The simulation's own embedded stack, whatever the configuration says about production.
    let db_file = exp.data_dir.join("consilium.db");
    let artifacts = exp.data_dir.join("artifacts");
    for old in [&db_file] {
        if old.exists() {
            std::fs::remove_file(old)?;
        }
    }
    // The last run's models must not mix with this one's: a folder that cannot be cleared
    // stops the simulation with the reason.
    match std::fs::remove_dir_all(&artifacts) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => anyhow::bail!(
            "the last simulation's artifacts in {} cannot be removed ({e}): remove the folder or choose another data_dir",
            artifacts.display()
        ),
        _ => {}
    }
    settings.database.url = None;
    settings.database.data_dir = exp.data_dir.clone();
    settings.server.host = "127.0.0.1".into();
    settings.server.port = 0;
    settings.auth.oidc = None;
    settings.auth.local_accounts = Some(false);
    settings.engine.broker_url = None;
    settings.engine.artifacts = None;
    settings.engine.round_timeout_seconds = exp.round_timeout_seconds;
    let app = Application::build(settings).await?;
    let ctx = app.context.clone();
    let broker = app.broker.clone();
    let url = format!("http://127.0.0.1:{}", app.port());
    let server = tokio::spawn(app.run_until_stopped());

    let person = |local: &str, name: &str, role| {
        (format!("{local}@simulation.local"), name.to_string(), role)
    };
    let mut people = vec![
        person(
            "administrator",
            "Simulation administrator",
            Role::Administrator,
        ),
        person("researcher", "Simulation researcher", Role::Researcher),
        person("committee", "Simulation committee", Role::CommitteeMember),
    ];
    let mut sites = Vec::new();
    for (i, s) in exp.sites.iter().enumerate() {
        let (email, name, role) = person(
            &format!("custodian-{}", i + 1),
            &format!("Simulated custodian of {}", s.name),
            Role::Custodian,
        );
        sites.push((s.name.clone(), email.clone(), cases[i]));
        people.push((email, name, role));
    }
    let walked = demo::walk_through(
        &ctx,
        Scenario {
            people,
            sites,
            title: format!("[simulation] {}", exp.name),
            purpose: "A local simulation of a training plan; not for production data.".into(),
            manifest: exp.plan.clone(),
            password: None,
            narrate: true,
            site_namespace: Some(site_namespace(&exp.name)),
        },
    )
    .await?;
    let details = serde_json::json!({
        "simulation": true,
        "experiment": exp.name,
        "config": config.display().to_string(),
        "plan_hash": walked.plan_hash,
        "sites": exp.sites.iter().map(|s| serde_json::json!({
            "name": s.name, "kind": format!("{:?}", s.dataset.kind).to_lowercase(), "root": s.dataset.root.display().to_string(),
        })).collect::<Vec<_>>(),
        "attacks": attacks_of(&exp),
    });
    {
        let w = ctx.begin_write().await?;
        audit::append(
            &*w,
            &Actor::system(),
            "simulation.started",
            "study",
            walked.study,
            &details,
        )
        .await?;
        w.commit().await?;
    }
    // A label-flipping site reads a flipped copy of its labels from the simulation's folder.
    let mut specs = Vec::new();
    for (i, ((id, name), s)) in walked.sites.iter().zip(&exp.sites).enumerate() {
        let mut dataset = s.dataset.clone();
        if let (Some(Attack::LabelFlip {}), true) = (&s.attack, s.dataset.masks) {
            anyhow::bail!(
                "site {:?}: the label_flip attack flips classes in a labels CSV, and this site's CSV pairs images with masks: choose another attack",
                s.name
            );
        }
        if let Some(Attack::LabelFlip {}) = s.attack {
            let flipped = exp
                .data_dir
                .join("attacks")
                .join(format!("site-{}-labels.csv", i + 1));
            attacks::flip_labels(&s.dataset.labels, &flipped, plan.num_classes as u32)?;
            dataset.labels = flipped;
        }
        specs.push((*id, name.clone(), dataset));
    }
    let board = Arc::new(attacks::Board::default());
    let attackers = exp.sites.iter().filter(|s| s.attack.is_some()).count();
    let attack_of: HashMap<Uuid, Option<Attack>> = walked
        .sites
        .iter()
        .zip(&exp.sites)
        .map(|((id, _), s)| (*id, s.attack.clone()))
        .collect();
    let sites_count = exp.sites.len();
    let wrap = move |site: Uuid, inner: Arc<dyn SiteArtifacts>| -> Arc<dyn SiteArtifacts> {
        Arc::new(attacks::Simulated {
            inner,
            attack: attack_of.get(&site).cloned().flatten(),
            board: board.clone(),
            sites: sites_count,
            attackers,
        })
    };
    demo::start_workers(&ctx, &broker, &url, specs, Decoder::this_program()?, &wrap).await?;
    let result = demo::follow(&ctx, &walked).await?;
    server.abort();

    let report = serde_json::json!({
        "simulation": true,
        "note": "A local simulation: its database, models and audit trail live in data_dir only and never enter a production registry.",
        "experiment": exp.name,
        "config": config.display().to_string(),
        "data_dir": exp.data_dir.display().to_string(),
        "plan_hash": walked.plan_hash,
        "attacks": attacks_of(&exp),
        "seconds": result.seconds,
        "run": result.run,
        "rounds": result.rounds,
        "models": result.versions,
        "final_model": result.versions.last(),
        "audit": result.audit,
    });
    if let Some(dir) = exp.report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&exp.report, serde_json::to_string_pretty(&report)?)?;
    println!();
    println!("Report: {}", exp.report.display());
    if result.run.status == "completed" {
        Ok(0)
    } else {
        eprintln!(
            "error: the simulated run ended {}: {}",
            result.run.status,
            result.run.stop_reason.unwrap_or_default()
        );
        Ok(1)
    }
}
