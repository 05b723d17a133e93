//! `matrix-user-operator import`: one MatrixUser manifest per account of a
//! homeserver that no MatrixUser manages yet, to bring an existing server
//! under Git.
//!
//! It reads only: the Homeserver and its Secrets, the MatrixUsers of the
//! cluster, and the homeserver's accounts (the user list, then each account
//! it imports). The manifests adopt the account as it is (`adopt: true`, no
//! password), keep it when deleted (`deletionPolicy: Retain`) and only
//! watch it (`managementPolicy: Observe`) unless `--manage`. Output is
//! deterministic: the same accounts give the same bytes, so a re-run diffs
//! cleanly in Git.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ListParams, ObjectMeta};
use kube::runtime::reflector;
use kube::{Api, ResourceExt};

use crate::account::{Account, validate_localpart};
use crate::api::{
    DeletionPolicy, ExternalIdSpec, Homeserver, HomeserverRef, ManagementPolicy, MatrixUser, MatrixUserSpec,
    ThreepidMedium, ThreepidSpec, UserType,
};
use crate::backend::listing::{AccountListing, ListedAccount};
use crate::backend::{AccountBackend, Backend, Parts};
use crate::controller::{Config, Context};
use crate::metrics::Metrics;
use crate::synapse::UserId;

/// The arguments of `import`.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The Homeserver to import from, as NAMESPACE/NAME; the manifests go
    /// in its namespace.
    #[arg(long, value_parser = parse_homeserver)]
    pub homeserver: (String, String),
    /// Write one file per account and a kustomization.yaml listing them
    /// into this directory (created if needed), instead of one multi-document
    /// YAML on stdout.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Give the manifests `managementPolicy: Manage` (the operator keeps the
    /// accounts in line with them) instead of Observe (it only reports drift).
    #[arg(long)]
    pub manage: bool,
    /// Import deactivated accounts too (as `deactivated: true`).
    #[arg(long)]
    pub include_deactivated: bool,
    /// Import only accounts whose localpart matches this regular expression
    /// (anchor it with ^…$ for a whole match), e.g. `^team-a\.`.
    #[arg(long = "localpart", value_parser = parse_regex)]
    pub localpart: Option<regex::Regex>,
    /// Limit on each request to the homeserver, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

fn parse_homeserver(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

/// The longest pattern taken: a regular expression is compiled with a size
/// limit anyway; this keeps the error short.
const MAX_REGEX_BYTES: usize = 1000;

fn parse_regex(s: &str) -> Result<regex::Regex, String> {
    if s.len() > MAX_REGEX_BYTES {
        return Err(format!("the pattern is longer than {MAX_REGEX_BYTES} bytes"));
    }
    regex::RegexBuilder::new(s)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| e.to_string())
}

/// Why an account is not imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// The admin token's own account: a MatrixUser may not manage it.
    Admin,
    /// An application service's (bridge's) user.
    Appservice,
    Guest,
    /// Deactivated, without `--include-deactivated`.
    Deactivated,
    /// A MatrixUser already records it (or claims its localpart).
    Managed,
    /// Its localpart does not match `--localpart`.
    Filtered,
    /// A localpart a MatrixUser cannot name (upper case, a leading `_`, all
    /// digits: Synapse took such names once, and refuses them now).
    UnmanageableLocalpart,
    /// Gone between the listing and its read.
    Gone,
}

impl Skip {
    fn describe(self) -> &'static str {
        match self {
            Skip::Admin => "the admin token's own account",
            Skip::Appservice => "appservice (bridge) users",
            Skip::Guest => "guests",
            Skip::Deactivated => "deactivated (--include-deactivated takes them)",
            Skip::Managed => "already managed by a MatrixUser",
            Skip::Filtered => "not matching --localpart",
            Skip::UnmanageableLocalpart => "a localpart no MatrixUser can name",
            Skip::Gone => "gone while importing",
        }
    }
}

