//! Every account of a homeserver, a page at a time: Synapse's user list, or
//! MAS's when Synapse delegates to it (MAS holds the accounts then; Synapse's
//! own list needs `guests=false` there). For `import` and the Homeserver's
//! account counts.
//!
//! Whatever the server sends is bounded: the accounts of a listing
//! ([`MAX_LISTED_ACCOUNTS`]), its pages, each page's size (the backends'
//! body limit), and each name (a Matrix ID is at most 255 bytes). A cursor
//! that does not move on is an error, as is a listing that goes on past the
//! bound: a server that never stops cannot hold its reader forever.

use super::mas::MasEndpoint;
use super::synapse::Endpoint;
use super::{Backend, BackendError};

/// The most accounts a listing reads: far above any homeserver the
/// operator is meant for (the largest public ones hold a few 100,000
/// local accounts), and ≈100 MB of listing at most.
pub const MAX_LISTED_ACCOUNTS: usize = 1_000_000;
/// Accounts per page of Synapse's list (its default is 100; a page of 500
/// is ≈100 KB).
pub const SYNAPSE_PAGE_SIZE: u32 = 500;
/// The most pages a listing reads: enough for [`MAX_LISTED_ACCOUNTS`] in
/// MAS's pages of 100, and a bound on a server that sends short pages.
pub const MAX_LISTED_PAGES: usize = MAX_LISTED_ACCOUNTS / 100;
/// The longest Matrix user ID (the spec's limit).
const MAX_USER_ID_BYTES: usize = 255;
/// The longest user type kept (Synapse's are `bot`, `support`, or a name of
/// its config).
const MAX_USER_TYPE_BYTES: usize = 64;

/// An account as a listing reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedAccount {
    /// The Matrix ID, `@localpart:server_name`.
    pub user_id: String,
    pub localpart: String,
    pub admin: bool,
    pub deactivated: bool,
    pub locked: bool,
    /// A guest (Synapse), or a guest before the move to MAS.
    pub guest: bool,
    pub user_type: Option<String>,
    /// MAS's ID of the account.
    pub mas_id: Option<String>,
}

/// Why a listing stopped.
#[derive(Debug, thiserror::Error)]
pub enum ListingError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The listing does not end: its cursor does not move on, or it goes
    /// past what is read of one.
    #[error("{endpoint}: {problem}")]
    Endless {
        endpoint: &'static str,
        problem: &'static str,
    },
}

enum Cursor {
    /// Synapse: the offset of the next page.
    From(u64),
    /// MAS: the ID of the last user read.
    After(Option<String>),
    Done,
}

/// A listing of every account of one homeserver, read page by page.
pub struct AccountListing<'a> {
    backend: &'a Backend,
    server_name: String,
    guests: bool,
    cursor: Cursor,
    pages: usize,
    accounts: usize,
    /// Entries that were no account of this server (a name too long, of
    /// another server): left out.
    pub malformed: usize,
    /// What Synapse said the list holds (for progress only; MAS does not say).
    pub total: Option<u64>,
}

impl<'a> AccountListing<'a> {
    /// A listing of the accounts of `server_name`; with `guests`, Synapse's
    /// guests too (reported as such, for a count of them).
    pub fn new(backend: &'a Backend, server_name: &str, guests: bool) -> Self {
        Self {
            backend,
            server_name: server_name.to_string(),
            guests: guests && matches!(backend, Backend::Synapse(_)),
            cursor: match backend {
                Backend::Synapse(_) => Cursor::From(0),
                Backend::Mas(_) => Cursor::After(None),
            },
            pages: 0,
            accounts: 0,
            malformed: 0,
            total: None,
        }
    }

    /// The next page, or `None` once the listing is done.
    pub async fn next_page(&mut self) -> Result<Option<Vec<ListedAccount>>, ListingError> {
        if matches!(self.cursor, Cursor::Done) {
            return Ok(None);
        }
        if self.pages >= MAX_LISTED_PAGES {
            return Err(self.endless("the listing goes on past 10,000 pages, the most that is read of one"));
        }
        self.pages += 1;
        let page = match (&self.cursor, self.backend) {
            (Cursor::From(from), Backend::Synapse(c)) => {
                let from = *from;
                let page = c
                    .list_users(from, SYNAPSE_PAGE_SIZE, self.guests)
                    .await
                    .map_err(BackendError::from)?;
                self.total = page.total;
                self.cursor = match page.next {
                    // Synapse's next offset is this one plus the page:
                    // one that does not move on would repeat it forever.
                    Some(next) if next > from && !page.users.is_empty() => Cursor::From(next),
                    Some(_) => {
                        return Err(self.endless("the next_token does not move past the page just read"));
                    }
                    None => Cursor::Done,
                };
                page.users
                    .into_iter()
                    .map(|u| ListedAccount {
                        localpart: String::new(),
                        user_id: u.name,
                        admin: u.admin,
                        deactivated: u.deactivated,
                        locked: u.locked,
                        guest: u.is_guest,
                        user_type: u.user_type,
                        mas_id: None,
                    })
                    .collect::<Vec<_>>()
            }
            (Cursor::After(after), Backend::Mas(m)) => {
                let (users, more) = m.mas().users_page(after.as_deref()).await.map_err(BackendError::from)?;
                // ULIDs sort as strings, and MAS lists by ID: each page
                // starts past the cursor and goes up.
                let mut last = after.clone();
                for u in &users {
                    if last.as_ref().is_some_and(|l| u.id <= *l) {
                        return Err(self.endless("the next page does not move past the cursor (page[after])"));
                    }
                    last = Some(u.id.clone());
                }
                self.cursor = if more { Cursor::After(last) } else { Cursor::Done };
                users
                    .into_iter()
                    .map(|u| ListedAccount {
                        user_id: format!("@{}:{}", u.attributes.username, self.server_name),
                        localpart: String::new(),
                        admin: u.attributes.admin,
                        deactivated: u.attributes.deactivated_at.is_some(),
                        locked: u.attributes.locked_at.is_some(),
                        guest: u.attributes.legacy_guest,
                        user_type: None,
                        mas_id: Some(u.id),
                    })
                    .collect()
            }
            _ => unreachable!("the cursor is made for the backend"),
        };
        let mut kept = Vec::with_capacity(page.len());
        for mut account in page {
            match self.localpart_of(&account.user_id) {
                Some(localpart)
                    if account
                        .user_type
                        .as_ref()
                        .is_none_or(|t| t.len() <= MAX_USER_TYPE_BYTES) =>
                {
                    account.localpart = localpart;
                    kept.push(account);
                }
                _ => self.malformed += 1,
            }
        }
        self.accounts += kept.len();
        if self.accounts > MAX_LISTED_ACCOUNTS {
            return Err(self.endless("the listing goes on past 1,000,000 accounts, the most that is read of one"));
        }
        Ok(Some(kept))
    }

    /// The localpart of a local Matrix ID of at most 255 bytes.
    fn localpart_of(&self, user_id: &str) -> Option<String> {
        if user_id.len() > MAX_USER_ID_BYTES {
            return None;
        }
        let (localpart, server) = user_id.strip_prefix('@')?.split_once(':')?;
        (server == self.server_name && !localpart.is_empty()).then(|| localpart.to_string())
    }

    fn endless(&mut self, problem: &'static str) -> ListingError {
        self.cursor = Cursor::Done;
        ListingError::Endless {
            endpoint: match self.backend {
                Backend::Synapse(_) => Endpoint::ListUsers.as_str(),
                Backend::Mas(_) => MasEndpoint::ListUsers.as_str(),
            },
            problem,
        }
    }
}
