//! Collecting a round under secure aggregation: the sites drive the four exchanges through
//! their endpoints (`services::secagg`); the engine closes what falls due, unmasks the sum once
//! the last exchange closes, and stores the survivors' mean change applied to the round's
//! model as the round's sum. No site's own update exists at the server, only masked inputs.

use super::rounds::RoundState;
use super::*;
use crate::entities::secagg_message;
use crate::services::secagg::{self, SecureRound};
use consilium_core::api::{SecAggSite, SecureAggregationRecord};

/// The stage name of a round's unmasked sum in `secagg_messages`.
const SUM: &str = "sum";

/// What a secure round's sum stands on, kept until its model version is made.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct SumRecord {
    /// SHA-256 of the round's model plus the survivors' mean change (safetensors).
    pub weights: String,
    /// The survivors: site, masked input's hash, training images.
    pub survivors: Vec<(Uuid, String, u64)>,
    pub dropped: Vec<(Uuid, String, bool)>,
    pub threshold: usize,
    pub neighbours: usize,
    pub clip: f64,
    pub noise_std: f64,
}

impl SumRecord {
    pub(crate) async fn lineage(&self, ctx: &AppContext) -> AppResult<SecureAggregationRecord> {
        let mut summed = Vec::new();
        for (site, _, _) in &self.survivors {
            summed.push(SecAggSite {
                site_id: *site,
                site_name: site_name(ctx, *site).await?,
                status: "summed".into(),
                recovered: false,
            });
        }
        let mut dropped = Vec::new();
        for (site, how, recovered) in &self.dropped {
            dropped.push(SecAggSite {
                site_id: *site,
                site_name: site_name(ctx, *site).await?,
                status: how.clone(),
                recovered: *recovered,
            });
        }
        Ok(SecureAggregationRecord {
            summed,
            dropped,
            neighbours: self.neighbours as u32,
            threshold: self.threshold as u32,
            clip: self.clip,
            noise_std: self.noise_std,
        })
    }
}

/// The round's sum, once collected.
pub(crate) async fn sum_of(ctx: &AppContext, x: &round::Model) -> AppResult<Option<SumRecord>> {
    match secagg_message::Entity::find()
        .filter(secagg_message::Column::RunId.eq(x.run_id))
        .filter(secagg_message::Column::Round.eq(x.number))
        .filter(secagg_message::Column::Stage.eq(SUM))
        .one(&ctx.db)
        .await?
    {
        Some(row) => Ok(Some(from(&row.body)?)),
        None => Ok(None),
    }
}

/// The model's weights plus `change` over the values a masked input holds (sorted by name,
/// the layers kept at the sites left as they are).
fn apply(global: &Weights, plan: &consilium_core::plan::Plan, change: &[f32]) -> Weights {
    let mut next = global.clone();
    let mut at = 0;
    for (name, t) in next.iter_mut() {
        if plan.is_local(name) {
            continue;
        }
        for (v, d) in t.data.iter_mut().zip(&change[at.min(change.len())..]) {
            *v += d;
        }
        at += t.data.len();
    }
    next
}

use consilium_core::aggregate::Weights;

impl Engine {
    #[tracing::instrument(skip_all, fields(run = %r.id, round = x.number))]
    pub(super) async fn collect_secure(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        x: round::Model,
        s: SecureRound,
    ) -> AppResult<()> {
        let closings = loop {
            let notified = self.notify.notified();
            let c = secagg::advance(ctx, &s).await?;
            if c.reveals.is_some() || Utc::now() > x.deadline {
                break c;
            }
            if !still_running(ctx, r.id).await? {
                return Ok(());
            }
            let _woken = tokio::time::timeout(std::time::Duration::from_millis(250), notified)
                .await
                .is_ok();
        };
        // A site sends its result (evaluation, losses) right after its reveals: wait a little
        // for those of the sites that revealed.
        let revealers: Vec<Uuid> = match (&closings.keys, &closings.reveals) {
            (Some(k), Some(rv)) => rv
                .members
                .keys()
                .filter_map(|i| k.members.get(i).map(|m| m.site_id))
                .collect(),
            _ => Vec::new(),
        };
        let until = (Utc::now() + Duration::seconds(10)).min(x.deadline);
        let got = loop {
            let got = self.results_of(ctx, r.id, x.number, "train").await?;
            if revealers.iter().all(|s| got.contains_key(s)) || Utc::now() >= until {
                break got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        };
        if !still_running(ctx, r.id).await? {
            return Ok(());
        }
        let global = weights::from_safetensors(
            &self
                .artifacts
                .get(x.global_in.as_deref().unwrap_or_default())
                .await
                .map_err(AppError::unexpected)?,
        )
        .map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
        let sites: Vec<Uuid> = from(&x.sites)?;
        let outcome = secagg::sum(ctx, &s, &closings, &global, x.quorum.max(0) as usize).await?;
        let mut excluded: Vec<ExcludedSite> = from(&x.excluded)?;
        let record = match outcome {
            Ok(sum) => {
                let next = apply(&global, &s.plan, &sum.mean_change);
                let bytes = weights::to_safetensors(&next)
                    .map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
                let hash = self
                    .artifacts
                    .put(bytes)
                    .await
                    .map_err(AppError::unexpected)?;
                for (site, how, recovered) in &sum.dropped {
                    excluded.push(ExcludedSite {
                        site_id: *site,
                        reason: if *recovered {
                            format!("{how}; its masks were removed with its neighbours' shares")
                        } else {
                            how.to_string()
                        },
                    });
                }
                Ok(SumRecord {
                    weights: hash,
                    survivors: sum.survivors,
                    dropped: sum
                        .dropped
                        .into_iter()
                        .map(|(s, how, rec)| (s, how.to_string(), rec))
                        .collect(),
                    threshold: sum.threshold,
                    neighbours: sum.neighbours,
                    clip: f64::from(s.secagg.clip),
                    noise_std: sum.noise_std,
                })
            }
            Err(reason) => Err(reason),
        };
        let w = ctx.begin_write().await?;
        super::driver::settle_unanswered(&*w, r.id, &x, &sites, &got).await?;
        let mut a: round::ActiveModel = x.clone().into();
        a.excluded = Set(json(&excluded)?);
        a.updated_at = Set(Utc::now());
        let (action, summed) = match &record {
            Ok(rec) => {
                secagg_message::ActiveModel {
                    id: Set(Uuid::new_v4()),
                    run_id: Set(r.id),
                    round: Set(x.number),
                    stage: Set(SUM.into()),
                    site_id: Set(Uuid::nil()),
                    body: Set(json(rec)?),
                    created_at: Set(Utc::now()),
                }
                .insert(&*w)
                .await?;
                a.state = Set(RoundState::Aggregating.as_str().into());
                ("round.collected", rec.survivors.len())
            }
            Err(reason) => {
                a.state = Set(RoundState::Failed.as_str().into());
                a.failure = Set(Some(reason.clone()));
                ("round.failed", 0)
            }
        };
        let m = a.update(&*w).await?;
        audit::append(
            &*w,
            &Actor::system(),
            action,
            "round",
            m.id,
            &serde_json::json!({
                "run_id": r.id, "round": m.number, "secure_aggregation": true, "summed": summed,
                "excluded": excluded, "failure": m.failure,
            }),
        )
        .await?;
        w.commit().await?;
        Ok(())
    }
}
