//! The accept loop: HTTP/1.1 on hyper, the same way the public server serves, with graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::Console;
use crate::routes::handle;

/// How long a client may take to send the request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves the console on `listener` until `shutdown` completes (its origin is the listener's
/// address over http unless one was configured), then stops accepting and lets
/// in-flight requests finish (at most ten seconds).
pub async fn serve(listener: TcpListener, console: Arc<Console>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).keep_alive(true);
    if let Ok(addr) = listener.local_addr() {
        let _ = console.origin.set(crate::auth::ConsoleOrigin::of_addr(addr));
        info!(%addr, origin = console.origin().unwrap_or_default(), "console listening");
    }
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let console = Arc::clone(&console);
                    let service = service_fn(move |req| {
                        let console = Arc::clone(&console);
                        async move { Ok::<_, std::convert::Infallible>(handle(&console, Some(peer.ip()), req).await) }
                    });
                    let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            debug!(%peer, error = %e, "console connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "console accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        warn!("console connections still open after the drain timeout; closing them");
    }
}
