//! Business rules as plain functions over domain types: who may do what, which study
//! transitions are allowed, and whether a run may start. No database, no HTTP.

use chrono::{DateTime, Utc};
use consilium_core::Role;
use consilium_core::api::{
    AccessRequestDto, AccessStatus, ReviewDecision, ReviewDto, StudyDto, StudyStatus,
};
use std::collections::{BTreeSet, HashMap};
use uuid::Uuid;

/// Who is acting: a signed-in person, an API token acting for one, or the system itself
/// (the CLI and start-up tasks).
#[derive(Clone, Debug, PartialEq)]
pub struct Actor {
    pub user_id: Uuid,
    pub roles: BTreeSet<Role>,
    /// Set when the request came with an API token.
    pub token_id: Option<Uuid>,
    /// Set for a site worker's token: it acts for this site only, with no role.
    pub site_id: Option<Uuid>,
    /// The credential behind the request, as the audit trail names it.
    pub via: Via,
}

/// How an actor proved who they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// A browser session (the portal, or the API with the session cookie).
    Session,
    /// An API token (its id is `Actor::token_id`).
    Token,
    /// A site worker: its token, or its signed result on the broker.
    Worker { site: String },
    /// On the server's own machine: the command line and the demo, calling the services.
    Console,
}

impl Actor {
    pub fn system() -> Self {
        Actor {
            user_id: Uuid::nil(),
            roles: [Role::Administrator].into_iter().collect(),
            token_id: None,
            site_id: None,
            via: Via::Console,
        }
    }

    /// A site's worker reporting through the broker (no user behind it).
    pub fn site_worker(site_id: Uuid, site_name: &str) -> Self {
        Actor {
            user_id: Uuid::nil(),
            roles: Default::default(),
            token_id: None,
            site_id: Some(site_id),
            via: Via::Worker {
                site: site_name.to_string(),
            },
        }
    }

    pub fn is_system(&self) -> bool {
        self.user_id.is_nil() && self.site_id.is_none()
    }

    /// How the audit log names this actor and the credential it acted with:
    /// `system`, `<user id> via session`, `<user id> via token <token id>`,
    /// `<user id> via console`, or `site <name> worker (<site id>)`.
    pub fn audit_name(&self) -> String {
        if self.is_system() {
            return "system".to_string();
        }
        match (&self.via, self.token_id, self.site_id) {
            (Via::Worker { site }, _, Some(id)) => format!("site {site} worker ({id})"),
            (_, Some(token), Some(id)) => format!("site {id} worker (token {token})"),
            (_, Some(token), None) => format!("{} via token {token}", self.user_id),
            (Via::Console, None, _) => format!("{} via console", self.user_id),
            _ => format!("{} via session", self.user_id),
        }
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// Every operation that changes state. Each needs one role; the service then checks the
/// resource (the study's owner, the site's custodian, the committee's member).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    CreateUser,
    SetUserRoles,
    CreateSite,
    SetCustodians,
    CreateCommittee,
    SetMembers,
    CreateStudy,
    UpdateStudy,
    SubmitStudy,
    SubmitPlan,
    ReviewStudy,
    RequestAccess,
    DecideAccess,
    RevokeAccess,
    CreateRun,
}

impl Operation {
    pub fn required_role(self) -> Role {
        use Operation::*;
        match self {
            CreateUser | SetUserRoles | CreateSite | SetCustodians | CreateCommittee
            | SetMembers => Role::Administrator,
            CreateStudy | UpdateStudy | SubmitStudy | SubmitPlan | RequestAccess | CreateRun => {
                Role::Researcher
            }
            ReviewStudy => Role::CommitteeMember,
            DecideAccess | RevokeAccess => Role::Custodian,
        }
    }

