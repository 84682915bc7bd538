#![deny(warnings)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use redis_cached::{redis_cached, Cache};

struct Repo {
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "a:<ids[]>", cache = self.cache)]
    async fn named_lifetime<'a>(&self, ids: &'a [u64]) -> HashMap<u64, String> {
        ids.iter().map(|id| (*id, id.to_string())).collect()
    }

    #[redis_cached(key = "b:<ids[]>", cache = self.cache)]
    async fn borrowed_elements<'a>(&self, ids: Vec<&'a str>) -> HashMap<&'a str, String> {
        ids.iter().map(|id| (*id, id.to_uppercase())).collect()
    }

    #[redis_cached(key = "c:<ids[]>", version = 2, tags = ["t:<tenant>"], cache = self.cache)]
    async fn mutable(&self, tenant: u32, mut ids: Vec<u64>) -> Result<BTreeMap<u64, u32>, String> {
        ids.sort_unstable();
        Ok(ids.into_iter().map(|id| (id, tenant)).collect())
    }

    #[redis_cached(key = "d:<ids[]>", cache = self.cache)]
    async fn by_reference(&self, ids: &BTreeSet<String>) -> HashMap<String, usize> {
        ids.iter().map(|id| (id.clone(), id.len())).collect()
    }

    #[redis_cached(key = "e:<ids[]>", cache = self.cache)]
    async fn arc_self(self: Arc<Self>, ids: VecDeque<u64>) -> Result<HashMap<u64, u64>, Box<dyn std::error::Error>> {
        Ok(ids.into_iter().map(|id| (id, id * 2)).collect())
    }
}

#[redis_cached(key = "f:<ids[]>")]
async fn free(ids: Vec<u64>) -> HashMap<u64, u64> {
    ids.into_iter().map(|id| (id, id)).collect()
}

/// Elided lifetimes in the element type.
#[redis_cached(key = "g:<ids[]>")]
async fn elided(ids: Vec<&str>) -> HashMap<&str, usize> {
    ids.into_iter().map(|id| (id, id.len())).collect()
}

fn assert_send<T: Send>(_: T) {}

fn main() {
    let repo = Arc::new(Repo { cache: Cache::in_memory() });
    assert_send(repo.named_lifetime(&[1]));
    assert_send(repo.borrowed_elements(vec!["a"]));
    assert_send(repo.mutable(1, vec![2]));
    let set = BTreeSet::new();
    assert_send(repo.by_reference(&set));
    assert_send(Arc::clone(&repo).arc_self(VecDeque::new()));
    assert_send(free(vec![1]));
    assert_send(elided(vec!["a"]));
}
