//! Request limits at the edge, for what actix-web does not bound itself.
//!
//! actix-web times out a request's head (`TESTFLINGER_HEADER_TIMEOUT_MS`), idle
//! keep-alive connections (`TESTFLINGER_KEEP_ALIVE_MS`) and the close of a connection
//! (`TESTFLINGER_DISCONNECT_TIMEOUT_MS`), but not a request's body. [`guard`] (a
//! middleware on every route) adds, for every request that has a body:
//!
//! - **Body deadline**, after Apache's `mod_reqtimeout` (`body=N,MinRate=R`): the body
//!   must arrive within `TESTFLINGER_BODY_TIMEOUT_MS` of the head, and every
//!   `TESTFLINGER_BODY_MIN_RATE` bytes received push the deadline back by one second.
//!   A body sent at 1 byte/s is cut off just after the base timeout; a large upload at a
//!   steady rate above the minimum is never cut. Past the deadline the answer is
//!   **408** and the connection is closed.
//! - **Large-body cap**: at most `TESTFLINGER_MAX_LARGE_BODIES` requests whose body is
//!   `TESTFLINGER_LARGE_BODY_BYTES` or more (declared by `Content-Length`, or reached
//!   while reading a chunked body) are served at once, on all workers together. One more
//!   is answered at once **503** with `Retry-After: 1` and the connection closed
//!   (nginx's `limit_conn` behaviour: the client retries; the agent retries 5xx on its
//!   own). A slot is held until the handler has answered, so bodies read whole into
//!   memory (JSON, at most 16 MiB each) are bounded in number too.
//! - **Unread bodies close the connection**: when a handler answers before reading its
//!   whole body (a 413, 401, 404, a refusal above), the answer carries
//!   `Connection: close` and the server closes the connection, so a client still
//!   sending (a chunked upload) sees the answer and an end instead of blocking while
//!   the server drains what it will never use. (actix-web drains an unread *chunked*
//!   body to its end on a kept-alive connection.)
//!
//! Slow readers are bounded outside this module: the listening socket carries
//! `TCP_USER_TIMEOUT` (`TESTFLINGER_SEND_TIMEOUT_MS`, see `startup`), so a client that
//! stops reading an answer (its window stays closed) or vanishes is dropped by the
//! kernel once data waited that long. A client that reads slowly but steadily keeps its
//! connection.

use actix_web::HttpMessage;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::{ConnectionType, StatusCode, header};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use bytes::Bytes;
use futures_util::{FutureExt, Stream};
use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The body limits of one server (shared by all its workers).
#[derive(Debug)]
pub struct Limits {
    /// Base time for a whole body, from the end of the head.
    pub body_timeout: Duration,
    /// Bytes per second that earn one more second (0: the deadline never moves).
    pub body_min_rate: u64,
    /// Bodies of this many bytes or more take a slot of `large_bodies`.
    pub large_body_bytes: u64,
    /// Slots for large bodies; `TESTFLINGER_MAX_LARGE_BODIES` of them.
    pub large_bodies: Arc<Semaphore>,
    max_large_bodies: usize,
}

impl Limits {
    pub fn from_settings(s: &crate::settings::Settings) -> Limits {
        let n = s.max_large_bodies.max(1);
        Limits {
            body_timeout: Duration::from_millis(s.body_timeout_ms.max(1)),
            body_min_rate: s.body_min_rate,
            large_body_bytes: s.large_body_bytes.max(1),
            large_bodies: Arc::new(Semaphore::new(n)),
            max_large_bodies: n,
        }
    }
}

