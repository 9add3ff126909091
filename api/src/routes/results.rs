//! `/v1/result...`: outcomes, log fragments (and our live stream of them), artifacts.

use super::{ok_text, parse_id, token, typed_body};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::Fragment;
use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use testflinger_common::{JobState, LogType, Phase};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/result/{id}", web::post().to(post_result))
        .route("/v1/result/{id}", web::get().to(get_result))
        .route("/v1/result/{id}/log/{log_type}", web::post().to(post_log))
        .route("/v1/result/{id}/log/{log_type}", web::get().to(get_log))
        .route(
            "/v1/result/{id}/log/{log_type}/stream",
            web::get().to(stream_log),
        )
        .route("/v1/result/{id}/artifact", web::post().to(post_artifact))
        .route("/v1/result/{id}/artifact", web::get().to(get_artifact));
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultIn {
    #[serde(default)]
    status: Option<BTreeMap<Phase, i64>>,
    #[serde(default)]
    device_info: Option<Map<String, Value>>,
    #[serde(default)]
    job_state: Option<String>,
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn post_result(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    let job_id = parse_id(&id, true)?;
    let tok = token(&req)?;
    let r: ResultIn = typed_body(&body)?;
    // The state is checked before the job is looked up: a malformed request is refused
    // whether or not the job exists.
    let new_state = match r.job_state.as_deref() {
        None => None,
        Some(raw) => Some(JobState::parse_lenient(raw).ok_or_else(|| {
            ApiError::Validation(testflinger_common::ValidationError::new(
                "job_state",
                format!(
                    "'{}' is not a job state; accepted: {}",
                    raw.chars().take(64).collect::<String>(),
                    JobState::reportable()
                ),
            ))
        })?),
    };
    let report = crate::jobs::report::Report {
        status: r.status,
        device_info: r.device_info,
        state: new_state,
    };
    app.jobs
        .report(&job_id, tok, super::acting_agent_id(&caller), &report)
        .await?;
    Ok(ok_text())
}

/// Joins fragments per phase, in order. When they come from more than one attempt
/// (the job was retried), each attempt's part starts with a label line, so each
/// attempt's output shows once and apart. `since_ms` skips older fragments.
fn join_by_phase(frags: &[Fragment], since_ms: Option<i64>) -> BTreeMap<String, String> {
    let retried = frags.iter().any(|f| f.attempt != frags[0].attempt);
    let mut per_phase: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for f in frags {
        if since_ms.is_some_and(|s| f.ts_ms < s) {
            continue;
        }
        let (last, text) = per_phase.entry(f.phase.clone()).or_default();
        if retried && *last != f.attempt {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&attempt_label(f.attempt));
            *last = f.attempt;
        }
        text.push_str(&f.data);
    }
    per_phase.into_iter().map(|(p, (_, t))| (p, t)).collect()
}

/// The line that starts an attempt's output in a retried job's logs.
fn attempt_label(attempt: u64) -> String {
    format!("===== attempt {attempt} =====\n")
}

