//! The roles a person (or an API token acting for one) can hold.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Registers sites, committees and users; grants roles.
    Administrator,
    /// Member of an ethics committee: reviews studies and training plans.
    CommitteeMember,
    /// Drafts studies, submits training plans, files data-access requests, starts runs.
    Researcher,
    /// A hospital's data custodian: decides data-access requests for their site.
    Custodian,
    /// Read-only access to everything, including the audit trail.
    Auditor,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Administrator,
        Role::CommitteeMember,
        Role::Researcher,
        Role::Custodian,
        Role::Auditor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Administrator => "administrator",
            Role::CommitteeMember => "committee_member",
            Role::Researcher => "researcher",
            Role::Custodian => "custodian",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
