use super::*;
use crate::gateway::options::Secret;

const NOW: i64 = 1_800_000_000;
const BODY: &[u8] = br#"{"object_kind":"tag_push","project_id":1}"#;
const ID: &str = "3c1e3b5e-5a53-4c0e-9d3a-7f1a2b3c4d5e";
const TOKEN: &str = "s3cret-token";

fn key() -> SigningKey {
    SigningKey::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec())
}

fn other_key() -> SigningKey {
    SigningKey::from_bytes(b"fedcba9876543210fedcba9876543210".to_vec())
}

/// Which credentials the project has.
#[derive(Clone, Copy)]
enum Configured {
    Token,
    Key,
    Both,
    Neither,
    Open,
}

fn project(configured: Configured) -> ProjectHooks {
    let mut p = ProjectHooks::new("group/app");
    let (token, key_set) = match configured {
        Configured::Token => (true, false),
        Configured::Key => (false, true),
        Configured::Both => (true, true),
        Configured::Neither => (false, false),
        Configured::Open => {
            p.allow_unauthenticated = true;
            (false, false)
        }
    };
    if token {
        p.webhook_token = Some(Secret::new(TOKEN));
    }
    if key_set {
        p.signing_key = Some(key());
    }
    p
}

/// Headers a delivery carries, as owned strings.
#[derive(Default, Clone)]
struct Sent {
    token: Option<String>,
    id: Option<String>,
    timestamp: Option<String>,
    signature: Option<String>,
}

impl Sent {
    fn token(t: &str) -> Self {
        Sent {
            token: Some(t.into()),
            ..Sent::default()
        }
    }

    /// A correctly signed delivery sent at `at`.
    fn signed(at: i64) -> Self {
        Sent {
            token: None,
            id: Some(ID.into()),
            timestamp: Some(at.to_string()),
            signature: Some(sign(&key(), ID, at, BODY)),
        }
    }

    fn with_token(mut self, t: &str) -> Self {
        self.token = Some(t.into());
        self
    }

    fn with_signature(mut self, s: &str) -> Self {
        self.signature = Some(s.into());
        self
    }
}

fn check(configured: Configured, sent: Sent, expected: Result<Method, Error>) {
    let creds = Credentials {
        token: sent.token.as_deref().map(str::as_bytes),
        webhook_id: sent.id.as_deref().map(str::as_bytes),
        timestamp: sent.timestamp.as_deref().map(str::as_bytes),
        signature: sent.signature.as_deref().map(str::as_bytes),
    };
    let got = authenticate(
        &project(configured),
        &creds,
        BODY,
        NOW,
        Duration::from_secs(300),
    );
    assert_eq!(got, expected);
}

#[test]
fn signatures() {
    use Configured::*;
    let good = sign(&key(), ID, NOW, BODY);
    let wrong = sign(&other_key(), ID, NOW, BODY);
    check(Key, Sent::signed(NOW), Ok(Method::Signature));
    // Any of several space-separated signatures may match; other versions are skipped.
    check(
        Key,
        Sent::signed(NOW).with_signature(&format!("v1a,abcd {wrong} {good}")),
        Ok(Method::Signature),
    );
    check(
        Key,
        Sent::signed(NOW).with_signature(&wrong),
        Err(Error::BadSignature),
    );
    check(
        Key,
        Sent::signed(NOW).with_signature(&format!("{wrong} v1,AAAA")),
        Err(Error::BadSignature),
    );
    // The edge of the window is inside it; one second more is not.
    check(Key, Sent::signed(NOW - 300), Ok(Method::Signature));
    check(Key, Sent::signed(NOW + 300), Ok(Method::Signature));
    check(Key, Sent::signed(NOW - 301), Err(Error::Stale(300)));
    check(Key, Sent::signed(NOW + 301), Err(Error::Future(300)));
    // A stale delivery is refused even when its signature is right for its timestamp.
    check(Key, Sent::signed(NOW - 3600), Err(Error::Stale(300)));
    // The signature covers the id and the timestamp as well as the body.
    let mut other_id = Sent::signed(NOW);
    other_id.id = Some("another-id".into());
    check(Key, other_id, Err(Error::BadSignature));
    let mut other_ts = Sent::signed(NOW);
    other_ts.timestamp = Some((NOW + 1).to_string());
    check(Key, other_ts, Err(Error::BadSignature));
}

