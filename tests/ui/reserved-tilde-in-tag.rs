use redis_cached::redis_cached;

// Tags are templates too, and their bookkeeping keys are the runtime's.
#[redis_cached(key = "user:<id>", tags = ["tenant~<tenant>"])]
async fn get(id: u64, tenant: u32) -> u64 {
    id + u64::from(tenant)
}

fn main() {}
