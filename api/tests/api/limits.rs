//! Request limits over real TCP (raw sockets, so nothing in a client library hides
//! what the server does): the body deadline, closing after a refused chunked upload,
//! and the cap on concurrent large bodies.

use crate::helpers::TestApp;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response head read off a raw connection.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a response head (and whatever body bytes follow in the same reads) within
/// `limit`; panics naming `what` when none comes.
async fn read_head<R: AsyncRead + Unpin>(
    s: &mut R,
    limit: Duration,
    what: &str,
) -> (Head, Vec<u8>) {
    let mut buf = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).to_string();
            let mut lines = text.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|c| c.parse().ok())
                .expect("status line");
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            return (Head { status, headers }, buf[end + 4..].to_vec());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) => panic!("{what}: connection closed before a response"),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => panic!("{what}: read failed before a response: {e}"),
            Err(_) => panic!("{what}: no response within {limit:?}"),
        }
    }
}

/// Reads until the server closes the connection (EOF or reset); false if it is still
/// open after `limit`.
async fn closed_within<R: AsyncRead + Unpin>(s: &mut R, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut chunk = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn port(app: &TestApp) -> u16 {
    app.base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port(app)))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_sent_at_one_byte_per_second_is_cut_off_at_the_body_timeout() {
    let app = TestApp::spawn_with(|s| {
        s.body_timeout_ms = 1500;
        s.body_min_rate = 1024;
    })
    .await;
    let mut s = connect(&app).await;
    s.write_all(
        b"POST /v1/job HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
    )
    .await
    .expect("write head");
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if wr.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let (head, _) = read_head(&mut rd, Duration::from_secs(8), "the slow body").await;
    let took = started.elapsed();
    assert_eq!(head.status, 408, "a body that never completes gets 408");
    assert_eq!(head.header("connection"), Some("close"));
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "cut off after {took:?}; the body timeout is 1.5 s"
    );
    assert!(
        closed_within(&mut rd, Duration::from_secs(4)).await,
        "the server must close the connection after the 408"
    );
    writer.abort();
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_413_on_a_chunked_upload_closes_the_connection() {
    let app = TestApp::spawn().await;
    let s = connect(&app).await;
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(
        b"POST /v1/job HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await
    .expect("write head");
    // A client that streams a body without end (past the 16 MiB JSON limit).
    let writer = tokio::spawn(async move {
        let chunk = vec![b' '; 64 * 1024];
        let frame = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk,
            b"\r\n".to_vec(),
        ]
        .concat();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if wr.write_all(&frame).await.is_err() {
                return started.elapsed();
            }
        }
        started.elapsed()
    });
    let (head, _) = read_head(
        &mut rd,
        Duration::from_secs(20),
        "the oversized chunked body",
    )
    .await;
    assert_eq!(head.status, 413);
    assert_eq!(head.header("connection"), Some("close"));
    assert!(
        closed_within(&mut rd, Duration::from_secs(5)).await,
        "after the 413 the server must close the connection"
    );
    let wrote_for = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the client's writes must fail once the server closed")
        .expect("writer");
    assert!(wrote_for < Duration::from_secs(30), "{wrote_for:?}");
    app.cleanup().await;
}

