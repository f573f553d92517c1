//! Synthetic previews: the researcher asks a site (under a data-access grant in force), the
//! site's worker generates and checks a preview set, the site's custodian releases or rejects
//! it, and only then may the researcher see it. Every step is audited.

use base64::Engine as _;
use chrono::{Duration, Utc};
use consilium_core::Role;
use consilium_core::api::{
    DecidePreview, PreviewClassDto, PreviewDto, PreviewImageDto, RequestPreview,
};
use consilium_core::plan::{MAX_DELTA, Segmentation};
use consilium_core::preview::{
    MAX_PREVIEW_CLASSES, PreviewImageData, PreviewPrivacy, PreviewSet, PreviewSpec,
};
use consilium_core::protocol::{Job, JobKind, JobResult, Outcome};
use consilium_worker::artifacts::ArtifactStore;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};
use uuid::Uuid;

use super::{Checks, from_json, not_found};
use crate::audit;
use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::{access_request, heartbeat, plan, preview_set, user};
use crate::error::{AppError, AppResult};
use crate::services::privacy::{self, Settlement};
use crate::services::{directory, studies};

fn json<T: serde::Serialize>(v: &T) -> AppResult<serde_json::Value> {
    serde_json::to_value(v).map_err(AppError::unexpected)
}

/// Who may see what of a preview.
#[derive(PartialEq)]
enum Sight {
    None,
    /// The record (status, who decided), not the images.
    Record,
    /// Everything.
    Images,
}

async fn sight(ctx: &AppContext, actor: &Actor, m: &preview_set::Model) -> AppResult<Sight> {
    let site = directory::get_site(&ctx.db, m.site_id).await?;
    if actor.has(Role::Custodian) && site.custodians.contains(&actor.user_id) {
        return Ok(Sight::Images);
    }
    let study = studies::load_study(&ctx.db, m.study_id).await?;
    if actor.has(Role::Researcher) && study.researcher_id == actor.user_id {
        let granted = grant_in_force(ctx, m.study_id, m.site_id).await?.is_some();
        return Ok(if m.status == "released" && granted {
            Sight::Images
        } else {
            Sight::Record
        });
    }
    if actor.has(Role::Administrator) || actor.has(Role::Auditor) {
        return Ok(Sight::Record);
    }
    Ok(Sight::None)
}

async fn grant_in_force(
    ctx: &AppContext,
    study: Uuid,
    site: Uuid,
) -> AppResult<Option<access_request::Model>> {
    let now = Utc::now();
    Ok(access_request::Entity::find()
        .filter(access_request::Column::StudyId.eq(study))
        .filter(access_request::Column::SiteId.eq(site))
        .filter(access_request::Column::Status.eq("approved"))
        .order_by_desc(access_request::Column::DecidedAt)
        .all(&ctx.db)
        .await?
        .into_iter()
        .find(|g| g.expires_at.is_some_and(|e| e > now)))
}

/// The mask classes of the plan a preview ran under, when it is a segmentation plan.
async fn segmentation(ctx: &AppContext, m: &preview_set::Model) -> AppResult<Option<Segmentation>> {
    let Some(p) = plan::Entity::find()
        .filter(plan::Column::StudyId.eq(m.study_id))
        .filter(plan::Column::Hash.eq(m.plan_hash.as_str()))
        .one(&ctx.db)
        .await?
    else {
        return Ok(None);
    };
    Ok(studies::plan_dto(&p)?
        .manifest
        .parse()
        .ok()
        .and_then(|p| p.segmentation))
}

