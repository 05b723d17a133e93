//! The MAS scenarios (`testkit/src/mas_scenarios.rs`) against a real MAS
//! and the Synapse that delegates to it — the same functions `tests/mas.rs`
//! runs against the stand-in.
//!
//! Opt-in: set `MAS_URL`, `MAS_CLIENT_ID`, `MAS_CLIENT_SECRET` (a client in
//! MAS's `policy.data.admin_clients`), `MAS_SYNAPSE_URL`,
//! `MAS_SYNAPSE_ADMIN_TOKEN` (a compatibility token with Synapse admin
//! rights), `MAS_SERVER_NAME`, `MAS_UPSTREAM_PROVIDER_ID` and
//! `MAS_UPSTREAM_PROVIDER_NAME` (an upstream OAuth provider configured in
//! MAS), optionally `MAS_WEAK_PASSWORD` (default `password`). MAS's
//! `policy.allowAdminUsers`-like settings must let the client set `admin`.
//! Without `MAS_URL` the suite is skipped with one line. Every run creates
//! new users (MAS cannot delete users), named `<scenario>-<hex>`.

use matrix_user_operator_testkit as common;

use std::process::ExitCode;

use common::mas::MasTarget;
use common::mas_scenarios as scenarios;
use common::token_scenarios as tokens;
use futures::FutureExt;

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let Some(target) = MasTarget::from_env() else {
        println!("mas_e2e: skipped: MAS_URL is not set (see tests/mas_e2e.rs for the variables)");
        return ExitCode::SUCCESS;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let failed = runtime.block_on(async {
        let t = &target;
        let runs: Vec<(&str, futures::future::BoxFuture<'_, ()>)> = vec![
            (
                "create_with_every_field_then_steady",
                scenarios::create_with_every_field_then_steady(t).boxed(),
            ),
            ("every_field_changed", scenarios::every_field_changed(t).boxed()),
            ("lock_and_unlock", scenarios::lock_and_unlock(t).boxed()),
            (
                "deactivate_and_reactivate",
                scenarios::deactivate_and_reactivate(t).boxed(),
            ),
            ("deletion_policies", scenarios::deletion_policies(t).boxed()),
            (
                "adoption_refused_then_allowed",
                scenarios::adoption_refused_then_allowed(t).boxed(),
            ),
            ("conflicts", scenarios::conflicts(t).boxed()),
            (
                "a_resync_reads_only_what_the_spec_manages",
                scenarios::a_resync_reads_only_what_the_spec_manages(t).boxed(),
            ),
            (
                "password_change_logs_out_only_when_asked",
                scenarios::password_change_logs_out_only_when_asked(t).boxed(),
            ),
            ("refusals_of_mas_mode", scenarios::refusals_of_mas_mode(t).boxed()),
            (
                "rooms_joined_left_and_joined_again",
                scenarios::rooms_joined_left_and_joined_again(t).boxed(),
            ),
            (
                "observe_compares_and_never_writes",
                scenarios::observe_compares_and_never_writes(t).boxed(),
            ),
            (
                "import_pages_through_every_account",
                scenarios::import_pages_through_every_account(t).boxed(),
            ),
            (
                "token_issue_and_revoke_on_delete",
                tokens::token_issue_and_revoke_on_delete(t).boxed(),
            ),
            (
                "token_rotation_with_grace",
                tokens::token_rotation_with_grace(t).boxed(),
            ),
            (
                "token_revoked_out_of_band_is_reissued",
                tokens::token_revoked_out_of_band_is_reissued(t).boxed(),
            ),
            (
                "token_of_a_deactivated_user_is_revoked",
                tokens::token_of_a_deactivated_user_is_revoked(t).boxed(),
            ),
            (
                "token_revokes_no_session_named_in_a_tampered_secret",
                tokens::token_revokes_no_session_named_in_a_tampered_secret(t).boxed(),
            ),
        ];
        let mut failed = 0;
        for (name, run) in runs {
            match std::panic::AssertUnwindSafe(run).catch_unwind().await {
                Ok(()) => println!("mas_e2e: {name} ... ok"),
                Err(panic) => {
                    failed += 1;
                    println!(
                        "mas_e2e: {name} ... FAILED: {}",
                        common::synapse::panic_message(&*panic)
                    );
                }
            }
        }
        failed
    });
    drop(runtime);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
