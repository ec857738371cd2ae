//! A small API behind northstar's usage meter (the seed's "UsageMeter middleware for your API
//! gateway"): every request takes one `api_requests` unit of the customer its `x-customer-id`
//! header names, and past the customer's limit the layer answers 402 with the upgrade payload
//! before the service sees the request.
//!
//! ```sh
//! NORTHSTAR_URL=http://127.0.0.1:7070 NORTHSTAR_SERVICE_KEY=service-key-0123456789 \
//!   cargo run --example gateway
//! curl -s localhost:8080/search -H 'x-customer-id: acme'   # 200 from the service, or 402
//! ```

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use northstar::gateway::{GatewayOptions, UsageLayer};
use tower_layer::Layer;
use tower_service::Service;

/// The API being metered: answers every request.
#[derive(Clone)]
struct Search;

impl Service<Request<Incoming>> for Search {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let body = format!(
            "{{\"results\": [], \"path\": \"{}\"}}\n",
            request.uri().path()
        );
        ready(Ok(Response::new(Full::new(Bytes::from(body)))))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let northstar =
        std::env::var("NORTHSTAR_URL").unwrap_or_else(|_| "http://127.0.0.1:7070".into());
    let key = std::env::var("NORTHSTAR_SERVICE_KEY")
        .map_err(|_| "set NORTHSTAR_SERVICE_KEY to a service key of the northstar server")?;
    let listen = std::env::var("GATEWAY_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let service =
        UsageLayer::new(&northstar, &key, GatewayOptions::consume("api_requests")).layer(Search);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("gateway listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                eprintln!("connection ended: {error}");
            }
        });
    }
}
