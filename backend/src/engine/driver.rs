//! The round driver: opens rounds (governance checked again each time), sends the jobs,
//! waits for the sites until the deadline, and moves each round on.

use super::rounds::{self, RoundState, Step};
use super::*;
use crate::services::privacy;

/// How long a private round waits for sites whose workers are still reading their data.
const PATIENTS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Engine {
    pub(super) async fn plan_of(
        &self,
        ctx: &AppContext,
        r: &run::Model,
    ) -> AppResult<(TrainingPlanManifest, Vec<(String, String)>)> {
        let p = plan::Entity::find()
            .filter(plan::Column::StudyId.eq(r.study_id))
            .filter(plan::Column::Hash.eq(r.plan_hash.as_str()))
            .one(&ctx.db)
            .await?
            .ok_or_else(|| {
                AppError::unexpected(anyhow::anyhow!("the run's plan {} is gone", r.plan_hash))
            })?;
        let dto = studies::plan_dto(&p)?;
        Ok((
            dto.manifest,
            dto.files.into_iter().map(|f| (f.name, f.sha256)).collect(),
        ))
    }

    #[tracing::instrument(skip(self, ctx))]
    pub(super) async fn drive(&self, ctx: &AppContext, run_id: Uuid) -> AppResult<()> {
        // The round this process opened (and sent jobs for); any other collecting round was
        // found at start, and its unanswered jobs are sent again.
        let mut opened: Option<i32> = None;
        loop {
            let Some(r) = run::Entity::find_by_id(run_id).one(&ctx.db).await? else {
                return Ok(());
            };
            if r.status != "running" {
                return Ok(());
            }
            let (manifest, files) = self.plan_of(ctx, &r).await?;
            let latest = round::Entity::find()
                .filter(round::Column::RunId.eq(run_id))
                .order_by_desc(round::Column::Number)
                .one(&ctx.db)
                .await?;
            let latest = match latest {
                None => None,
                Some(x) => match RoundState::parse(&x.state) {
                    Some(state) => Some((x, state)),
                    None => {
                        return Err(AppError::unexpected(anyhow::anyhow!(
                            "round {} of run {run_id} is in an unknown state {:?}",
                            x.number,
                            x.state
                        )));
                    }
                },
            };
            let step = rounds::step(latest.as_ref().map(|(x, s)| (x.number, *s)));
            match (step, latest) {
                (Step::Open(1), None) => {
                    self.open_round(ctx, &r, &manifest, &files, 1, None).await?;
                    opened = Some(1);
                }
                (Step::Collect(n), Some((x, _))) => {
                    let resend = opened != Some(n);
                    self.collect(ctx, &r, &manifest, &files, x, resend).await?
                }
                (Step::Aggregate(_), Some((x, _))) => {
                    self.aggregate(ctx, &r, &manifest, &files, x).await?
                }
                (Step::Close(_), Some((x, _))) => self.close(ctx, &r, &manifest, x).await?,
                (Step::Open(n), Some((x, _))) => {
                    let global = match x.model_version_id {
                        Some(id) => model_version::Entity::find_by_id(id)
                            .one(&ctx.db)
                            .await?
                            .map(|m| m.hash),
                        None => None,
                    };
                    self.open_round(ctx, &r, &manifest, &files, n, global)
                        .await?;
                    opened = Some(n);
                }
                (Step::Fail(_), Some((x, _))) => {
                    let why = x.failure.clone().unwrap_or_else(|| "a round failed".into());
                    return self.finish(ctx, run_id, "failed", &why).await;
                }
                (step, _) => {
                    return Err(AppError::unexpected(anyhow::anyhow!(
                        "run {run_id}: no round for step {step:?}"
                    )));
                }
            }
        }
    }

    /// Ends a run with a status and the reason, audited.
    pub async fn finish(
        &self,
        ctx: &AppContext,
        run_id: Uuid,
        status: &str,
        reason: &str,
    ) -> AppResult<()> {
        let w = ctx.begin_write().await?;
        let Some(r) = run::Entity::find_by_id(run_id).one(&*w).await? else {
            return Ok(());
        };
        let mut a: run::ActiveModel = r.into();
        a.status = Set(status.to_string());
        a.stop_reason = Set(Some(reason.to_string()));
        let r = a.update(&*w).await?;
        privacy::end_run(&*w, run_id, status).await?;
        audit::append(
            &*w,
            &Actor::system(),
            &format!("run.{status}"),
            "run",
            run_id,
            &run_service::run_dto(&r)?,
        )
        .await?;
        w.commit().await?;
        tracing::info!(run = %run_id, status, reason, "run ended");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn publish(
        &self,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        number: i32,
        sites: &[Uuid],
        kind: JobKind,
        model: &str,
        deadline: chrono::DateTime<Utc>,
        corrections: &HashMap<Uuid, String>,
    ) -> Vec<(Uuid, String)> {
        let mut failed = Vec::new();
        for site in sites {
            let job = Job {
                protocol: consilium_core::protocol::PROTOCOL_VERSION,
                job_id: job_id(r.id, number, *site, kind),
                kind,
                run_id: r.id,
                round: number as u32,
                study_id: r.study_id,
                site_id: *site,
                plan_hash: r.plan_hash.clone(),
                manifest: manifest.clone(),
                files: files.to_vec(),
                global_model: Some(model.to_string()),
                deadline,
                preview: None,
                correction: if kind == JobKind::Train {
                    corrections.get(site).cloned()
                } else {
                    None
                },
            };
            if let Err(e) =
                consilium_worker::broker::send_job(&*self.broker, &self.signer, &job).await
            {
                failed.push((*site, format!("the job could not be sent: {e}")));
            }
        }
        failed
    }

    /// The training patients each site's worker last reported, waiting a while for workers
    /// that run but are still reading their data (a private round's cost depends on the
    /// count).
    pub(super) async fn patients_of(
        &self,
        ctx: &AppContext,
        sites: &[Uuid],
    ) -> AppResult<HashMap<Uuid, Option<i64>>> {
        let until = std::time::Instant::now()
            + PATIENTS_WAIT.min(self.round_timeout.to_std().unwrap_or_default());
        loop {
            let beats = heartbeat::Entity::find()
                .filter(heartbeat::Column::SiteId.is_in(sites.iter().copied()))
                .all(&ctx.db)
                .await?;
            let known: HashMap<Uuid, Option<i64>> =
                beats.into_iter().map(|b| (b.site_id, b.patients)).collect();
            // A site with no heartbeat at all has no worker running: it is not waited for.
            let all = sites
                .iter()
                .all(|s| known.get(s).is_none_or(|n| n.is_some()));
            if all || std::time::Instant::now() >= until {
                return Ok(known);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// Re-checks governance, selects the sites, and sends round `number`'s training jobs.
    #[tracing::instrument(skip_all, fields(run = %r.id, round = number))]
    pub(super) async fn open_round(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        number: i32,
        global: Option<String>,
    ) -> AppResult<()> {
        let check = run_service::check(&ctx.db, r.study_id, Some(&r.plan_hash)).await?;
        if !check.study_unmet.is_empty() {
            return self
                .finish(
                    ctx,
                    r.id,
                    "paused",
                    &format!(
                        "Round {number} can't start: {}",
                        check.study_unmet.join(" ")
                    ),
                )
                .await;
        }
        let total = check.eligible_sites.len() + check.site_unmet.len();
        let quorum = manifest
            .aggregation
            .min_sites
            .map_or(total, |q| q as usize)
            .clamp(1, total.max(1)) as i32;
        if (check.eligible_sites.len() as i32) < quorum {
            let reasons: Vec<String> = check
                .site_unmet
                .iter()
                .map(|(_, why)| why.clone())
                .collect();
            return self.finish(ctx, r.id, "paused", &format!(
                "Round {number} can't start: only {} of {total} sites may take part and the plan needs {quorum} ({}).",
                check.eligible_sites.len(), reasons.join(" ")
            )).await;
        }
        // Round 1 starts from the plan's seeded initial model, stored like any other.
        let plan = manifest.parse().map_err(|p| {
            AppError::unexpected(anyhow::anyhow!(
                "the approved plan does not parse: {}",
                p.join("; ")
            ))
        })?;
        let global = match global {
            Some(g) => g,
            None => {
                let plan = plan.clone();
                let bytes = tokio::task::spawn_blocking(move || {
                    consilium_worker::train::Net::new(&plan, &candle_core::Device::Cpu)
                        .and_then(|n| n.to_safetensors())
                })
                .await
                .map_err(AppError::unexpected)?
                .map_err(|e| {
                    AppError::unexpected(anyhow::anyhow!("the plan's model can't be built: {e}"))
                })?;
                self.artifacts
                    .put(bytes)
                    .await
                    .map_err(AppError::unexpected)?
            }
        };
        let mut excluded: Vec<ExcludedSite> = check
            .site_unmet
            .iter()
            .map(|(s, why)| ExcludedSite {
                site_id: *s,
                reason: why.clone(),
            })
            .collect();
        let patients = match &plan.dp_sgd {
            Some(_) => self.patients_of(ctx, &check.eligible_sites).await?,
            None => HashMap::new(),
        };
        // Under secure aggregation the round also holds the exchanges after training: the
        // reveals, then the evaluation, a stage each.
        let deadline = Utc::now()
            + self.round_timeout
            + plan.secure_aggregation.map_or(Duration::zero(), |s| {
                Duration::seconds(2 * i64::from(s.stage_seconds))
            });
        let w = ctx.begin_write().await?;
        // A private round's cost is reserved in each site's dataset ledger before its job
        // goes out, in this transaction; a site whose run or dataset budget it would exceed
        // is left out, with the reason.
        let mut sites = check.eligible_sites.clone();
        if let Some(dp) = &plan.dp_sgd {
            let mut kept = Vec::new();
            let mut over = Vec::new();
            for s in &sites {
                let name = site::Entity::find_by_id(*s)
                    .one(&*w)
                    .await?
                    .map_or_else(|| s.to_string(), |x| x.name);
                let reserved = privacy::reserve(
                    &*w,
                    privacy::Reservation {
                        spender: privacy::Spender::Round(&plan, dp),
                        study_id: r.study_id,
                        run_id: r.id,
                        round: number,
                        site_id: *s,
                        site_name: &name,
                        patients: patients.get(s).copied().flatten(),
                    },
                )
                .await?;
                match reserved {
                    Ok(()) => kept.push(*s),
                    Err(reason) => {
                        over.push(reason.clone());
                        excluded.push(ExcludedSite {
                            site_id: *s,
                            reason,
                        });
                    }
                }
            }
            if (kept.len() as i32) < quorum {
                drop(w);
                return self
                    .finish(
                        ctx,
                        r.id,
                        "stopped",
                        &format!(
                            "Round {number} can't start: only {} of {total} sites can spend its privacy cost and the plan needs {quorum} ({}).",
                            kept.len(),
                            over.join("; ")
                        ),
                    )
                    .await;
            }
            sites = kept;
        }
        let m = round::ActiveModel {
            id: Set(Uuid::new_v4()),
            run_id: Set(r.id),
            number: Set(number),
            state: Set(RoundState::Collecting.as_str().into()),
            deadline: Set(deadline),
            quorum: Set(quorum),
            sites: Set(json(&sites)?),
            excluded: Set(json(&excluded)?),
            global_in: Set(Some(global.clone())),
            model_version_id: Set(None),
            failure: Set(None),
            created_at: Set(Utc::now()),
            updated_at: Set(Utc::now()),
        }
        .insert(&*w)
        .await?;
        audit::append(&*w, &Actor::system(), "round.opened", "round", m.id, &serde_json::json!({
            "run_id": r.id, "round": number, "sites": sites, "excluded": excluded, "global_in": global, "deadline": deadline,
        }))
        .await?;
        w.commit().await?;
        let corrections = super::versions::corrections(ctx, r.id).await?;
        self.publish(
            r,
            manifest,
            files,
            number,
            &sites,
            JobKind::Train,
            &global,
            deadline,
            &corrections,
        )
        .await;
        Ok(())
    }

    pub(super) async fn results_of(
        &self,
        ctx: &AppContext,
        run_id: Uuid,
        number: i32,
        kind: &str,
    ) -> AppResult<HashMap<Uuid, update::Model>> {
        let rows = update::Entity::find()
            .filter(update::Column::RunId.eq(run_id))
            .filter(update::Column::Round.eq(number))
            .filter(update::Column::Kind.eq(kind))
            .filter(update::Column::Late.eq(false))
            .all(&ctx.db)
            .await?;
        Ok(rows.into_iter().map(|u| (u.site_id, u)).collect())
    }

    /// Waits until every site answered or the deadline passed. With `resend` (a round found
    /// at start) the unanswered jobs are sent again first: the same job ids, so a site's
    /// second answer is not counted.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn wait_for(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        x: &round::Model,
        kind: JobKind,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        model: &str,
        askable: &[Uuid],
        resend: bool,
    ) -> AppResult<HashMap<Uuid, update::Model>> {
        let sites: Vec<Uuid> = from(&x.sites)?;
        let label = if kind == JobKind::Train {
            "train"
        } else {
            "evaluate"
        };
        let mut resent = !resend;
        loop {
            let notified = self.notify.notified();
            let got = self.results_of(ctx, r.id, x.number, label).await?;
            let missing: Vec<Uuid> = sites
                .iter()
                .filter(|s| !got.contains_key(s))
                .copied()
                .collect();
            if missing.is_empty() || Utc::now() > x.deadline {
                return Ok(got);
            }
            if !resent {
                let wanted: Vec<Uuid> = missing
                    .iter()
                    .filter(|s| askable.contains(s))
                    .copied()
                    .collect();
                let corrections = match kind {
                    JobKind::Train => super::versions::corrections(ctx, r.id).await?,
                    _ => HashMap::new(),
                };
                self.publish(
                    r,
                    manifest,
                    files,
                    x.number,
                    &wanted,
                    kind,
                    model,
                    x.deadline,
                    &corrections,
                )
                .await;
                resent = true;
            }
            if !still_running(ctx, r.id).await? {
                return Ok(got);
            }
            let left = (x.deadline - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(std::time::Duration::from_secs(2));
            // Woken by a new result or not before `left` has passed: either way, look again.
            let _woken = tokio::time::timeout(left, notified).await.is_ok();
        }
    }

    #[tracing::instrument(skip_all, fields(run = %r.id, round = x.number))]
    pub(super) async fn collect(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        x: round::Model,
        resend: bool,
    ) -> AppResult<()> {
        if let Some(s) = crate::services::secagg::secure_round(&ctx.db, r.id, x.number).await? {
            return self.collect_secure(ctx, r, x, s).await;
        }
        let global = x.global_in.clone().unwrap_or_default();
        let sites: Vec<Uuid> = from(&x.sites)?;
        let got = self
            .wait_for(
                ctx,
                r,
                &x,
                JobKind::Train,
                manifest,
                files,
                &global,
                &sites,
                resend,
            )
            .await?;
        if !still_running(ctx, r.id).await? {
            return Ok(());
        }
        let mut excluded: Vec<ExcludedSite> = from(&x.excluded)?;
        let mut trained = 0;
        for s in &sites {
            match got.get(s) {
                Some(u) if u.outcome == "trained" => trained += 1,
                Some(u) => excluded.push(ExcludedSite {
                    site_id: *s,
                    reason: format!("{}: {}", u.outcome, u.reason.clone().unwrap_or_default()),
                }),
                None => excluded.push(ExcludedSite {
                    site_id: *s,
                    reason: "no update before the deadline".into(),
                }),
            }
        }
        let w = ctx.begin_write().await?;
        settle_unanswered(&*w, r.id, &x, &sites, &got).await?;
        let mut a: round::ActiveModel = x.clone().into();
        a.excluded = Set(json(&excluded)?);
        a.updated_at = Set(Utc::now());
        let next = rounds::after_collecting(trained as u32, x.quorum.max(0) as u32);
        a.state = Set(next.as_str().into());
        let action = if next == RoundState::Aggregating {
            "round.collected"
        } else {
            // The first site's reason, so the run's failure says what to change (a diverged
            // model, a refused plan); the round lists every site's.
            let why = match excluded.as_slice() {
                [] => String::new(),
                [one] => format!(
                    " The site left out said: {}.",
                    one.reason.trim_end_matches('.')
                ),
                [first, rest @ ..] => format!(
                    " The first of {} sites left out said: {} (the round lists each).",
                    rest.len() + 1,
                    first.reason.trim_end_matches('.')
                ),
            };
            a.failure = Set(Some(format!(
                "Round {} failed: {trained} of {} sites sent an update, the plan needs {}.{why}",
                x.number,
                sites.len(),
                x.quorum
            )));
            "round.failed"
        };
        let m = a.update(&*w).await?;
        audit::append(&*w, &Actor::system(), action, "round", m.id, &serde_json::json!({
            "run_id": r.id, "round": m.number, "trained": trained, "excluded": excluded, "failure": m.failure,
        }))
        .await?;
        w.commit().await?;
        Ok(())
    }
}

/// A private round's reservation of each site that did not answer is counted as spent: the
/// site may have trained.
pub(super) async fn settle_unanswered(
    w: &impl sea_orm::ConnectionTrait,
    run: Uuid,
    x: &round::Model,
    sites: &[Uuid],
    got: &HashMap<Uuid, update::Model>,
) -> AppResult<()> {
    for s in sites.iter().filter(|s| !got.contains_key(s)) {
        privacy::settle(
            w,
            run,
            x.number,
            *s,
            privacy::Settlement::Assumed(
                "no answer before the deadline; counted as spent, since the site may have trained"
                    .into(),
            ),
        )
        .await?;
    }
    Ok(())
}