/// A job's fragments from `from` on, from Redis or the file store (see [`crate::logs`]).
async fn fragments(
    app: &AppState,
    id: &str,
    log_type: &str,
    from: i64,
    limit: Option<crate::store::Batch>,
) -> ApiResult<Vec<Fragment>> {
    crate::logs::read(&app.store, &app.files, id, log_type, from, limit).await
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn get_result(app: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = parse_id(&id, false)?.to_string();
    let rec = app.store.get_job(&id).await?.ok_or(ApiError::NoContent)?;
    let mut out = Map::new();
    out.insert("job_state".into(), json!(rec.state));
    for (phase, code) in &rec.status {
        out.insert(format!("{phase}_status"), code.clone());
    }
    if let Some(di) = rec.device_info {
        out.insert("device_info".into(), di);
    }
    for (log_type, suffix) in [("output", "output"), ("serial", "serial")] {
        let frags = fragments(&app, &id, log_type, 0, None).await?;
        for (phase, text) in join_by_phase(&frags, None) {
            out.insert(format!("{phase}_{suffix}"), Value::String(text));
        }
    }
    if !rec.reason.is_empty() {
        out.insert("job_reason".into(), json!(rec.reason));
    }
    if rec.attempt > 0 {
        out.insert("job_attempt".into(), json!(rec.attempt));
    }
    Ok(HttpResponse::Ok().json(out))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogIn {
    fragment_number: i64,
    timestamp: String,
    phase: Phase,
    log_data: String,
}

fn parse_time(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    let trimmed = s.trim_end_matches('Z');
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(trimmed, fmt) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    if let Some((base, _)) = trimmed.split_once("+00:00") {
        return parse_time(base);
    }
    None
}

fn log_type(raw: &str) -> ApiResult<LogType> {
    raw.parse::<LogType>().map_err(|_| {
        ApiError::Text(
            StatusCode::NOT_FOUND,
            format!("Not found: log type '{raw}' (use output or serial)\n"),
        )
    })
}

#[tracing::instrument(skip_all, fields(job.id = %path.0))]
async fn post_log(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    let (id, lt) = path.into_inner();
    let id = parse_id(&id, true)?.to_string();
    let lt = log_type(&lt)?;
    let tok = token(&req)?;
    let l: LogIn = typed_body(&body)?;
    if !(0..crate::store::ATTEMPT_STRIDE).contains(&l.fragment_number) {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new(
                "fragment_number",
                format!(
                    "{} is out of range; accepted: 0 to {}",
                    l.fragment_number,
                    crate::store::ATTEMPT_STRIDE - 1
                ),
            ),
        ));
    }
    let Some(ms) = parse_time(&l.timestamp) else {
        return Err(ApiError::Validation(
            testflinger_common::ValidationError::new("timestamp", "not a valid ISO 8601 datetime"),
        ));
    };
    // 404 for an unknown job (upstream accepts and drops the fragment). Checked again,
    // with the write, when the fragment is stored.
    let me = super::acting_agent_id(&caller);
    let attempt = app.store.check_token(&id, tok, me).await?;
    let frag = Fragment {
        n: crate::store::fragment_score(attempt, l.fragment_number),
        attempt: attempt.max(1),
        ts_ms: ms,
        ts: l.timestamp,
        phase: l.phase.as_str().to_string(),
        data: l.log_data,
    };
    let cap = app.settings.max_log_bytes;
    // Built field by field: cloning `frag` would copy its data (up to 16 MiB) for nothing.
    let notice = Fragment {
        n: frag.n,
        attempt: frag.attempt,
        ts_ms: frag.ts_ms,
        ts: frag.ts.clone(),
        phase: frag.phase.clone(),
        data: crate::logs::truncation_notice(lt.as_str(), cap),
    };
    // Past the cap the fragment is accepted (200) but not stored: an agent that got an
    // error would retry it forever.
    let stored = app
        .store
        .put_fragment(
            &id,
            lt.as_str(),
            &frag,
            cap,
            &notice,
            crate::logs::LATE_DELAY_MS,
            (tok, me),
        )
        .await?;
    if stored == crate::store::PutFragment::Truncated {
        tracing::warn!(job.id = %id, log_type = lt.as_str(), cap, "job log reached its cap: truncated");
    }
    Ok(ok_text())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    #[serde(default, deserialize_with = "super::last")]
    start_fragment: Option<String>,
    #[serde(default, deserialize_with = "super::last")]
    start_timestamp: Option<String>,
    #[serde(default, deserialize_with = "super::last")]
    phase: Option<String>,
}

fn bad_query(field: &str, msg: &str) -> ApiError {
    ApiError::Json(StatusCode::BAD_REQUEST, format!("{field}: {msg}"))
}

