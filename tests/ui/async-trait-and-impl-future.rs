use std::future::Future;
use std::pin::Pin;

use redis_cached::redis_cached;

trait Users {
    fn user<'life0, 'async_trait>(
        &'life0 self,
        id: u64,
    ) -> Pin<Box<dyn Future<Output = u64> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait;
}

struct Repo;

// What `#[async_trait]` turns an `async fn` of a trait impl into.
impl Users for Repo {
    #[redis_cached(key = "user:<id>")]
    fn user<'life0, 'async_trait>(
        &'life0 self,
        id: u64,
    ) -> Pin<Box<dyn Future<Output = u64> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { id })
    }
}

#[redis_cached(key = "order:<id>")]
fn order(id: u64) -> impl Future<Output = u64> {
    async move { id }
}

fn main() {}
