//! Room memberships of managed accounts (`MatrixUser.spec.rooms`): the
//! rooms an account is in, aliases, the admin join, and the leave, which
//! only the user can make (with a short-lived token of theirs).
//!
//! Measured on Synapse 1.163.2 (see the README's "Rooms"):
//! `POST /_synapse/admin/v1/join/<room>` joins a local user to a public
//! room (200, also when the admin is not in it), and to any other room the
//! admin is in with the power to invite (it invites first). It answers 403
//! `M_FORBIDDEN` "<admin> not in room" for a private room without the
//! admin, 403 `M_BAD_STATE` for a banned user, 404 `M_UNKNOWN` for a room
//! ID the server does not know, 404 `M_NOT_FOUND` for an unknown alias. It
//! also joins a deactivated account (200): the plan never asks it to.
//! `GET .../users/<id>/joined_rooms` answers `{joined_rooms, total}` (an
//! unknown user: 200 and none). The directory answers 404 `M_NOT_FOUND`
//! for an unknown alias, 502 for one of another server that cannot be
//! reached. The client leave answers 200 `{}` (again when left already),
//! 403 `M_FORBIDDEN` "not in room" for a room never joined, 404 `M_UNKNOWN`
//! for an unknown room.

use reqwest::Method;
use serde::Deserialize;

use super::client::{Bearer, Body};
use super::{Endpoint, ErrCode, SynapseClient, SynapseError, UserId};
use crate::secret::SecretString;

/// The most rooms taken from a `joined_rooms` answer: a user can be in
/// many more than `spec.rooms` lists, but the operator compares only
/// those; the body limit bounds the answer first.
const MAX_JOINED_ROOMS: usize = 100_000;

impl SynapseClient {
    /// The rooms `user_id` is joined to.
    pub async fn joined_rooms(&self, user_id: &UserId) -> Result<Vec<String>, SynapseError> {
        #[derive(Deserialize)]
        struct Answer {
            joined_rooms: Vec<String>,
        }
        let segments = ["_synapse", "admin", "v1", "users", user_id.as_str(), "joined_rooms"];
        let (_, answer): (_, Answer) = self
            .send_as(Bearer::Admin, Endpoint::JoinedRooms, Method::GET, &segments, None)
            .await?;
        // A room ID that is no fit one (too long, unprintable, a secret)
        // is not one of the listed rooms either: it is left out.
        Ok(answer
            .joined_rooms
            .into_iter()
            .take(MAX_JOINED_ROOMS)
            .filter(|id| self.fit_id(Endpoint::JoinedRooms, 200, id.clone(), &[]).is_ok())
            .collect())
    }

    /// The room ID an alias names, from the server's directory.
    pub async fn resolve_alias(&self, alias: &str) -> Result<String, SynapseError> {
        #[derive(Deserialize)]
        struct Answer {
            room_id: String,
        }
        let segments = ["_matrix", "client", "v3", "directory", "room", alias];
        let (status, answer): (_, Answer) = self
            .send_as(Bearer::Admin, Endpoint::ResolveAlias, Method::GET, &segments, None)
            .await?;
        self.fit_id(Endpoint::ResolveAlias, status.as_u16(), answer.room_id, &[])
    }

    /// Joins the local user `user_id` to `room_id` with the admin join API.
    pub async fn join_room(&self, room_id: &str, user_id: &UserId) -> Result<(), SynapseError> {
        let segments = ["_synapse", "admin", "v1", "join", room_id];
        let body = Body::plain(&serde_json::json!({"user_id": user_id.as_str()}));
        self.send_as::<serde::de::IgnoredAny>(Bearer::Admin, Endpoint::JoinRoom, Method::POST, &segments, Some(body))
            .await
            .map(|_| ())
    }

    /// Leaves `room_id` as the user whose token `token` is. A room the
    /// user is not in (403 "not in room") or that the server does not know
    /// (404) is left already.
    pub async fn leave_room(&self, token: &SecretString, room_id: &str) -> Result<(), SynapseError> {
        let segments = ["_matrix", "client", "v3", "rooms", room_id, "leave"];
        let body = Body::plain(&serde_json::json!({}));
        match self
            .send_as::<serde::de::IgnoredAny>(
                Bearer::User(token),
                Endpoint::LeaveRoom,
                Method::POST,
                &segments,
                Some(body),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(SynapseError::Api {
                status: 403,
                errcode: ErrCode::Forbidden,
                message,
                ..
            }) if message.contains("not in room") => Ok(()),
            Err(SynapseError::Api { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