#[tracing::instrument(skip_all, fields(job.id = %path.0))]
async fn get_log(
    app: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    let (id, lt) = path.into_inner();
    let id = parse_id(&id, true)?.to_string();
    let lt = log_type(&lt)?;
    let q: LogQuery =
        super::serde_html_form(&req).map_err(|e| bad_query("query", &e.to_string()))?;
    let start = match q.start_fragment.as_deref() {
        None => 0,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| bad_query("start_fragment", "must be an integer >= 0"))?,
    };
    let since = match q.start_timestamp.as_deref() {
        None => None,
        Some(s) => Some(
            parse_time(s)
                .ok_or_else(|| bad_query("start_timestamp", "not a valid ISO 8601 datetime"))?,
        ),
    };
    let phase = match q.phase.as_deref() {
        None => None,
        Some(p) => Some(p.parse::<Phase>().map_err(|e| bad_query("phase", &e))?),
    };
    let mut per: BTreeMap<&'static str, (i64, String)> = BTreeMap::new();
    for p in Phase::ALL {
        if phase.is_none_or(|f| f == *p) {
            per.insert(p.as_str(), (-1, String::new()));
        }
    }
    let frags = fragments(&app, &id, lt.as_str(), start, None).await?;
    for f in &frags {
        if since.is_some_and(|s| f.ts_ms < s) {
            continue;
        }
        if let Some(entry) = per.get_mut(f.phase.as_str()) {
            entry.0 = entry.0.max(f.n);
        }
    }
    for (phase, text) in join_by_phase(&frags, since) {
        if let Some(entry) = per.get_mut(phase.as_str()) {
            entry.1 = text;
        }
    }
    let body: Map<String, Value> = per
        .into_iter()
        .map(|(p, (n, d))| {
            (
                p.to_string(),
                json!({"last_fragment_number": n, "log_data": d}),
            )
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ lt.as_str(): body })))
}

