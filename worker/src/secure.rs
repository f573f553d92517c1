//! A site's side of secure aggregation (SecAgg+, `consilium_core::secagg`) for one training job:
//! its keys and shares go to its neighbours through the server before it trains; after training
//! it hands over only its masked input (its clipped, weighted change, with its share of the
//! noise under `privacy.noise_multiplier`, quantised and masked), then reveals what the
//! protocol lets the server have. Its secrets live in this job's memory only and are drawn from
//! the operating system's generator.

use consilium_core::plan::{Plan, SecureAggregation};
use consilium_core::protocol::Job;
use consilium_core::secagg::wire::{
    KeysAnswer, KeysPost, MaskedAnswer, MaskedPost, RevealsPost, SharesAnswer, SharesPost, Stage,
    encode_masked,
};
use consilium_core::secagg::{
    Context, HeldShare, PublicKeys, SelfSeed, SiteIndex, SiteSecrets, clip_values, mask,
    open_share, quantise_at, reveal, share_keys,
};
use rand::rngs::OsRng;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::job::{JobError, SiteContext};

/// What a site holds between the key exchange and its masked input.
pub struct Prepared {
    secrets: SiteSecrets,
    seed: SelfSeed,
    keys: KeysAnswer,
    /// The neighbours that shared their keys with this site (the others have left).
    live: Vec<(SiteIndex, PublicKeys)>,
    held: Vec<HeldShare>,
    samples: u64,
}

fn context(job: &Job) -> Context {
    Context {
        run: job.run_id,
        round: job.round,
    }
}

fn failed(stage: Stage, e: impl std::fmt::Display) -> JobError {
    JobError::Failed(format!(
        "secure aggregation, the {} exchange: {e}",
        stage.as_str()
    ))
}

async fn post(
    job: &Job,
    ctx: &SiteContext,
    stage: Stage,
    body: &impl Serialize,
) -> Result<(), JobError> {
    let body = serde_json::to_value(body).map_err(|e| failed(stage, e))?;
    ctx.artifacts
        .secagg_post(job, stage, body)
        .await
        .map_err(|e| failed(stage, e))
}

/// The stage's answer, asked for until it closes or the job's deadline passes.
async fn wait<T: DeserializeOwned>(
    job: &Job,
    ctx: &SiteContext,
    stage: Stage,
) -> Result<T, JobError> {
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        if let Some(v) = ctx
            .artifacts
            .secagg_answer(job, stage)
            .await
            .map_err(|e| failed(stage, e))?
        {
            return serde_json::from_value(v).map_err(|e| failed(stage, e));
        }
        if chrono::Utc::now() >= job.deadline {
            return Err(failed(
                stage,
                "it did not close before the round's deadline",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(250));
    }
}

/// The key exchange and the shares, before training: `samples` is the site's training images
/// (its public weight).
pub async fn prepare(job: &Job, ctx: &SiteContext, samples: u64) -> Result<Prepared, JobError> {
    let secrets = SiteSecrets::generate(&mut OsRng);
    post(
        job,
        ctx,
        Stage::Keys,
        &KeysPost {
            keys: secrets.public(),
            samples,
        },
    )
    .await?;
    let keys: KeysAnswer = wait(job, ctx, Stage::Keys).await?;
    let neighbours: Vec<(SiteIndex, PublicKeys)> =
        keys.neighbours.iter().map(|n| (n.index, n.keys)).collect();
    let round = context(job);
    let (seed, shares) = share_keys(
        &round,
        keys.index,
        &secrets,
        &neighbours,
        keys.threshold,
        &mut OsRng,
    )
    .map_err(|e| failed(Stage::Shares, e))?;
    post(job, ctx, Stage::Shares, &SharesPost { shares }).await?;
    let got: SharesAnswer = wait(job, ctx, Stage::Shares).await?;
    let mut held = vec![seed.own_share()];
    for share in &got.shares {
        let sender = neighbours
            .iter()
            .find(|(i, _)| *i == share.from)
            .map(|(_, k)| k)
            .ok_or_else(|| {
                failed(
                    Stage::Shares,
                    format!("site {} is not a neighbour of this site", share.from),
                )
            })?;
        held.push(
            open_share(&round, keys.index, &secrets, sender, share)
                .map_err(|e| failed(Stage::Shares, e))?,
        );
    }
    let live = neighbours
        .into_iter()
        .filter(|(i, _)| got.shares.iter().any(|h| h.from == *i))
        .collect();
    Ok(Prepared {
        secrets,
        seed,
        keys,
        live,
        held,
        samples,
    })
}

/// The site's input: its `change` (the model's values less the layers kept at the site, sorted
/// by name) clipped to ±clip, weighted by its share of the round's images, with its share of
/// the round's noise, in the round's fixed point.
pub fn input(
    plan: &Plan,
    secagg: &SecureAggregation,
    keys: &KeysAnswer,
    samples: u64,
    mut change: Vec<f32>,
) -> Vec<u32> {
    clip_values(&mut change, secagg.clip);
    let weight = samples as f64 / keys.total_samples.max(1) as f64;
    // Distributed noise: σ·C/√t from each site, so the sum of at least t sites carries σ·C.
    let per_site = plan.clipping.map_or(0.0, |c| {
        c.noise_multiplier * c.clip_norm / (keys.threshold.max(1) as f64).sqrt()
    });
    let mut noise = vec![0f32; change.len()];
    if per_site > 0.0 {
        consilium_core::noise::gaussian(&mut OsRng, per_site, &mut noise);
    }
    let values: Vec<f64> = change
        .iter()
        .zip(&noise)
        .map(|(v, n)| weight * f64::from(*v) + f64::from(*n))
        .collect();
    quantise_at(&values, secagg.step(per_site, keys.sites))
}

/// After training: the masked input handed over as the job's output and announced, then the
/// reveals. Returns the masked input's SHA-256.
pub async fn finish(
    job: &Job,
    ctx: &SiteContext,
    plan: &Plan,
    secagg: &SecureAggregation,
    prepared: Prepared,
    change: Vec<f32>,
) -> Result<String, JobError> {
    let Prepared {
        secrets,
        seed,
        keys,
        live,
        held,
        samples,
    } = prepared;
    let q = input(plan, secagg, &keys, samples, change);
    let masked = mask(&context(job), keys.index, &secrets, &seed, &live, &q)
        .map_err(|e| failed(Stage::Masked, e))?;
    let sha256 = ctx
        .artifacts
        .upload(job, encode_masked(&masked))
        .await
        .map_err(|e| failed(Stage::Masked, e))?;
    post(
        job,
        ctx,
        Stage::Masked,
        &MaskedPost {
            sha256: sha256.clone(),
        },
    )
    .await?;
    let who: MaskedAnswer = wait(job, ctx, Stage::Masked).await?;
    let reveals =
        reveal(&held, &who.survivors, &who.dropped).map_err(|e| failed(Stage::Reveals, e))?;
    post(job, ctx, Stage::Reveals, &RevealsPost { reveals }).await?;
    Ok(sha256)
}
