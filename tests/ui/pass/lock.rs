use redis_cached::redis_cached;

#[redis_cached(key = "report:<id>", ttl = "5m", lock = true, lock_ttl = "30s", lock_wait = "2s")]
async fn report(id: u64) -> Result<Vec<u8>, String> {
    Ok(id.to_le_bytes().to_vec())
}

#[redis_cached(key = "plain:<id>", lock = false)]
async fn plain(id: u64) -> u64 {
    id
}

fn main() {
    let _ = (report(1), plain(2));
}
