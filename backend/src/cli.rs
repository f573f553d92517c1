//! The `consilium` command line.

use chrono::{Duration, Utc};
use clap::{Parser, Subcommand};
use consilium_core::Role;
use consilium_core::api::{CreateToken, CreateUser};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use std::path::PathBuf;

use crate::configuration::{self, Settings};
use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::user;
use crate::services::{directory, tokens};
use crate::startup::{self, Application};
use crate::{audit, telemetry};

#[derive(Parser, Debug)]
#[command(
    name = "consilium",
    version,
    about = "Governed federated learning for medical imaging"
)]
pub struct Cli {
    /// A TOML configuration file (default: ./consilium.toml when present).
    #[arg(long, global = true, env = "CONSILIUM_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the server (migrates the database first).
    Serve,
    /// Walks a governed study end to end on this machine, then serves it.
    Demo {
        /// The demo's own folder (its database is recreated every time).
        #[arg(long, default_value = "data/demo")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Stop after the walk-through instead of serving.
        #[arg(long)]
        exit: bool,
    },
    /// Tries a training plan on local folders, one per simulated site, before asking for
    /// approval; prints each round and writes a JSON report. Never touches production data.
    /// Here `--config` names the experiment file (default: experiment.toml).
    Simulate {
        /// Instead: write a ready-to-run example experiment (three synthetic sites) here.
        #[arg(long, value_name = "DIR", group = "examples")]
        example: Option<PathBuf>,
        /// Instead: write a ready-to-run segmentation example here (three synthetic sites of
        /// phantoms with lesion masks, a U-Net plan scored by Dice).
        #[arg(long, value_name = "DIR", group = "examples")]
        example_segmentation: Option<PathBuf>,
        /// With an example: this many times its images at each site (1 to 50; e.g. to see
        /// what differential privacy costs with more patients).
        #[arg(long, default_value_t = 1, requires = "examples", value_parser = clap::value_parser!(u32).range(1..=50))]
        scale: u32,
    },
    /// Brings the database schema up to date and exits.
    Migrate,
    /// Writes the OpenAPI document.
    Openapi {
        /// Where to write it.
        #[arg(long, default_value = "openapi/openapi.json")]
        out: PathBuf,
        /// Only check that the file is current; exit 1 if not.
        #[arg(long)]
        check: bool,
    },
    /// Checks that each site produced the update a model version says it did: every
    /// contribution's signature verified with its site's public key. Give a lineage file (as
    /// `GET /api/v1/models/{id}/lineage` returns it; checked offline), the audit export's signed
    /// updates (`GET /api/v1/audit/export?format=signatures`; offline too) or a model id (read
    /// from this server's database). Exit 1 when any does not hold.
    VerifyLineage {
        /// A lineage JSON file, or a model version id.
        target: String,
    },
    /// Administration from the server's own machine.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Privacy planning for researchers: what DP-SGD costs.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
}

