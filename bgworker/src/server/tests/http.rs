//! HTTP broadcast and CORS on the WebSocket port, by raw HTTP/1.1.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` and returns the status, the headers (lower-cased
/// names) and the body of the answer.
async fn http(server: &TestServer, request: String) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn post(path: &str, auth: &str, content_type: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\n{auth}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn bearer(token: &str) -> String {
    format!("authorization: Bearer {token}")
}

async fn listener(server: &TestServer, vsn: &str) -> Client {
    let mut c = server.connect_with(&token(60), Some(vsn)).await;
    if vsn == "1.0.0" {
        send(
            &mut c,
            json!({"topic": "realtime:room", "event": "phx_join", "payload": {}, "ref": "1"}),
        )
        .await;
        assert_eq!(recv(&mut c).await["payload"]["status"], "ok");
    } else {
        assert_eq!(join(&mut c, "1", "realtime:room", json!({})).await[4]["status"], "ok");
    }
    c
}

#[tokio::test]
async fn batch_broadcasts_reach_joined_sockets_and_forged_keys_do_not() {
    let server = TestServer::start().await;
    let mut v1 = listener(&server, "1.0.0").await;
    let batch = |text: &str| {
        json!({"messages": [{"topic": "room", "event": "note", "payload": {"text": text}, "id": "m1"}]}).to_string()
    };
    let forged = hs256(
        "not-the-secret-not-the-secret-not-the",
        json!({"role": "anon", "exp": jwt::now() + 60}),
    );
    let (status, headers, body) = http(
        &server,
        post(
            "/realtime/v1/api/broadcast",
            &bearer(&forged),
            "application/json",
            &batch("forged"),
        ),
    )
    .await;
    assert_eq!((status, body.as_str()), (401, r#"{"message":"Unauthorized"}"#));
    assert!(headers.contains(&("access-control-allow-origin".into(), "*".into())));
    // the apikey header works as well as a bearer token
    let (status, _, body) = http(
        &server,
        post(
            "/realtime/v1/api/broadcast",
            &format!("apikey: {}", token(60)),
            "application/json",
            &batch("real"),
        ),
    )
    .await;
    assert_eq!((status, body.as_str()), (202, ""));
    let got = recv(&mut v1).await;
    assert_eq!(
        got["payload"],
        json!({"type": "broadcast", "event": "note", "payload": {"text": "real"}, "meta": {"id": "m1"}})
    );
    // validation, then the rate
    let (status, _, body) = http(
        &server,
        post(
            "/api/broadcast",
            &bearer(&token(60)),
            "application/json",
            r#"{"messages": 3}"#,
        ),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn per_event_broadcasts_take_json_or_bytes_and_nothing_else() {
    let server = TestServer::start().await;
    let mut v2 = listener(&server, "2.0.0").await;
    let auth = bearer(&token(60));
    let path = "/realtime/v1/api/broadcast/room/events/cur%20pos";
    let (status, _, _) = http(
        &server,
        post(path, &auth, "application/json; charset=utf-8", r#"{"x":1}"#),
    )
    .await;
    assert_eq!(status, 202);
    let (status, _, _) = http(&server, post(path, &auth, "application/octet-stream", "\u{1}\u{2}")).await;
    assert_eq!(status, 202);
    let (status, _, body) = http(&server, post(path, &auth, "text/plain", "hi")).await;
    assert_eq!(status, 415);
    assert_eq!(
        body,
        r#"{"error":"Unsupported Media Type. Use application/json or application/octet-stream"}"#
    );
    let mut json_frame = vec![4, 13, 7, 0, 1];
    json_frame.extend_from_slice(b"realtime:roomcur pos{\"x\":1}");
    assert_eq!(recv_binary(&mut v2).await, json_frame);
    let mut bytes_frame = vec![4, 13, 7, 0, 0];
    bytes_frame.extend_from_slice(b"realtime:roomcur pos\x01\x02");
    assert_eq!(recv_binary(&mut v2).await, bytes_frame);
    // a private topic needs the write policy, which needs the database
    let (status, _, _) = http(
        &server,
        post(&format!("{path}?private=true"), &auth, "application/json", "{}"),
    )
    .await;
    assert_eq!(status, 503);
    // kind 4 holds names of 255 bytes at most: refused, not dropped later
    let long = format!("/api/broadcast/{}/events/e", "t".repeat(250));
    let (status, _, _) = http(&server, post(&long, &auth, "application/octet-stream", "\u{1}")).await;
    assert_eq!(status, 422);
    heartbeat_ok(&mut v2, "5").await;
    server.stop().await;
}

#[tokio::test]
async fn limits_hold_for_http_requests() {
    let server = TestServer::with(
        Settings {
            limits: Limits {
                max_payload_bytes: 100,
                http_broadcasts_per_second: 2,
                ..Limits::default()
            },
            ..settings(SECRET, 100, 100)
        },
        Options::default(),
    )
    .await;
    let auth = bearer(&token(60));
    let path = "/realtime/v1/api/broadcast/room/events/e";
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(700));
    let (status, _, body) = http(&server, post(path, &auth, "application/json", &big)).await;
    assert_eq!(
        (status, body.as_str()),
        (422, r#"{"message":"Payload size exceeds tenant limit"}"#)
    );
    let three = json!({"messages": [
        {"topic": "t", "event": "e", "payload": {}}, {"topic": "t", "event": "e", "payload": {}}, {"topic": "t", "event": "e", "payload": {}}
    ]});
    let (status, _, body) = http(
        &server,
        post("/api/broadcast", &auth, "application/json", &three.to_string()),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("reduce the batch size"), "{body}");
    // a burst at once: a second's worth (2) goes, then 429
    let server = Arc::new(server);
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let (server, request) = (server.clone(), post(path, &auth, "application/json", "{}"));
            tokio::spawn(async move { http(&server, request).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for request in burst {
        statuses.push(request.await.unwrap());
    }
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    assert!(accepted >= 2 && statuses.contains(&429), "{statuses:?}");
    assert!(statuses.iter().all(|s| [202, 429].contains(s)), "{statuses:?}");
    let Ok(server) = Arc::try_unwrap(server) else {
        panic!("the burst is over")
    };
    // no content-length, a method or path we do not serve
    let (status, _, _) = http(&server, format!("POST {path} HTTP/1.1\r\n{auth}\r\n\r\n")).await;
    assert_eq!(status, 411);
    let (status, _, _) = http(&server, format!("PUT {path} HTTP/1.1\r\ncontent-length: 0\r\n\r\n")).await;
    assert_eq!(status, 405);
    let (status, _, _) = http(&server, "POST /elsewhere HTTP/1.1\r\ncontent-length: 0\r\n\r\n".into()).await;
    assert_eq!(status, 404);
    // a head that never ends is cut off at its size limit
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let endless = format!("POST {path} HTTP/1.1\r\nx: {}", "y".repeat(20_000));
    let _ = stream.write_all(endless.as_bytes()).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await.unwrap();
    assert!(
        read.is_err() || rest.is_empty(),
        "answered: {}",
        String::from_utf8_lossy(&rest)
    );
    server.stop().await;
}

#[tokio::test]
async fn cors_preflights_are_answered() {
    let server = TestServer::start().await;
    let request = "OPTIONS /realtime/v1/api/broadcast HTTP/1.1\r\norigin: http://app.test\r\n\
                   access-control-request-method: POST\r\naccess-control-request-headers: x-custom\r\n\r\n";
    let (status, headers, _) = http(&server, request.into()).await;
    assert_eq!(status, 204);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(header("access-control-allow-origin"), "*");
    assert!(header("access-control-allow-methods").contains("POST"));
    assert!(header("access-control-allow-headers").contains("authorization"));
    assert!(header("access-control-allow-headers").contains("x-custom"));
    server.stop().await;
}

#[tokio::test]
async fn private_http_broadcasts_follow_the_write_policies_asked_once_per_topic() {
    let (waker, _wake_rx) = crate::server::wake::wake_pair().unwrap();
    let (link, rx) = link::main_link(waker);
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = asked.clone();
    std::thread::spawn(move || {
        while let Ok(request) = rx.recv() {
            if let link::MainRequest::Authorize(a) = request {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let ok = a.subtopic == "open";
                let _ = a.reply.send(Ok(link::Permissions {
                    broadcast: ok,
                    presence: ok,
                }));
            }
        }
    });
    let server = TestServer::with_main(settings(SECRET, 10, 10), Options::default(), Some(link)).await;
    let auth = bearer(&token(60));
    let message = |topic: &str, n: i64| json!({"topic": topic, "event": "e", "payload": {"n": n}, "private": true});
    let batch = json!({"messages": [message("open", 1), message("shut", 2), message("open", 3), message("shut", 4)]});
    let (status, _, _) = http(
        &server,
        post("/api/broadcast", &auth, "application/json", &batch.to_string()),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one question per topic"
    );
    let (status, _, _) = http(
        &server,
        post(
            "/api/broadcast/shut/events/e?private=true",
            &auth,
            "application/json",
            "{}",
        ),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = http(
        &server,
        post(
            "/api/broadcast/open/events/e?private=true",
            &auth,
            "application/json",
            "{}",
        ),
    )
    .await;
    assert_eq!(status, 202);
    server.stop().await;
}

#[tokio::test]
async fn an_early_refusal_of_a_large_upload_reaches_the_client() {
    let server = TestServer::start().await;
    let body = format!(r#"{{"blob":"{}"}}"#, "x".repeat(2 << 20));
    let forged = hs256(
        "not-the-secret-not-the-secret-not-the",
        json!({"role": "anon", "exp": jwt::now() + 60}),
    );
    // refused before its body is read: the answer still arrives whole
    let (status, _, answer) = http(
        &server,
        post("/api/broadcast/t/events/e", &bearer(&forged), "application/json", &body),
    )
    .await;
    assert_eq!((status, answer.as_str()), (401, r#"{"message":"Unauthorized"}"#));
    server.stop().await;
}
