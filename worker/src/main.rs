//! `consilium-worker`: one per hospital.

use clap::{Parser, Subcommand};
use consilium_worker::artifacts::ServerArtifacts;
use consilium_worker::data::{self, DatasetSpec};
use consilium_worker::decode::Decoder;
use consilium_worker::job::{ServerApprovals, SiteContext};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "consilium-worker",
    version,
    about = "The Consilium site worker: trains approved plans on this hospital's images"
)]
struct Cli {
    /// The worker's TOML configuration (also `CONSILIUM_WORKER_*` variables).
    #[arg(long, env = "CONSILIUM_WORKER_CONFIG", default_value = "worker.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connects to the broker and runs jobs until stopped.
    Run,
    /// Creates this site's signing key (Ed25519, from the operating system's generator) in a
    /// new file readable only by you, and prints the public key for the site's custodian to
    /// register. The private key never leaves this machine.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Prints what DP-SGD training has spent of this dataset's privacy (the site's own ledger),
    /// per run and in all, against the site's lifetime budget.
    Privacy,
    /// Reads the dataset and reports what is usable and what is skipped, then exits.
    CheckData {
        #[arg(long, default_value_t = 28)]
        size: usize,
    },
    /// Measures local training steps/s of a model (random data, batch 64 — 16 for unet —, SGD
    /// with momentum) with 1 thread and with all threads, each in a fresh process.
    BenchTrain {
        /// `small_cnn` (28×28 input), `resnet` (32×32) or `unet` (64×64, a random mask).
        #[arg(long, default_value = "small_cnn")]
        model: String,
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Measurements of each kind; the median is reported, with the range.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Run one measurement with this many threads (used by the parent run).
        #[arg(long, hide = true)]
        threads: Option<usize>,
        /// With candle's own kernels (the baseline; used by the parent run).
        #[arg(long, hide = true)]
        candle_conv: bool,
        /// DP-SGD (per-patient gradients, clipping and noise) next to non-private training.
        #[arg(long)]
        dp: bool,
        /// resnet's and unet's normalisation: `batch` or `group` (DP-SGD needs `group`).
        #[arg(long, default_value = "batch")]
        norm: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerSettings {
    site_id: Uuid,
    /// The Consilium server, e.g. `https://consilium.example.org`.
    server_url: String,
    /// The site's worker token (`consilium admin create-worker-token`); never printed.
    token: secrecy::SecretString,
    /// The site's signing key (`consilium-worker keygen`); its public half must be registered
    /// by the site's custodian, or the server refuses everything this worker sends. Needed to
    /// `run`; `check-data` does without.
    signing_key: Option<PathBuf>,
    /// The server's public job-signing key (`consilium admin server-key` prints it): this
    /// worker runs only jobs signed with it. Needed to `run`.
    server_public_key: Option<String>,
    /// `amqp://user:password@host:5672/%2f`, with this site's own broker user
    /// (`consilium admin broker-user`); its password never printed.
    broker_url: secrecy::SecretString,
    /// Refused: a site holds no artifact-store credentials (models come and go through the
    /// server). Kept only to say so to an old configuration.
    #[serde(default)]
    artifacts: Option<String>,
    #[serde(default = "default_heartbeat")]
    heartbeat_seconds: u64,
    /// Allows `http://` and `amqp://` to other machines (a closed development network only).
    #[serde(default)]
    allow_plain_transport: bool,
    /// The site's privacy ledger (JSON): what DP-SGD has spent of this dataset. By default
    /// `privacy-ledger.json` beside the signing key. Back it up with the key: without it the
    /// site no longer knows what its patients' data has spent.
    #[serde(default)]
    privacy_ledger: Option<PathBuf>,
    /// The dataset's lifetime privacy budget (`epsilon`, `delta`): the worker refuses any
    /// DP-SGD round that would take the dataset beyond it, whatever the server asks. Without
    /// it, only each run's approved budget holds.
    #[serde(default)]
    privacy_budget: Option<consilium_worker::ledger::Budget>,
    dataset: DatasetSpec,
}

impl WorkerSettings {
    fn ledger_path(&self) -> Option<PathBuf> {
        self.privacy_ledger.clone().or_else(|| {
            self.signing_key
                .as_ref()
                .map(|k| k.with_file_name("privacy-ledger.json"))
        })
    }
}

fn default_heartbeat() -> u64 {
    5
}

fn main() {
    // Started again as its own decoding child, this program decodes files and nothing else.
    consilium_worker::decode::serve_if_child();
    worker_main();
}

#[tokio::main]
async fn worker_main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::BenchTrain {
        model,
        steps,
        runs,
        threads,
        candle_conv,
        dp,
        norm,
    } = &cli.command
    {
        return consilium_worker::bench::bench_train(
            &consilium_worker::bench::Bench {
                model,
                norm,
                steps: *steps,
                runs: *runs,
                dp: *dp,
            },
            *threads,
            *candle_conv,
        );
    }
    if let Command::Keygen { out } = &cli.command {
        let key = consilium_worker::identity::generate(out)?;
        let (id, public) = consilium_worker::identity::public_part(&key);
        println!(
            "Wrote the site's signing key to {} (readable only by you).",
            out.display()
        );
        println!("Key id:     {id}");
        println!("Public key: {public}");
        println!();
        println!("Give the public key to the site's custodian, who registers it:");
        println!("  in the portal (Data access, \"Signing keys of your sites\") or");
        println!("  POST /api/v1/sites/{{site id}}/keys {{\"public_key\": \"{public}\"}}");
        println!(
            "Then set `signing_key = \"{}\"` in worker.toml.",
            out.display()
        );
        return Ok(());
    }
    let settings: WorkerSettings = Figment::new()
        .merge(Toml::file_exact(&cli.config))
        .merge(Env::prefixed("CONSILIUM_WORKER_").split("__"))
        .extract()
        .map_err(|e| {
            anyhow::anyhow!(
                "invalid worker configuration ({}): {e}",
                cli.config.display()
            )
        })?;
    match cli.command {
        Command::CheckData { size } => {
            let ds = data::load(&settings.dataset, size, &Decoder::this_program()?)?;
            println!("{}\n", ds.summary(settings.dataset.kind));
            print!("{}", ds.table());
            if !ds.skipped.is_empty() {
                println!("\nskipped:");
            }
            for s in &ds.skipped {
                println!("  {}: {}", s.file, s.reason);
            }
            Ok(())
        }
        Command::BenchTrain { .. } | Command::Keygen { .. } => Ok(()),
        Command::Privacy => {
            let path = settings.ledger_path().ok_or_else(|| {
                anyhow::anyhow!(
                    "neither privacy_ledger nor signing_key is set in {}: there is no ledger to read",
                    cli.config.display()
                )
            })?;
            let ledger = consilium_worker::ledger::Ledger::open(&path, settings.privacy_budget)
                .map_err(anyhow::Error::msg)?;
            print!("{}", ledger.report().map_err(anyhow::Error::msg)?);
            Ok(())
        }
        Command::Run => {
            if settings.artifacts.is_some() {
                anyhow::bail!(
                    "`artifacts` is set in {}: a site no longer opens the artifact store (it would need credentials that reach every site's updates). Remove the setting: the worker reads the global models and hands over its updates through the server (server_url, with its worker token).",
                    cli.config.display()
                );
            }
            let server_key = settings.server_public_key.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "server_public_key is not set in {}: ask the server's administrator for it (`consilium admin server-key` prints it) and set `server_public_key = \"…\"`; the worker runs only jobs signed with that key",
                    cli.config.display()
                )
            })?;
            let server_key =
                consilium_core::signing::parse_public_key(server_key).map_err(|e| {
                    anyhow::anyhow!("server_public_key in {}: {e}", cli.config.display())
                })?;
            let artifacts = Arc::new(ServerArtifacts {
                server_url: settings.server_url.clone(),
                token: settings.token.clone(),
                http: reqwest::Client::new(),
            });
            let approvals = Arc::new(ServerApprovals {
                server_url: settings.server_url.clone(),
                token: settings.token.clone(),
                http: reqwest::Client::new(),
            });
            let path = settings.signing_key.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "signing_key is not set in {}: create the site's key with `consilium-worker keygen --out site.key`, have the site's custodian register its public key, and set `signing_key = \"site.key\"`",
                    cli.config.display()
                )
            })?;
            let signer = consilium_worker::identity::load(path)?;
            let ledger_path = settings
                .ledger_path()
                .unwrap_or_else(|| path.with_file_name("privacy-ledger.json"));
            let ledger =
                consilium_worker::ledger::Ledger::open(&ledger_path, settings.privacy_budget)
                    .map_err(anyhow::Error::msg)?;
            use consilium_worker::transport::check;
            check(
                "server_url",
                &settings.server_url,
                settings.allow_plain_transport,
            )
            .and_then(|()| {
                check(
                    "broker_url",
                    secrecy::ExposeSecret::expose_secret(&settings.broker_url),
                    settings.allow_plain_transport,
                )
            })
            .map_err(anyhow::Error::msg)?;
            let ctx = Arc::new(
                SiteContext::new(
                    settings.site_id,
                    settings.dataset,
                    artifacts,
                    approvals,
                    Decoder::this_program()?,
                    signer,
                    server_key,
                )
                .with_ledger(ledger),
            );
            let broker = consilium_worker::broker::connect_site(
                secrecy::ExposeSecret::expose_secret(&settings.broker_url),
            )
            .await?;
            let stop = async {
                if let Err(e) = tokio::signal::ctrl_c().await {
                    tracing::error!(error = %e, "cannot listen for Ctrl-C; stop the worker with a signal");
                    std::future::pending::<()>().await;
                }
            };
            consilium_worker::consumer::run(
                ctx,
                broker,
                Duration::from_secs(settings.heartbeat_seconds),
                stop,
            )
            .await
        }
    }
}
