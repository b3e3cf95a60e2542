use super::*;
use serde_json::{json, Value};

const TAG_CREATE: &str = include_str!("../../../tests/fixtures/gitlab/tag_push_create.json");
const TAG_ANNOTATED: &str = include_str!("../../../tests/fixtures/gitlab/tag_push_annotated.json");
const TAG_DELETE: &str = include_str!("../../../tests/fixtures/gitlab/tag_push_delete.json");
const TAG_MOVE: &str = include_str!("../../../tests/fixtures/gitlab/tag_push_move.json");
const TAG_SHA256: &str = include_str!("../../../tests/fixtures/gitlab/tag_push_create_sha256.json");
const TAG_NULL_CHECKOUT: &str =
    include_str!("../../../tests/fixtures/gitlab/tag_push_create_null_checkout.json");
const PUSH: &str = include_str!("../../../tests/fixtures/gitlab/push.json");
const MR: &str = include_str!("../../../tests/fixtures/gitlab/merge_request_open.json");

const TAG: Option<&str> = Some("Tag Push Hook");
const BRANCH: Option<&str> = Some("Push Hook");
const MERGE: Option<&str> = Some("Merge Request Hook");

const COMMIT: &str = "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7";

fn project() -> ProjectHooks {
    ProjectHooks::new("jsmith/example")
}

fn with(f: impl FnOnce(&mut ProjectHooks)) -> ProjectHooks {
    let mut p = project();
    f(&mut p);
    p
}

/// `fixture` with `changes` applied: `(path, Some(value))` sets a field, `(path, None)` removes
/// it. Paths are dotted (`project.id`).
fn edit(fixture: &str, changes: &[(&str, Option<Value>)]) -> String {
    let mut body: Value = serde_json::from_str(fixture).unwrap();
    for (path, value) in changes {
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().unwrap();
        let mut target = &mut body;
        for p in parts {
            target = target.get_mut(p).unwrap();
        }
        let object = target.as_object_mut().unwrap();
        match value {
            Some(v) => object.insert(last.to_string(), v.clone()),
            None => object.remove(last),
        };
    }
    body.to_string()
}

/// Classifies `body` delivered as `event` for `project`, and compares a one-line rendering:
/// `build <sha>`, `rebuild <sha>`, `delete`, `ignored: <reason>` or `error: <message>`.
fn check(event: Option<&str>, body: &str, project: &ProjectHooks, expected: &str) {
    let got = match Hook::parse(body.as_bytes())
        .and_then(|hook| classify(EventKind::from_header(event), &hook, project))
    {
        Ok(Decision::Build { sha }) => format!("build {sha}"),
        Ok(Decision::Rebuild { sha }) => format!("rebuild {sha}"),
        Ok(Decision::Delete) => "delete".to_string(),
        Ok(Decision::Ignore { reason }) => format!("ignored: {reason}"),
        Err(e) => format!("error: {e}"),
    };
    assert_eq!(got, expected, "event {event:?}, body {body}");
}

