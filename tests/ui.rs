//! Compile-time errors of the attributes, each with its expected message
//! (tests/ui/*.stderr), and tricky inputs that must compile (tests/ui/pass).

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
    cases.pass("tests/ui/pass/*.rs");
}
