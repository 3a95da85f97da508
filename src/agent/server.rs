//! The agent's HTTP endpoints, served by hyper on the agent's tokio runtime: `/healthz` and
//! `/readyz` on `--health-listen`, `/metrics` on `--metrics-listen` (one listener serves both
//! when the addresses are equal). Two flags, because who may reach them differs: kubelet's
//! probes need the health endpoints only, and the metrics name every pod and key of the node.
//! GET (and HEAD) only; one request per connection, its head read within a bound and the
//! whole exchange too, so a client that stalls holds nothing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::health::{self, AgentStatus};
use super::metrics::{self, LinkReader};

/// A request's head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole connection ends by then (a scrape's link reads end after 5 s).
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// What one listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routes {
    pub health: bool,
    pub metrics: bool,
}

/// The listeners the flags ask for: one per address.
pub fn plan(health: SocketAddr, metrics: Option<SocketAddr>) -> Vec<(SocketAddr, Routes)> {
    match metrics {
        Some(addr) if addr == health => vec![(
            addr,
            Routes {
                health: true,
                metrics: true,
            },
        )],
        Some(addr) => vec![
            (
                health,
                Routes {
                    health: true,
                    metrics: false,
                },
            ),
            (
                addr,
                Routes {
                    health: false,
                    metrics: true,
                },
            ),
        ],
        None => vec![(
            health,
            Routes {
                health: true,
                metrics: false,
            },
        )],
    }
}

pub async fn bind(addr: SocketAddr, routes: Routes) -> Result<TcpListener> {
    let flag = match routes.health {
        true => "--health-listen",
        false => "--metrics-listen",
    };
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {flag} {addr}"))
}

/// What the handlers need.
pub struct Shared {
    pub status: Arc<AgentStatus>,
    pub links: Option<LinkReader>,
}

/// Serve until the task is dropped.
pub async fn serve(listener: TcpListener, routes: Routes, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&request, routes, &shared).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIMIT, connection).await;
        });
    }
}

async fn answer(
    request: &Request<Incoming>,
    routes: Routes,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let (code, content_type, body) =
        route(request.method(), request.uri().path(), routes, shared).await;
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn route(
    method: &Method,
    path: &str,
    routes: Routes,
    shared: &Shared,
) -> (u16, &'static str, String) {
    if method != Method::GET && method != Method::HEAD {
        return (405, PLAIN, "only GET\n".into());
    }
    match path {
        "/healthz" | "/readyz" if routes.health => {
            let (code, body) = health::respond(path, &shared.status);
            (code, PLAIN, body)
        }
        "/metrics" if routes.metrics => {
            let links = match &shared.links {
                Some(reader) => reader.read().await,
                None => Vec::new(),
            };
            (
                200,
                metrics::CONTENT_TYPE,
                metrics::render(&shared.status, links),
            )
        }
        _ => {
            let paths: Vec<&str> = [
                (routes.health, "/healthz"),
                (routes.health, "/readyz"),
                (routes.metrics, "/metrics"),
            ]
            .into_iter()
            .filter_map(|(on, path)| on.then_some(path))
            .collect();
            (404, PLAIN, format!("try {}\n", paths.join(" or ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_listener_per_address() {
        let health: SocketAddr = "127.0.0.1:9765".parse().unwrap();
        let metrics: SocketAddr = "127.0.0.1:9766".parse().unwrap();
        assert_eq!(plan(health, Some(metrics)).len(), 2);
        assert_eq!(
            plan(health, Some(health)),
            vec![(
                health,
                Routes {
                    health: true,
                    metrics: true
                }
            )]
        );
        assert!(!plan(health, None)[0].1.metrics);
    }

    #[tokio::test]
    async fn routes_answer_only_where_their_flag_put_them() {
        let shared = Shared {
            status: Arc::new(AgentStatus::default()),
            links: None,
        };
        let health = Routes {
            health: true,
            metrics: false,
        };
        let metrics = Routes {
            health: false,
            metrics: true,
        };
        assert_eq!(
            route(&Method::GET, "/healthz", health, &shared).await.0,
            200
        );
        assert_eq!(
            route(&Method::GET, "/metrics", health, &shared).await.0,
            404
        );
        assert_eq!(
            route(&Method::GET, "/readyz", metrics, &shared).await.0,
            404
        );
        let (code, content_type, body) = route(&Method::GET, "/metrics", metrics, &shared).await;
        assert_eq!((code, content_type), (200, metrics::CONTENT_TYPE));
        assert!(body.contains("# TYPE wgcni_network_ready gauge"), "{body}");
        assert_eq!(
            route(&Method::POST, "/metrics", metrics, &shared).await.0,
            405
        );
        let (_, _, body) = route(&Method::GET, "/x", metrics, &shared).await;
        assert_eq!(body, "try /metrics\n");
    }
}