    pub fn describe(self) -> &'static str {
        use Operation::*;
        match self {
            CreateUser => "register users",
            SetUserRoles => "change a user's roles",
            CreateSite => "register sites",
            SetCustodians => "change a site's custodians",
            CreateCommittee => "register ethics committees",
            SetMembers => "change a committee's members",
            CreateStudy => "draft studies",
            UpdateStudy => "change a study",
            SubmitStudy => "submit a study for review",
            SubmitPlan => "submit training plans",
            ReviewStudy => "review studies",
            RequestAccess => "request data access",
            DecideAccess => "decide data-access requests",
            RevokeAccess => "revoke data access",
            CreateRun => "start runs",
        }
    }
}

/// The role check every mutating service call begins with.
pub fn authorize(actor: &Actor, op: Operation) -> Result<(), String> {
    let role = op.required_role();
    if actor.has(role) {
        Ok(())
    } else {
        Err(format!(
            "Only a user with the {role} role may {}; ask an administrator if you need it.",
            op.describe()
        ))
    }
}

// ------------------------------------------------------------------ study transitions

/// A study may be submitted from a draft or after changes were requested.
pub fn submit_transition(status: StudyStatus) -> Result<StudyStatus, String> {
    match status {
        StudyStatus::Draft | StudyStatus::ChangesRequested => Ok(StudyStatus::Submitted),
        StudyStatus::Submitted => {
            Err("The study is already submitted and awaits its committee's decision.".into())
        }
        StudyStatus::Approved => {
            Err("The study is already approved; amend it to submit a new version.".into())
        }
        StudyStatus::Rejected => Err(
            "The study was rejected; a rejected study can't be resubmitted. Draft a new study."
                .into(),
        ),
    }
}

/// A committee decides only on a submitted study.
pub fn review_transition(
    status: StudyStatus,
    decision: ReviewDecision,
) -> Result<StudyStatus, String> {
    if status != StudyStatus::Submitted {
        return Err(format!(
            "The study is {}; only a submitted study can be reviewed.",
            status.as_str().replace('_', " ")
        ));
    }
    Ok(match decision {
        ReviewDecision::Approve => StudyStatus::Approved,
        ReviewDecision::RequestChanges => StudyStatus::ChangesRequested,
        ReviewDecision::Reject => StudyStatus::Rejected,
    })
}

/// Changing a study (or its plan) returns it to draft when it was approved: an amendment
/// needs a new decision. A study under review or rejected can't change.
pub fn amend_transition(status: StudyStatus) -> Result<StudyStatus, String> {
    match status {
        StudyStatus::Draft | StudyStatus::ChangesRequested | StudyStatus::Approved => {
            Ok(if status == StudyStatus::Approved {
                StudyStatus::Draft
            } else {
                status
            })
        }
        StudyStatus::Submitted => Err(
            "The study is under review; wait for the committee's decision before changing it."
                .into(),
        ),
        StudyStatus::Rejected => {
            Err("The study was rejected and can't change; draft a new study.".into())
        }
    }
}

// ------------------------------------------------------------------ preflight

/// Everything the run check looks at, loaded by the caller.
pub struct PreflightInput<'a> {
    pub study: &'a StudyDto,
    /// The study's plan hashes, oldest first.
    pub plan_hashes: &'a [String],
    /// The plan the run would use; `None` means the latest.
    pub requested_plan: Option<&'a str>,
    /// The study's ethics decisions, oldest first.
    pub reviews: &'a [ReviewDto],
    /// The study's data-access requests, oldest first.
    pub access: &'a [AccessRequestDto],
    pub site_names: &'a HashMap<Uuid, String>,
    pub now: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PreflightOutcome {
    pub plan_hash: Option<String>,
    pub unmet: Vec<String>,
    /// The approving decision in force, when there is one.
    pub review_id: Option<Uuid>,
    /// The grant in force for each site that has one.
    pub grant_ids: Vec<Uuid>,
    /// The conditions about the study, its plan and its ethics approval (not about sites).
    pub study_unmet: Vec<String>,
    /// The sites whose grant covers the plan now.
    pub eligible_sites: Vec<Uuid>,
    /// Sites that may not take part, with the reason.
    pub site_unmet: Vec<(Uuid, String)>,
}

