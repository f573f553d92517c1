//! Versioning and lineage: aggregation of a round's updates into a new model version, what
//! it stands on, cross-site evaluation, and when a run stops.

use super::rounds::{RoundState, metric, stopping};
use super::*;
use consilium_core::aggregate::{ScaffoldSite, Weights, scaffold_controls, scaffold_correction};
use consilium_core::segmentation::SegmentationScores;
use std::collections::BTreeMap;

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
        // The sites whose update counted and that answered: a site whose masked input is in a
        // secure sum but that stopped before its result is not asked.
        let trained = self.results_of(ctx, r.id, x.number, "train").await?;
        let evaluators: Vec<Uuid> = sites
            .iter()
            .filter(|s| !excluded.iter().any(|e| e.site_id == **s))
            .filter(|s| trained.get(s).is_some_and(|u| u.outcome == "trained"))
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
            &HashMap::new(),
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
        // FedNova and SCAFFOLD count each site's local steps from the approved plan and its
        // samples; partial sharing keeps the plan's local layers out of the aggregate.
        let plan = manifest.parse().map_err(|problems| {
            AppError::unexpected(anyhow::anyhow!(
                "the run's plan no longer parses: {}",
                problems.join("; ")
            ))
        })?;
        let counts_steps = matches!(strategy, Strategy::FedNova | Strategy::Scaffold);
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
        let mut trained_sites = Vec::new();
        let mut contributions = Vec::new();
        let mut ordered: Vec<&update::Model> =
            got.values().filter(|u| u.outcome == "trained").collect();
        ordered.sort_by_key(|u| u.site_id);
        // Under secure aggregation the round has one update, the survivors' mean, and no site's
        // own: each contribution names the site's masked input and its public share.
        let secure = super::secure::sum_of(ctx, x).await?;
        if let Some(sum) = &secure {
            let mean = weights::from_safetensors(
                &self
                    .artifacts
                    .get(&sum.weights)
                    .await
                    .map_err(AppError::unexpected)?,
            )
            .map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
            let total: u64 = sum.survivors.iter().map(|(_, _, n)| n).sum();
            updates.push(Update {
                weights: mean,
                samples: total,
                loss_before: None,
                loss_after: None,
                steps: None,
            });
            for (site, masked, samples) in &sum.survivors {
                let u = got.get(site).filter(|u| u.outcome == "trained");
                contributions.push(Contribution {
                    site_id: *site,
                    site_name: site_name(ctx, *site).await?,
                    update_hash: masked.clone(),
                    samples: *samples,
                    evaluation: u
                        .and_then(|u| u.evaluation.as_ref())
                        .and_then(|e| from(e).ok())
                        .unwrap_or_default(),
                    train_loss_before: u.and_then(|u| u.train_loss_before).unwrap_or(f64::NAN),
                    train_loss_after: u.and_then(|u| u.train_loss_after).unwrap_or(f64::NAN),
                    privacy: u.and_then(|u| u.privacy.as_ref()).map(from).transpose()?,
                    weight: Some(*samples as f64 / total.max(1) as f64),
                    score: None,
                    down_weighted: false,
                    correction: None,
                    kept_at_site: plan.local_layers.clone(),
                });
            }
            ordered.clear();
        }
        for u in ordered {
            let hash = u.update_hash.clone().unwrap_or_default();
            let bytes = self
                .artifacts
                .get(&hash)
                .await
                .map_err(AppError::unexpected)?;
            let mut w = weights::from_safetensors(&bytes)
                .map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
            // The layers that stay at the sites are not in their updates (and whatever a site
            // sends of them is not used): the model keeps its own values of them.
            w.retain(|name, _| !plan.is_local(name));
            for (name, t) in global.iter().filter(|(n, _)| plan.is_local(n)) {
                w.insert(name.clone(), t.clone());
            }
            let samples = u.samples.unwrap_or(0).max(0) as u64;
            updates.push(Update {
                weights: w,
                samples,
                loss_before: u.train_loss_before,
                loss_after: u.train_loss_after,
                steps: counts_steps.then(|| plan.fednova_steps(samples)),
            });
            trained_sites.push(u.site_id);
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
                correction: None,
                kept_at_site: plan.local_layers.clone(),
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
        let scaffold = match &strategy {
            Strategy::Scaffold => Some(Scaffold {
                controls: self.controls(&state).await?,
                learning_rate: plan.optimiser.learning_rate(),
                sites_in_run: self.sites_in_run(ctx, r.id).await?,
            }),
            _ => None,
        };
        // The corrections this round's jobs carried, for the lineage.
        let sent = state.corrections.clone();
        let (g, u, s) = (global.clone(), updates, strategy.clone());
        let sites_trained = trained_sites;
        let next = tokio::task::spawn_blocking(move || {
            let out = aggregate(&s, &g, &u, &mut state)?;
            let controls = scaffold
                .map(|c| c.after(&g, &u, &sites_trained, &out.weights))
                .transpose()?;
            Ok::<_, consilium_core::aggregate::AggregateError>((out, state, controls))
        })
        .await
        .map_err(AppError::unexpected)?
        .map_err(|e| AppError::unexpected(anyhow::anyhow!("aggregation: {e}")))?;
        let (
            Aggregated {
                weights: mut next,
                sites,
            },
            mut state,
            controls,
        ) = next;
        // The model's own values of the layers that stay at the sites, exactly (a weighted
        // mean of equal tensors may round).
        for (name, t) in global.iter().filter(|(n, _)| plan.is_local(n)) {
            next.insert(name.clone(), t.clone());
        }
        if let Some((controls, corrections)) = controls {
            self.keep_controls(&mut state, &controls, corrections)
                .await?;
        }
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
        let contributions: Vec<Contribution> = if secure.is_some() {
            contributions
                .into_iter()
                .map(|c| Contribution {
                    train_loss_before: finite(c.train_loss_before),
                    train_loss_after: finite(c.train_loss_after),
                    ..c
                })
                .collect()
        } else {
            contributions
                .into_iter()
                .zip(sites.iter().zip(down))
                .map(|(c, (site, down_weighted))| Contribution {
                    train_loss_before: finite(c.train_loss_before),
                    train_loss_after: finite(c.train_loss_after),
                    weight: Some(site.weight),
                    score: site.score.filter(|s| s.is_finite()),
                    down_weighted,
                    correction: sent.get(&c.site_id.to_string()).cloned(),
                    ..c
                })
                .collect()
        };
        let secure_aggregation = match &secure {
            Some(sum) => Some(json(&sum.lineage(ctx).await?)?),
            None => None,
        };
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
            secure_aggregation: Set(secure_aggregation),
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

/// Sample-weighted mean of the sites' metrics (segmentation scores too, each over the sites
/// that have it).
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
        segmentation: SegmentationScores::weighted(
            ms.iter()
                .filter_map(|m| m.segmentation.as_ref().map(|s| (s, m.samples))),
        ),
    }
}