/// What the cluster knows already, for the skips and the names.
#[derive(Debug, Default)]
pub struct Known {
    /// The Matrix IDs MatrixUsers record (status.userId).
    pub recorded: HashSet<String>,
    /// The localparts the Homeserver's MatrixUsers name (they may not have
    /// an account yet).
    pub claimed: HashSet<String>,
    /// The names of MatrixUsers in the Homeserver's namespace.
    pub names: BTreeSet<String>,
}

impl Known {
    pub fn of(users: &[MatrixUser], namespace: &str, homeserver: &str) -> Self {
        let mut known = Known::default();
        for u in users {
            if let Some(id) = u.status.as_ref().and_then(|s| s.user_id.clone()) {
                known.recorded.insert(id);
            }
            if u.namespace().as_deref() == Some(namespace) {
                let name = u.name_any();
                if u.spec.homeserver_ref.name == homeserver {
                    known.claimed.insert(u.spec.effective_localpart(&name).to_string());
                }
                known.names.insert(name);
            }
        }
        known
    }
}

/// Why an account listed is not imported before it is read, or `None`.
pub fn skip_before_reading(
    account: &ListedAccount,
    admin_user_id: &str,
    known: &Known,
    include_deactivated: bool,
    filter: Option<&regex::Regex>,
) -> Option<Skip> {
    if account.user_id == admin_user_id {
        Some(Skip::Admin)
    } else if account.guest {
        Some(Skip::Guest)
    } else if filter.is_some_and(|f| !f.is_match(&account.localpart)) {
        // First: a team importing its part hears of its own accounts only.
        Some(Skip::Filtered)
    } else if known.recorded.contains(&account.user_id) || known.claimed.contains(&account.localpart) {
        Some(Skip::Managed)
    } else if account.deactivated && !include_deactivated {
        Some(Skip::Deactivated)
    } else if validate_localpart(&account.localpart).is_err() {
        Some(Skip::UnmanageableLocalpart)
    } else {
        None
    }
}

/// Whether `s` is a Kubernetes object name (an RFC 1123 subdomain).
pub fn is_object_name(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The most of a localpart a derived name keeps before its hash.
const DERIVED_STEM_BYTES: usize = 40;

/// A name for a localpart that is no object name: its letters and digits,
/// the rest as `-`, then a hash of the whole localpart, so two localparts
/// that read alike (`a_b`, `a=b`) get two names. `hex` hash digits.
fn derived_name(localpart: &str, hex: usize) -> String {
    let mut stem = String::new();
    for c in localpart.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (stem.is_empty() || stem.ends_with('-'))) {
            stem.push(c);
        }
        if stem.len() >= DERIVED_STEM_BYTES {
            break;
        }
    }
    let stem = stem.trim_end_matches('-');
    let digest = ring::digest::digest(&ring::digest::SHA256, localpart.as_bytes());
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let hash = &hash[..hex];
    if stem.is_empty() {
        format!("user-{hash}")
    } else {
        format!("{stem}-{hash}")
    }
}

/// The object name of each localpart (in `localparts`' order), and whether
/// it needs `spec.localpart` (the name is not the localpart). A localpart
/// that is a valid name is its own name unless a MatrixUser of the
/// namespace (`taken`) has it; the others get a derived name, longer or
/// numbered on a collision. Deterministic: the same localparts and taken
/// names give the same names.
pub fn object_names(localparts: &[&str], taken: &BTreeSet<String>) -> Vec<(String, bool)> {
    let mut used: BTreeSet<String> = taken.clone();
    let mut names: Vec<Option<String>> = vec![None; localparts.len()];
    // Localparts that are names claim them first: another localpart's
    // derived name never takes the name of an account that is one.
    let own: BTreeSet<&str> = localparts
        .iter()
        .copied()
        .filter(|l| is_object_name(l) && !taken.contains(*l))
        .collect();
    for (i, l) in localparts.iter().enumerate() {
        if own.contains(l) {
            used.insert(l.to_string());
            names[i] = Some(l.to_string());
        }
    }
    for (i, l) in localparts.iter().enumerate() {
        if names[i].is_some() {
            continue;
        }
        let mut name = derived_name(l, 8);
        if used.contains(&name) || own.contains(name.as_str()) {
            name = derived_name(l, 16);
        }
        let base = name.clone();
        let mut n = 2;
        while used.contains(&name) || own.contains(name.as_str()) {
            name = format!("{base}-{n}");
            n += 1;
        }
        used.insert(name.clone());
        names[i] = Some(name);
    }
    names
        .into_iter()
        .zip(localparts)
        .map(|(name, l)| {
            let name = name.unwrap_or_default();
            let differs = name != *l;
            (name, differs)
        })
        .collect()
}

