mod common;
#[test]
fn fails_after_start() {
    let s = common::synapse();
    assert_eq!(s.server_name, "nope");
}
