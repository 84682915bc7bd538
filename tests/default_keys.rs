//! Default keys tell functions apart: methods of the same name in two impl
//! blocks of one module, the same method of two trait impls on one type, and
//! the instantiations of a generic function each have their own entry.
//! Explicit keys whose placeholders have a generic type depend on the
//! instantiation too; other explicit keys are rendered exactly as written.
//!
//! The digests' generated code uses absolute paths too (see tests/hygiene.rs).

#![deny(unused_qualifications)]

mod core {}

use redis_cached::{redis_cached, Cache, CacheKey};

thread_local! {
    // `#[tokio::test]` runs each test on its own thread: one cache per test,
    // reached without an argument (which the default key would include).
    static CACHE: Cache = Cache::in_memory();
}

fn cache() -> Cache {
    CACHE.with(Cache::clone)
}

mod rows {
    use super::*;

    pub struct Users {
        pub cache: Cache,
    }
    pub struct Customers {
        pub cache: Cache,
    }

    impl Users {
        #[redis_cached(cache = self.cache)]
        pub async fn get(&self, id: u64) -> String {
            format!("user {id}")
        }
    }

    impl Customers {
        #[redis_cached(cache = self.cache)]
        pub async fn get(&self, id: u64) -> String {
            format!("customer {id}")
        }
    }

    pub trait Named {
        async fn name(&self, id: u64) -> String;
    }
    pub trait Labelled {
        async fn name(&self, id: u64) -> String;
    }

    pub struct Row {
        pub cache: Cache,
    }

    impl Named for Row {
        #[redis_cached(cache = self.cache)]
        async fn name(&self, id: u64) -> String {
            format!("named {id}")
        }
    }

    impl Labelled for Row {
        #[redis_cached(cache = self.cache)]
        async fn name(&self, id: u64) -> String {
            format!("labelled {id}")
        }
    }

    /// A default method: each implementing type has its own entries.
    pub trait Kind {
        const NAME: &'static str;

        #[redis_cached(cache = cache())]
        async fn kind(&self, id: u64) -> String {
            format!("{} {id}", Self::NAME)
        }
    }

    impl Kind for Users {
        const NAME: &'static str = "users";
    }
    impl Kind for Customers {
        const NAME: &'static str = "customers";
    }

    /// A generic impl: its associated fns have no receiver to name `Self`.
    pub struct Table<T>(std::marker::PhantomData<T>);

    impl<T> Table<T> {
        #[redis_cached(cache = cache())]
        pub async fn load(id: u64) -> String {
            format!("{} {id}", std::any::type_name::<T>())
        }
    }
}

#[redis_cached(cache = cache())]
async fn load<T>(id: u64) -> String {
    format!("{} {id}", std::any::type_name::<T>())
}

#[redis_cached(cache = cache())]
async fn describe(value: impl CacheKey + std::fmt::Debug) -> String {
    format!("{value:?}")
}

#[redis_cached(key = "gen:<x>", cache = cache)]
async fn gen<T: CacheKey + std::fmt::Debug>(cache: &Cache, x: T) -> String {
    format!("{x:?}")
}

#[redis_cached(key = "gen:<x>", cache = cache)]
async fn gen_impl(cache: &Cache, x: &(impl CacheKey + std::fmt::Debug)) -> String {
    format!("{x:?}")
}

#[redis_cached(key = "plain:<id>", cache = cache)]
async fn plain<T>(cache: &Cache, id: u64) -> String {
    format!("{} {id}", std::any::type_name::<T>())
}

#[tokio::test]
async fn methods_of_two_impl_blocks_have_their_own_entries() {
    let cache = Cache::in_memory();
    let users = rows::Users {
        cache: cache.clone(),
    };
    let customers = rows::Customers {
        cache: cache.clone(),
    };
    assert_eq!(users.get(1).await, "user 1");
    assert_eq!(customers.get(1).await, "customer 1");
    assert_eq!(users.get(1).await, "user 1");
    assert_eq!(cache.stats().hits, 1);
}

