//! Planning: a webhook plus the project's settings at this moment become a job's plan. The plan
//! is recorded in `JobCreated`, so nothing downstream ever reads configuration again.

use ferry_proto::{
    ArtifactRef, BuildSpec, DeploySpec, JobCreated, JobId, StepId, StepPlan, StepSpec,
    WebhookReceived,
};

/// The settings of one project that planning needs, mapped from configuration.
#[derive(Clone, Debug, Default)]
pub struct ProjectPlan {
    pub id: u64,
    pub path: String,
    pub priority: i32,
    /// Priority of deploy steps; by default above builds so releases are not starved.
    pub deploy_priority: i32,
    pub auto_build: bool,
    pub auto_deploy: bool,
    /// Overrides the payload's clone URL.
    pub clone_url: Option<String>,
    pub build_pool: String,
    pub build: BuildSpec,
    /// `(pool, spec)` per environment, in declared order.
    pub environments: Vec<(String, DeploySpec)>,
}

/// The step id of a deploy to `environment`.
pub fn deploy_step(environment: &str) -> StepId {
    StepId::new(format!("deploy:{environment}"))
}

/// The short name of a ref: `refs/tags/v1` → `v1`.
pub fn short_ref(git_ref: &str) -> &str {
    git_ref
        .strip_prefix("refs/tags/")
        .or_else(|| git_ref.strip_prefix("refs/heads/"))
        .unwrap_or(git_ref)
}

/// The plan for a webhook that asks for a build, or why there is none.
pub fn plan_job(
    project: &ProjectPlan,
    webhook: &WebhookReceived,
    job: JobId,
    trigger: String,
) -> Result<JobCreated, String> {
    let git_ref = webhook.git_ref.clone().ok_or("the webhook has no ref")?;
    let sha = webhook
        .checkout_sha
        .clone()
        .ok_or("the webhook has no checkout_sha")?;
    if !project.auto_build {
        return Err(format!("project {} has auto_build = false", project.path));
    }
    let clone_url = project
        .clone_url
        .clone()
        .or_else(|| webhook.clone_url.clone())
        .ok_or_else(|| {
            format!(
                "project {} has no clone_url and the webhook none",
                project.path
            )
        })?;
    let mut steps = vec![StepPlan {
        step: StepId::new("build"),
        pool: project.build_pool.clone(),
        priority: project.priority,
        spec: StepSpec::Build(BuildSpec {
            clone_url,
            ..project.build.clone()
        }),
    }];
    if project.auto_deploy {
        steps.extend(project.environments.iter().map(|(pool, env)| StepPlan {
            step: deploy_step(&env.environment),
            pool: pool.clone(),
            priority: project.deploy_priority,
            spec: StepSpec::Deploy(env.clone()),
        }));
    }
    Ok(JobCreated {
        artifact: None,
        job,
        project_id: project.id,
        project: project.path.clone(),
        tag: short_ref(&git_ref).to_string(),
        git_ref,
        sha,
        priority: project.priority,
        trigger,
        steps,
    })
}

/// The plan of a job that ships an artifact an earlier job built to one environment, without
/// building: a manual deploy or a rollback. The environment's settings are the project's current
/// ones (hosts may have changed since the build); tag and commit are the source job's.
pub fn plan_deploy(
    project: &ProjectPlan,
    environment: &str,
    source: &JobCreated,
    artifact: ArtifactRef,
    job: JobId,
    trigger: String,
) -> Result<JobCreated, String> {
    let (pool, spec) = project
        .environments
        .iter()
        .find(|(_, e)| e.environment == environment)
        .ok_or_else(|| {
            format!(
                "project {} has no environment {environment:?}",
                project.path
            )
        })?;
    Ok(JobCreated {
        job,
        project_id: project.id,
        project: project.path.clone(),
        tag: source.tag.clone(),
        git_ref: source.git_ref.clone(),
        sha: source.sha.clone(),
        priority: project.priority,
        trigger,
        steps: vec![StepPlan {
            step: deploy_step(environment),
            pool: pool.clone(),
            priority: project.deploy_priority,
            spec: StepSpec::Deploy(spec.clone()),
        }],
        artifact: Some(artifact),
    })
}