/// A request head declaring a body of `len` bytes, and its first byte.
fn large_head(len: usize) -> Vec<u8> {
    format!("POST /v1/job HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n{{")
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cap_on_concurrent_large_bodies_holds() {
    let app = TestApp::spawn_with(|s| {
        s.max_large_bodies = 2;
        s.large_body_bytes = 1024;
    })
    .await;
    let q = app.queue("cap");
    // Two large bodies in progress take both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect(&app).await;
        s.write_all(&large_head(100_000)).await.expect("write");
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A third is refused at once, with Retry-After, and its connection closed.
    let mut third = connect(&app).await;
    third.write_all(&large_head(100_000)).await.expect("write");
    let (head, _) = read_head(&mut third, Duration::from_secs(3), "the third large body").await;
    assert_eq!(head.status, 503);
    assert_eq!(head.header("retry-after"), Some("1"));
    assert_eq!(head.header("connection"), Some("close"));
    assert!(closed_within(&mut third, Duration::from_secs(4)).await);
    // A chunked body is counted once it reaches the threshold.
    let mut chunked = connect(&app).await;
    let frame = [b"800\r\n".to_vec(), vec![b' '; 0x800], b"\r\n".to_vec()].concat();
    chunked
        .write_all(b"POST /v1/job HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .expect("write");
    chunked.write_all(&frame).await.expect("write");
    let (head, _) = read_head(
        &mut chunked,
        Duration::from_secs(3),
        "the chunked large body",
    )
    .await;
    assert_eq!(head.status, 503);
    // Small bodies are not counted.
    let small = json!({"job_queue": q});
    let r = app.post_json("/v1/job", &small).await;
    assert_eq!(
        r.status(),
        200,
        "a small body must pass while large ones are capped"
    );
    // One large body ends (the client goes away): its slot is free again.
    drop(held.pop());
    let big = json!({"job_queue": q, "test_data": {"test_cmds": "x".repeat(4000)}});
    app.wait_for(5, "a large body to be accepted again", || async {
        let r = app.post_json("/v1/job", &big).await;
        (r.status() == 200).then_some(())
    })
    .await;
    drop(held);
    app.cleanup().await;
}

/// A gzip tar of `n` bytes of incompressible data (stored, not compressed), so the
/// artifact is as large on the wire as on disk.
fn big_tarball(n: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..n as u64)
        .map(|i| {
            (i.wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                >> 56) as u8
        })
        .collect();
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "blob.bin", data.as_slice())
        .expect("tar");
    tar.into_inner().expect("tar").finish().expect("gzip")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_a_download_is_dropped_after_the_send_timeout() {
    let app = TestApp::spawn_with(|s| s.send_timeout_ms = 1500).await;
    let q = app.queue("slowread");
    let id = app.submit(json!({"job_queue": q})).await;
    let token = app.claim(&id, "slow-reader-agent").await["token"]
        .as_str()
        .expect("token")
        .to_string();
    let tarball = big_tarball(40 << 20);
    let total = tarball.len();
    let part = reqwest::multipart::Part::bytes(tarball).file_name("file");
    let r = app
        .http
        .post(app.url(&format!("/v1/result/{id}/artifact")))
        .header("X-Testflinger-Token", &token)
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status(), 200);
    // Ask for it and read nothing: the kernel buffers fill, the window closes.
    let mut s = connect(&app).await;
    s.write_all(format!("GET /v1/result/{id}/artifact HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_secs(12)).await;
    // Now read: the server dropped the connection, so far less than the whole
    // artifact arrives before the end (an error or EOF).
    let mut got = 0usize;
    let mut chunk = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the download neither finished nor ended");
    assert!(
        got < total,
        "the whole artifact ({got} of {total} bytes) reached a client that stopped reading for 12 s; the send timeout is 1.5 s"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fully_read_upload_keeps_its_connection_alive() {
    // Only answers to bodies left unread close the connection: a multipart upload read
    // to its closing boundary does not.
    let app = TestApp::spawn().await;
    let q = app.queue("keepalive");
    let id = app.submit(json!({"job_queue": q})).await;
    let token = app.claim(&id, "keepalive-agent").await["token"]
        .as_str()
        .expect("token")
        .to_string();
    let file = big_tarball(1000);
    let body = [
        b"--bnd\r\ncontent-disposition: form-data; name=\"file\"; filename=\"file\"\r\ncontent-type: application/octet-stream\r\n\r\n".to_vec(),
        file,
        b"\r\n--bnd--\r\n".to_vec(),
    ]
    .concat();
    let mut s = connect(&app).await;
    let head = format!(
        "POST /v1/result/{id}/artifact HTTP/1.1\r\nhost: t\r\nx-testflinger-token: {token}\r\ncontent-type: multipart/form-data; boundary=bnd\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(&[head.into_bytes(), body].concat())
        .await
        .expect("write");
    let (h, _) = read_head(&mut s, Duration::from_secs(10), "the upload").await;
    assert_eq!(h.status, 200);
    assert_ne!(h.header("connection"), Some("close"));
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("second request");
    let (h, _) = read_head(&mut s, Duration::from_secs(5), "the second request").await;
    assert_eq!(h.status, 200);
    app.cleanup().await;
}