/// What the body stream saw, read by [`guard`] once the handler answered.
#[derive(Default)]
struct Watch {
    timed_out: AtomicBool,
    busy: AtomicBool,
    eof: AtomicBool,
    received: AtomicU64,
    /// The large-body slot, held until [`guard`] ends (not only while the body is read).
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

/// The request's payload with the deadline and the lazy large-body slot.
struct Guarded {
    /// Shared with [`guard`], which keeps an unread payload alive until its answer is
    /// sent: actix-web closes the connection only for an unread payload still held.
    inner: Rc<RefCell<Payload>>,
    watch: Arc<Watch>,
    limits: web::Data<Limits>,
    started: Instant,
    deadline: Pin<Box<Sleep>>,
    received: u64,
    /// A chunked body takes its slot when it reaches `large_body_bytes`.
    needs_slot: bool,
    done: bool,
}

impl Guarded {
    fn extended(&self) -> Instant {
        let extra = match self.limits.body_min_rate {
            0 => Duration::ZERO,
            r => Duration::from_secs_f64(self.received as f64 / r as f64),
        };
        self.started + self.limits.body_timeout + extra
    }
}

fn io_err(kind: std::io::ErrorKind, msg: &str) -> actix_web::error::PayloadError {
    actix_web::error::PayloadError::Io(std::io::Error::new(kind, msg.to_string()))
}

impl Stream for Guarded {
    type Item = Result<Bytes, actix_web::error::PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut *this.inner.borrow_mut()).poll_next(cx);
        match polled {
            Poll::Ready(Some(Ok(b))) => {
                this.received += b.len() as u64;
                this.watch.received.store(this.received, Ordering::Relaxed);
                if this.needs_slot && this.received >= this.limits.large_body_bytes {
                    this.needs_slot = false;
                    match this.limits.large_bodies.clone().try_acquire_owned() {
                        Ok(p) => {
                            if let Ok(mut slot) = this.watch.permit.lock() {
                                *slot = Some(p);
                            }
                        }
                        Err(_) => {
                            this.done = true;
                            this.watch.busy.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(io_err(
                                std::io::ErrorKind::WouldBlock,
                                "too many large request bodies at once",
                            ))));
                        }
                    }
                }
                let d = this.extended();
                this.deadline.as_mut().reset(d);
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(None) => {
                this.done = true;
                this.watch.eof.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.done = true;
                    this.watch.timed_out.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(io_err(
                        std::io::ErrorKind::TimedOut,
                        "request body not received in time",
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

fn declared_length(req: &ServiceRequest) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn chunked(req: &ServiceRequest) -> bool {
    req.headers()
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn busy_response(limits: &Limits) -> HttpResponse {
    HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE)
        .insert_header((header::RETRY_AFTER, "1"))
        .force_close()
        .json(serde_json::json!({
            "message": format!(
                "too many large request bodies at once: at most {} bodies of {} bytes or more are read at a time (TESTFLINGER_MAX_LARGE_BODIES, TESTFLINGER_LARGE_BODY_BYTES); retry shortly",
                limits.max_large_bodies, limits.large_body_bytes
            )
        }))
}

/// The middleware (`middleware::from_fn(limits::guard)`): see the module docs. Needs a
/// `web::Data<Limits>` in the app; without one it passes requests through.
pub async fn guard(
    mut req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(limits) = req.app_data::<web::Data<Limits>>().cloned() else {
        return next.call(req).await;
    };
    let declared = declared_length(&req);
    let chunked = chunked(&req);
    if !chunked && declared.is_none_or(|n| n == 0) {
        return next.call(req).await;
    }
    let watch = Arc::new(Watch::default());
    if declared.is_some_and(|n| n >= limits.large_body_bytes) {
        match limits.large_bodies.clone().try_acquire_owned() {
            Ok(p) => {
                if let Ok(mut slot) = watch.permit.lock() {
                    *slot = Some(p);
                }
            }
            Err(_) => {
                tracing::warn!(
                    path = req.path(),
                    bytes = declared,
                    "too many large request bodies at once; answered 503"
                );
                let res = busy_response(&limits);
                return Ok(req.into_response(res));
            }
        }
    }
    let started = Instant::now();
    let payload = Rc::new(RefCell::new(req.take_payload()));
    let stream = Guarded {
        inner: payload.clone(),
        watch: watch.clone(),
        limits: limits.clone(),
        started,
        deadline: Box::pin(tokio::time::sleep_until(started + limits.body_timeout)),
        received: 0,
        needs_slot: declared.is_none() && chunked,
        done: false,
    };
    req.set_payload(Payload::Stream {
        payload: Box::pin(stream),
    });
    let mut res = next.call(req).await?;
    if watch.timed_out.load(Ordering::Relaxed) {
        let received = watch.received.load(Ordering::Relaxed);
        tracing::warn!(
            path = res.request().path(),
            received,
            "request body not received in time; answered 408"
        );
        let body = HttpResponse::build(StatusCode::REQUEST_TIMEOUT)
            .force_close()
            .json(serde_json::json!({
                "message": format!(
                    "request body not received in time: {received} of {} bytes in {} ms; a body must arrive within TESTFLINGER_BODY_TIMEOUT_MS ({} ms), plus one second per TESTFLINGER_BODY_MIN_RATE ({}) bytes received",
                    declared.map_or_else(|| "(chunked)".to_string(), |n| n.to_string()),
                    started.elapsed().as_millis(),
                    limits.body_timeout.as_millis(),
                    limits.body_min_rate
                )
            }));
        res = res.into_response(body);
    } else if watch.busy.load(Ordering::Relaxed) {
        tracing::warn!(
            path = res.request().path(),
            "too many large request bodies at once; answered 503"
        );
        let body = busy_response(&limits);
        res = res.into_response(body);
    }
    // A handler may stop at the body's end without polling past it (multipart stops at
    // the closing boundary): look once, without waiting, whether the end is there.
    let at_end = watch.eof.load(Ordering::Relaxed)
        || matches!(
            futures_util::StreamExt::next(&mut *payload.borrow_mut()).now_or_never(),
            Some(None)
        );
    if !at_end {
        res.response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
        // Held by the answer's body until it is sent, so the server sees an unread
        // payload and closes instead of draining a chunked body that may never end.
        res = res.map_body(|_, body| {
            BoxBody::new(HoldingPayload {
                body,
                _payload: payload,
            })
        });
    }
    drop(watch);
    Ok(res)
}

/// An answer's body that keeps the request's unread payload alive while it is sent.
struct HoldingPayload {
    body: BoxBody,
    _payload: Rc<RefCell<Payload>>,
}

impl MessageBody for HoldingPayload {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> actix_web::body::BodySize {
        self.body.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.body).poll_next(cx)
    }
}
