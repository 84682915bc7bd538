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

mod derived {
    use std::collections::HashSet;

    use proptest::prelude::*;
    use redis_cached::{redis_cached, Cache, CacheKey, KeyBuilder};

    #[derive(CacheKey, Debug, Clone, PartialEq, Eq, Hash)]
    struct Account {
        tenant: String,
        id: u64,
    }

    #[derive(CacheKey, Debug, Clone, PartialEq, Eq, Hash)]
    struct Pair(String, Option<u32>);

    #[derive(CacheKey, Debug, Clone, PartialEq, Eq, Hash)]
    enum Filter {
        All,
        Active,
        Since { day: u32 },
        Named(String, Vec<String>),
    }

    #[derive(CacheKey)]
    struct Wrapper<T>(T);

    #[derive(CacheKey, Clone)]
    #[cache_key(transparent)]
    struct PlanId(u64);

    #[derive(CacheKey, Clone)]
    #[cache_key(transparent)]
    struct Email {
        address: String,
    }

    #[allow(non_camel_case_types)]
    #[derive(CacheKey, Clone)]
    enum Kind {
        r#type,
        Other(String),
    }

    /// A hand-written impl that writes bytes no encoding holds.
    #[derive(Clone)]
    struct Careless(&'static str);

    impl CacheKey for Careless {
        fn write_key(&self, out: &mut String) {
            out.push_str(self.0);
        }
    }

    fn enc<K: CacheKey>(value: &K) -> String {
        let mut k = KeyBuilder::with_capacity(16);
        k.value(value);
        k.finish(None)
    }

    #[test]
    fn derived_encodings_are_readable() {
        let account = Account {
            tenant: "acme corp".into(),
            id: 7,
        };
        assert_eq!(enc(&account), "%[%,acme%20corp%,7%]");
        assert_eq!(enc(&Filter::Active), "Active");
        assert_eq!(enc(&Filter::Since { day: 3 }), "Since%[%,3%]");
        assert_eq!(enc(&Wrapper(5u8)), "%[%,5%]");
        assert_eq!(enc(&PlanId(7)), "7");
        assert_eq!(
            enc(&Email {
                address: "a@b".into()
            }),
            "a%40b"
        );
        assert_eq!(enc(&Kind::r#type), "type");
    }

    /// One cached function per kind of value, with the key template `t:<v>`.
    macro_rules! agree {
        ($($name:ident: $ty:ty = $value:expr;)*) => {
            $(
                #[redis_cached(key = "t:<v>", cache = cache)]
                async fn $name(cache: &Cache, v: $ty) -> u8 {
                    let _ = v;
                    0
                }
            )*

            /// `tag(…)` renders what the attribute renders, for every
            /// built-in and derived kind and a careless hand-written impl.
            #[test]
            fn tags_render_as_the_attribute_for_every_kind() {
                let cache = Cache::in_memory();
                $(
                    let value: $ty = $value;
                    let attribute = redis_cached::key_of($name(&cache, value.clone())).expect("a key");
                    let tag = redis_cached::tag("t:<v>", &[&value]).expect("valid");
                    assert_eq!(tag, attribute, "{}", stringify!($name));
                )*
            }
        };
    }

    agree! {
        unsigned: u64 = 42;
        signed: i32 = -7;
        boolean: bool = true;
        character: char = '~';
        text: String = "a b:{c}~%".into();
        float: f64 = -0.5;
        optional: Option<u32> = None;
        list: Vec<String> = vec!["x,y".into(), "]".into()];
        account: Account = Account { tenant: "t:1".into(), id: 1 };
        filter: Filter = Filter::Named("n".into(), vec!["%,".into()]);
        plan: PlanId = PlanId(7);
        kind: Kind = Kind::r#type;
        other: Kind = Kind::Other("o".into());
        careless: Careless = Careless("a:b{c}@v2 #~");
    }

    fn filters() -> impl Strategy<Value = Filter> {
        let text = "[a-c:%, \\[\\]]{0,4}";
        prop_oneof![
            Just(Filter::All),
            Just(Filter::Active),
            (0u32..4).prop_map(|day| Filter::Since { day }),
            (text, prop::collection::vec(text, 0..3)).prop_map(|(a, b)| Filter::Named(a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// Different values, different keys: structs, tuples, enums.
        #[test]
        fn derived_encodings_are_injective(
            a in filters(), b in filters(),
            p in ("[a:%,]{0,3}", prop::option::of(0u32..3)), q in ("[a:%,]{0,3}", prop::option::of(0u32..3)),
        ) {
            prop_assert_eq!(a == b, enc(&a) == enc(&b), "{:?} {:?}", a, b);
            let (p, q) = (Pair(p.0, p.1), Pair(q.0, q.1));
            prop_assert_eq!(p == q, enc(&p) == enc(&q), "{:?} {:?}", p, q);
        }
    }

    #[redis_cached(key = "accounts:<account>:<filter>", cache = cache)]
    async fn accounts(cache: &Cache, account: Account, filter: Filter) -> String {
        format!("{account:?} {filter:?}")
    }

    #[tokio::test]
    async fn derived_keys_work_through_the_attribute() {
        let cache = Cache::in_memory();
        let account = Account {
            tenant: "t:1".into(),
            id: 1,
        };
        let mut seen = HashSet::new();
        for filter in [Filter::All, Filter::Active, Filter::Since { day: 1 }] {
            let key = redis_cached::key_of(accounts(&cache, account.clone(), filter.clone()))
                .expect("a key");
            assert!(seen.insert(key));
            let value = accounts(&cache, account.clone(), filter.clone()).await;
            assert_eq!(value, format!("{account:?} {filter:?}"));
        }
    }
}