/// SCAFFOLD's inputs to a round's aggregation: the control variates so far, the plan's
/// learning rate and how many sites the run has.
struct Scaffold {
    controls: Controls,
    learning_rate: f64,
    sites_in_run: usize,
}

/// SCAFFOLD's control variates: the server's `c` and each site's `c_i`.
#[derive(Default)]
struct Controls {
    server: Weights,
    sites: BTreeMap<Uuid, Weights>,
}

impl Scaffold {
    /// The control variates after a round, and each site's correction `c − c_i` for the next
    /// one (every site the run has heard of; one that never trained gets `c`).
    fn after(
        self,
        global: &Weights,
        updates: &[Update],
        sites: &[Uuid],
        next: &Weights,
    ) -> Result<(Controls, BTreeMap<Uuid, Weights>), consilium_core::aggregate::AggregateError>
    {
        let Scaffold {
            mut controls,
            learning_rate,
            sites_in_run,
        } = self;
        let trained: Vec<ScaffoldSite<'_>> = updates
            .iter()
            .zip(sites)
            .map(|(u, id)| ScaffoldSite {
                weights: &u.weights,
                steps: u.steps.unwrap_or(0.0),
                control: controls.sites.get(id),
            })
            .collect();
        let sites_in_run = sites_in_run.max(trained.len());
        let (site_controls, server) = scaffold_controls(
            global,
            &trained,
            &controls.server,
            sites_in_run,
            learning_rate,
        )?;
        for (id, c) in sites.iter().zip(site_controls) {
            controls.sites.insert(*id, c);
        }
        controls.server = server;
        let corrections = controls
            .sites
            .iter()
            .map(|(id, c)| (*id, scaffold_correction(next, &controls.server, Some(c))))
            .collect();
        Ok((controls, corrections))
    }
}

