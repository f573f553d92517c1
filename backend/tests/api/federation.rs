//! The server and three site workers as separate processes, over the real RabbitMQ and
//! PostgreSQL, through what goes wrong in hospitals: a worker killed in the middle of a job,
//! the server restarted in the middle of a round, the broker's connections dropped, a
//! malformed message on the results queue, a job carrying an altered plan and a job not signed
//! by the server. Each worker connects as its own site's broker user (`consilium admin
//! broker-user`), pins the server's key (`consilium admin server-key`) and holds no
//! artifact-store credentials.
//!
//! Needs the worker binary next to the server's (`cargo build -p consilium-worker`; `cargo
//! test --workspace` builds it) and `rabbitmqctl` (each run gets its own virtual host).

use crate::engine::{approved_study_at, engine_manifest, segmentation_plan, worker_token};
use crate::helpers::*;

use consilium_core::Role;
use consilium_core::protocol::{Job, JobKind, JobResult, Outcome, WorkerMessage};
use consilium_worker::broker::{Broker, RabbitBroker};
use consilium_worker::synthetic::{SiteProfile, write_segmentation_site, write_site};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

fn binary(name: &str) -> PathBuf {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_consilium"));
    let path = server.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p consilium-worker`",
        path.display()
    );
    path
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl (installed with rabbitmq-server) runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A RabbitMQ virtual host of this test's own, deleted afterwards.
pub struct Vhost(String);

impl Vhost {
    pub fn new() -> Self {
        let name = format!("consilium-test-{}", Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost(name)
    }
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

/// A child process, killed when dropped; its output goes to a log file shown on failure.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = cmd
            .env_remove("CONSILIUM_TEST_PG")
            .env_remove("CONSILIUM_CONFIG")
            .stdout(Stdio::from(file.try_clone().expect("log file")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("the process starts");
        Proc { child, log }
    }

    /// SIGKILL: no chance to finish the job or say goodbye.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    dir: PathBuf,
    port: u16,
    database_url: String,
    broker_url: String,
    round_timeout: u64,
}

impl Cluster {
    fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn server_command(&self) -> Command {
        let mut cmd = Command::new(binary("consilium"));
        cmd.env_remove("CONSILIUM_TEST_PG")
            .env_remove("CONSILIUM_CONFIG")
            .env("CONSILIUM_DATABASE__URL", &self.database_url)
            .env("CONSILIUM_DATABASE__DATA_DIR", self.dir.join("server"))
            .env("CONSILIUM_ENGINE__BROKER_URL", &self.broker_url);
        cmd
    }

    /// `consilium admin …` as the server's administrator runs it; what it prints.
    fn admin(&self, args: &[&str]) -> String {
        let out = self
            .server_command()
            .arg("admin")
            .args(args)
            .output()
            .expect("consilium admin runs");
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "consilium admin {args:?}: {printed}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        printed
    }

    fn start_server(&self, n: usize) -> Proc {
        let mut cmd = self.server_command();
        cmd.arg("serve")
            .env("CONSILIUM_SERVER__HOST", "127.0.0.1")
            .env("CONSILIUM_SERVER__PORT", self.port.to_string())
            .env("CONSILIUM_DATABASE__URL", &self.database_url)
            .env("CONSILIUM_DATABASE__DATA_DIR", self.dir.join("server"))
            .env("CONSILIUM_ENGINE__BROKER_URL", &self.broker_url)
            .env("CONSILIUM_ENGINE__ARTIFACTS", self.dir.join("artifacts"))
            .env(
                "CONSILIUM_ENGINE__ROUND_TIMEOUT_SECONDS",
                self.round_timeout.to_string(),
            )
            .env("CONSILIUM_LOG__LEVEL", "info");
        Proc::spawn(cmd, self.dir.join(format!("server-{n}.log")))
    }

    fn start_worker(&self, config: &Path, n: usize) -> Proc {
        let mut cmd = Command::new(binary("consilium-worker"));
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_LOG", "info");
        Proc::spawn(cmd, self.dir.join(format!("worker-{n}.log")))
    }
}

async fn wait_healthy(client: &reqwest::Client, address: &str, server: &Proc) {
    for _ in 0..240 {
        if let Ok(r) = client.get(format!("{address}/health")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the server did not start:\n{}", server.tail());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn get(client: &reqwest::Client, url: String, auth: &Person) -> Value {
    let resp = client
        .get(&url)
        .bearer_auth(token(auth))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    resp.json().await.expect("json")
}

/// Polls until `ready` holds for the run's rounds (or panics with the logs after `secs`).
async fn wait_rounds(
    client: &reqwest::Client,
    c: &Cluster,
    run: &str,
    who: &Person,
    secs: u64,
    what: &str,
    ready: impl Fn(&[Value]) -> bool,
) {
    for _ in 0..secs * 5 {
        if let Ok(resp) = client
            .get(format!("{}/api/v1/runs/{run}/rounds", c.address()))
            .bearer_auth(token(who))
            .send()
            .await
            && let Ok(rounds) = resp.json::<Vec<Value>>().await
            && ready(&rounds)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what} did not happen within {secs} s");
}

fn round_in(rounds: &[Value], number: u64, state: &str) -> bool {
    rounds
        .iter()
        .any(|r| r["number"] == number && r["state"] == state)
}

/// Waits until the site's worker reports that it is training.
async fn wait_training(client: &reqwest::Client, c: &Cluster, site: Uuid, who: &Person) {
    for _ in 0..600 {
        if let Ok(resp) = client
            .get(format!("{}/api/v1/sites/{site}/heartbeat", c.address()))
            .bearer_auth(token(who))
            .send()
            .await
            && let Ok(h) = resp.json::<Value>().await
            && h["state"] == "training"
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = client
        .get(format!("{}/api/v1/sites/{site}/heartbeat", c.address()))
        .bearer_auth(token(who))
        .send()
        .await;
    let last = match last {
        Ok(r) => r
            .text()
            .await
            .unwrap_or_else(|e| format!("(unreadable: {e})")),
        Err(e) => format!("(the server did not answer: {e})"),
    };
    panic!("site {site}'s worker never reported training; its last heartbeat: {last}");
}

/// A server's configuration and the sites' workers' (data, keys registered by their
/// custodians, broker users), ready to start.
struct Provisioned {
    cluster: Cluster,
    configs: Vec<PathBuf>,
    key_files: Vec<PathBuf>,
    site_brokers: Vec<String>,
}

async fn provision(
    app: &TestApp,
    sites: &[(Uuid, &Person)],
    dir: &Path,
    vhost: &Vhost,
    round_timeout: u64,
    profile: impl Fn(usize) -> SiteProfile,
    masks: bool,
) -> Provisioned {
    let c = Cluster {
        dir: dir.to_path_buf(),
        port: free_port(),
        database_url: app.database_url().expect("PostgreSQL"),
        broker_url: vhost.url(),
        round_timeout,
    };
    // The server's public key, as its administrator hands it to the hospitals.
    let server_key = c
        .admin(&["server-key"])
        .lines()
        .find_map(|l| l.strip_prefix("Public key: "))
        .expect("server-key prints the public key")
        .trim()
        .to_string();
    let mut configs = Vec::new();
    let mut key_files = Vec::new();
    let mut site_brokers = Vec::new();
    for (i, (site, custodian)) in sites.iter().enumerate() {
        let data = c.dir.join(format!("site-{i}"));
        if masks {
            write_segmentation_site(&data, 32, &profile(i)).expect("synthetic data");
        } else {
            write_site(&data, 32, &profile(i)).expect("synthetic data");
        }
        let worker_token = worker_token(app, *site, custodian).await;
        // The site's key, made by the shipped worker binary; its public half registered by the
        // site's custodian through the REST API, from what `keygen` printed.
        let key_file = c.dir.join(format!("site-{i}.key"));
        let keygen = Command::new(binary("consilium-worker"))
            .args(["keygen", "--out"])
            .arg(&key_file)
            .output()
            .expect("keygen runs");
        let printed = String::from_utf8_lossy(&keygen.stdout).into_owned();
        assert!(keygen.status.success(), "{printed}");
        let public = printed
            .lines()
            .find_map(|l| l.strip_prefix("Public key: "))
            .expect("keygen prints the public key")
            .trim()
            .to_string();
        let session = Auth::Cookie(app.sign_in(&custodian.email).await);
        app.post(
            &format!("/api/v1/sites/{site}/keys"),
            &session,
            json!({"public_key": public, "name": format!("worker {i}")}),
        )
        .await
        .expect(201);
        key_files.push(key_file.clone());
        // The site's own broker user, made by the administrator.
        let printed = c.admin(&["broker-user", "--site", &site.to_string()]);
        let site_broker = printed
            .lines()
            .find_map(|l| l.trim().strip_prefix("broker_url = "))
            .expect("broker-user prints the worker's broker_url")
            .trim_matches('"')
            .to_string();
        assert!(
            site_broker.contains(&format!("consilium-site-{site}")),
            "{printed}"
        );
        site_brokers.push(site_broker.clone());
        let config = c.dir.join(format!("worker-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"site_id = "{site}"
server_url = "{server}"
token = "{worker_token}"
broker_url = "{broker}"
server_public_key = "{server_key}"
signing_key = "{key}"
heartbeat_seconds = 1

[dataset]
kind = "images"
root = "{root}"
labels = "{labels}"
holdout = 0.25
masks = {masks}
"#,
                server = c.address(),
                broker = site_broker,
                key = key_file.display(),
                root = data.display(),
                labels = data.join("labels.csv").display(),
            ),
        )
        .expect("worker config");
        configs.push(config);
    }

    Provisioned {
        cluster: c,
        configs,
        key_files,
        site_brokers,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_train_through_failures() {
    let vhost = Vhost::new();
    // The governance is set up through the API of an in-process server on the same database;
    // the run itself is driven by the server process.
    let app = spawn_app(Db::Postgres).await;
    let w = world(&app).await;
    let custodian_c = app.person("cleo@east.test", &[Role::Custodian]).await;
    let site_c: Uuid = app
        .post(
            "/api/v1/sites",
            &w.admin.auth,
            json!({"name": "East Clinic", "custodians": [custodian_c.id]}),
        )
        .await
        .expect(201)["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("site id");
    let sites = [
        (w.site_a, &w.custodian_a),
        (w.site_b, &w.custodian_b),
        (site_c, &custodian_c),
    ];
    let mut manifest = engine_manifest(4);
    // Long enough local training for a worker and the server to be killed in the middle of it.
    manifest["local_epochs"] = json!(40);
    let (sid, hash) = approved_study_at(&app, &w, manifest, &sites).await;

    let tmp = tempfile::tempdir().expect("dir");
    let profile = |i: usize| SiteProfile {
        images: 160,
        lesion_fraction: [0.5, 0.4, 0.3][i],
        gain: 1.0,
        offset: 0.0,
        noise: 0.03 + 0.02 * i as f32,
        blur: 0,
        seed: i as u64 + 1,
    };
    let Provisioned {
        cluster: c,
        configs,
        key_files,
        site_brokers,
    } = provision(&app, &sites, tmp.path(), &vhost, 150, profile, false).await;
    let mut server = c.start_server(1);
    wait_healthy(&app.client, &c.address(), &server).await;
    let mut workers: Vec<Proc> = configs
        .iter()
        .enumerate()
        .map(|(i, cfg)| c.start_worker(cfg, i))
        .collect();

    // Garbage on the results queue: dead-lettered, and the server runs on.
    let rabbit = RabbitBroker::connect(&c.broker_url)
        .await
        .expect("RabbitMQ at 127.0.0.1:5672");
    rabbit
        .publish_raw_result(b"{\"not\": \"a worker message\"")
        .await
        .expect("published");
    // A well-formed result, signed by the first site and sent as its broker user, for a run
    // this server never had: dead-lettered too, not retried.
    let first_key = consilium_worker::identity::load(&key_files[0]).expect("site key");
    let never = consilium_core::signing::sign(
        &first_key,
        &WorkerMessage::Result(JobResult {
            job_id: Uuid::new_v4(),
            kind: None,
            run_id: Uuid::new_v4(),
            round: 1,
            site_id: w.site_a,
            outcome: Outcome::Failed {
                reason: "no such run".into(),
            },
        }),
    )
    .expect("signed");
    RabbitBroker::connect_site(&site_brokers[0])
        .await
        .expect("the first site's broker user connects")
        .publish_message(&never)
        .await
        .expect("published");

    let run = app
        .client
        .post(format!("{}/api/v1/studies/{sid}/runs", c.address()))
        .bearer_auth(token(&w.researcher))
        .json(&json!({}))
        .send()
        .await
        .expect("start run");
    assert_eq!(run.status(), 201, "{}", server.tail());
    let run: Value = run.json().await.expect("run");
    let rid = id_of(&run);
    let run_id: Uuid = rid.parse().expect("run id");

    // A job whose plan was altered after approval (the learning rate), sent straight to the
    // first site's queue under the approved hash: the worker refuses it.
    let mut altered: consilium_core::manifest::TrainingPlanManifest =
        serde_json::from_value(engine_manifest(4)).expect("manifest");
    altered.optimiser.learning_rate = 0.5;
    let forged = Job {
        protocol: consilium_core::protocol::PROTOCOL_VERSION,
        job_id: Uuid::new_v4(),
        kind: JobKind::Train,
        run_id,
        round: 1,
        study_id: sid.parse().expect("study id"),
        site_id: w.site_a,
        plan_hash: hash.clone(),
        manifest: altered,
        files: vec![],
        global_model: None,
        deadline: chrono::Utc::now() + chrono::Duration::minutes(5),
        preview: None,
        correction: None,
    };
    // Signed with the server's own key (taken from its file: a server that altered the plan),
    // it still fails the worker's plan check.
    let server_signer = consilium_worker::identity::load(&c.dir.join("server/server-signing.key"))
        .expect("the server's key");
    consilium_worker::broker::send_job(&rabbit, &server_signer, &forged)
        .await
        .expect("published");
    // A job signed with any other key (someone with access to the broker, not the server):
    // refused unread, dead-lettered, and reported by the site.
    let impostor = consilium_core::signing::SigningKey::generate(&mut rand::rngs::OsRng);
    let mut unsigned = forged.clone();
    unsigned.job_id = Uuid::new_v4();
    consilium_worker::broker::send_job(&rabbit, &impostor, &unsigned)
        .await
        .expect("published");

    // Round 1: the third site's worker is killed in the middle of its job and started again;
    // RabbitMQ delivers the unacknowledged job to it once more.
    wait_rounds(&app.client, &c, &rid, &w.researcher, 120, "round 1", |r| {
        round_in(r, 1, "collecting")
    })
    .await;
    wait_training(&app.client, &c, site_c, &w.admin).await;
    workers[2].kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    workers[2] = c.start_worker(&configs[2], 3);

    // Round 2: the server is killed while the sites train, and started again.
    wait_rounds(&app.client, &c, &rid, &w.researcher, 240, "round 2", |r| {
        round_in(r, 2, "collecting")
    })
    .await;
    wait_training(&app.client, &c, w.site_b, &w.admin).await;
    server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server = c.start_server(2);
    wait_healthy(&app.client, &c.address(), &server).await;

    // Round 3: every connection to the broker is closed under both sides' feet.
    wait_rounds(&app.client, &c, &rid, &w.researcher, 240, "round 3", |r| {
        round_in(r, 3, "collecting")
    })
    .await;
    wait_training(&app.client, &c, w.site_a, &w.admin).await;
    rabbitmqctl(&[
        "close_all_connections",
        "--vhost",
        &vhost.0,
        "test: the broker drops every connection",
    ]);

    let done = run_end(&app.client, &c, &rid, &w.researcher).await;
    let logs = || logs_of(&server, &workers);
    assert_eq!(done["status"], "completed", "{done}\n{}", logs());
    assert_eq!(done["current_round"], 4);

    // Every round closed; no site counted twice in any round, whatever was redelivered.
    let rounds = get(
        &app.client,
        format!("{}/api/v1/runs/{rid}/rounds", c.address()),
        &w.researcher,
    )
    .await;
    let rounds = rounds.as_array().expect("rounds");
    assert_eq!(rounds.len(), 4);
    for r in rounds {
        assert_eq!(r["state"], "closed", "{r}");
        let trained = r["sites"]
            .as_array()
            .expect("sites")
            .iter()
            .filter(|s| s["status"] == "trained")
            .count();
        assert!(
            trained >= 2,
            "round {} reached its quorum: {r}",
            r["number"]
        );
    }
    let models = get(
        &app.client,
        format!("{}/api/v1/models?run_id={rid}", c.address()),
        &w.researcher,
    )
    .await;
    let models = models.as_array().expect("models");
    assert_eq!(models.len(), 4, "one model version per round");
    for m in models {
        let mut hashes: Vec<&str> = m["contributions"]
            .as_array()
            .expect("contributions")
            .iter()
            .filter_map(|u| u["site_id"].as_str())
            .collect();
        let n = hashes.len();
        hashes.sort();
        hashes.dedup();
        assert_eq!(hashes.len(), n, "a site counted twice in {m}");
    }

    // The last model's lineage names all three sites' updates and the approvals.
    let last = &models[3];
    let lineage = get(
        &app.client,
        format!("{}/api/v1/models/{}/lineage", c.address(), id_of(last)),
        &w.auditor,
    )
    .await;
    let mut names: Vec<&str> = lineage["model"]["contributions"]
        .as_array()
        .expect("contributions")
        .iter()
        .filter_map(|u| u["site_name"].as_str())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["East Clinic", "North Hospital", "South Hospital"]
    );
    assert_eq!(lineage["plan"]["hash"], json!(hash));
    assert_eq!(lineage["review"]["decision"], "approve");
    assert_eq!(lineage["grants"].as_array().map(Vec::len), Some(3));
    let acc = last["evaluation"]["global"]["accuracy"]
        .as_f64()
        .expect("accuracy");
    assert!(acc > 0.7, "above chance at the sites: {acc}");

    // The malformed message, the stray result and the job not signed by the server sit in the
    // dead-letter queue.
    let reasons = rabbit.dead_letter_reasons().await.expect("dead letters");
    assert_eq!(reasons.len(), 3, "{reasons:#?}");
    let rejected = get(
        &app.client,
        format!(
            "{}/api/v1/audit/events?action=job.rejected_by_site",
            c.address()
        ),
        &w.auditor,
    )
    .await;
    assert_eq!(rejected.as_array().map(Vec::len), Some(1), "{rejected}");
    assert_eq!(rejected[0]["object_id"], json!(w.site_a), "{rejected}");

    // The altered plan was refused: round 1 lists the refusal with its reason, uncounted,
    // and the audit trail records it.
    let uncounted: Vec<&Value> = rounds[0]["not_counted"]
        .as_array()
        .expect("not_counted")
        .iter()
        .filter(|u| u["job_id"] == json!(forged.job_id))
        .collect();
    assert_eq!(uncounted.len(), 1, "{}", rounds[0]);
    assert_eq!(uncounted[0]["outcome"], "refused");
    assert!(
        uncounted[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("it was altered")),
        "{}",
        uncounted[0]
    );
    let refused = get(
        &app.client,
        format!("{}/api/v1/audit/events?action=job.refused", c.address()),
        &w.auditor,
    )
    .await;
    assert_eq!(refused.as_array().map(Vec::len), Some(1), "{refused}");
    let verify = get(
        &app.client,
        format!("{}/api/v1/audit/verify", c.address()),
        &w.auditor,
    )
    .await;
    assert_eq!(verify["ok"], true, "{verify}");
}

/// Starts the server process and a worker process per site, then the study's run as the
/// researcher: the processes and the run's id.
async fn start_run(
    app: &TestApp,
    c: &Cluster,
    configs: &[PathBuf],
    study: &str,
    researcher: &Person,
) -> (Proc, Vec<Proc>, String) {
    let server = c.start_server(1);
    wait_healthy(&app.client, &c.address(), &server).await;
    let workers: Vec<Proc> = configs
        .iter()
        .enumerate()
        .map(|(i, cfg)| c.start_worker(cfg, i))
        .collect();
    let run = app
        .client
        .post(format!("{}/api/v1/studies/{study}/runs", c.address()))
        .bearer_auth(token(researcher))
        .json(&json!({}))
        .send()
        .await
        .expect("start run");
    assert_eq!(run.status(), 201, "{}", server.tail());
    let rid = id_of(&run.json::<Value>().await.expect("run"));
    (server, workers, rid)
}

/// The run once it is no longer running (`Null` if it still is after five minutes).
async fn run_end(client: &reqwest::Client, c: &Cluster, rid: &str, who: &Person) -> Value {
    for _ in 0..1200 {
        if let Ok(r) = client
            .get(format!("{}/api/v1/runs/{rid}", c.address()))
            .bearer_auth(token(who))
            .send()
            .await
            && let Ok(v) = r.json::<Value>().await
            && v["status"] != "running"
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Value::Null
}

/// The last lines of the server's and the workers' logs, for a failure's message.
fn logs_of(server: &Proc, workers: &[Proc]) -> String {
    format!(
        "server:\n{}\nworkers:\n{}",
        server.tail(),
        workers
            .iter()
            .map(Proc::tail)
            .collect::<Vec<_>>()
            .join("\n---\n")
    )
}

/// Polls the database until the run's secure-aggregation exchanges hold a row of `stage` (of
/// `site`, or a closing when `site` is nil).
async fn wait_exchange(app: &TestApp, run: Uuid, stage: &str, site: Uuid, secs: u64) {
    use consilium_backend::entities::secagg_message;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    for _ in 0..secs * 10 {
        let found = secagg_message::Entity::find()
            .filter(secagg_message::Column::RunId.eq(run))
            .filter(secagg_message::Column::Stage.eq(stage))
            .filter(secagg_message::Column::SiteId.eq(site))
            .one(&app.ctx.db)
            .await
            .expect("the exchanges");
        if found.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {stage} row of site {site} within {secs} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_worker_processes_sum_masked_updates_through_dropouts() {
    let vhost = Vhost::new();
    let app = spawn_app(Db::Postgres).await;
    let w = world(&app).await;
    let five = crate::engine::five_sites(&app, &w).await;
    let sites: Vec<(Uuid, &Person)> = five.iter().map(|(s, c)| (*s, c)).collect();
    let mut manifest = engine_manifest(1);
    // Long enough local training for a worker to be killed in the middle of it.
    manifest["local_epochs"] = json!(30);
    manifest["aggregation"] = json!({"strategy": "fedavg", "min_sites": 3});
    manifest["privacy"] = json!({"secure_aggregation": true, "secagg": {"stage_seconds": 10}});
    let (sid, _) = approved_study_at(&app, &w, manifest, &sites).await;
    let tmp = tempfile::tempdir().expect("dir");
    let profile = |i: usize| SiteProfile {
        images: 64,
        lesion_fraction: 0.5,
        gain: 1.0,
        offset: 0.0,
        noise: 0.03,
        blur: 0,
        seed: i as u64 + 1,
    };
    let Provisioned {
        cluster: c,
        configs,
        ..
    } = provision(&app, &sites, tmp.path(), &vhost, 90, profile, false).await;
    let (server, mut workers, rid) = start_run(&app, &c, &configs, &sid, &w.researcher).await;
    let run_id: Uuid = rid.parse().expect("run id");
    let (east, west) = (sites[2].0, sites[3].0);
    // East is killed once the shares are exchanged, while it trains; West once it has sent
    // its masked input, while it waits for the others'.
    wait_exchange(&app, run_id, "shares.closed", Uuid::nil(), 120).await;
    workers[2].kill();
    wait_exchange(&app, run_id, "masked", west, 120).await;
    workers[3].kill();

    let done = run_end(&app.client, &c, &rid, &w.researcher).await;
    let logs = || logs_of(&server, &workers);
    assert_eq!(done["status"], "completed", "{done}\n{}", logs());
    let models = get(
        &app.client,
        format!("{}/api/v1/models?run_id={rid}", c.address()),
        &w.researcher,
    )
    .await;
    let record = &models[0]["secure_aggregation"];
    let summed = crate::secagg::summed_sites(record);
    assert_eq!(summed.len(), 4, "{record}\n{}", logs());
    assert!(
        summed.contains(&west) && !summed.contains(&east),
        "{record}"
    );
    assert_eq!(record["dropped"][0]["site_id"], json!(east), "{record}");
    assert_eq!(record["dropped"][0]["recovered"], true, "{record}");
    // The three sites that stayed evaluated the new model.
    let evaluated = models[0]["evaluation"]["sites"]
        .as_array()
        .map(Vec::len)
        .unwrap_or_default();
    assert_eq!(evaluated, 3, "{}", models[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_train_a_unet_scored_by_dice_in_the_lineage() {
    let vhost = Vhost::new();
    let app = spawn_app(Db::Postgres).await;
    let w = world(&app).await;
    let sites = [(w.site_a, &w.custodian_a), (w.site_b, &w.custodian_b)];
    let manifest = segmentation_plan(4);
    let (sid, hash) = approved_study_at(&app, &w, manifest, &sites).await;
    let tmp = tempfile::tempdir().expect("dir");
    let profile = |i: usize| SiteProfile {
        images: 80,
        lesion_fraction: 0.7,
        gain: [1.0, 0.8][i],
        offset: [0.0, 0.1][i],
        noise: [0.03, 0.06][i],
        blur: i,
        seed: i as u64 + 1,
    };
    let Provisioned {
        cluster: c,
        configs,
        ..
    } = provision(&app, &sites, tmp.path(), &vhost, 300, profile, true).await;
    let (server, workers, rid) = start_run(&app, &c, &configs, &sid, &w.researcher).await;
    let done = run_end(&app.client, &c, &rid, &w.researcher).await;
    let logs = || logs_of(&server, &workers);
    assert_eq!(done["status"], "completed", "{done}\n{}", logs());

    // Each round's model carries the sites' Dice, and the final one's lineage says how well
    // the U-Net outlines the lesions, under the approved plan.
    let models = get(
        &app.client,
        format!("{}/api/v1/models?run_id={rid}", c.address()),
        &w.researcher,
    )
    .await;
    let models = models.as_array().expect("models");
    assert_eq!(models.len(), 4, "{models:?}");
    let last = models
        .iter()
        .max_by_key(|m| m["round"].as_u64())
        .expect("a model");
    let lineage = get(
        &app.client,
        format!("{}/api/v1/models/{}/lineage", c.address(), id_of(last)),
        &w.researcher,
    )
    .await;
    assert_eq!(lineage["plan"]["hash"], json!(hash), "{lineage}");
    let evaluation = &lineage["model"]["evaluation"];
    let dice = evaluation["global"]["segmentation"]["mean_dice"]
        .as_f64()
        .unwrap_or_else(|| panic!("no Dice in the lineage: {evaluation}"));
    assert!(dice > 0.5, "the U-Net learnt nothing: {evaluation}");
    let sites_scored = evaluation["sites"].as_array().expect("sites");
    assert_eq!(sites_scored.len(), 2, "{evaluation}");
    for s in sites_scored {
        let scores = &s["metrics"]["segmentation"];
        assert!(scores["dice"][0].as_f64().is_some(), "{s}");
        assert!(scores["hd95"].as_f64().is_some(), "{s}");
    }
}
