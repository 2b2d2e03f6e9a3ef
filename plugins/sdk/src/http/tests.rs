use serde_json::json;

use super::transport::kind_of;
use super::*;
use crate::bindings::wasi::http::types::ErrorCode;

const CHARGES: &str = "POST http://127.0.0.1:9002/charges";

fn answer(status: u16, body: &str) -> Response {
    Response::new(CHARGES, status, body)
}

#[test]
fn urls_split_into_scheme_authority_and_path() {
    let t = Target::parse("http://127.0.0.1:9002/charges/o-1?x=1#frag").unwrap();
    assert_eq!(
        t,
        Target {
            https: false,
            authority: "127.0.0.1:9002".into(),
            path_with_query: "/charges/o-1?x=1".into()
        }
    );
    let t = Target::parse("HTTPS://svc.example").unwrap();
    assert!(t.https);
    assert_eq!(t.authority, "svc.example");
    assert_eq!(t.path_with_query, "/");
    assert_eq!(
        Target::parse("http://h?q=1").unwrap().path_with_query,
        "/?q=1"
    );
    for bad in [
        "127.0.0.1:9002/charges",
        "ftp://h/",
        "http:///path",
        "http://user:pw@h/",
        "http://h/a b",
        "",
    ] {
        assert!(Target::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn path_segments_are_encoded() {
    assert_eq!(
        path_segment("0197c2a4-7d1e-7f3a-9b2c-1d2e3f4a5b6c"),
        "0197c2a4-7d1e-7f3a-9b2c-1d2e3f4a5b6c"
    );
    assert_eq!(path_segment("a/b c?é"), "a%2Fb%20c%3F%C3%A9");
    assert_eq!(path_segment(".."), "..");
}

#[test]
fn requests_are_built_without_an_idempotency_key() {
    let r = Request::post("http://h/x").json(&json!({"a": 1}));
    assert_eq!(r.describe(), "POST http://h/x");
    assert_eq!(r.body_bytes(), Some(br#"{"a":1}"#.as_slice()));
    assert_eq!(r.header_value("content-type"), Some("application/json"));
    assert_eq!(r.header_value("idempotency-key"), None, "the host adds it");

    let r = Request::put("http://h/x")
        .header("Content-Type", "application/merge-patch+json")
        .idempotency_key("mine")
        .json(&json!({}));
    assert_eq!(
        r.headers(),
        [
            (
                "Content-Type".to_string(),
                "application/merge-patch+json".to_string()
            ),
            ("Idempotency-Key".to_string(), "mine".to_string()),
        ]
    );
    assert_eq!(Request::get("http://h/").body_bytes(), None);
    assert_eq!(
        Request::new(Method::Other("PURGE".into()), "http://h/").describe(),
        "PURGE http://h/"
    );
}

#[test]
fn build_mistakes_surface_at_send_without_a_request() {
    // A map with non-string keys is not JSON; `send` reports it before any
    // host call (which would panic natively).
    let body: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
    let err = Request::post("http://h/x").json(&body).send().unwrap_err();
    assert!(
        matches!(err.kind, HttpErrorKind::InvalidRequest(_)),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .starts_with("POST http://h/x was not sent: the body is not serializable"));
    assert_eq!(
        StepError::from(err.clone()),
        StepError::Rejected(err.to_string())
    );

    let err = get("localhost:9001/x").unwrap_err();
    assert!(
        matches!(err.kind, HttpErrorKind::InvalidRequest(_)),
        "{err:?}"
    );
}

#[test]
fn statuses_map_to_outcomes() {
    assert_eq!(answer(201, "{}").error_for_status(), Ok(answer(201, "{}")));
    for status in [408, 425, 429, 500, 502, 503, 504] {
        assert_eq!(
            answer(status, r#"{"error": "payment gateway unavailable"}"#).error_for_status(),
            Err(StepError::Retryable(format!(
                "{CHARGES} answered {status}: payment gateway unavailable"
            ))),
        );
    }
    for status in [400, 402, 404, 409, 422] {
        assert_eq!(
            answer(status, r#"{"error": "card declined"}"#).error_for_status(),
            Err(StepError::Rejected("card declined".into())),
        );
    }
    assert_eq!(
        answer(302, "").error_for_status(),
        Err(StepError::Retryable(format!("{CHARGES} answered 302")))
    );
    assert_eq!(
        answer(409, "").error_for_status(),
        Err(StepError::Rejected(format!("{CHARGES} answered 409")))
    );
}

#[test]
fn error_messages_come_from_the_body_and_are_cut() {
    assert_eq!(
        answer(409, r#"{"error":"out of stock","sku":"OOS-1"}"#).error_message(),
        "out of stock"
    );
    assert_eq!(answer(400, r#"{"message":"bad"}"#).error_message(), "bad");
    assert_eq!(
        answer(400, r#"{"error":{"message":"nested"}}"#).error_message(),
        "nested"
    );
    assert_eq!(
        answer(503, "  upstream down\n").error_message(),
        "upstream down"
    );
    assert_eq!(
        answer(500, r#"{"error": 5}"#).error_message(),
        r#"{"error": 5}"#
    );
    let long = "é".repeat(500);
    let cut = answer(500, long.as_str()).error_message();
    assert_eq!(cut.chars().count(), 200);
    assert!(cut.ends_with('…'));
    assert_eq!(
        answer(500, "x".repeat(200).as_str()).error_message(),
        "x".repeat(200)
    );
}

#[test]
fn bodies_become_outputs() {
    let r = answer(201, r#"{ "charge_id": "ch_o-1", "status": "charged" }"#)
        .with_header("Idempotent-Replayed", "true");
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        r.clone().done(),
        Ok(StepOutcome::Done(
            r#"{ "charge_id": "ch_o-1", "status": "charged" }"#.into()
        ))
    );
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Charge {
        status: String,
    }
    assert_eq!(r.json::<Charge>().unwrap().status, "charged");

    // A 2xx whose body is not JSON cannot be an output: retry.
    match answer(200, "<html>").output() {
        Err(StepError::Retryable(m)) => {
            assert!(
                m.starts_with(&format!("{CHARGES}: the body is not the expected JSON")),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    let not_utf8 = Response::new(CHARGES, 200, b"\"\xff\"".as_slice());
    assert!(matches!(not_utf8.output(), Err(StepError::Retryable(_))));
    // A refusal stays a refusal, whatever the body.
    assert_eq!(
        answer(402, r#"{"error":"card declined"}"#).done(),
        Err(StepError::Rejected("card declined".into()))
    );
}

#[test]
fn transport_failures_are_retryable_with_clear_messages() {
    let cases = [
        (
            ErrorCode::HttpRequestDenied,
            "POST http://x/charges was denied: the origin is not granted to this plugin \
             (an admin grants it with PUT /admin/plugins/{name}/grants)",
        ),
        (
            ErrorCode::ConnectionRefused,
            "POST http://x/charges failed: connection refused",
        ),
        (
            ErrorCode::ConnectionTimeout,
            "POST http://x/charges failed: timed out",
        ),
        (
            ErrorCode::HttpResponseTimeout,
            "POST http://x/charges failed: timed out",
        ),
        (
            ErrorCode::HttpResponseBodySize(Some(2 << 20)),
            "POST http://x/charges failed: response body larger than the host's limit",
        ),
        (
            ErrorCode::ConnectionTerminated,
            "POST http://x/charges failed: connection terminated",
        ),
        (
            ErrorCode::InternalError(Some("at most 16 requests per call".into())),
            "POST http://x/charges failed: at most 16 requests per call",
        ),
    ];
    for (code, message) in cases {
        let err = HttpError {
            request: "POST http://x/charges".into(),
            kind: kind_of(code),
        };
        assert_eq!(err.to_string(), message);
        assert!(err.is_retryable());
        assert_eq!(StepError::from(err), StepError::Retryable(message.into()));
    }
}