/// An account to import, as read.
#[derive(Clone, Debug)]
pub struct Imported {
    pub user_id: String,
    pub localpart: String,
    pub account: Account,
}

/// The spec of an imported account: its fields as the server reports
/// them, adopted, without a password, retained on deletion.
pub fn spec_of(
    account: &Account,
    localpart: Option<&str>,
    homeserver: &str,
    policy: ManagementPolicy,
) -> (MatrixUserSpec, Vec<&'static str>) {
    let mut left_out = Vec::new();
    let display_name = match &account.displayname {
        Some(d) if d.chars().count() <= 256 => Some(d.clone()),
        Some(_) => {
            left_out.push("displayName (longer than the 256 characters a MatrixUser takes)");
            None
        }
        None => None,
    };
    let avatar_url = match &account.avatar_url {
        Some(a) if is_mxc(a) => Some(a.clone()),
        Some(_) => {
            left_out.push("avatarUrl (not an mxc:// URI a MatrixUser takes)");
            None
        }
        None => None,
    };
    let user_type = match account.user_type.as_deref() {
        Some("bot") => Some(UserType::Bot),
        Some("support") => Some(UserType::Support),
        Some(_) => {
            left_out.push("userType (neither bot nor support)");
            None
        }
        None => None,
    };
    let mut threepids: Vec<ThreepidSpec> = Vec::new();
    for t in &account.threepids {
        let medium = match t.medium.as_str() {
            "email" => ThreepidMedium::Email,
            "msisdn" => ThreepidMedium::Msisdn,
            _ => continue,
        };
        threepids.push(ThreepidSpec {
            medium,
            address: t.address.clone(),
        });
    }
    threepids.sort_by(|a, b| (a.medium, &a.address).cmp(&(b.medium, &b.address)));
    let threepids_fit = threepids.len() <= 32 && threepids.iter().all(fits_threepid);
    if !threepids_fit {
        left_out.push("threepids (more than 32, or one a MatrixUser does not take)");
    }
    let mut external_ids: Vec<ExternalIdSpec> = account
        .external_ids
        .iter()
        .map(|e| ExternalIdSpec {
            auth_provider: e.auth_provider.clone(),
            external_id: e.external_id.clone(),
        })
        .collect();
    external_ids.sort_by(|a, b| (&a.auth_provider, &a.external_id).cmp(&(&b.auth_provider, &b.external_id)));
    let external_ids_fit = external_ids.len() <= 32
        && external_ids.iter().all(|e| {
            (1..=255).contains(&e.auth_provider.chars().count()) && (1..=255).contains(&e.external_id.chars().count())
        });
    if !external_ids_fit {
        left_out.push("externalIds (more than 32, or one longer than 255 characters)");
    }
    // The CRD refuses deactivated and locked together: a deactivated
    // account cannot log in anyway.
    let locked = if account.deactivated {
        if account.locked {
            left_out.push("locked (the account is deactivated, which a MatrixUser cannot say together)");
        }
        None
    } else {
        Some(account.locked)
    };
    let spec = MatrixUserSpec {
        homeserver_ref: HomeserverRef {
            name: homeserver.to_string(),
        },
        localpart: localpart.map(str::to_string),
        display_name,
        avatar_url,
        admin: Some(account.admin),
        deactivated: Some(account.deactivated),
        locked,
        user_type,
        password: None,
        threepids: (threepids_fit && !threepids.is_empty()).then_some(threepids),
        external_ids: (external_ids_fit && !external_ids.is_empty()).then_some(external_ids),
        rooms: None,
        deletion_policy: DeletionPolicy::Retain,
        adopt: true,
        management_policy: policy,
    };
    (spec, left_out)
}

