//! Event encode/decode and folding throughput.
//!
//! `cargo bench --bench events`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ferry::domain::View;
use ferry_proto::*;

fn plan(job: JobId) -> Event {
    JobCreated {
        artifact: None,
        job,
        project_id: 42,
        project: "group/app".into(),
        tag: "v1.0.0".into(),
        git_ref: "refs/tags/v1.0.0".into(),
        sha: "b".repeat(40),
        priority: 0,
        trigger: "webhook:1700000000000-0".into(),
        steps: vec![
            StepPlan {
                step: StepId::new("build"),
                pool: "default".into(),
                priority: 0,
                spec: StepSpec::Build(BuildSpec {
                    clone_url: "https://gitlab.example.com/group/app.git".into(),
                    commands: vec!["make test".into(), "make build".into()],
                    artifacts: vec!["bin/app".into()],
                    timeout_secs: 1800,
                    ..Default::default()
                }),
            },
            StepPlan {
                step: StepId::new("deploy:production"),
                pool: "default".into(),
                priority: 10,
                spec: StepSpec::Deploy(DeploySpec {
                    environment: "production".into(),
                    hosts: vec!["deploy@10.0.0.5:22".into(), "deploy@10.0.0.6:22".into()],
                    path: "/srv/app".into(),
                    max_parallel: 1,
                    keep_releases: 5,
                    rollback_on_failure: true,
                    ..Default::default()
                }),
            },
        ],
    }
    .into()
}

/// A realistic job history: plan, then queue/claim/start/succeed per step, then success.
fn job_events(job: JobId) -> Vec<Event> {
    let mut out = vec![plan(job)];
    for (i, step) in ["build", "deploy:production"].into_iter().enumerate() {
        let step = StepId::new(step);
        let agent = AgentId::new("build-01");
        out.push(
            StepQueued {
                step: step.clone(),
                attempt: 1,
                pool: "default".into(),
                priority: 0,
            }
            .into(),
        );
        out.push(
            StepClaimed {
                step: step.clone(),
                attempt: 1,
                agent: agent.clone(),
                token: FencingToken(i as u64 + 1),
                lease_ttl_ms: 15000,
            }
            .into(),
        );
        out.push(
            StepStarted {
                step: step.clone(),
                attempt: 1,
                agent,
            }
            .into(),
        );
        out.push(StepSucceeded { step, attempt: 1 }.into());
    }
    out.push(JobSucceeded {}.into());
    out
}

fn codec(c: &mut Criterion) {
    let claimed: Event = StepClaimed {
        step: StepId::new("build"),
        attempt: 1,
        agent: AgentId::new("build-01"),
        token: FencingToken(7),
        lease_ttl_ms: 15000,
    }
    .into();
    let created = plan(JobId::new());
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    for (name, event) in [("step_claimed", &claimed), ("job_created", &created)] {
        let env = Envelope::new(event, "job:x", 1, Some(7));
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| black_box(Envelope::new(black_box(event), "job:x", 1, Some(7))))
        });
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| black_box(black_box(&env).decode().unwrap()))
        });
    }
    g.finish();
}

fn fold(c: &mut Criterion) {
    let mut events: Vec<(String, Event)> = Vec::with_capacity(100_000);
    while events.len() < 100_000 {
        let job = JobId::new();
        let stream = format!("job:{job}");
        events.extend(job_events(job).into_iter().map(|e| (stream.clone(), e)));
    }
    events.truncate(100_000);
    let positions: Vec<String> = (0..events.len()).map(|i| format!("{i}-0")).collect();
    let mut g = c.benchmark_group("fold");
    g.sample_size(10);
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("100k_events", |b| {
        b.iter(|| {
            let mut view = View::default();
            for ((stream, e), pos) in events.iter().zip(&positions) {
                view.apply(pos, stream, e, 1);
            }
            black_box(view.jobs.len())
        })
    });
    // Including the decode from stored bytes, as replay does.
    let stored: Vec<Envelope> = events
        .iter()
        .map(|(s, e)| Envelope::new(e, s.clone(), 1, None))
        .collect();
    g.bench_function("100k_events_decoded", |b| {
        b.iter(|| {
            let mut view = View::default();
            for (env, pos) in stored.iter().zip(&positions) {
                view.apply(pos, &env.stream, &env.decode().unwrap(), env.at_ms);
            }
            black_box(view.jobs.len())
        })
    });
    g.finish();
}

criterion_group!(benches, codec, fold);
criterion_main!(benches);
