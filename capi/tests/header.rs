//! The committed header is what cbindgen generates from the sources.

#[test]
fn the_committed_header_is_current() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/tandem.h"));
    let committed = include_str!("../include/tandem.h");
    assert!(
        generated == committed,
        "capi/include/tandem.h is stale: copy {}/tandem.h over it",
        env!("OUT_DIR")
    );
}
