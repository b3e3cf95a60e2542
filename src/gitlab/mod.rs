//! GitLab's API, as ferry calls it: the [`client`] (commit statuses, deployments, with the retry
//! rules of `gitlab/contract.md` §5) and the [`reporter`] role that posts a commit status for
//! every step of every job and records each report as an event.

pub mod client;
pub mod reporter;

pub use client::{
    Client, Deployment, DeploymentRequest, DeploymentStatus, Error, Retry, StatusOutcome,
    StatusRequest, StatusState,
};
pub use reporter::{
    deployment_transitions, run, status_name, transitions, DeploymentTransition, ReporterOptions,
    Transition, GROUP,
};