#[derive(Subcommand, Debug)]
pub enum PrivacyCommand {
    /// ε after a number of DP-SGD steps (the sampled Gaussian mechanism, Poisson sampling),
    /// by both conversions at the best Rényi order; or, with --epsilon instead of
    /// --noise-multiplier, the noise multiplier that meets that ε (the tighter conversion).
    Cost {
        /// The chance that a patient's data is in a batch: batch size / patients.
        #[arg(long)]
        sampling_rate: f64,
        /// σ: the noise's standard deviation over the clipping norm.
        #[arg(long, required_unless_present = "epsilon", conflicts_with = "epsilon")]
        noise_multiplier: Option<f64>,
        /// The target ε, to find σ for.
        #[arg(long)]
        epsilon: Option<f64>,
        /// Training steps (batches) over the whole run: epochs × rounds × patients / batch size.
        #[arg(long)]
        steps: u64,
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Registers a user (e.g. the first administrator).
    CreateUser {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        /// A role; repeat for several (administrator, committee_member, researcher, custodian, auditor).
        #[arg(long = "role", value_parser = parse_role, required = true)]
        roles: Vec<Role>,
        /// A development-only local password (local accounts must be enabled).
        #[arg(long, env = "CONSILIUM_ADMIN_PASSWORD")]
        password: Option<String>,
    },
    /// Creates an API token for a user and prints it once.
    CreateToken {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "cli")]
        name: String,
        #[arg(long = "role", value_parser = parse_role, required = true)]
        roles: Vec<Role>,
        /// Days until it expires.
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
    /// Recomputes the audit chain; exit 1 when it is broken.
    VerifyAudit,
    /// Prints the server's public job-signing key (creating the key on first use), for each
    /// worker's `server_public_key`.
    ServerKey,
    /// Creates a site's own RabbitMQ user (or gives it a new password), allowed only to consume
    /// the site's job queue and publish results, and prints the `broker_url` for its worker.
    BrokerUser {
        #[arg(long)]
        site: uuid::Uuid,
        /// A file holding the password to set; unset: a new random one, printed once.
        #[arg(long)]
        password_file: Option<std::path::PathBuf>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
        format!("unknown role {s:?}; one of: {}", all.join(", "))
    })
}

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Command::Openapi { out, check } = &cli.command {
        return openapi(out, *check);
    }
    if let Command::Privacy(PrivacyCommand::Cost {
        sampling_rate,
        noise_multiplier,
        epsilon,
        steps,
        delta,
        json,
    }) = &cli.command
    {
        return Ok(privacy_cost(
            *sampling_rate,
            *noise_multiplier,
            *epsilon,
            *steps,
            *delta,
            *json,
        ));
    }
    if let Command::VerifyLineage { target } = &cli.command
        && uuid::Uuid::parse_str(target).is_err()
    {
        let text = std::fs::read_to_string(target)
            .map_err(|e| anyhow::anyhow!("cannot read the lineage file {target}: {e}"))?;
        let lineage = match serde_json::from_str(&text) {
            Ok(l) => l,
            Err(e) => {
                // The audit export's signed updates, one per line.
                let lines: Result<Vec<consilium_core::api::SignedUpdateDto>, _> = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(serde_json::from_str)
                    .collect();
                return match lines {
                    Ok(list) if !list.is_empty() => Ok(report_checks(
                        crate::services::models::verify_signed_updates(&list),
                    )),
                    _ => Err(anyhow::anyhow!(
                        "{target} is neither a model lineage (GET /api/v1/models/{{id}}/lineage) nor the audit export's signed updates (GET /api/v1/audit/export?format=signatures): {e}"
                    )),
                };
            }
        };
        return Ok(report_lineage(&lineage));
    }
    // For `simulate`, --config is the experiment; the server's own settings are not used.
    let server_config = match cli.command {
        Command::Simulate { .. } => None,
        _ => cli.config.as_deref(),
    };
    let mut settings: Settings = configuration::load(server_config)?;
    if matches!(cli.command, Command::Demo { .. } | Command::Simulate { .. })
        && settings.log.level == "info"
    {
        // The demo's own output tells the story; the log shows only what went wrong.
        settings.log.level = "warn".into();
    }
    telemetry::init(&settings.log);
    match cli.command {
        Command::Openapi { .. } | Command::Privacy(_) => Ok(0),
        Command::Serve => {
            let app = Application::build(settings).await?;
            eprintln!(
                "Consilium is serving on http://127.0.0.1:{} (API docs at /api/docs)",
                app.port()
            );
            app.run_until_stopped().await?;
            Ok(0)
        }
        Command::Demo {
            data_dir,
            port,
            exit,
        } => {
            crate::demo::run(
                settings,
                crate::demo::DemoOptions {
                    data_dir,
                    port,
                    exit,
                },
            )
            .await
        }
        Command::Simulate {
            example,
            example_segmentation,
            scale,
        } => {
            let experiment = cli
                .config
                .unwrap_or_else(|| PathBuf::from("experiment.toml"));
            let example = match (example, example_segmentation) {
                (Some(dir), _) => Some((dir, crate::simulate::Example::Classification)),
                (_, Some(dir)) => Some((dir, crate::simulate::Example::Segmentation)),
                _ => None,
            };
            let example = example.as_ref().map(|(d, k)| (d.as_path(), *k));
            crate::simulate::run(settings, &experiment, example, scale).await
        }
        Command::Migrate => {
            startup::connect_and_migrate(&settings).await?;
            eprintln!("The database schema is up to date.");
            Ok(0)
        }
        Command::Admin(cmd) => {
            let ctx = startup::build_context(settings).await?;
            admin(&ctx, cmd).await
        }
        Command::VerifyLineage { target } => {
            let ctx = startup::build_context(settings).await?;
            let id = uuid::Uuid::parse_str(&target)?;
            let lineage = crate::services::models::lineage(&ctx, &Actor::system(), id).await?;
            Ok(report_lineage(&lineage))
        }
    }
}

