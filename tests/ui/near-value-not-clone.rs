use redis_cached::redis_cached;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Report {
    rows: Vec<u64>,
}

#[redis_cached(key = "report:<id>", near = "30s")]
async fn report(id: u64) -> Option<Report> {
    Some(Report { rows: vec![id] })
}

fn main() {}
