//! Key encoding is injective: property tests over hostile strings, through
//! the attribute (a collision would return another call's value) and through
//! the key builder the attribute calls.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use redis_cached::{redis_cached, Cache, KeyBuilder};

#[redis_cached(key = "pair:<a>:<b>", cache = cache)]
async fn pair(cache: &Cache, a: String, b: String) -> (String, String) {
    (a, b)
}

fn render(a: &str, b: &str) -> String {
    let mut k = KeyBuilder::with_capacity(32);
    k.literal("pair:");
    k.value(a);
    k.literal(":");
    k.value(b);
    k.finish(None)
}

/// Strings rich in the bytes that could break a naive key: separators, glob
/// and hash-tag characters, escapes, spaces, control and non-ASCII.
fn hostile() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just(':'),
            Just('*'),
            Just('{'),
            Just('}'),
            Just('%'),
            Just(' '),
            Just('\n'),
            Just('\0'),
            Just('é'),
            Just('界'),
            Just('@'),
            Just('~'),
            Just('['),
            Just(','),
            Just('3'),
            Just('A'),
            Just('a'),
            Just('-'),
            any::<char>(),
        ],
        0..8,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

const SAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.%";

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn different_arguments_never_share_a_key(a in hostile(), b in hostile(), c in hostile(), d in hostile()) {
        prop_assume!((&a, &b) != (&c, &d));
        prop_assert_ne!(render(&a, &b), render(&c, &d));
    }

    #[test]
    fn values_only_use_the_safe_alphabet(a in hostile()) {
        let mut out = String::new();
        redis_cached::escape_into(a.as_bytes(), &mut out);
        prop_assert!(out.bytes().all(|b| SAFE.contains(&b)), "{out:?}");
    }

    #[test]
    fn escaping_round_trips(a in hostile()) {
        let mut out = String::new();
        redis_cached::escape_into(a.as_bytes(), &mut out);
        let mut decoded = Vec::new();
        let bytes = out.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                decoded.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
        prop_assert_eq!(decoded, a.into_bytes());
    }
}

#[test]
fn colliding_looking_pairs_through_the_attribute() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cache = Cache::in_memory();
        let mut rng_pairs = vec![
            ("1:2".to_owned(), "3".to_owned()),
            ("1".to_owned(), "2:3".to_owned()),
            ("1%3A2".to_owned(), "3".to_owned()),
            (String::new(), ":".to_owned()),
            (":".to_owned(), String::new()),
        ];
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        for _ in 0..500 {
            let a = hostile().new_tree(&mut runner).unwrap().current();
            let b = hostile().new_tree(&mut runner).unwrap().current();
            rng_pairs.push((a, b));
        }
        // Twice: the second pass is served from the cache, and each pair
        // must get back its own arguments.
        for _ in 0..2 {
            for (a, b) in &rng_pairs {
                assert_eq!(
                    pair(&cache, a.clone(), b.clone()).await,
                    (a.clone(), b.clone())
                );
            }
        }
        assert!(cache.stats().hits >= rng_pairs.len() as u64);
    });
}