impl PreflightOutcome {
    pub fn ready(&self) -> bool {
        self.unmet.is_empty()
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn day(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// May a run of this study start now? Returns every unmet condition, in words.
pub fn preflight(input: &PreflightInput<'_>) -> PreflightOutcome {
    let mut unmet = Vec::new();
    let study = input.study;

    if study.status != StudyStatus::Approved {
        unmet.push(format!(
            "The study is {}; it must be approved by its ethics committee.",
            study.status.as_str().replace('_', " ")
        ));
    }

    let plan_hash = match input.requested_plan {
        Some(h) if input.plan_hashes.iter().any(|p| p == h) => Some(h.to_string()),
        Some(h) => {
            unmet.push(format!(
                "Training plan {} is not a plan of this study.",
                short(h)
            ));
            None
        }
        None => {
            let latest = input.plan_hashes.last().cloned();
            if latest.is_none() {
                unmet.push("No training plan has been submitted for this study.".to_string());
            }
            latest
        }
    };

    // The ethics decision: the newest approval covering this protocol version and plan.
    let mut review_id = None;
    if let Some(hash) = plan_hash.as_deref() {
        let approvals: Vec<&ReviewDto> = input
            .reviews
            .iter()
            .filter(|r| r.decision == ReviewDecision::Approve)
            .collect();
        let covering = approvals.iter().rev().find(|r| {
            r.protocol_version == study.protocol_version && r.plan_hashes.iter().any(|p| p == hash)
        });
        match covering {
            Some(r) => match r.expires_at {
                Some(exp) if exp > input.now => review_id = Some(r.id),
                Some(exp) => unmet.push(format!("The ethics approval expired on {}.", day(exp))),
                None => unmet
                    .push("The ethics approval has no expiry date and can't be relied on.".into()),
            },
            None => {
                if let Some(last) = approvals.last() {
                    if last.protocol_version != study.protocol_version {
                        unmet.push(format!(
                            "The ethics approval covers protocol version {}; the protocol is now version {} and needs a new decision.",
                            last.protocol_version, study.protocol_version
                        ));
                    } else {
                        unmet.push(format!(
                            "Training plan {} has not been approved by the ethics committee.",
                            short(hash)
                        ));
                    }
                } else if study.status == StudyStatus::Approved {
                    unmet.push(format!(
                        "Training plan {} has not been approved by the ethics committee.",
                        short(hash)
                    ));
                }
            }
        }
    }

    let study_unmet = unmet.clone();
    // Data access: an approved, unexpired grant covering this plan for every site.
    let mut grant_ids = Vec::new();
    let mut eligible_sites = Vec::new();
    let mut site_unmet = Vec::new();
    for site in &study.sites {
        let name = input
            .site_names
            .get(&site.site_id)
            .cloned()
            .unwrap_or_else(|| site.site_id.to_string());
        let requests: Vec<&AccessRequestDto> = input
            .access
            .iter()
            .filter(|a| a.site_id == site.site_id)
            .collect();
        let in_force = requests.iter().rev().find(|a| {
            a.status == AccessStatus::Approved
                && a.expires_at.is_some_and(|e| e > input.now)
                && plan_hash
                    .as_deref()
                    .is_some_and(|h| a.plan_hashes.iter().any(|p| p == h))
        });
        if let Some(grant) = in_force {
            grant_ids.push(grant.id);
            eligible_sites.push(site.site_id);
            continue;
        }
        let reason = match requests.last() {
            None => "no data-access request has been filed.".to_string(),
            Some(a) => match a.status {
                AccessStatus::Pending => {
                    "the data-access request awaits the custodian's decision.".to_string()
                }
                AccessStatus::Denied => "the custodian denied data access.".to_string(),
                AccessStatus::Revoked => "the custodian revoked data access.".to_string(),
                AccessStatus::Approved => match a.expires_at {
                    Some(e) if e <= input.now => {
                        format!("the data-access grant expired on {}.", day(e))
                    }
                    _ => match plan_hash.as_deref() {
                        Some(h) => format!(
                            "the data-access grant does not cover training plan {}.",
                            short(h)
                        ),
                        None => "there is no training plan for the grant to cover.".to_string(),
                    },
                },
            },
        };
        unmet.push(format!("Site {name}: {reason}"));
        site_unmet.push((site.site_id, reason));
    }

    PreflightOutcome {
        plan_hash,
        unmet,
        review_id,
        grant_ids,
        study_unmet,
        eligible_sites,
        site_unmet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use consilium_core::api::{DataScope, StudySite};

    fn scope() -> DataScope {
        DataScope {
            modality: "CR".into(),
            body_part: "CHEST".into(),
            label: "nodule".into(),
            cases: 100,
        }
    }

    fn study(status: StudyStatus, sites: &[Uuid]) -> StudyDto {
        let now = Utc::now();
        StudyDto {
            id: Uuid::new_v4(),
            title: "t".into(),
            protocol_text: "p".into(),
            protocol_version: 2,
            purpose: "x".into(),
            committee_id: Uuid::new_v4(),
            researcher_id: Uuid::new_v4(),
            sites: sites
                .iter()
                .map(|s| StudySite {
                    site_id: *s,
                    scope: scope(),
                })
                .collect(),
            status,
            created_at: now,
            updated_at: now,
        }
    }

    fn approval(
        study: &StudyDto,
        version: i32,
        hashes: &[&str],
        expires: DateTime<Utc>,
    ) -> ReviewDto {
        ReviewDto {
            id: Uuid::new_v4(),
            study_id: study.id,
            committee_id: study.committee_id,
            reviewer_id: Uuid::new_v4(),
            decision: ReviewDecision::Approve,
            comments: String::new(),
            conditions: None,
            expires_at: Some(expires),
            protocol_version: version,
            plan_hashes: hashes.iter().map(|s| s.to_string()).collect(),
            created_at: Utc::now(),
        }
    }

    fn grant(
        study: &StudyDto,
        site: Uuid,
        status: AccessStatus,
        hashes: &[&str],
        expires: DateTime<Utc>,
    ) -> AccessRequestDto {
        AccessRequestDto {
            id: Uuid::new_v4(),
            study_id: study.id,
            site_id: site,
            requester_id: study.researcher_id,
            scope: scope(),
            plan_hashes: hashes.iter().map(|s| s.to_string()).collect(),
            justification: String::new(),
            status,
            decided_by: None,
            decided_at: None,
            expires_at: Some(expires),
            comment: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn all_conditions_met_is_ready_and_names_what_is_in_force() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let s = study(StudyStatus::Approved, &[a, b]);
        let later = Utc::now() + Duration::days(30);
        let reviews = [approval(&s, 2, &["h1"], later)];
        let access = [
            grant(&s, a, AccessStatus::Approved, &["h1"], later),
            grant(&s, b, AccessStatus::Approved, &["h1"], later),
        ];
        let names = HashMap::new();
        let out = preflight(&PreflightInput {
            study: &s,
            plan_hashes: &["h1".into()],
            requested_plan: None,
            reviews: &reviews,
            access: &access,
            site_names: &names,
            now: Utc::now(),
        });
        assert!(out.ready(), "{:?}", out.unmet);
        assert_eq!(out.review_id, Some(reviews[0].id));
        assert_eq!(out.grant_ids, vec![access[0].id, access[1].id]);
    }

    #[test]
    fn every_unmet_condition_is_named() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let s = study(StudyStatus::Approved, &[a, b, c]);
        let now = Utc::now();
        let reviews = [approval(&s, 1, &["h1"], now + Duration::days(3))];
        let access = [
            grant(
                &s,
                a,
                AccessStatus::Pending,
                &["h1"],
                now + Duration::days(3),
            ),
            grant(
                &s,
                b,
                AccessStatus::Approved,
                &["h1"],
                now - Duration::days(1),
            ),
        ];
        let names: HashMap<Uuid, String> = [
            (a, "North".to_string()),
            (b, "South".to_string()),
            (c, "East".to_string()),
        ]
        .into();
        let out = preflight(&PreflightInput {
            study: &s,
            plan_hashes: &["h1".into()],
            requested_plan: None,
            reviews: &reviews,
            access: &access,
            site_names: &names,
            now,
        });
        assert!(!out.ready());
        assert_eq!(out.unmet.len(), 4, "{:?}", out.unmet);
        assert!(out.unmet[0].contains("covers protocol version 1; the protocol is now version 2"));
        assert_eq!(
            out.unmet[1],
            "Site North: the data-access request awaits the custodian's decision."
        );
        assert!(out.unmet[2].starts_with("Site South: the data-access grant expired on"));
        assert_eq!(
            out.unmet[3],
            "Site East: no data-access request has been filed."
        );
    }

    #[test]
    fn a_new_plan_needs_new_approvals() {
        let a = Uuid::new_v4();
        let s = study(StudyStatus::Approved, &[a]);
        let later = Utc::now() + Duration::days(30);
        let reviews = [approval(&s, 2, &["h1"], later)];
        let access = [grant(&s, a, AccessStatus::Approved, &["h1"], later)];
        let names = HashMap::new();
        let out = preflight(&PreflightInput {
            study: &s,
            plan_hashes: &["h1".into(), "h2".into()],
            requested_plan: None,
            reviews: &reviews,
            access: &access,
            site_names: &names,
            now: Utc::now(),
        });
        assert_eq!(out.plan_hash.as_deref(), Some("h2"));
        assert_eq!(out.unmet.len(), 2, "{:?}", out.unmet);
        assert!(out.unmet[0].contains("has not been approved by the ethics committee"));
        assert!(out.unmet[1].contains("does not cover training plan h2"));
    }

    #[test]
    fn draft_study_without_plan() {
        let s = study(StudyStatus::Draft, &[]);
        let names = HashMap::new();
        let out = preflight(&PreflightInput {
            study: &s,
            plan_hashes: &[],
            requested_plan: None,
            reviews: &[],
            access: &[],
            site_names: &names,
            now: Utc::now(),
        });
        assert_eq!(
            out.unmet,
            vec![
                "The study is draft; it must be approved by its ethics committee.".to_string(),
                "No training plan has been submitted for this study.".to_string(),
            ]
        );
    }

    #[test]
    fn transitions() {
        assert_eq!(
            submit_transition(StudyStatus::Draft),
            Ok(StudyStatus::Submitted)
        );
        assert!(submit_transition(StudyStatus::Rejected).is_err());
        assert_eq!(
            review_transition(StudyStatus::Submitted, ReviewDecision::Reject),
            Ok(StudyStatus::Rejected)
        );
        assert!(review_transition(StudyStatus::Rejected, ReviewDecision::Approve).is_err());
        assert_eq!(
            amend_transition(StudyStatus::Approved),
            Ok(StudyStatus::Draft)
        );
        assert!(amend_transition(StudyStatus::Submitted).is_err());
    }

    #[test]
    fn role_gate() {
        let mut r = Actor {
            user_id: Uuid::new_v4(),
            roles: [Role::Researcher].into(),
            token_id: None,
            site_id: None,
            via: Via::Session,
        };
        assert!(authorize(&r, Operation::CreateStudy).is_ok());
        assert!(authorize(&r, Operation::ReviewStudy).is_err());
        r.roles = [Role::Auditor].into();
        assert!(authorize(&r, Operation::CreateStudy).is_err());
    }
}