impl Engine {
    /// SCAFFOLD's control variates as the last round left them (none before the first). An
    /// unreadable store fails the round: starting them again would change the training.
    async fn controls(&self, state: &ServerState) -> AppResult<Controls> {
        let Some(hash) = &state.controls else {
            return Ok(Controls::default());
        };
        let bytes = self
            .artifacts
            .get(hash)
            .await
            .map_err(AppError::unexpected)?;
        let all = weights::from_safetensors(&bytes).map_err(|e| {
            AppError::unexpected(anyhow::anyhow!("SCAFFOLD's control variates: {e}"))
        })?;
        let mut controls = Controls::default();
        for (name, t) in all {
            if let Some(n) = name.strip_prefix("server/") {
                controls.server.insert(n.to_string(), t);
            } else if let Some((id, n)) = name.strip_prefix("site/").and_then(|r| r.split_once('/'))
            {
                let id = Uuid::parse_str(id).map_err(|e| {
                    AppError::unexpected(anyhow::anyhow!(
                        "SCAFFOLD's control variates name {name}: {e}"
                    ))
                })?;
                controls
                    .sites
                    .entry(id)
                    .or_default()
                    .insert(n.to_string(), t);
            }
        }
        Ok(controls)
    }

    /// Stores the control variates and each site's next correction with the run's state.
    async fn keep_controls(
        &self,
        state: &mut ServerState,
        controls: &Controls,
        corrections: BTreeMap<Uuid, Weights>,
    ) -> AppResult<()> {
        let mut all = Weights::new();
        for (n, t) in &controls.server {
            all.insert(format!("server/{n}"), t.clone());
        }
        for (id, c) in &controls.sites {
            for (n, t) in c {
                all.insert(format!("site/{id}/{n}"), t.clone());
            }
        }
        let put = |w: &Weights| -> AppResult<Vec<u8>> {
            weights::to_safetensors(w).map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))
        };
        state.controls = Some(
            self.artifacts
                .put(put(&all)?)
                .await
                .map_err(AppError::unexpected)?,
        );
        state.corrections.clear();
        for (id, c) in corrections {
            let hash = self
                .artifacts
                .put(put(&c)?)
                .await
                .map_err(AppError::unexpected)?;
            state.corrections.insert(id.to_string(), hash);
        }
        Ok(())
    }

    /// The sites a run has asked to train so far (SCAFFOLD's N).
    async fn sites_in_run(&self, ctx: &AppContext, run: Uuid) -> AppResult<usize> {
        let mut all = std::collections::BTreeSet::new();
        for x in round::Entity::find()
            .filter(round::Column::RunId.eq(run))
            .all(&ctx.db)
            .await?
        {
            all.extend(from::<Vec<Uuid>>(&x.sites)?);
        }
        Ok(all.len())
    }
}

/// Each site's SCAFFOLD correction for the run's next round, as the last aggregation left
/// them (none for other strategies and before round 2).
pub(crate) async fn corrections(ctx: &AppContext, run: Uuid) -> AppResult<HashMap<Uuid, String>> {
    let state = run::Entity::find_by_id(run)
        .one(&ctx.db)
        .await?
        .and_then(|r| r.server_state);
    let Some(state) = state else {
        return Ok(HashMap::new());
    };
    let state: ServerState = serde_json::from_str(&state).map_err(AppError::unexpected)?;
    state
        .corrections
        .iter()
        .map(|(id, h)| {
            Ok((
                Uuid::parse_str(id).map_err(AppError::unexpected)?,
                h.clone(),
            ))
        })
        .collect()
}