async fn dto(ctx: &AppContext, m: &preview_set::Model, images: bool) -> AppResult<PreviewDto> {
    let site = directory::get_site(&ctx.db, m.site_id).await?;
    let classes = match segmentation(ctx, m).await? {
        Some(seg) => seg
            .values
            .iter()
            .zip(&seg.names)
            .enumerate()
            .map(|(class, (value, name))| PreviewClassDto {
                value: *value,
                name: name.clone(),
                colour: consilium_core::preview::overlay_css(class),
            })
            .collect(),
        None => Vec::new(),
    };
    let labels: Vec<u32> = match &m.labels {
        Some(l) if images => from_json(l)?,
        _ => Vec::new(),
    };
    let decided_by_name = match m.decided_by {
        Some(id) => user::Entity::find_by_id(id)
            .one(&ctx.db)
            .await?
            .map(|u| u.name),
        None => None,
    };
    Ok(PreviewDto {
        id: m.id,
        study_id: m.study_id,
        site_id: m.site_id,
        site_name: site.name,
        requested_by: m.requested_by,
        grant_id: m.grant_id,
        plan_hash: m.plan_hash.clone(),
        status: m.status.clone(),
        generator: m.generator.clone(),
        epsilon: m.epsilon,
        delta: from_json::<PreviewSpec>(&m.spec)?.dp.map(|d| d.delta),
        images: labels
            .into_iter()
            .enumerate()
            .map(|(i, label)| PreviewImageDto {
                index: i as u32,
                label,
            })
            .collect(),
        classes,
        withheld: m.withheld.map(|w| w.max(0) as u32),
        memorisation: match (&m.memorisation, images) {
            (Some(v), true) => Some(from_json(v)?),
            _ => None,
        },
        summary: match (&m.summary, images) {
            (Some(v), true) => Some(from_json(v)?),
            _ => None,
        },
        failure: m.failure.clone(),
        decided_by: m.decided_by,
        decided_by_name,
        decided_at: m.decided_at,
        comment: m.comment.clone(),
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

async fn visible(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
) -> AppResult<(preview_set::Model, Sight)> {
    let m = preview_set::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("preview", id))?;
    match sight(ctx, actor, &m).await? {
        Sight::None => Err(not_found("preview", id)),
        s => Ok((m, s)),
    }
}

/// The study's researcher asks a site for a preview; the site's worker gets a job.
pub async fn request(
    ctx: &AppContext,
    actor: &Actor,
    study_id: Uuid,
    input: RequestPreview,
) -> AppResult<PreviewDto> {
    let s = studies::visible_study(&ctx.db, actor, study_id).await?;
    if !(actor.has(Role::Researcher) && s.researcher_id == actor.user_id) {
        return Err(AppError::Forbidden(
            "Only the study's researcher may ask its sites for previews.".into(),
        ));
    }
    let mut checks = Checks::default();
    let per_class = input.per_class.unwrap_or(12);
    checks.check(
        (1..=64).contains(&per_class),
        "per_class must be between 1 and 64",
    );
    checks.check(
        input
            .generator
            .as_deref()
            .is_none_or(|g| matches!(g, "cvae" | "pca_gaussian")),
        "generator must be `cvae` or `pca_gaussian`",
    );
    checks.check(
        s.sites.iter().any(|x| x.site_id == input.site_id),
        format!(
            "site_id: site {} does not take part in this study",
            input.site_id
        ),
    );
    checks.finish()?;
    let site = directory::get_site(&ctx.db, input.site_id).await?;
    let Some(grant) = grant_in_force(ctx, study_id, input.site_id).await? else {
        return Err(AppError::conflict(
            "no_grant",
            format!(
                "There is no data-access grant in force for {:?}: ask its custodian for access first; a preview is made under that grant.",
                site.name
            ),
        ));
    };
    let hashes: Vec<String> = from_json(&grant.plan_hashes)?;
    let plans = plan::Entity::find()
        .filter(plan::Column::StudyId.eq(study_id))
        .order_by_desc(plan::Column::Version)
        .all(&ctx.db)
        .await?;
    let Some(p) = plans.iter().find(|p| hashes.contains(&p.hash)) else {
        return Err(AppError::conflict(
            "plan_missing",
            "The grant names no plan of this study.",
        ));
    };
    let plan = studies::plan_dto(p)?;
    if let Some(seg) = plan.manifest.parse().ok().and_then(|p| p.segmentation)
        && seg.values.len() > MAX_PREVIEW_CLASSES
    {
        return Err(AppError::Unprocessable(vec![format!(
            "the plan's masks have {} classes, and a preview draws masks of at most {MAX_PREVIEW_CLASSES} (the generator learns each class as a channel beside the image); a preview of this study's data cannot be made",
            seg.values.len()
        )]));
    }
    let dp = private(&plan, &input)?;
    let engine = ctx.federation()?;
    let spec = PreviewSpec {
        per_class,
        generator: input.generator.clone(),
        dp,
        ..PreviewSpec::default()
    };
    let now = Utc::now();
    let id = Uuid::new_v4();
    let w = ctx.begin_write().await?;
    if let Some(dp) = &dp {
        // The generator's cost is reserved in the dataset's ledger before the job goes out.
        let patients = heartbeat::Entity::find()
            .filter(heartbeat::Column::SiteId.eq(input.site_id))
            .one(&*w)
            .await?
            .and_then(|b| b.patients);
        let reserved = privacy::reserve(
            &*w,
            privacy::Reservation {
                spender: privacy::Spender::Preview(dp),
                study_id,
                run_id: id,
                round: 0,
                site_id: input.site_id,
                site_name: &site.name,
                patients,
            },
        )
        .await?;
        if let Err(reason) = reserved {
            return Err(AppError::conflict(
                "privacy_budget",
                format!("No private preview was asked of the site: {reason}."),
            ));
        }
    }
    let m = preview_set::ActiveModel {
        id: Set(id),
        study_id: Set(study_id),
        site_id: Set(input.site_id),
        requested_by: Set(actor.user_id),
        grant_id: Set(grant.id),
        plan_hash: Set(plan.hash.clone()),
        status: Set("generating".into()),
        spec: Set(json(&spec)?),
        set_hash: Set(None),
        generator: Set(None),
        epsilon: Set(None),
        images: Set(None),
        withheld: Set(None),
        labels: Set(None),
        memorisation: Set(None),
        summary: Set(None),
        failure: Set(None),
        decided_by: Set(None),
        decided_at: Set(None),
        comment: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(&*w)
    .await?;
    let out = dto(ctx, &m, false).await?;
    audit::append(&*w, actor, "preview.requested", "preview", id, &out).await?;
    w.commit().await?;
    let job = Job {
        protocol: consilium_core::protocol::PROTOCOL_VERSION,
        job_id: Uuid::new_v4(),
        kind: JobKind::Preview,
        run_id: id,
        round: 0,
        study_id,
        site_id: input.site_id,
        plan_hash: plan.hash.clone(),
        manifest: plan.manifest.clone(),
        files: plan
            .files
            .iter()
            .map(|f| (f.name.clone(), f.sha256.clone()))
            .collect(),
        global_model: None,
        deadline: now + Duration::minutes(30),
        preview: Some(spec),
        correction: None,
    };
    if let Err(e) = engine.send_job(&job).await {
        mark_failed(
            ctx,
            id,
            &format!("the job could not be sent to the site: {e}"),
            Spent::Nothing,
        )
        .await?;
    }
    Ok(out)
}

/// The budget a preview request asks for, checked against the plan: a study whose plan trains
/// with DP-SGD gets only private previews of its sites' data.
fn private(
    plan: &consilium_core::api::PlanDto,
    input: &RequestPreview,
) -> AppResult<Option<PreviewPrivacy>> {
    let plan_dp = plan.manifest.parse().ok().and_then(|p| p.dp_sgd);
    let Some(epsilon) = input.epsilon else {
        if let Some(dp) = plan_dp {
            return Err(AppError::Unprocessable(vec![format!(
                "epsilon: this study's plan trains with DP-SGD (each patient at most ε = {} at δ = {}), so a preview of its sites' data must be private too; give the ε the preview may spend (for example 1)",
                dp.epsilon, dp.delta
            )]));
        }
        if input.delta.is_some() {
            return Err(AppError::Unprocessable(vec![
                "delta is the δ of a private preview: give epsilon too, or leave delta out".into(),
            ]));
        }
        return Ok(None);
    };
    let delta = input
        .delta
        .or(plan_dp.map(|d| d.delta))
        .unwrap_or(DEFAULT_DELTA);
    let mut checks = Checks::default();
    checks.check(
        epsilon.is_finite() && epsilon > 0.0 && epsilon <= privacy::MAX_BUDGET_EPSILON,
        format!(
            "epsilon must be a number above 0 and at most {}; it is {epsilon}",
            privacy::MAX_BUDGET_EPSILON
        ),
    );
    checks.check(
        delta.is_finite() && delta > 0.0 && delta <= MAX_DELTA,
        format!(
            "delta must be above 0 and at most {MAX_DELTA} (the chance the guarantee fails outright; 1e-5 is usual); it is {delta}"
        ),
    );
    checks.check(
        input.generator.as_deref() != Some("pca_gaussian"),
        "generator: pca_gaussian cannot be trained with DP-SGD; a private preview uses cvae",
    );
    checks.finish()?;
    Ok(Some(PreviewPrivacy {
        epsilon,
        delta,
        max_grad_norm: plan_dp.map_or(DEFAULT_MAX_GRAD_NORM, |d| d.max_grad_norm),
    }))
}

/// δ of a private preview when neither the request nor the plan gives one.
pub const DEFAULT_DELTA: f64 = 1e-5;
/// C of a private preview's generator when the plan has no DP-SGD of its own.
pub const DEFAULT_MAX_GRAD_NORM: f64 = 1.0;

/// What a preview that ends without a set cost the dataset.
enum Spent {
    /// The site did not train (the job never went out, or the site refused it).
    Nothing,
    /// The site may have trained the generator before it failed.
    Maybe,
}

async fn mark_failed(ctx: &AppContext, id: Uuid, reason: &str, spent: Spent) -> AppResult<()> {
    let w = ctx.begin_write().await?;
    if let Some(m) = preview_set::Entity::find_by_id(id).one(&*w).await? {
        let why = format!("the preview failed: {reason}");
        privacy::settle(
            &*w,
            id,
            0,
            m.site_id,
            match spent {
                Spent::Nothing => Settlement::Released(why),
                Spent::Maybe => Settlement::Assumed(why),
            },
        )
        .await?;
        let mut a: preview_set::ActiveModel = m.into();
        a.status = Set("failed".into());
        a.failure = Set(Some(reason.to_string()));
        a.updated_at = Set(Utc::now());
        let m = a.update(&*w).await?;
        audit::append(
            &*w,
            &Actor::system(),
            "preview.failed",
            "preview",
            id,
            &m.failure,
        )
        .await?;
    }
    w.commit().await?;
    Ok(())
}

pub async fn is_preview(ctx: &AppContext, id: Uuid) -> AppResult<bool> {
    Ok(preview_set::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .is_some())
}

/// A site's answer to a preview job (counted once: later copies are ignored).
pub async fn record(ctx: &AppContext, artifacts: &ArtifactStore, r: JobResult) -> AppResult<()> {
    let Some(m) = preview_set::Entity::find_by_id(r.run_id)
        .one(&ctx.db)
        .await?
    else {
        return Ok(());
    };
    if m.status != "generating" || m.site_id != r.site_id {
        tracing::info!(preview = %m.id, "a repeated or misaddressed preview result, ignored");
        return Ok(());
    }
    match r.outcome {
        Outcome::Previewed {
            set,
            images,
            withheld,
            privacy: spent,
            ..
        } => {
            let bytes = artifacts.get(&set).await.map_err(AppError::unexpected)?;
            let parsed: PreviewSet =
                serde_json::from_slice(&bytes).map_err(AppError::unexpected)?;
            let labels: Vec<u32> = parsed.images.iter().map(|i| i.label).collect();
            if let Err(problem) = masks_fit(&parsed, segmentation(ctx, &m).await?.as_ref()) {
                tracing::warn!(site = %r.site_id, preview = %m.id, problem, "a preview set that does not fit its plan");
                return mark_failed(
                    ctx,
                    m.id,
                    &format!("the site's set does not fit the study's plan, so it is not shown: {problem}"),
                    Spent::Maybe,
                )
                .await;
            }
            let w = ctx.begin_write().await?;
            let held = privacy::reservation(&*w, m.id, 0, m.site_id).await?;
            let problem = match (&held, &spent) {
                (None, None) => None,
                (None, Some(_)) => Some(
                    "the site trained a private generator for a preview that was not asked to be private"
                        .to_string(),
                ),
                (Some(_), None) => Some(
                    "the preview was asked to be private, and the site reported no privacy cost"
                        .to_string(),
                ),
                (Some(h), Some(s)) => {
                    privacy::unreproducible(s).or_else(|| privacy::disagreement(h, s))
                }
            };
            if held.is_some() {
                privacy::settle(
                    &*w,
                    m.id,
                    0,
                    m.site_id,
                    Settlement::Spent {
                        reported: spent.as_ref().map(|s| s.rdp.clone()),
                        note: problem
                            .as_ref()
                            .map(|p| format!("the preview is not shown: {p}")),
                    },
                )
                .await?;
            }
            if let Some(problem) = problem {
                tracing::warn!(site = %r.site_id, preview = %m.id, problem, "privacy alarm");
                audit::append(
                    &*w,
                    &Actor::system(),
                    "privacy.alarm",
                    "preview",
                    m.id,
                    &serde_json::json!({"preview_id": m.id, "site_id": r.site_id, "job_id": r.job_id, "problem": problem}),
                )
                .await?;
                w.commit().await?;
                return mark_failed(
                    ctx,
                    m.id,
                    &format!("its privacy does not add up, so it is not shown: {problem}"),
                    Spent::Maybe,
                )
                .await;
            }
            // The ε shown is the server's own account of what the set spent.
            let epsilon = match privacy::reservation(&*w, m.id, 0, m.site_id).await? {
                Some(row) => Some(privacy::row_epsilon(&row)?),
                None => None,
            };
            let mut a: preview_set::ActiveModel = m.into();
            a.status = Set("awaiting_release".into());
            a.set_hash = Set(Some(set));
            a.generator = Set(Some(parsed.generator.clone()));
            a.epsilon = Set(epsilon);
            a.images = Set(Some(images as i32));
            a.withheld = Set(Some(withheld as i32));
            a.labels = Set(Some(json(&labels)?));
            a.memorisation = Set(Some(json(&parsed.memorisation)?));
            a.summary = Set(Some(json(&parsed.summary)?));
            a.updated_at = Set(Utc::now());
            let m = a.update(&*w).await?;
            audit::append(
                &*w,
                &Actor::system(),
                "preview.generated",
                "preview",
                m.id,
                &(m.set_hash.clone(), images, withheld),
            )
            .await?;
            w.commit().await?;
            Ok(())
        }
        Outcome::Refused { reason } => mark_failed(ctx, m.id, &reason, Spent::Nothing).await,
        Outcome::Failed { reason } => mark_failed(ctx, m.id, &reason, Spent::Maybe).await,
        _ => {
            mark_failed(
                ctx,
                m.id,
                "the site answered with something other than a preview",
                Spent::Maybe,
            )
            .await
        }
    }
}

pub async fn list(ctx: &AppContext, actor: &Actor, study_id: Uuid) -> AppResult<Vec<PreviewDto>> {
    studies::visible_study(&ctx.db, actor, study_id).await?;
    let rows = preview_set::Entity::find()
        .filter(preview_set::Column::StudyId.eq(study_id))
        .order_by_desc(preview_set::Column::CreatedAt)
        .all(&ctx.db)
        .await?;
    let mut out = Vec::new();
    for m in rows {
        match sight(ctx, actor, &m).await? {
            Sight::None => {}
            s => out.push(dto(ctx, &m, s == Sight::Images).await?),
        }
    }
    Ok(out)
}

pub async fn get(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<PreviewDto> {
    let (m, s) = visible(ctx, actor, id).await?;
    dto(ctx, &m, s == Sight::Images).await
}

/// One image of a set as the site sent it, for someone who may see the images; with the
/// plan's mask classes for a preview of segmentation data.
async fn stored_image(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    index: u32,
) -> AppResult<(PreviewImageData, u32, Option<Segmentation>)> {
    let (m, s) = visible(ctx, actor, id).await?;
    if s != Sight::Images {
        return Err(AppError::Forbidden(
            "The images are shown to the study's researcher once the site's custodian has released them.".into(),
        ));
    }
    let hash = m
        .set_hash
        .clone()
        .ok_or_else(|| AppError::conflict("invalid_state", "This preview has no images (yet)."))?;
    let engine = ctx.federation()?;
    let bytes = engine
        .artifacts
        .get(&hash)
        .await
        .map_err(AppError::unexpected)?;
    let set: PreviewSet = serde_json::from_slice(&bytes).map_err(AppError::unexpected)?;
    let count = set.images.len();
    let img = set.images.into_iter().nth(index as usize).ok_or_else(|| {
        AppError::NotFound(format!(
            "This preview has {count} images (0 to {}); there is no image {index}.",
            count.saturating_sub(1)
        ))
    })?;
    Ok((img, set.image_size, segmentation(ctx, &m).await?))
}

/// A stored set that no longer reads as it was checked on arrival.
fn broken(problem: String) -> AppError {
    AppError::unexpected(anyhow::anyhow!("a stored preview set: {problem}"))
}

fn base64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(|e| format!("not base64: {e}"))
}

/// Decodes an 8-bit grey PNG the site sent, refusing any other size than the set's (the site
/// is not trusted to send a decompression bomb).
fn grey(png: &[u8], size: u32) -> Result<image::GrayImage, String> {
    let mut reader =
        image::ImageReader::with_format(std::io::Cursor::new(png), image::ImageFormat::Png);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(size);
    limits.max_image_height = Some(size);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| format!("not a PNG of {size}×{size}: {e}"))?;
    match img {
        image::DynamicImage::ImageLuma8(g) if g.dimensions() == (size, size) => Ok(g),
        other => Err(format!(
            "a {}×{} {:?} image, not {size}×{size} 8-bit grey",
            other.width(),
            other.height(),
            other.color()
        )),
    }
}

/// A base64 PNG of a set, decoded as `grey` does.
fn grey_b64(text: &str, size: u32) -> Result<image::GrayImage, String> {
    base64(text).and_then(|png| grey(&png, size))
}

/// Whether a set's masks are what its plan asks: one per image, of the image's size, naming
/// only the plan's classes, for a segmentation plan; none for a classifier's.
fn masks_fit(set: &PreviewSet, seg: Option<&Segmentation>) -> Result<(), String> {
    for (i, img) in set.images.iter().enumerate() {
        match (seg, &img.mask_png_base64) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(format!(
                    "image {i} carries a mask, and the plan trains a classifier"
                ));
            }
            (Some(_), None) => {
                return Err(format!(
                    "image {i} has no mask, and the plan segments images"
                ));
            }
            (Some(seg), Some(mask)) => {
                // The overlay decodes the image too.
                grey_b64(&img.png_base64, set.image_size).map_err(|e| format!("image {i}: {e}"))?;
                let mask =
                    grey_b64(mask, set.image_size).map_err(|e| format!("image {i}'s mask: {e}"))?;
                if let Some(c) = mask
                    .pixels()
                    .map(|p| p.0[0])
                    .find(|c| usize::from(*c) >= seg.values.len())
                {
                    return Err(format!(
                        "image {i}'s mask has class {c}, and the plan names {} classes",
                        seg.values.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// One image of a set, as PNG.
pub async fn image(ctx: &AppContext, actor: &Actor, id: Uuid, index: u32) -> AppResult<Vec<u8>> {
    let (img, _, _) = stored_image(ctx, actor, id, index).await?;
    base64(&img.png_base64).map_err(broken)
}

/// Which drawing of an image's synthetic mask to return.
#[derive(Clone, Copy)]
pub enum MaskView {
    /// The mask alone: a grey PNG of the plan's mask values (16-bit when a value needs it).
    Mask,
    /// The image with the mask's classes in their colours over it (RGB PNG).
    Overlay,
}

/// An image's synthetic mask (a preview of segmentation data), as PNG.
pub async fn mask(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    index: u32,
    view: MaskView,
) -> AppResult<Vec<u8>> {
    let (img, size, seg) = stored_image(ctx, actor, id, index).await?;
    let (Some(seg), Some(mask)) = (seg, &img.mask_png_base64) else {
        return Err(AppError::NotFound(
            "This preview's images have no masks: its plan trains a classifier, not a segmentation model.".into(),
        ));
    };
    // Checked when the set arrived (`masks_fit`).
    let classes = grey_b64(mask, size).map_err(broken)?;
    let mut out = std::io::Cursor::new(Vec::new());
    let written = match view {
        MaskView::Mask => {
            let values: Vec<u16> = classes
                .pixels()
                .map(|p| seg.values.get(usize::from(p.0[0])).copied().unwrap_or(0))
                .collect();
            match u8::try_from(values.iter().copied().max().unwrap_or(0)) {
                Ok(_) => image::GrayImage::from_raw(
                    size,
                    size,
                    values.iter().map(|v| *v as u8).collect(),
                )
                .map(|g| g.write_to(&mut out, image::ImageFormat::Png)),
                Err(_) => image::ImageBuffer::<image::Luma<u16>, _>::from_raw(size, size, values)
                    .map(|g| g.write_to(&mut out, image::ImageFormat::Png)),
            }
        }
        MaskView::Overlay => {
            let grey = grey_b64(&img.png_base64, size).map_err(broken)?;
            let rgb = consilium_core::preview::overlay(grey.as_raw(), classes.as_raw());
            image::RgbImage::from_raw(size, size, rgb)
                .map(|g| g.write_to(&mut out, image::ImageFormat::Png))
        }
    };
    match written {
        Some(Ok(())) => Ok(out.into_inner()),
        Some(Err(e)) => Err(AppError::unexpected(e)),
        None => Err(broken("a mask of the wrong number of pixels".into())),
    }
}

/// The site's custodian releases or rejects a generated preview set.
pub async fn decide(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: DecidePreview,
) -> AppResult<PreviewDto> {
    let (m, _) = visible(ctx, actor, id).await?;
    let site = directory::get_site(&ctx.db, m.site_id).await?;
    if !(actor.has(Role::Custodian) && site.custodians.contains(&actor.user_id)) {
        return Err(AppError::Forbidden(format!(
            "Only the custodian of {:?} may release or reject its previews.",
            site.name
        )));
    }
    let mut checks = Checks::default();
    let comment = checks.text("comment", &input.comment, 20_000, true);
    let status = match input.decision.as_str() {
        "release" => "released",
        "reject" => "rejected",
        _ => {
            checks.check(false, "decision must be `release` or `reject`");
            ""
        }
    };
    checks.finish()?;
    if m.status != "awaiting_release" {
        return Err(AppError::conflict(
            "invalid_state",
            format!(
                "This preview is {}; only a generated set awaiting release can be released or rejected.",
                m.status.replace('_', " ")
            ),
        ));
    }
    let w = ctx.begin_write().await?;
    let mut a: preview_set::ActiveModel = m.into();
    a.status = Set(status.into());
    a.decided_by = Set(Some(actor.user_id));
    a.decided_at = Set(Some(Utc::now()));
    a.comment = Set(Some(comment));
    a.updated_at = Set(Utc::now());
    let m = a.update(&*w).await?;
    let out = dto(ctx, &m, true).await?;
    audit::append(
        &*w,
        actor,
        &format!("preview.{status}"),
        "preview",
        id,
        &out,
    )
    .await?;
    w.commit().await?;
    Ok(out)
}