/// Prints each contribution's check; 0 when all hold.
fn report_lineage(lineage: &consilium_core::api::LineageDto) -> i32 {
    let checks = crate::services::models::verify_lineage(lineage);
    println!(
        "Model {} (run {}, round {}): {} contribution(s)",
        lineage.model.id,
        lineage.model.run_id,
        lineage.model.round,
        checks.len()
    );
    for (ok, line) in &checks {
        println!("  {} {line}", if *ok { "ok  " } else { "FAIL" });
    }
    if checks.iter().all(|(ok, _)| *ok) && !checks.is_empty() {
        println!("Every contribution is signed by its site.");
        0
    } else {
        println!("The lineage does not hold: see FAIL above.");
        1
    }
}

/// `consilium privacy cost`: prints ε by both conversions (or σ for a target ε); 2 on bad input.
fn privacy_cost(
    q: f64,
    sigma: Option<f64>,
    target: Option<f64>,
    steps: u64,
    delta: f64,
    json: bool,
) -> i32 {
    use consilium_core::privacy::{RdpCost, default_orders, noise_for};
    let orders = default_orders();
    let computed = (|| {
        let sigma = match (sigma, target) {
            (Some(s), _) => s,
            (None, Some(e)) => noise_for(q, steps, e, delta, &orders)?,
            (None, None) => return Ok(None),
        };
        let cost = RdpCost::sampled_gaussian(q, sigma, steps, &orders)?;
        Ok::<_, consilium_core::privacy::PrivacyError>(Some((
            sigma,
            cost.epsilon(delta)?,
            cost.epsilon_classic(delta)?,
        )))
    })();
    let (sigma, tight, classic) = match computed {
        Ok(Some(x)) => x,
        Ok(None) => {
            eprintln!("error: give --noise-multiplier, or --epsilon to find the noise multiplier");
            return 2;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "sampling_rate": q, "noise_multiplier": sigma, "steps": steps, "delta": delta,
                "epsilon": tight.epsilon, "order": tight.order,
                "epsilon_classic": classic.epsilon, "order_classic": classic.order,
            })
        );
    } else {
        println!("sampling rate {q}, noise multiplier {sigma:.4}, {steps} steps, δ = {delta:e}");
        println!(
            "ε = {:.3} at order {} (Balle et al. 2020; what Consilium enforces)",
            tight.epsilon, tight.order
        );
        println!(
            "ε = {:.3} at order {} (the classic conversion)",
            classic.epsilon, classic.order
        );
    }
    0
}

/// Prints each signed update's check (the audit export's); 0 when all hold.
fn report_checks(checks: Vec<(bool, String)>) -> i32 {
    println!("{} signed update(s)", checks.len());
    for (ok, line) in &checks {
        println!("  {} {line}", if *ok { "ok  " } else { "FAIL" });
    }
    if checks.iter().all(|(ok, _)| *ok) {
        println!("Every update is signed by its site.");
        0
    } else {
        println!("Not every update holds: see FAIL above.");
        1
    }
}