#[tokio::test]
async fn methods_of_two_trait_impls_on_one_type_have_their_own_entries() {
    use rows::{Labelled, Named};
    let row = rows::Row {
        cache: Cache::in_memory(),
    };
    assert_eq!(Named::name(&row, 1).await, "named 1");
    assert_eq!(Labelled::name(&row, 1).await, "labelled 1");
    assert_eq!(Named::name(&row, 1).await, "named 1");
    assert_eq!(row.cache.stats().hits, 1);
}

#[tokio::test]
async fn a_default_method_has_entries_per_implementing_type() {
    use rows::Kind;
    let cache = cache();
    let users = rows::Users {
        cache: cache.clone(),
    };
    let customers = rows::Customers {
        cache: cache.clone(),
    };
    assert_eq!(users.kind(1).await, "users 1");
    assert_eq!(customers.kind(1).await, "customers 1");
    assert_eq!(users.kind(1).await, "users 1");
    assert_eq!(cache.stats().hits, 1);
}

#[tokio::test]
async fn instantiations_of_a_generic_fn_have_their_own_entries() {
    let cache = cache();
    assert_eq!(load::<u8>(1).await, "u8 1");
    assert_eq!(load::<String>(1).await, "alloc::string::String 1");
    assert_eq!(load::<u8>(1).await, "u8 1");
    assert_eq!(cache.stats().hits, 1);
}

#[tokio::test]
async fn associated_fns_of_a_generic_impl_have_their_own_entries() {
    let cache = cache();
    assert_eq!(rows::Table::<u8>::load(1).await, "u8 1");
    assert_eq!(rows::Table::<u16>::load(1).await, "u16 1");
    assert_eq!(cache.stats().computes, 2);
}

#[tokio::test]
async fn impl_trait_arguments_are_generic_too() {
    let cache = cache();
    assert_eq!(describe('a').await, "'a'");
    assert_eq!(describe("a").await, "\"a\"");
    assert_eq!(cache.stats().computes, 2);
}

#[tokio::test]
async fn explicit_keys_of_generic_placeholders_depend_on_the_type() {
    let cache = Cache::in_memory();
    assert_eq!(gen(&cache, 'a').await, "'a'");
    assert_eq!(gen(&cache, String::from("a")).await, "\"a\"");
    assert_eq!(gen(&cache, 1.0f64).await, "1.0");
    assert_eq!(gen(&cache, "1.0").await, "\"1.0\"");
    assert_eq!(gen(&cache, 'a').await, "'a'");
    assert_eq!(cache.stats().computes, 4);

    assert_eq!(gen_impl(&cache, &'b').await, "'b'");
    assert_eq!(gen_impl(&cache, &"b").await, "\"b\"");
    assert_eq!(cache.stats().computes, 6);
}

#[tokio::test]
async fn explicit_keys_without_generic_placeholders_are_rendered_as_written() {
    let cache = Cache::in_memory();
    assert_eq!(plain::<u8>(&cache, 42).await, "u8 42");
    assert_eq!(
        cache.get::<String>("plain:42").await.as_deref(),
        Some("u8 42")
    );
}

mod skipped {
    use redis_cached::{key_of, redis_cached, Cache};

    /// A connection pool: no key, and nothing to do with the value.
    pub struct Pool;

    #[redis_cached(skip = [pool], cache = cache)]
    async fn user(cache: &Cache, pool: &Pool, id: u64) -> u64 {
        let _ = pool;
        id * 10
    }

    #[tokio::test]
    async fn skipped_arguments_are_left_out_of_the_default_key() {
        let cache = Cache::in_memory();
        assert_eq!(user(&cache, &Pool, 4).await, 40);
        let key = key_of(user(&cache, &Pool, 4)).expect("a key");
        assert!(key.ends_with(":4"), "{key}");
        assert!(key.contains("::user#"), "{key}");
        assert_eq!(cache.stats().hits, 0);
        assert_eq!(user(&cache, &Pool, 4).await, 40);
        assert_eq!(cache.stats().hits, 1);
    }
}
