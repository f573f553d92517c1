//! Versioning and lineage: aggregation of a round's updates into a new model version, what
//! it stands on, cross-site evaluation, and when a run stops.

use super::rounds::{RoundState, metric, stopping};
use super::*;

impl Engine {
    #[tracing::instrument(skip_all, fields(run = %r.id, round = x.number))]
    pub(super) async fn aggregate(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        x: round::Model,
    ) -> AppResult<()> {
        let version = match x.model_version_id {
            Some(id) => model_version::Entity::find_by_id(id)
                .one(&ctx.db)
                .await?
                .ok_or_else(|| {
                    AppError::unexpected(anyhow::anyhow!("model version {id} is gone"))
                })?,
            None => self.new_version(ctx, r, manifest, &x).await?,
        };
        let x = round::Entity::find_by_id(x.id)
            .one(&ctx.db)
            .await?
            .ok_or_else(|| AppError::unexpected(anyhow::anyhow!("round vanished")))?;
        let sites: Vec<Uuid> = from(&x.sites)?;
        let excluded: Vec<ExcludedSite> = from(&x.excluded)?;
        let evaluators: Vec<Uuid> = sites
            .iter()
            .filter(|s| !excluded.iter().any(|e| e.site_id == **s))
            .copied()
            .collect();
        let hash = version.hash.clone();
        self.publish(
            r,
            manifest,
            files,
            x.number,
            &evaluators,
            JobKind::Evaluate,
            &hash,
            x.deadline,
        )
        .await;
        let got = self
            .wait_for(
                ctx,
                r,
                &x,
                JobKind::Evaluate,
                manifest,
                files,
                &hash,
                &evaluators,
                false,
            )
            .await?;
        if !still_running(ctx, r.id).await? {
            return Ok(());
        }
        let mut per_site = Vec::new();
        for s in &evaluators {
            if let Some(m) = got
                .get(s)
                .and_then(|u| u.evaluation.as_ref())
                .and_then(|e| from::<Metrics>(e).ok())
            {
                per_site.push(SiteEvaluation {
                    site_id: *s,
                    site_name: site_name(ctx, *s).await?,
                    metrics: m,
                });
            }
        }
        let evaluation = ModelEvaluation {
            global: weighted(per_site.iter().map(|s| &s.metrics)),
            sites: per_site,
        };
        let w = ctx.begin_write().await?;
        let mut v: model_version::ActiveModel = version.into();
        v.evaluation = Set(Some(json(&evaluation)?));
        let v = v.update(&*w).await?;
        let mut a: round::ActiveModel = x.into();
        a.state = Set(RoundState::Evaluated.as_str().into());
        a.updated_at = Set(Utc::now());
        let m = a.update(&*w).await?;
        audit::append(
            &*w,
            &Actor::system(),
            "round.evaluated",
            "round",
            m.id,
            &serde_json::json!({
                "run_id": r.id, "round": m.number, "model_version": v.id, "evaluation": evaluation,
            }),
        )
        .await?;
        w.commit().await?;
        Ok(())
    }