fn is_mxc(s: &str) -> bool {
    s.len() <= 512
        && s.strip_prefix("mxc://")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(server, media)| {
                !server.is_empty() && !media.is_empty() && !media.contains('/') && !s.chars().any(char::is_whitespace)
            })
}

fn fits_threepid(t: &ThreepidSpec) -> bool {
    let len = t.address.chars().count();
    (1..=320).contains(&len)
        && (t.medium != ThreepidMedium::Email
            || (t.address.bytes().all(|b| (b'!'..=b'~').contains(&b)) && t.address.matches('@').count() == 1))
}

/// The comment each manifest starts with: why it says what it says.
fn header(user_id: &str, homeserver: &str, namespace: &str, policy: ManagementPolicy, left_out: &[&str]) -> String {
    let mut h = format!(
        "# Imported from {user_id} by `matrix-user-operator import` (Homeserver {namespace}/{homeserver}).\n\
         # deletionPolicy: Retain: deleting this MatrixUser leaves the account as it is. An import\n\
         #   must never make a later `kubectl delete` deactivate an account nobody has decided\n\
         #   about; set Deactivate or Erase once you have.\n"
    );
    h.push_str(match policy {
        ManagementPolicy::Observe => {
            "# managementPolicy: Observe: the operator only reports whether the account matches this\n\
             #   spec (InSync, Drifted, NotFound) and never writes to it; set Manage to keep it in line.\n"
        }
        ManagementPolicy::Manage => {
            "# managementPolicy: Manage (--manage): the operator keeps the account in line with this spec.\n"
        }
    });
    h.push_str("# No password: the account keeps its own (spec.password would take it over).\n");
    for field in left_out {
        h.push_str(&format!("# Left out: {field}.\n"));
    }
    h
}

/// One manifest: its object name and its text (header and YAML).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub text: String,
}

/// The manifests of `imported` (in any order): sorted by localpart, named
/// by [`object_names`].
pub fn manifests(
    mut imported: Vec<Imported>,
    namespace: &str,
    homeserver: &str,
    policy: ManagementPolicy,
    taken: &BTreeSet<String>,
) -> Result<Vec<Manifest>, String> {
    imported.sort_by(|a, b| a.localpart.cmp(&b.localpart));
    imported.dedup_by(|a, b| a.localpart == b.localpart);
    let localparts: Vec<&str> = imported.iter().map(|i| i.localpart.as_str()).collect();
    let names = object_names(&localparts, taken);
    let mut out = Vec::with_capacity(imported.len());
    for (i, (name, differs)) in imported.iter().zip(names) {
        let (spec, left_out) = spec_of(&i.account, differs.then_some(i.localpart.as_str()), homeserver, policy);
        let user = MatrixUser {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_string()),
                ..Default::default()
            },
            spec,
            status: None,
        };
        let yaml = serde_yaml::to_string(&user).map_err(|e| format!("cannot render {name}: {e}"))?;
        let text = format!("{}{yaml}", header(&i.user_id, homeserver, namespace, policy, &left_out));
        out.push(Manifest { name, text });
    }
    Ok(out)
}

/// The whole output on stdout: the manifests as one multi-document YAML.
pub fn multi_document(manifests: &[Manifest]) -> String {
    manifests.iter().map(|m| format!("---\n{}", m.text)).collect()
}

