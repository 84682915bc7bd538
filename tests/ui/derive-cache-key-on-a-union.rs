use redis_cached::CacheKey;

#[derive(CacheKey)]
union Bits {
    int: u32,
    float: f32,
}

fn main() {}