#[test]
fn malformed_and_missing_signature_headers() {
    use Configured::*;
    for bad in [
        "",
        "v1",
        "v1,",
        "v2,abcd",
        "v1,!!!not-base64!!!",
        "sha256=abcd",
    ] {
        check(
            Key,
            Sent::signed(NOW).with_signature(bad),
            Err(Error::MalformedSignature),
        );
    }
    for bad in ["", "abc", "-5", "1.5", "99999999999999999999"] {
        let mut sent = Sent::signed(NOW);
        sent.timestamp = Some(bad.into());
        check(Key, sent, Err(Error::MalformedTimestamp));
    }
    let missing = |f: fn(&mut Sent)| {
        let mut s = Sent::signed(NOW);
        f(&mut s);
        s
    };
    check(
        Key,
        missing(|s| s.signature = None),
        Err(Error::MissingHeader("webhook-signature")),
    );
    check(
        Key,
        missing(|s| s.id = None),
        Err(Error::MissingHeader("webhook-id")),
    );
    check(
        Key,
        missing(|s| s.timestamp = None),
        Err(Error::MissingHeader("webhook-timestamp")),
    );
    // A signing-only project does not fall back to a token.
    check(
        Key,
        Sent::token(TOKEN),
        Err(Error::MissingHeader("webhook-signature")),
    );
}

#[test]
fn tokens() {
    use Configured::*;
    check(Token, Sent::token(TOKEN), Ok(Method::Token));
    check(Token, Sent::token("wrong"), Err(Error::WrongToken));
    check(
        Token,
        Sent::token(&format!("{TOKEN}x")),
        Err(Error::WrongToken),
    );
    check(Token, Sent::token(&TOKEN[..4]), Err(Error::WrongToken));
    check(Token, Sent::token(""), Err(Error::EmptyToken));
    check(
        Token,
        Sent::default(),
        Err(Error::MissingHeader("x-gitlab-token")),
    );
    // A token project ignores signature headers it has no key for.
    check(
        Token,
        Sent::signed(NOW).with_token(TOKEN),
        Ok(Method::Token),
    );
}

#[test]
fn both_configured_signature_wins_when_present() {
    use Configured::*;
    check(
        Both,
        Sent::signed(NOW).with_token(TOKEN),
        Ok(Method::Signature),
    );
    check(
        Both,
        Sent::signed(NOW).with_token("wrong"),
        Ok(Method::Signature),
    );
    // A bad signature is not rescued by a good token.
    let wrong = sign(&other_key(), ID, NOW, BODY);
    check(
        Both,
        Sent::signed(NOW).with_signature(&wrong).with_token(TOKEN),
        Err(Error::BadSignature),
    );
    check(
        Both,
        Sent::signed(NOW - 301).with_token(TOKEN),
        Err(Error::Stale(300)),
    );
    // Without a signature (an older GitLab, or the migration), the token decides.
    check(Both, Sent::token(TOKEN), Ok(Method::Token));
    check(Both, Sent::token("wrong"), Err(Error::WrongToken));
    check(
        Both,
        Sent::default(),
        Err(Error::MissingHeader("x-gitlab-token")),
    );
}

#[test]
fn projects_without_credentials() {
    use Configured::*;
    check(
        Neither,
        Sent::default(),
        Err(Error::NoCredentialsConfigured),
    );
    check(
        Neither,
        Sent::token("anything"),
        Err(Error::NoCredentialsConfigured),
    );
    check(Open, Sent::default(), Ok(Method::Unauthenticated));
    // An empty configured token is no token: an empty header never matches it.
    let mut p = project(Neither);
    p.webhook_token = Some(Secret::new(""));
    let creds = Credentials {
        token: Some(b""),
        ..Credentials::default()
    };
    assert_eq!(
        authenticate(&p, &creds, BODY, NOW, Duration::from_secs(300)),
        Err(Error::NoCredentialsConfigured)
    );
}

#[test]
fn standard_webhooks_test_vector() {
    // The example from the Standard Webhooks specification.
    let key = SigningKey::from_token("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let body = br#"{"test": 2432232314}"#;
    let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    let signature = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    assert_eq!(sign(&key, id, 1614265330, body), signature);
    let creds = Credentials {
        token: None,
        webhook_id: Some(id.as_bytes()),
        timestamp: Some(b"1614265330"),
        signature: Some(signature.as_bytes()),
    };
    let tolerance = Duration::from_secs(300);
    assert_eq!(
        verify_signature(&key, &creds, body, 1614265330, tolerance),
        Ok(())
    );
    // Verified against the raw bytes: the same JSON re-serialized does not match.
    assert_eq!(
        verify_signature(
            &key,
            &creds,
            br#"{"test":2432232314}"#,
            1614265330,
            tolerance
        ),
        Err(Error::BadSignature)
    );
}

#[test]
fn signing_tokens() {
    assert!(SigningKey::from_token("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
    for bad in [
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_",
        "whsec_!!!",
        "whsec",
    ] {
        assert_eq!(
            SigningKey::from_token(bad),
            Err(InvalidSigningToken),
            "{bad}"
        );
    }
    // Keys and tokens never show in debug output.
    let p = project(Configured::Both);
    let shown = format!("{p:?}");
    assert!(!shown.contains(TOKEN), "{shown}");
    assert!(!shown.contains("0123456789abcdef"), "{shown}");
}
