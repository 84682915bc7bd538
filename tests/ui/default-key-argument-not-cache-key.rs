use redis_cached::redis_cached;

struct Db;

#[redis_cached]
async fn user(db: &Db, id: u64) -> u64 {
    let _ = db;
    id
}

#[redis_cached(skip = [pool])]
async fn order(db: &Db, id: u64) -> u64 {
    let _ = db;
    id
}

#[redis_cached(key = "o:<id>", skip = [db])]
async fn invoice(db: &Db, id: u64) -> u64 {
    let _ = db;
    id
}

fn main() {}
