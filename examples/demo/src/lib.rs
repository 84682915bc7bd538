#![warn(missing_docs)]
//! A small HTTP service over a real database, cached with `redis-cached`,
//! and a load generator that shows what the cache saves: run
//! `cargo run -p demo --release -- bench`.

pub mod db;
pub mod load;
pub mod outside;
pub mod repo;
pub mod report;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;

use redis_cached::Cache;

/// Where the data is when `DATABASE_URL` is not set: a SQLite file in the
/// current directory, created and seeded on first use.
pub const DEFAULT_DATABASE: &str = "sqlite://demo.sqlite3?mode=rwc";

/// The cache: Redis at `redis_url` if given, else in process memory.
pub fn cache(redis_url: Option<&str>, namespace: &str) -> Result<Cache, redis_cached::Error> {
    Cache::builder(redis_url.unwrap_or("memory://"))
        .namespace(namespace)
        .build()
}

/// Serves `app` on a free loopback port; its address.
pub async fn spawn(app: service::App) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = service::router(Arc::new(app));
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            eprintln!("the service stopped: {err}");
        }
    });
    Ok(addr)
}
