//! `near_max_bytes` bounds the memory the near tier holds, decoded values
//! included, however much larger they are than their stored bytes. An
//! allocator that counts the bytes in use measures it; a test binary of its
//! own, so that no other test's allocations are counted.

// A global allocator is an `unsafe impl`.
#![allow(unsafe_code)]

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use redis_cached::Cache;
use support::RedisServer;

/// The system allocator, counting the bytes in use.
struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        IN_USE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        IN_USE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        IN_USE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const NEAR: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(600);
const MAX_BYTES: usize = 1 << 20;
const KEYS: usize = 1_000;

/// 200 one-letter strings: about 800 bytes stored, 5,000 decoded (a
/// `String` is 24 bytes, plus its letter's allocation).
fn letters() -> Vec<String> {
    vec!["a".to_owned(); 200]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_max_bytes_bounds_the_memory_of_decoded_values() {
    let server = RedisServer::start();
    let cache = Cache::builder(&server.url())
        .near_capacity(100_000)
        .near_max_bytes(MAX_BYTES)
        .build()
        .expect("valid URL");
    let value = letters();
    for n in 0..KEYS {
        cache
            .set(&format!("l:{n}"), &value, TTL)
            .await
            .expect("stored");
    }
    // Serving: a near hit on the first key.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.stats().near_hits == 0 {
        assert!(Instant::now() < deadline, "the near tier never served");
        cache.get_near::<Vec<String>>("l:0", NEAR).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Each key filled, then decoded by a hit, twice over.
    for _ in 0..2 {
        for n in 0..KEYS {
            for _ in 0..2 {
                let found = cache.get_near::<Vec<String>>(&format!("l:{n}"), NEAR).await;
                assert_eq!(found.map(|v| v.len()), Some(200));
            }
        }
    }
    let entries = cache.near_entry_count().expect("a near tier");
    let full = IN_USE.load(Ordering::SeqCst);

    // Emptied: what it held is freed.
    let mut raw = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut raw)
        .await
        .expect("FLUSHALL");
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.near_entry_count() != Some(0) {
        assert!(Instant::now() < deadline, "the tier was not emptied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = full - IN_USE.load(Ordering::SeqCst);
    eprintln!(
        "near tier: {entries} entries held {} KiB (near_max_bytes {} KiB)",
        held / 1024,
        MAX_BYTES / 1024
    );
    assert!(
        entries > 10,
        "{entries} entries: the tier keeps such values"
    );
    assert!(
        held <= MAX_BYTES as isize,
        "{entries} entries held {held} bytes, over near_max_bytes ({MAX_BYTES})"
    );
}