#[test]
fn tags() {
    let p = project();
    // GitLab's documented example: a lightweight tag, `after` = `checkout_sha`.
    check(TAG, TAG_CREATE, &p, &format!("build {COMMIT}"));
    // Annotated: `after` is the tag object; the commit is `checkout_sha`.
    check(TAG, TAG_ANNOTATED, &p, &format!("build {COMMIT}"));
    check(TAG, TAG_DELETE, &p, "delete");
    // Deletion never builds, whatever on_tag_move says.
    check(
        TAG,
        TAG_DELETE,
        &with(|p| p.on_tag_move = OnTagMove::Rebuild),
        "delete",
    );
    check(TAG, TAG_MOVE, &p, &format!("ignored: {IGNORE_MOVED}"));
    check(
        TAG,
        TAG_MOVE,
        &with(|p| p.on_tag_move = OnTagMove::Rebuild),
        "rebuild e59094b8de0f2f91abbe4760a52d9137260252d8",
    );
    // SHA-256 repositories: 64 zeros is a creation too.
    check(
        TAG,
        TAG_SHA256,
        &p,
        "build a3f1c2d4e5b60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90",
    );
    let deleted_sha256 = edit(
        TAG_SHA256,
        &[
            (
                "before",
                Some(json!(
                    "a3f1c2d4e5b60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
                )),
            ),
            ("after", Some(json!("0".repeat(64)))),
            ("checkout_sha", Some(Value::Null)),
        ],
    );
    check(TAG, &deleted_sha256, &p, "delete");
    // A null (or absent) checkout_sha on a creation builds nothing and says why.
    check(
        TAG,
        TAG_NULL_CHECKOUT,
        &p,
        &format!("ignored: {IGNORE_NULL_CHECKOUT}"),
    );
    check(
        TAG,
        &edit(TAG_CREATE, &[("checkout_sha", None)]),
        &p,
        &format!("ignored: {IGNORE_NULL_CHECKOUT}"),
    );
    check(
        TAG,
        &edit(TAG_MOVE, &[("checkout_sha", Some(Value::Null))]),
        &with(|p| p.on_tag_move = OnTagMove::Rebuild),
        &format!("ignored: {IGNORE_NULL_CHECKOUT}"),
    );
    // A project that does not build automatically records the creation only.
    check(
        TAG,
        TAG_CREATE,
        &with(|p| p.auto_build = false),
        &format!("ignored: {IGNORE_NO_AUTO_BUILD}"),
    );
    // Unknown fields, and the absence of optional or deprecated ones, are fine.
    let trimmed = edit(
        TAG_CREATE,
        &[
            ("repository", None),
            ("commits", None),
            ("message", None),
            ("user_email", None),
            ("project.homepage", None),
            ("project.url", None),
            ("brand_new_field", Some(json!({"nested": [1, 2, 3]}))),
        ],
    );
    check(TAG, &trimmed, &p, &format!("build {COMMIT}"));
}

#[test]
fn branches() {
    let listed = with(|p| p.branches = vec!["main".into(), "master".into()]);
    let head = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7";
    check(BRANCH, PUSH, &listed, &format!("build {head}"));
    check(
        BRANCH,
        PUSH,
        &project(),
        &format!("ignored: {IGNORE_BRANCH_UNLISTED}"),
    );
    check(
        BRANCH,
        PUSH,
        &with(|p| p.branches = vec!["main".into()]),
        &format!("ignored: {IGNORE_BRANCH_UNLISTED}"),
    );
    // Branch names match exactly, not as prefixes.
    check(
        BRANCH,
        &edit(PUSH, &[("ref", Some(json!("refs/heads/master-old")))]),
        &listed,
        &format!("ignored: {IGNORE_BRANCH_UNLISTED}"),
    );
    let deleted = edit(
        PUSH,
        &[
            ("after", Some(json!("0".repeat(40)))),
            ("checkout_sha", Some(Value::Null)),
        ],
    );
    check(
        BRANCH,
        &deleted,
        &listed,
        &format!("ignored: {IGNORE_BRANCH_DELETED}"),
    );
    let created = edit(PUSH, &[("before", Some(json!("0".repeat(40))))]);
    check(BRANCH, &created, &listed, &format!("build {head}"));
}

#[test]
fn other_events() {
    let p = project();
    check(MERGE, MR, &p, &format!("ignored: {IGNORE_MERGE_REQUEST}"));
    // Deprecated merge request fields, present or absent.
    let deprecated = edit(
        MR,
        &[
            (
                "repository",
                Some(json!({"name": "Flight", "url": "git@x:y.git", "homepage": "h"})),
            ),
            ("object_attributes.assignee_id", Some(json!(1))),
            ("object_attributes.work_in_progress", Some(json!(false))),
            (
                "project.http_url",
                Some(json!("http://gitlab.example.com/f.git")),
            ),
            (
                "project.ssh_url",
                Some(json!("git@gitlab.example.com:f.git")),
            ),
            ("project.url", Some(json!("git@gitlab.example.com:f.git"))),
            (
                "project.homepage",
                Some(json!("http://gitlab.example.com/f")),
            ),
        ],
    );
    check(
        MERGE,
        &deprecated,
        &p,
        &format!("ignored: {IGNORE_MERGE_REQUEST}"),
    );
    let stripped = edit(
        MR,
        &[
            ("labels", None),
            ("changes", None),
            ("object_attributes", None),
        ],
    );
    check(
        MERGE,
        &stripped,
        &p,
        &format!("ignored: {IGNORE_MERGE_REQUEST}"),
    );
    // Unknown or missing X-Gitlab-Event: recorded, not acted on, whatever the body.
    for event in [
        Some("Pipeline Hook"),
        Some("Something New Hook"),
        Some(""),
        None,
    ] {
        check(
            event,
            TAG_CREATE,
            &p,
            &format!("ignored: {IGNORE_OTHER_EVENT}"),
        );
    }
    check(
        Some("Pipeline Hook"),
        r#"{"object_kind":"pipeline","ref":7}"#,
        &p,
        &format!("ignored: {IGNORE_OTHER_EVENT}"),
    );
}