    /// Aggregates the round's updates into a new model version with its lineage.
    pub(super) async fn new_version(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        x: &round::Model,
    ) -> AppResult<model_version::Model> {
        let strategy = Strategy::from_spec(&manifest.aggregation)
            .map_err(|e| AppError::unexpected(anyhow::anyhow!("{e}")))?;
        // FedNova counts each site's local steps from the approved plan and its samples.
        let plan = match strategy {
            Strategy::FedNova => Some(manifest.parse().map_err(|problems| {
                AppError::unexpected(anyhow::anyhow!(
                    "the run's plan no longer parses: {}",
                    problems.join("; ")
                ))
            })?),
            _ => None,
        };
        let global_hash = x.global_in.clone().unwrap_or_default();
        let global = weights::from_safetensors(
            &self
                .artifacts
                .get(&global_hash)
                .await
                .map_err(AppError::unexpected)?,
        )
        .map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
        let got = self.results_of(ctx, r.id, x.number, "train").await?;
        let mut updates = Vec::new();
        let mut contributions = Vec::new();
        let mut ordered: Vec<&update::Model> =
            got.values().filter(|u| u.outcome == "trained").collect();
        ordered.sort_by_key(|u| u.site_id);
        for u in ordered {
            let hash = u.update_hash.clone().unwrap_or_default();
            let bytes = self
                .artifacts
                .get(&hash)
                .await
                .map_err(AppError::unexpected)?;
            let w = weights::from_safetensors(&bytes)
                .map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
            let samples = u.samples.unwrap_or(0).max(0) as u64;
            updates.push(Update {
                weights: w,
                samples,
                loss_before: u.train_loss_before,
                loss_after: u.train_loss_after,
                steps: plan.as_ref().map(|p| p.fednova_steps(samples)),
            });
            contributions.push(Contribution {
                site_id: u.site_id,
                site_name: site_name(ctx, u.site_id).await?,
                update_hash: hash,
                samples: u.samples.unwrap_or(0).max(0) as u64,
                evaluation: u
                    .evaluation
                    .as_ref()
                    .and_then(|e| from(e).ok())
                    .unwrap_or_default(),
                train_loss_before: u.train_loss_before.unwrap_or(f64::NAN),
                train_loss_after: u.train_loss_after.unwrap_or(f64::NAN),
                privacy: u.privacy.as_ref().map(from).transpose()?,
                weight: None,
                score: None,
                down_weighted: false,
            });
        }
        // FedAdam's and FedYogi's moments: starting them again silently would change the
        // training the plan describes, so an unreadable state fails the run with that reason.
        let mut state: ServerState = match r.server_state.as_deref() {
            None => ServerState::default(),
            Some(s) => serde_json::from_str(s).map_err(|e| {
                AppError::unexpected(anyhow::anyhow!(
                    "the server optimiser's state of run {} is unreadable: {e}",
                    r.id
                ))
            })?,
        };
        let (g, u, s) = (global.clone(), updates, strategy.clone());
        let next = tokio::task::spawn_blocking(move || {
            aggregate(&s, &g, &u, &mut state).map(|w| (w, state))
        })
        .await
        .map_err(AppError::unexpected)?
        .map_err(|e| AppError::unexpected(anyhow::anyhow!("aggregation: {e}")))?;
        let (
            Aggregated {
                weights: next,
                sites,
            },
            state,
        ) = next;
        let down = down_weighted(&strategy, &sites);
        let bytes =
            weights::to_safetensors(&next).map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
        let hash = self
            .artifacts
            .put(bytes)
            .await
            .map_err(AppError::unexpected)?;
        let parent = model_version::Entity::find()
            .filter(model_version::Column::RunId.eq(r.id))
            .order_by_desc(model_version::Column::Round)
            .one(&ctx.db)
            .await?
            .map(|p| p.id);
        let contributions: Vec<Contribution> = contributions
            .into_iter()
            .zip(sites.iter().zip(down))
            .map(|(c, (site, down_weighted))| Contribution {
                train_loss_before: finite(c.train_loss_before),
                train_loss_after: finite(c.train_loss_after),
                weight: Some(site.weight),
                score: site.score.filter(|s| s.is_finite()),
                down_weighted,
                ..c
            })
            .collect();
        let w = ctx.begin_write().await?;
        let v = model_version::ActiveModel {
            id: Set(Uuid::new_v4()),
            run_id: Set(r.id),
            study_id: Set(r.study_id),
            round: Set(x.number),
            hash: Set(hash),
            parent_id: Set(parent),
            plan_hash: Set(r.plan_hash.clone()),
            review_id: Set(r.review_id),
            grant_ids: Set(r.grant_ids.clone()),
            strategy: Set(manifest.aggregation.strategy.clone()),
            contributions: Set(json(&contributions)?),
            evaluation: Set(None),
            created_at: Set(Utc::now()),
            released_at: Set(None),
            released_by: Set(None),
        }
        .insert(&*w)
        .await?;
        let mut a: round::ActiveModel = x.clone().into();
        a.model_version_id = Set(Some(v.id));
        a.updated_at = Set(Utc::now());
        a.update(&*w).await?;
        let mut rr: run::ActiveModel = r.clone().into();
        rr.server_state = Set(Some(serde_json::to_string(&state)?));
        rr.update(&*w).await?;
        audit::append(
            &*w,
            &Actor::system(),
            "model.version_created",
            "model_version",
            v.id,
            &crate::services::models::version_dto(&v)?,
        )
        .await?;
        // A site down-weighted round after round is flagged once a streak reaches the mark.
        let history = model_version::Entity::find()
            .filter(model_version::Column::RunId.eq(r.id))
            .all(&*w)
            .await?
            .iter()
            .map(crate::services::models::version_dto)
            .collect::<AppResult<Vec<_>>>()?;
        for flag in flagged_sites(&history) {
            if flag.rounds.len() == FLAG_AFTER_ROUNDS
                && flag.rounds.last() == Some(&(x.number.max(0) as u32))
            {
                tracing::warn!(site = %flag.site_id, rounds = ?flag.rounds, "site flagged: down-weighted round after round");
                audit::append(
                    &*w,
                    &Actor::system(),
                    "site.flagged",
                    "site",
                    flag.site_id,
                    &flag,
                )
                .await?;
            }
        }
        w.commit().await?;
        Ok(v)
    }

