use redis_cached::redis_cached;

// A hand-written `CacheKey` impl may write `,` bare: `<a>,<b>` could
// render one key for two pairs of values.
#[redis_cached(key = "pair:<a>,<b>")]
async fn pair(a: String, b: String) -> String {
    a + &b
}

fn main() {}