#[test]
fn malformed_pushes() {
    let p = project();
    for field in ["ref", "before", "after", "project_id"] {
        let mut changes = vec![(field, None)];
        if field == "project_id" {
            changes.push(("project.id", None));
        }
        check(
            TAG,
            &edit(TAG_CREATE, &changes),
            &p,
            &format!("error: missing field {field}"),
        );
        check(
            BRANCH,
            &edit(PUSH, &changes),
            &p,
            &format!("error: missing field {field}"),
        );
    }
    // project.id stands in for project_id.
    check(
        TAG,
        &edit(TAG_CREATE, &[("project_id", None)]),
        &p,
        &format!("build {COMMIT}"),
    );
    check(
        TAG,
        &edit(TAG_CREATE, &[("ref", Some(json!(5)))]),
        &p,
        "error: field ref must be a string",
    );
    check(
        TAG,
        &edit(TAG_CREATE, &[("after", Some(Value::Null))]),
        &p,
        "error: missing field after",
    );
    for bad in [
        "v1.0.0",
        "refs/heads/main",
        "refs/tags/",
        "refs/tags/a..b",
        "refs/tags/a b",
        "refs/tags/x\u{7}",
        "refs/tags//x",
        "refs/tags/.hidden",
        "refs/tags/x.lock",
    ] {
        check(
            TAG,
            &edit(TAG_CREATE, &[("ref", Some(json!(bad)))]),
            &p,
            "error: field ref must be a tag ref (refs/tags/<name>)",
        );
    }
    check(
        BRANCH,
        &edit(PUSH, &[("ref", Some(json!("refs/tags/v1")))]),
        &p,
        "error: field ref must be a branch ref (refs/heads/<name>)",
    );
    for (field, bad) in [
        ("before", "zzz"),
        ("after", ""),
        ("checkout_sha", "not-hex"),
        ("after", &"a".repeat(65)),
    ] {
        check(
            TAG,
            &edit(TAG_CREATE, &[(field, Some(json!(bad)))]),
            &p,
            &format!("error: field {field} must be a hex object id"),
        );
    }
    check(
        TAG,
        &edit(TAG_CREATE, &[("after", Some(json!("0".repeat(40))))]),
        &p,
        "error: fields before and after are both all zeros",
    );
    // The body's object_kind must agree with X-Gitlab-Event.
    check(
        TAG,
        PUSH,
        &p,
        "error: field object_kind must be tag_push for a tag push hook",
    );
    check(
        BRANCH,
        TAG_CREATE,
        &p,
        "error: field object_kind must be push for a push hook",
    );
}

#[test]
fn bodies_that_are_not_json_objects() {
    let p = project();
    check(
        TAG,
        "",
        &p,
        "error: body is not valid json: line 1 column 0",
    );
    check(
        TAG,
        "{\"object_kind\": ",
        &p,
        "error: body is not valid json: line 1 column 16",
    );
    check(
        TAG,
        "not json",
        &p,
        "error: body is not valid json: line 1 column 2",
    );
    check(TAG, "[1, 2]", &p, "error: body is not a json object");
    check(TAG, "\"tag_push\"", &p, "error: body is not a json object");
}

