//! Tests of the MAS stand-in (tests/common/mas) against its real MAS-mode Synapse.

mod common;

use common::mas::mas_standin;

#[tokio::test]
async fn version() {
    let target = mas_standin().target();
    let admin = target.admin().await;
    let (status, body) = admin.get("/api/admin/v1/version").await;
    assert_eq!((status, body["version"].as_str()), (200, Some("1.22.0")));
}