/// The `kustomization.yaml` of an output directory.
pub fn kustomization(manifests: &[Manifest], namespace: &str, homeserver: &str) -> String {
    let mut k = format!(
        "# Written by `matrix-user-operator import` from Homeserver {namespace}/{homeserver}: one file per account.\n\
         apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
    );
    if manifests.is_empty() {
        k = k.replace("resources:\n", "resources: []\n");
    }
    for m in manifests {
        k.push_str(&format!("- {}.yaml\n", m.name));
    }
    k
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Summary {
    pub listed: usize,
    pub imported: usize,
    pub skipped: BTreeMap<Skip, usize>,
    pub malformed: usize,
}

impl Summary {
    pub fn line(&self) -> String {
        let mut s = format!("import: {} accounts listed, {} imported", self.listed, self.imported);
        let skipped: Vec<String> = self
            .skipped
            .iter()
            .map(|(cause, n)| format!("{n} {}", cause.describe()))
            .collect();
        if !skipped.is_empty() {
            s.push_str(&format!("; skipped: {}", skipped.join(", ")));
        }
        if self.malformed > 0 {
            s.push_str(&format!(
                "; {} entries of the listing were no account of this server and were left out",
                self.malformed
            ));
        }
        s
    }
}

/// Accounts read at once (the client's limit on requests in flight, the
/// Homeserver's maxConcurrentRequests, applies too).
const READS_IN_FLIGHT: usize = 8;

/// Runs `import`: manifests to stdout or `--output-dir`, progress and the
/// summary to stderr.
pub async fn run(args: ImportArgs) -> Result<(), String> {
    crate::tls::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach Kubernetes (KUBECONFIG or the in-cluster config): {e}"))?;
    let (namespace, name) = &args.homeserver;
    let hs = Api::<Homeserver>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| format!("cannot read Homeserver {namespace}/{name}: {e}"))?;
    let users = matrix_users(&client, namespace).await?;
    let known = Known::of(&users, namespace, name);
    let config = Config {
        request_timeout: args.request_timeout,
        ..Config::default()
    };
    let ctx = Context::new(client, config, reflector::store::<MatrixUser>().0, Metrics::new());
    let backend = ctx.backend(&hs).await.map_err(|e| e.to_string())?;
    let admin = backend.synapse().whoami().await.map_err(|e| e.to_string())?;
    let server_name = admin
        .split_once(':')
        .map(|(_, s)| s.to_string())
        .ok_or("whoami answered a user ID without a server name")?;
    if let Some(expected) = &hs.spec.server_name
        && *expected != server_name
    {
        return Err(format!(
            "the admin token is of server {server_name}, the Homeserver's serverName is {expected}"
        ));
    }
    let policy = if args.manage {
        ManagementPolicy::Manage
    } else {
        ManagementPolicy::Observe
    };
    let mut summary = Summary::default();
    let selection = Selection {
        include_deactivated: args.include_deactivated,
        localpart: args.localpart.clone(),
    };
    let imported = read_accounts(&backend, &server_name, &admin, &known, &selection, &mut summary).await?;
    let manifests = manifests(imported, namespace, name, policy, &known.names)?;
    summary.imported = manifests.len();
    match &args.output_dir {
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(multi_document(&manifests).as_bytes())
                .and_then(|_| stdout.flush())
                .map_err(|e| format!("cannot write to stdout: {e}"))?;
        }
        Some(dir) => write_dir(dir, &manifests, namespace, name)?,
    }
    eprintln!("{}", summary.line());
    Ok(())
}

/// The MatrixUsers of the cluster, or of the Homeserver's namespace when
/// the kubeconfig may not list them all (said on stderr: a MatrixUser
/// elsewhere may then manage an account this imports).
async fn matrix_users(client: &kube::Client, namespace: &str) -> Result<Vec<MatrixUser>, String> {
    match Api::<MatrixUser>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(e)) if e.code == 403 => {
            eprintln!(
                "import: may not list MatrixUsers in all namespaces; only those of {namespace} are \
                 known as managing accounts"
            );
            Api::<MatrixUser>::namespaced(client.clone(), namespace)
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .map_err(|e| format!("cannot list MatrixUsers in {namespace}: {e}"))
        }
        Err(e) => Err(format!("cannot list MatrixUsers: {e}")),
    }
}