/// Our addition: Server-Sent Events of a job's log fragments as they arrive. Resume with
/// `Last-Event-ID` or `?start_fragment=`. Each event: `id: <fragment_number>` and
/// `data: {"fragment_number","phase","timestamp","log_data"}`; an `end` event carries the
/// final state once the job is complete or cancelled and every fragment was sent.
///
/// Each write of the stream carries at most [`crate::logs::SSE_BATCH_FRAGMENTS`]
/// fragments and [`crate::logs::SSE_BATCH_BYTES`] of `log_data` (a long log is sent in
/// batches, never all at once). Between batches the stream waits for the job's log
/// events (Redis pub/sub, see [`crate::logs::LogEvents`]), reading again only when one
/// comes, or every 15 s with a keep-alive comment (a safety net for a lost event).
#[tracing::instrument(skip_all, fields(job.id = %path.0))]
async fn stream_log(
    app: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    let (id, lt) = path.into_inner();
    let id = parse_id(&id, true)?.to_string();
    let lt = log_type(&lt)?;
    // The request is checked before the job is looked up: a malformed request is a 400
    // whether or not the job exists.
    let q: LogQuery =
        super::serde_html_form(&req).map_err(|e| bad_query("query", &e.to_string()))?;
    let fragment_number = |field: &str, raw: &str| match raw.trim().parse::<i64>() {
        Ok(n) if (0..i64::MAX).contains(&n) => Ok(n),
        _ => Err(bad_query(
            field,
            &format!("got '{raw}'; accepted: a fragment number (a whole number, 0 or more)"),
        )),
    };
    let from_header = match req.headers().get("last-event-id") {
        None => None,
        Some(v) => {
            let raw = v.to_str().unwrap_or("(not text)");
            Some(fragment_number("Last-Event-ID", raw)? + 1)
        }
    };
    let from_query = match q.start_fragment.as_deref() {
        None => None,
        Some(raw) => Some(fragment_number("start_fragment", raw)?),
    };
    let start = from_header.or(from_query).unwrap_or(0);
    if app.store.job_state(&id).await?.is_none() {
        return Err(ApiError::NoContent);
    }
    struct S {
        app: web::Data<AppState>,
        id: String,
        lt: &'static str,
        next: i64,
        done: bool,
        follow: crate::logs::Follow,
    }
    let follow = app.logs.events.follow(&id);
    let st = S {
        app,
        id,
        lt: lt.as_str(),
        next: start,
        done: false,
        follow,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            // Events from here on wake the wait below, even one that comes mid-read.
            st.follow.seen();
            let frags = match fragments(
                &st.app,
                &st.id,
                st.lt,
                st.next,
                Some(crate::logs::SSE_BATCH),
            )
            .await
            {
                Ok(f) => f,
                Err(e) => {
                    st.done = true;
                    let msg = format!(
                        "event: error\ndata: {}\n\n",
                        json!({"message": e.to_string()})
                    );
                    return Some((Ok::<_, actix_web::Error>(web::Bytes::from(msg)), st));
                }
            };
            if !frags.is_empty() {
                let mut out = String::new();
                let mut bytes = 0;
                for f in frags {
                    if bytes > 0 && bytes + f.data.len() > crate::logs::SSE_BATCH_BYTES {
                        break;
                    }
                    bytes += f.data.len();
                    st.next = st.next.max(f.n + 1);
                    let data = json!({"fragment_number": f.n, "attempt": f.attempt, "phase": f.phase, "timestamp": f.ts, "log_data": f.data});
                    out.push_str(&format!("id: {}\ndata: {}\n\n", f.n, data));
                }
                return Some((Ok(web::Bytes::from(out)), st));
            }
            let state = st.app.store.job_state(&st.id).await.ok().flatten();
            let terminal = state.is_none_or(JobState::is_terminal);
            if terminal {
                // One last look, so fragments posted just before the end are not lost.
                let one = crate::store::Batch {
                    fragments: 1,
                    bytes: 0,
                };
                if let Ok(last) = fragments(&st.app, &st.id, st.lt, st.next, Some(one)).await
                    && !last.is_empty()
                {
                    continue;
                }
                st.done = true;
                let msg = format!("event: end\ndata: {}\n\n", json!({"job_state": state}));
                return Some((Ok(web::Bytes::from(msg)), st));
            }
            tokio::select! {
                _ = st.follow.changed() => continue,
                _ = tokio::time::sleep(Duration::from_secs(15)) => {
                    return Some((Ok(web::Bytes::from_static(b": keep-alive\n\n")), st));
                }
            }
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream))
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn post_artifact(
    app: web::Data<AppState>,
    caller: crate::auth::Caller,
    req: HttpRequest,
    id: web::Path<String>,
    payload: Multipart,
) -> ApiResult<HttpResponse> {
    caller.require(crate::auth::AGENT)?;
    let id = parse_id(&id, true)?.to_string();
    let tok = token(&req)?;
    let me = super::acting_agent_id(&caller);
    // Checked first so that a stale holder's upload is refused before it is read, and
    // again when it is committed (the commit and its check are one step).
    app.store.check_token(&id, tok, me).await?;
    if let Some(len) = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > app.files.max_bytes + 64 * 1024
    {
        return Err(ApiError::TooLarge(format!(
            "upload larger than the limit of {} bytes",
            app.files.max_bytes
        )));
    }
    let staged = app.files.stage_artifact(&id, payload).await?;
    let name = staged
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match app.store.commit_artifact(&id, tok, me, &name).await {
        Ok(previous) => {
            app.files.drop_replaced_artifact(&id, &previous).await;
            Ok(ok_text())
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&staged).await;
            Err(e.into())
        }
    }
}

#[tracing::instrument(skip_all, fields(job.id = %id))]
async fn get_artifact(app: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = parse_id(&id, true)?.to_string();
    super::stream_artifact(&app, &id).await
}