#[test]
fn parse_reads_what_matters() {
    let hook = Hook::parse(TAG_ANNOTATED.as_bytes()).unwrap();
    assert_eq!(hook.object_kind.as_deref(), Some("tag_push"));
    assert_eq!(hook.project_id, Some(1));
    assert_eq!(hook.project_path.as_deref(), Some("jsmith/example"));
    assert_eq!(hook.git_ref.as_deref(), Some("refs/tags/v1.1.0"));
    assert_eq!(
        hook.before.as_deref(),
        Some("0000000000000000000000000000000000000000")
    );
    assert_eq!(
        hook.after.as_deref(),
        Some("5f2a0e1c9d8b7a6f5e4d3c2b1a0f9e8d7c6b5a49")
    );
    assert_eq!(hook.checkout_sha.as_deref(), Some(COMMIT));
    assert_eq!(hook.user.as_deref(), Some("jsmith"));
    assert_eq!(
        hook.clone_url.as_deref(),
        Some("http://example.com/jsmith/example.git")
    );
    let stored = |event: &str| ferry_proto::WebhookReceived {
        delivery_id: Some("d-1".into()),
        event: event.into(),
        project_id: hook.project_id,
        project_path: hook.project_path.clone(),
        git_ref: hook.git_ref.clone(),
        before: hook.before.clone(),
        after: hook.after.clone(),
        action: "build".into(),
        ..Default::default()
    };
    assert_eq!(
        crate::gateway::dedupe_keys(&stored("Tag Push Hook")),
        [
            "delivery:1:d-1",
            "content:1:refs/tags/v1.1.0:0000000000000000000000000000000000000000:5f2a0e1c9d8b7a6f5e4d3c2b1a0f9e8d7c6b5a49"
        ]
    );
    assert_eq!(
        crate::gateway::dedupe_keys(&stored("Note Hook")),
        ["delivery:1:d-1"]
    );

    let mr = Hook::parse(MR.as_bytes()).unwrap();
    assert_eq!(mr.project_id, Some(2));
    assert_eq!(
        mr.project_path.as_deref(),
        Some("flightjs/flight-management")
    );
    assert_eq!(mr.user.as_deref(), Some("agarcia"));
    assert_eq!(mr.git_ref, None);
}

#[test]
fn zeros_and_ref_names() {
    assert!(is_all_zeros(&"0".repeat(40)));
    assert!(is_all_zeros(&"0".repeat(64)));
    assert!(is_all_zeros("0"));
    assert!(!is_all_zeros(""));
    assert!(!is_all_zeros(&format!("{}1", "0".repeat(39))));
    for good in ["v1.0.0", "release/2024-01", "v1.0.0-rc.1+build", "ünïcode"] {
        assert!(is_valid_ref_name(good), "{good}");
    }
    for bad in [
        "", "@", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b", "/a", "a/", "a//b",
        ".a", "a/.b", "a.lock", "a.", "a@{1}", "a\u{0}b",
    ] {
        assert!(!is_valid_ref_name(bad), "{bad:?}");
    }
}

#[test]
fn duplicate_keys_are_not_json_ferry_accepts() {
    check(
        TAG,
        r#"{"ref": "refs/tags/a", "ref": "refs/tags/b"}"#,
        &project(),
        "error: body is not valid json: duplicate field `ref` at line 1 column 28",
    );
}

#[test]
fn fields_of_the_wrong_type_read_as_absent_and_are_named_when_required() {
    let parse = |body: &str| Hook::parse(body.as_bytes()).unwrap();
    // Unknown fields of any shape are skipped; an escaped key is still the key it spells.
    let hook = parse(
        r#"{"project": {"namespace": {"a": [1, {"b": null}]}, "id": 7,
            "path_with\u005fnamespace": "g/app", "git_http_url": null},
           "user": {"username": "ann", "x": [true]}, "commits": [[], {}], "ref": "refs/tags/v1"}"#,
    );
    assert_eq!(hook.project_id, Some(7));
    assert_eq!(hook.project_path.as_deref(), Some("g/app"));
    assert_eq!(hook.clone_url, None);
    assert_eq!(hook.user.as_deref(), Some("ann"));
    assert_eq!(hook.git_ref.as_deref(), Some("refs/tags/v1"));
    assert!(hook.invalid.is_empty(), "{:?}", hook.invalid);

    for (body, invalid) in [
        (
            r#"{"project_id": -1}"#,
            ("project_id", "an unsigned integer"),
        ),
        (
            r#"{"project_id": 1.5}"#,
            ("project_id", "an unsigned integer"),
        ),
        (
            r#"{"project_id": "1"}"#,
            ("project_id", "an unsigned integer"),
        ),
        (
            r#"{"project": {"id": [1]}}"#,
            ("project.id", "an unsigned integer"),
        ),
        (r#"{"project": "g/app"}"#, ("project", "an object")),
        (r#"{"project": [1]}"#, ("project", "an object")),
        (r#"{"before": {"sha": "0"}}"#, ("before", "a string")),
        (r#"{"checkout_sha": false}"#, ("checkout_sha", "a string")),
        (
            r#"{"user": {"username": 3}}"#,
            ("user.username", "a string"),
        ),
    ] {
        assert_eq!(parse(body).invalid, [invalid], "{body}");
    }
    // A user that is not an object is simply not read (the field is optional everywhere).
    assert_eq!(parse(r#"{"user": [1]}"#).user, None);
}
