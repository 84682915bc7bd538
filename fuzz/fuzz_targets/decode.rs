//! Decoding stored entries from arbitrary bytes, as values of a few types:
//! an error or a value, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    cached_runtime::__private::fuzz_decode(bytes);
});