    #[tracing::instrument(skip_all, fields(run = %r.id, round = x.number))]
    pub(super) async fn close(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        x: round::Model,
    ) -> AppResult<()> {
        let history = model_version::Entity::find()
            .filter(model_version::Column::RunId.eq(r.id))
            .order_by_asc(model_version::Column::Round)
            .all(&ctx.db)
            .await?;
        let plan = manifest.parse().map_err(|p| {
            AppError::unexpected(anyhow::anyhow!(
                "the approved plan does not parse: {}",
                p.join("; ")
            ))
        })?;
        let values: Vec<f64> = history
            .iter()
            .filter_map(|v| {
                v.evaluation
                    .as_ref()
                    .and_then(|e| from::<ModelEvaluation>(e).ok())
            })
            .map(|e| metric(&e.global, plan.stopping.metric))
            .collect();
        let stop = stopping(&plan, x.number, &values);
        let w = ctx.begin_write().await?;
        let mut a: round::ActiveModel = x.into();
        a.state = Set(RoundState::Closed.as_str().into());
        a.updated_at = Set(Utc::now());
        let m = a.update(&*w).await?;
        let mut rr: run::ActiveModel = r.clone().into();
        rr.current_round = Set(m.number);
        rr.update(&*w).await?;
        audit::append(
            &*w,
            &Actor::system(),
            "round.closed",
            "round",
            m.id,
            &serde_json::json!({"run_id": r.id, "round": m.number, "stop": stop}),
        )
        .await?;
        w.commit().await?;
        if let Some(reason) = stop {
            self.finish(ctx, r.id, "completed", &reason).await?;
        }
        Ok(())
    }
}

/// Sample-weighted mean of the sites' metrics.
pub fn weighted<'a>(ms: impl Iterator<Item = &'a Metrics>) -> Metrics {
    let ms: Vec<&Metrics> = ms.collect();
    let n: u64 = ms.iter().map(|m| m.samples).sum();
    if n == 0 {
        return Metrics::default();
    }
    let w = |f: &dyn Fn(&Metrics) -> f64| {
        ms.iter().map(|m| f(m) * m.samples as f64).sum::<f64>() / n as f64
    };
    let with_auroc: Vec<&&Metrics> = ms.iter().filter(|m| m.auroc.is_some()).collect();
    let n_auroc: u64 = with_auroc.iter().map(|m| m.samples).sum();
    let auroc = (n_auroc > 0).then(|| {
        with_auroc
            .iter()
            .map(|m| m.auroc.unwrap_or(0.0) * m.samples as f64)
            .sum::<f64>()
            / n_auroc as f64
    });
    Metrics {
        loss: w(&|m| m.loss),
        accuracy: w(&|m| m.accuracy),
        auroc,
        samples: n,
    }
}
