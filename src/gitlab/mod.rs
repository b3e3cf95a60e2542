//! GitLab's API, as ferry calls it: the [`client`] (commit statuses, deployments, tags, with the
//! retry rules of `gitlab/contract.md` §5), the [`reporter`] role that posts a commit status for
//! every step of every job and records each report as an event, and tag [`reconcile`]iation.

pub mod client;
pub mod reconcile;
pub mod reporter;

pub use client::{
    Client, Deployment, DeploymentRequest, DeploymentStatus, Error, Retry, StatusOutcome,
    StatusRequest, StatusState, Tag, TagCommit,
};
pub use reconcile::{reconcile_project, ReconcileProject, Reconciled};
pub use reporter::{
    deployment_transitions, run, status_name, transitions, DeploymentTransition, Reconciliation,
    ReporterOptions, Transition, GROUP, RECONCILE_LOCK,
};
