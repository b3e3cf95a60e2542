//! Planning: a webhook plus the project's settings at this moment become a job's plan. The plan
//! is recorded in `JobCreated`, so nothing downstream ever reads configuration again.

use ferry_proto::{
    ArtifactRef, BuildSpec, DeploySpec, JobCreated, JobId, StepId, StepPlan, StepSpec,
    WebhookReceived,
};

/// The settings of one project that planning needs, mapped from configuration.
#[derive(Clone, Debug, Default)]
pub struct ProjectPlan {
    /// GitLab's id of the project, when configured; otherwise a job records the id its webhook
    /// carried (what commit statuses and deployments are posted under).
    pub id: Option<u64>,
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

fn is_http(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
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
    let clone_url = match (&project.clone_url, &webhook.clone_url) {
        (Some(configured), _) => configured.clone(),
        // The payload's git_http_url: GitLab's is always http(s). Any other scheme (file://, a
        // plain path, ssh:// with the agent's key) would let whoever can deliver a webhook
        // choose what the build commands run on.
        (None, Some(url)) if is_http(url) => url.clone(),
        (None, Some(url)) => {
            return Err(format!(
                "project {}: the webhook's clone URL {url:?} is not http(s); configure clone_url",
                project.path
            ))
        }
        (None, None) => {
            return Err(format!(
                "project {} has no clone_url and the webhook none",
                project.path
            ))
        }
    };
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
        project_id: project.id.or(webhook.project_id).unwrap_or(0),
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
        project_id: project.id.unwrap_or(source.project_id),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Commit statuses and deployments are posted under the job's `project_id`: a project
    /// configured by path alone takes the id its webhook carried, a manual deploy its source
    /// job's (not 0, which GitLab answers with 404).
    #[test]
    fn a_project_configured_without_an_id_records_the_webhooks() {
        let webhook = WebhookReceived {
            project_id: Some(42),
            git_ref: Some("refs/tags/v1".into()),
            checkout_sha: Some("a".repeat(40)),
            clone_url: Some("https://gitlab.example/g/app.git".into()),
            ..Default::default()
        };
        let mut project = ProjectPlan {
            path: "g/app".into(),
            auto_build: true,
            environments: vec![("default".into(), DeploySpec::default())],
            ..Default::default()
        };
        let job = plan_job(&project, &webhook, JobId::new(), "t".into()).unwrap();
        assert_eq!(job.project_id, 42);
        let artifact = ArtifactRef {
            job: job.job,
            name: "app-v1-aaaaaaa.tar.gz".into(),
            key: "k".into(),
            size: 1,
            sha256: "b".repeat(64),
        };
        let env = &project.environments[0].1.environment.clone();
        let deploy = plan_deploy(
            &project,
            env,
            &job,
            artifact.clone(),
            JobId::new(),
            "t".into(),
        );
        assert_eq!(deploy.unwrap().project_id, 42);

        project.id = Some(7);
        let job = plan_job(&project, &webhook, JobId::new(), "t".into()).unwrap();
        assert_eq!(
            job.steps[0].spec,
            StepSpec::Build(BuildSpec {
                clone_url: "https://gitlab.example/g/app.git".into(),
                ..project.build.clone()
            })
        );
        assert_eq!(job.project_id, 7, "a configured id wins");
        let deploy = plan_deploy(&project, env, &job, artifact, JobId::new(), "t".into());
        assert_eq!(deploy.unwrap().project_id, 7);
    }

    /// The payload's clone URL is used only when it is http(s), as GitLab's always is: a
    /// forged or odd delivery cannot point the build at a local path or an ssh host.
    #[test]
    fn a_webhook_clone_url_that_is_not_http_is_refused() {
        let project = ProjectPlan {
            path: "g/app".into(),
            auto_build: true,
            ..Default::default()
        };
        for url in [
            "file:///etc",
            "/srv/repo",
            "ssh://git@elsewhere/x.git",
            "git@h:x.git",
        ] {
            let webhook = WebhookReceived {
                git_ref: Some("refs/tags/v1".into()),
                checkout_sha: Some("a".repeat(40)),
                clone_url: Some(url.into()),
                ..Default::default()
            };
            let err = plan_job(&project, &webhook, JobId::new(), "t".into()).unwrap_err();
            assert!(
                err.contains("is not http(s); configure clone_url"),
                "{url}: {err}"
            );
            // A configured URL is the operator's choice, whatever its scheme.
            let configured = ProjectPlan {
                clone_url: Some("file:///srv/repo".into()),
                ..project.clone()
            };
            assert!(plan_job(&configured, &webhook, JobId::new(), "t".into()).is_ok());
        }
    }
}
