//! The service wrapper (tower and hyper) and the accept loop with graceful shutdown.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::ResponseBody;
use crate::routes::handle;
use crate::state::AppState;

/// How long a client may take to send the request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The billing HTTP service: cheap to clone, usable as a `tower::Service` (mount it in axum with
/// `Router::fallback_service` or `nest_service`) and as a `hyper::service::Service`.
#[derive(Debug, Clone)]
pub struct BillingService {
    state: Arc<AppState>,
}

impl BillingService {
    /// A service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }
}

/// The future of one request.
type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

impl<B> tower_service::Service<Request<B>> for BillingService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let state = Arc::clone(&self.state);
        Box::pin(async move { Ok(handle(&state, req).await) })
    }
}

impl<B> hyper::service::Service<Request<B>> for BillingService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<B>) -> Self::Future {
        let state = Arc::clone(&self.state);
        Box::pin(async move { Ok(handle(&state, req).await) })
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown` completes, then shuts down gracefully: stops
/// accepting, lets in-flight requests finish (idle keep-alive connections are closed), and returns
/// once every connection is done or after twice the request timeout.
///
/// Stopping the job worker is the caller's business (see `Billing::run_background`).
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let service = BillingService::new(Arc::clone(&state));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).keep_alive(true);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "listening");
    }
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(error = %e, "set_nodelay failed");
                    }
                    let connection = builder.serve_connection(TokioIo::new(stream), service.clone());
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    info!("shutting down: no longer accepting; finishing in-flight requests");
    let drain = state.request_timeout().saturating_mul(2);
    match tokio::time::timeout(drain, graceful.shutdown()).await {
        Ok(()) => info!("all connections closed"),
        Err(_) => warn!(?drain, "connections still open after the drain timeout; closing them"),
    }
}
