//! `spec.rooms` of a pass: the joins and leaves, and what is not in line
//! as one error.

use super::*;

/// The rooms of an account in sync (`spec.rooms`): the membership diff
/// against the rooms it is in, then the joins and leaves. A MatrixUser
/// without `rooms` costs no call; its records, if it had any, are dropped
/// (the memberships stay as they are, the account's own from then on).
pub(super) async fn sync_user_rooms(
    user: &MatrixUser,
    backend: &Backend,
    account: &crate::account::Account,
    user_id: &UserId,
    old: &MatrixUserStatus,
    out: &mut Option<RoomsReport>,
) {
    let Some(listed) = &user.spec.rooms else {
        // Forgotten, not left.
        if !old.rooms.is_empty() || old.joined_rooms.is_some() {
            *out = Some(RoomsReport::default());
        }
        return;
    };
    let purpose = format!(
        "matrix-user-operator: leaving rooms for MatrixUser {}/{}",
        user.namespace().unwrap_or_default(),
        user.name_any()
    );
    *out = Some(sync_rooms(backend, account, user_id, listed, &old.rooms, &purpose).await);
}

/// The most rooms a condition message names one by one.
pub(super) const MAX_ROOMS_NAMED: usize = 5;

/// A pass's rooms as an error: the pass failed as a whole, or some rooms
/// are not in line (each named, with what the server said).
pub(super) fn rooms_result(report: &mut Option<RoomsReport>) -> Result<(), Error> {
    let Some(report) = report else {
        return Ok(());
    };
    if let Some(e) = report.failed.take() {
        return Err(e.into());
    }
    if report.problems.is_empty() {
        return Ok(());
    }
    let joining = report.problems.iter().any(|p| p.step != RoomStep::Leave);
    let mut parts: Vec<String> = report
        .problems
        .iter()
        .take(MAX_ROOMS_NAMED)
        .map(|p| {
            let step = match p.step {
                RoomStep::Resolve => "cannot look the alias up",
                RoomStep::Join => "cannot join",
                RoomStep::Leave => "cannot leave",
            };
            format!("{} ({step}: {})", p.room, p.error)
        })
        .collect();
    if report.problems.len() > MAX_ROOMS_NAMED {
        parts.push(format!("and {} more", report.problems.len() - MAX_ROOMS_NAMED));
    }
    let done = if joining {
        "the others are joined"
    } else {
        "the others are in line"
    };
    Err(Error::Rooms {
        reason: if joining { "RoomNotJoinable" } else { "RoomNotLeft" },
        message: format!(
            "{} of the rooms not in line ({done}): {}",
            report.problems.len(),
            parts.join("; ")
        ),
        transient: report.problems.iter().any(|p| p.transient),
    })
}