fn openapi(out: &std::path::Path, check: bool) -> anyhow::Result<i32> {
    let json = startup::openapi_json()?;
    if check {
        let current = std::fs::read_to_string(out).unwrap_or_default();
        if current != json {
            eprintln!(
                "{} is stale; regenerate it with: cargo run -p consilium-backend -- openapi",
                out.display()
            );
            return Ok(1);
        }
        eprintln!("{} is current.", out.display());
        return Ok(0);
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, json)?;
    eprintln!("Wrote {}", out.display());
    Ok(0)
}

async fn admin(ctx: &AppContext, cmd: AdminCommand) -> anyhow::Result<i32> {
    let system = Actor::system();
    match cmd {
        AdminCommand::CreateUser {
            email,
            name,
            roles,
            password,
        } => {
            match directory::create_user(
                ctx,
                &system,
                CreateUser {
                    email,
                    name,
                    roles,
                    password,
                },
            )
            .await
            {
                Ok(u) => {
                    println!("{}", serde_json::to_string_pretty(&u)?);
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("error: {}", e.problem().detail);
                    for reason in e.problem().errors {
                        eprintln!("  - {reason}");
                    }
                    Ok(2)
                }
            }
        }
        AdminCommand::CreateToken {
            email,
            name,
            roles,
            days,
        } => {
            let Some(u) = user::Entity::find()
                .filter(user::Column::Email.eq(email.trim().to_lowercase()))
                .one(&ctx.db)
                .await?
            else {
                eprintln!(
                    "error: no user with the email {email}; create one with `consilium admin create-user`."
                );
                return Ok(2);
            };
            let input = CreateToken {
                name,
                roles,
                expires_at: Utc::now() + Duration::days(days),
            };
            match tokens::create(ctx, &system, u.id, input).await {
                Ok(t) => {
                    println!("{}", t.token);
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("error: {}", e.problem().detail);
                    for reason in e.problem().errors {
                        eprintln!("  - {reason}");
                    }
                    Ok(2)
                }
            }
        }
        AdminCommand::VerifyAudit => {
            let v = audit::verify(&ctx.db).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(if v.ok { 0 } else { 1 })
        }
        AdminCommand::ServerKey => {
            let key = crate::startup::server_key(&ctx.settings)
                .map_err(anyhow::Error::msg)?
                .verifying_key();
            println!("Key id:     {}", consilium_core::signing::key_id(&key));
            println!(
                "Public key: {}",
                consilium_core::signing::encode_public_key(&key)
            );
            println!();
            println!("Each site's worker.toml pins it:");
            println!(
                "  server_public_key = \"{}\"",
                consilium_core::signing::encode_public_key(&key)
            );
            Ok(0)
        }
        AdminCommand::BrokerUser {
            site,
            password_file,
        } => {
            if let Err(e) = directory::get_site(&ctx.db, site).await {
                eprintln!("error: {}", e.problem().detail);
                return Ok(2);
            }
            let password = match password_file {
                Some(f) => Some(secrecy::SecretString::from(
                    std::fs::read_to_string(&f)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?
                        .trim()
                        .to_string(),
                )),
                None => None,
            };
            let made = crate::broker_users::provision(&ctx.settings, site, password).await?;
            let w = ctx.begin_write().await?;
            audit::append(
                &*w,
                &system,
                "site.broker_user_provisioned",
                "site",
                site,
                &serde_json::json!({"user": made.user}),
            )
            .await?;
            w.commit().await?;
            println!(
                "Broker user {} may consume only its site's job queue and publish results.",
                made.user
            );
            println!("Set in the site's worker.toml (shown once; keep it secret):");
            println!(
                "  broker_url = \"{}\"",
                secrecy::ExposeSecret::expose_secret(&made.broker_url)
            );
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
