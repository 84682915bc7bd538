//! The HTTP service: the API over the repository, `/metrics` in the
//! Prometheus text format and `/stats` for the load generator.

use std::sync::{Arc, OnceLock};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

use crate::db::DbError;
use crate::repo::Repo;

/// What the handlers share.
pub struct App {
    /// The data.
    pub repo: Repo,
    /// `false`: every call goes to the database directly (the baseline).
    pub cached: bool,
}

/// What `/stats` answers: the counts the load generator reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// SQL statements run, counted at the database layer.
    pub sql: u64,
    /// Cache hits (`Cache::stats`).
    pub hits: u64,
    /// Cache misses (`Cache::stats`), waiting for another caller's
    /// computation included.
    pub misses: u64,
}

/// The process's Prometheus recorder, installed on first use: the cache's
/// timings rendered as histograms (with its bucket bounds), not summaries.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        for (name, bounds) in redis_cached::HISTOGRAM_BUCKETS {
            builder = builder
                .set_buckets_for_metric(Matcher::Full((*name).to_owned()), bounds)
                .expect("bucket bounds are never empty");
        }
        let handle = builder
            .install_recorder()
            .expect("no other metrics recorder is installed");
        metrics::describe_counter!(
            "demo_sql_statements_total",
            metrics::Unit::Count,
            "SQL statements the demo's repository ran."
        );
        handle
    })
}

/// The routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/users/{id}", get(user))
        .route("/users/{id}/name", axum::routing::put(rename))
        .route("/users/{id}/orders", get(orders).post(add_order))
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .with_state(app)
}

/// A database failure: logged here, and never shown to the client (the
/// driver's text can name tables, columns, hosts or values).
fn failed(err: DbError) -> Response {
    eprintln!("request failed: {err}");
    (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
}

async fn user(State(app): State<Arc<App>>, Path(id): Path<i64>) -> Response {
    let user = if app.cached {
        app.repo.user(id).await
    } else {
        app.repo.db.user(id).await
    };
    match user {
        Ok(Some(user)) => Json(user).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(err) => failed(err),
    }
}

async fn orders(State(app): State<Arc<App>>, Path(id): Path<i64>) -> Response {
    let summary = if app.cached {
        app.repo.order_summary(id).await
    } else {
        app.repo.db.order_summary(id).await
    };
    match summary {
        Ok(summary) => Json(summary).into_response(),
        Err(err) => failed(err),
    }
}

async fn rename(State(app): State<Arc<App>>, Path(id): Path<i64>, name: String) -> Response {
    let user = if app.cached {
        app.repo.rename_user(id, name).await
    } else {
        app.repo.db.rename_user(id, &name).await
    };
    match user {
        Ok(Some(user)) => Json(user).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(err) => failed(err),
    }
}

async fn add_order(State(app): State<Arc<App>>, Path(id): Path<i64>, amount: String) -> Response {
    let Ok(amount) = amount.trim().parse::<i64>() else {
        return (StatusCode::BAD_REQUEST, "the body is an amount in cents").into_response();
    };
    let order = if app.cached {
        app.repo.add_order(id, amount).await
    } else {
        app.repo.db.add_order(id, amount).await
    };
    match order {
        Ok(order) => (StatusCode::CREATED, Json(order)).into_response(),
        Err(err) => failed(err),
    }
}

async fn metrics() -> String {
    let handle = prometheus();
    handle.run_upkeep();
    handle.render()
}

async fn stats(State(app): State<Arc<App>>) -> Json<Counts> {
    let stats = app.repo.cache.stats();
    Json(Counts {
        sql: app.repo.db.statements(),
        hits: stats.hits,
        misses: stats.misses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_database_error_reaches_the_log_not_the_client() {
        let response = failed(DbError(
            "relation \"users\" at db.internal:5432: duplicate key alice@example.com".into(),
        ));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .expect("a body");
        assert_eq!(&body[..], b"internal error");
    }
}
