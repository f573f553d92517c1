//! What the browser tests set up through the services (as an integration would through the
//! API) before the browser takes over.

use consilium_backend::domain::Actor;
use consilium_backend::services::{access, studies};
use consilium_core::Role;
use consilium_core::api::{
    AccessDecision, CreateAccessRequest, CreateStudy, DataScope, DecideAccessRequest,
    ReviewDecision, StudyDto, StudySite, SubmitPlan, SubmitReview, UserDto,
};

use crate::harness::Portal;

pub fn actor(u: &UserDto) -> Actor {
    Actor {
        user_id: u.id,
        roles: u.roles.iter().copied().collect(),
        token_id: None,
        site_id: None,
        via: consilium_backend::domain::Via::Console,
    }
}

pub fn researcher(p: &Portal) -> Actor {
    actor(p.cast.first(Role::Researcher).unwrap())
}

/// The cast's first `n` sites, each asked for 50 chest radiographs.
pub fn study_sites(p: &Portal, n: usize) -> Vec<StudySite> {
    p.cast.sites[..n]
        .iter()
        .map(|(s, _, _)| StudySite {
            site_id: s.id,
            scope: DataScope {
                modality: "CR".into(),
                body_part: "CHEST".into(),
                label: "lesion".into(),
                cases: 50,
            },
        })
        .collect()
}

/// The researcher's draft study at the cast's first `sites` sites, with the demo's plan, and
/// an access request filed for each site.
pub async fn drafted_study(p: &Portal, title: &str, sites: usize) -> StudyDto {
    let manifest = consilium_backend::demo::demo_scenario().unwrap().manifest;
    drafted_study_with(p, title, sites, manifest).await
}

/// `drafted_study` with another plan.
pub async fn drafted_study_with(
    p: &Portal,
    title: &str,
    sites: usize,
    manifest: consilium_core::manifest::TrainingPlanManifest,
) -> StudyDto {
    let researcher = researcher(p);
    let study = studies::create_study(
        &p.ctx,
        &researcher,
        CreateStudy {
            title: title.into(),
            protocol_text: "Retrospective.".into(),
            purpose: format!("{title}, for the portal's tests."),
            committee_id: p.cast.committee.id,
            sites: study_sites(p, sites),
        },
    )
    .await
    .unwrap();
    studies::submit_plan(
        &p.ctx,
        &researcher,
        study.id,
        SubmitPlan {
            manifest,
            files: vec![],
            keep_files: vec![],
        },
    )
    .await
    .unwrap();
    for (s, _, _) in &p.cast.sites[..sites] {
        access::create_request(
            &p.ctx,
            &researcher,
            study.id,
            CreateAccessRequest {
                site_id: s.id,
                plan_hashes: None,
                justification: format!("{title}: training."),
            },
        )
        .await
        .unwrap();
    }
    study
}

/// Submitted by the researcher and approved by the committee member, for 30 days.
pub async fn approved(p: &Portal, study: &StudyDto) {
    studies::submit_study(&p.ctx, &researcher(p), study.id)
        .await
        .unwrap();
    approved_as_submitted(p, study).await;
}

/// A submitted study approved by the committee member, for 30 days.
pub async fn approved_as_submitted(p: &Portal, study: &StudyDto) {
    studies::review_study(
        &p.ctx,
        &actor(p.cast.first(Role::CommitteeMember).unwrap()),
        study.id,
        SubmitReview {
            decision: ReviewDecision::Approve,
            comments: "Fine.".into(),
            conditions: None,
            expires_at: Some(chrono::Utc::now() + chrono::Duration::days(30)),
        },
    )
    .await
    .unwrap();
}

/// The custodian of the cast's site number `site` grants the study's request, for 30 days.
pub async fn granted(p: &Portal, study: &StudyDto, site: usize) {
    let (s, custodian, _) = &p.cast.sites[site];
    let req = access::list(&p.ctx, &researcher(p), Some(s.id), Some(study.id))
        .await
        .unwrap()
        .remove(0);
    access::decide(
        &p.ctx,
        &actor(custodian),
        req.id,
        DecideAccessRequest {
            decision: AccessDecision::Approve,
            comment: None,
            expires_at: Some(chrono::Utc::now() + chrono::Duration::days(30)),
            scope: None,
        },
    )
    .await
    .unwrap();
}

/// The run's status once it stops running (at most five minutes).
pub async fn finished(p: &Portal, run_id: uuid::Uuid) -> String {
    use consilium_backend::entities::run;
    use sea_orm::EntityTrait;
    let mut status = String::new();
    for _ in 0..600 {
        status = run::Entity::find_by_id(run_id)
            .one(&p.ctx.db)
            .await
            .unwrap()
            .unwrap()
            .status;
        if status != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    status
}