/// Which accounts an import takes, besides those no MatrixUser manages.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub include_deactivated: bool,
    pub localpart: Option<regex::Regex>,
}

/// Pages through the accounts of `backend` and reads each one to import;
/// `admin` is the admin token's user. Counts into `summary`, and says on
/// stderr how far it got after each page.
pub async fn read_accounts(
    backend: &Backend,
    server_name: &str,
    admin: &str,
    known: &Known,
    selection: &Selection,
    summary: &mut Summary,
) -> Result<Vec<Imported>, String> {
    let mut listing = AccountListing::new(backend, server_name, true);
    let mut imported = Vec::new();
    loop {
        let page = match listing.next_page().await {
            Ok(Some(page)) => page,
            Ok(None) => break,
            Err(e) => {
                return Err(format!(
                    "{e} (after {} accounts listed; nothing was written)",
                    summary.listed
                ));
            }
        };
        summary.listed += page.len();
        let mut to_read = Vec::new();
        for account in page {
            match skip_before_reading(
                &account,
                admin,
                known,
                selection.include_deactivated,
                selection.localpart.as_ref(),
            ) {
                Some(cause) => *summary.skipped.entry(cause).or_default() += 1,
                None => to_read.push(account),
            }
        }
        let reads: Vec<_> = futures::stream::iter(to_read)
            .map(|listed| async move {
                let read = read_account(backend, &listed, server_name).await;
                (listed, read)
            })
            .buffered(READS_IN_FLIGHT)
            .collect()
            .await;
        for (listed, read) in reads {
            match read? {
                Ok(account) => imported.push(Imported {
                    user_id: listed.user_id,
                    localpart: listed.localpart,
                    account,
                }),
                Err(cause) => *summary.skipped.entry(cause).or_default() += 1,
            }
        }
        let total = listing.total.map(|t| format!(" of {t}")).unwrap_or_default();
        eprintln!(
            "import: {} accounts read{total}, {} to import",
            summary.listed,
            imported.len()
        );
    }
    summary.malformed = listing.malformed;
    Ok(imported)
}

/// The account of `listed` whole (its emails, SSO links), or why it is not
/// imported after all (an appservice user, gone meanwhile).
async fn read_account(
    backend: &Backend,
    listed: &ListedAccount,
    server_name: &str,
) -> Result<Result<Account, Skip>, String> {
    let user_id = UserId::new(&listed.localpart, server_name).map_err(|e| e.to_string())?;
    let failed = |e: &dyn std::fmt::Display| format!("cannot read {user_id}: {e}");
    match backend {
        // The user list has no appservice_id: the user's GET does, and it
        // is needed anyway for the emails and SSO links.
        Backend::Synapse(c) => match c.get_user(&user_id).await.map_err(|e| failed(&e))? {
            None => Ok(Err(Skip::Gone)),
            Some(u) if u.appservice_id.is_some() => Ok(Err(Skip::Appservice)),
            Some(u) => Ok(Ok(u.into())),
        },
        // MAS has no appservice users: they live in Synapse alone.
        Backend::Mas(_) => match backend.read(&user_id, Parts::ALL).await.map_err(|e| failed(&e))? {
            None => Ok(Err(Skip::Gone)),
            Some(a) => Ok(Ok(a)),
        },
    }
}

/// Writes one file per manifest and the kustomization.yaml into `dir`.
fn write_dir(dir: &Path, manifests: &[Manifest], namespace: &str, homeserver: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let write = |file: &str, text: &str| {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    for m in manifests {
        write(&format!("{}.yaml", m.name), &m.text)?;
    }
    write("kustomization.yaml", &kustomization(manifests, namespace, homeserver))
}

#[cfg(test)]
mod tests;
