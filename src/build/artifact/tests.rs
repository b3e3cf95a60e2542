use super::*;
use std::os::unix::fs::symlink;

fn refused(path: &str) -> bool {
    matches!(check_relative(path), Err(Error::PathRefused { .. }))
}

#[test]
fn relative_path_checks() {
    for (path, ok) in [
        ("dist", true),
        ("dist/app.bin", true),
        ("./dist", true),
        (".", true),
        ("a..b", true),
        ("", false),
        ("/etc/passwd", false),
        ("..", false),
        ("../x", false),
        ("dist/../../x", false),
        ("dist/..", false),
    ] {
        assert_eq!(!refused(path), ok, "{path:?}");
    }
}

#[test]
fn file_names_are_one_safe_component() {
    for (project, tag, sha, expected) in [
        (
            "group/app",
            "v1.0.0",
            "0123456789abcdef",
            "group-app-v1.0.0-01234567.tar.gz",
        ),
        (
            "a/b/c",
            "v1;touch pwned",
            "abc",
            "a-b-c-v1_touch_pwned-abc.tar.gz",
        ),
        ("app", "../../etc", "ff", "app-_.-..-etc-ff.tar.gz"),
        ("app", "v$(id)", "ff", "app-v__id_-ff.tar.gz"),
    ] {
        let name = file_name(project, tag, sha);
        assert_eq!(name, expected);
        assert!(!name.contains('/'));
    }
    assert_eq!(
        artifact_key("abcdef", "x.tar.gz"),
        "sha256/ab/abcdef/x.tar.gz"
    );
}

fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("src");
    fs::create_dir_all(root.join("dist/sub")).unwrap();
    fs::write(root.join("dist/a.txt"), "a").unwrap();
    fs::write(root.join("dist/sub/b.txt"), "b").unwrap();
    fs::write(root.join("top.txt"), "top").unwrap();
    symlink("a.txt", root.join("dist/link")).unwrap();
    dir
}

#[test]
fn packing_is_deterministic_and_sorted() {
    let dir = tree();
    let root = dir.path().join("src");
    let one = pack(
        &root,
        &["dist".into(), "top.txt".into()],
        &dir.path().join("1.tgz"),
        "x",
    )
    .unwrap();
    // Different mtimes and listing order must not change the bytes.
    fs::write(root.join("dist/a.txt"), "a").unwrap();
    let two = pack(
        &root,
        &["top.txt".into(), "./dist/".into()],
        &dir.path().join("2.tgz"),
        "x",
    )
    .unwrap();
    assert_eq!(one.sha256, two.sha256);
    assert_eq!(one.size, two.size);
    assert_eq!(fs::read(&one.path).unwrap(), fs::read(&two.path).unwrap());

    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        fs::File::open(&one.path).unwrap(),
    ));
    let names: Vec<(String, u64, u64)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                e.path().unwrap().to_string_lossy().into_owned(),
                h.mtime().unwrap(),
                h.uid().unwrap(),
            )
        })
        .collect();
    let expected = [
        "dist/",
        "dist/a.txt",
        "dist/link",
        "dist/sub/",
        "dist/sub/b.txt",
        "top.txt",
    ];
    assert_eq!(
        names.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(),
        expected
    );
    assert!(names.iter().all(|n| n.1 == 0 && n.2 == 0));
}

#[test]
fn symlinks_out_of_the_checkout_are_refused() {
    let dir = tree();
    let root = dir.path().join("src");
    fs::write(dir.path().join("outside.txt"), "secret").unwrap();
    symlink("../outside.txt", root.join("escape")).unwrap();
    fs::create_dir_all(root.join("inner")).unwrap();
    symlink("../../outside.txt", root.join("inner/escape")).unwrap();
    symlink(dir.path().join("src/top.txt"), root.join("abs")).unwrap();
    fs::create_dir_all(root.join("absdir")).unwrap();
    symlink(dir.path().join("src/top.txt"), root.join("absdir/abs")).unwrap();
    let out = dir.path().join("o.tgz");
    for path in ["escape", "inner", "absdir"] {
        let err = pack(&root, &[path.into()], &out, "x").unwrap_err();
        assert!(matches!(err, Error::PathRefused { .. }), "{path}: {err}");
    }
    // A top-level symlink that stays inside is followed.
    pack(&root, &["abs".into()], &out, "x").unwrap();
    let missing = pack(&root, &["nope".into()], &out, "x").unwrap_err();
    assert!(matches!(missing, Error::NoArtifacts { .. }), "{missing}");
}
