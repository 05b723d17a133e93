//! `matrix-user-operator plan -f FILE|DIR`: what applying MatrixUser
//! manifests from disk would do to the live homeserver, like
//! `terraform plan`. It reads the Homeservers, Secrets and live
//! MatrixUsers from the cluster of the current kubeconfig, reads the
//! accounts, and plans each with the operator's own pure plan
//! ([`crate::preview`]): nothing is written anywhere.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};

use super::homeserver::ready_status;
use super::matrixuser::{check_password, pending_creation_of};
use super::{Config, Context, Error, digest_key, ownership, secrets};
use crate::account::UserId;
use crate::api::{ManagementPolicy, MatrixUser, MatrixUserStatus, PENDING_CREATION};
use crate::backend::Backend;
use crate::metrics::Metrics;
use crate::plan::{Action, Authority, Desired, DesiredPassword, RoomPlan, desired_from_spec, validate_threepid};
use crate::preview::{AccountPreview, OBSERVER, Observation, observation, preview_account, preview_rooms};
use crate::secret::{DigestKey, SecretString, digest_matches};

/// Prints what applying MatrixUser manifests would do to the live
/// homeserver, writing nothing. Exit code: 0 no changes, 2 changes, 1 an
/// error or a MatrixUser the operator would refuse.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A manifest file (YAML, several documents allowed) or a directory
    /// (its `.yaml` and `.yml` files, not its subdirectories); repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// `text` for people, `json` for bots (a stable shape: see the README).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The operator's namespace, where its key of the password digests
    /// lives (default: the kubeconfig context's namespace). Without that
    /// key, whether a password changed cannot be told.
    #[arg(long)]
    pub operator_namespace: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// The plan of every MatrixUser read: the `--output json` document.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub users: Vec<UserPlan>,
    /// Documents that are no MatrixUser (a kustomization.yaml, a Secret).
    pub ignored: Vec<Ignored>,
    pub summary: Summary,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// MatrixUsers whose apply would write to the homeserver.
    pub changes: usize,
    pub unchanged: usize,
    /// MatrixUsers the operator would refuse (`reason` says why).
    pub refused: usize,
    /// MatrixUsers that could not be planned (an error reading).
    pub errors: usize,
    /// `managementPolicy: Observe`: never changed; `drifted` of them differ.
    pub observed: usize,
    pub drifted: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ignored {
    pub file: String,
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

/// What applying one MatrixUser would do.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserPlan {
    pub file: String,
    pub namespace: String,
    pub name: String,
    /// The Matrix ID, once the Homeserver's server name is known.
    pub user_id: Option<String>,
    pub management_policy: String,
    /// `create`, `update`, `none`, `refused`, `error`, or `observe`.
    pub action: String,
    /// The account exists and would be adopted (`spec.adopt`).
    pub adopt: bool,
    /// The fields that would be set (on a create: after it) — names only.
    pub fields: Vec<String>,
    pub deactivate: bool,
    pub reactivate: bool,
    /// `set` (the Secret holds a password the status digest does not
    /// match, or one to be generated), `unchanged`, `unknown` (the
    /// operator's digest key cannot be read), or absent: not managed.
    pub password: Option<String>,
    /// Rooms that would be joined and left, as listed (or by ID).
    pub join: Vec<String>,
    pub leave: Vec<String>,
    /// Listed aliases that name no room (the operator would report them).
    pub unresolved_rooms: Vec<String>,
    /// For `refused` and `error`: the reason the operator would report.
    pub reason: Option<String>,
    /// For `refused` and `error` the message, for `observe` the
    /// observation's; never a secret.
    pub message: Option<String>,
    /// `managementPolicy: Observe`: `InSync`, `Drifted` or `NotFound`.
    pub observed: Option<String>,
}

impl UserPlan {
    fn changes(&self) -> bool {
        matches!(self.action.as_str(), "create" | "update")
    }
}

/// A manifest read from disk.
struct Manifest {
    file: String,
    user: MatrixUser,
}

/// Reads the MatrixUsers of `paths`: every document of each file; a
/// directory's `.yaml` and `.yml` files, in name order.
fn read_manifests(paths: &[PathBuf], ignored: &mut Vec<Ignored>) -> Result<Vec<Manifest>, String> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("cannot read directory {}: {e}", path.display()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value =
                serde_yaml::Value::deserialize(document).map_err(|e| format!("{}: not YAML: {e}", file.display()))?;
            if value.is_null() {
                continue;
            }
            let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let (api_version, kind) = (field("apiVersion"), field("kind"));
            let name = value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            if kind != "MatrixUser" || !api_version.starts_with("matrix-operator.io/") {
                ignored.push(Ignored {
                    file: file.display().to_string(),
                    api_version,
                    kind,
                    name,
                });
                continue;
            }
            let user: MatrixUser = serde_yaml::from_value(value)
                .map_err(|e| format!("{}: MatrixUser {name:?} is not valid: {e}", file.display()))?;
            out.push(Manifest {
                file: file.display().to_string(),
                user,
            });
        }
    }
    Ok(out)
}

/// The subcommand: reads, plans, prints; the exit code says what it found.
pub fn main(args: PlanArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(plan_all(&args)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        Output::Text => print!("{}", render(&report)),
    }
    let s = &report.summary;
    if s.errors > 0 || s.refused > 0 {
        ExitCode::FAILURE
    } else if s.changes > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

async fn plan_all(args: &PlanArgs) -> Result<Report, String> {
    let mut report = Report::default();
    let manifests = read_manifests(&args.files, &mut report.ignored)?;
    crate::tls::install_crypto_provider();
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot reach Kubernetes (KUBECONFIG): {e}"))?;
    let default_namespace = client.default_namespace().to_string();
    let operator_namespace = args.operator_namespace.clone().unwrap_or(default_namespace.clone());
    let digest_key = read_digest_key(&client, &operator_namespace).await;
    // The live MatrixUsers, to find two that name one Matrix ID as the
    // operator does: every namespace when the kubeconfig may list them,
    // else those of the manifests.
    let mut writer = Writer::<MatrixUser>::default();
    let namespaces: BTreeSet<String> = manifests
        .iter()
        .map(|m| m.user.namespace().unwrap_or(default_namespace.clone()))
        .collect();
    let live = match Api::<MatrixUser>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items,
        Err(_) => {
            let mut items = Vec::new();
            for ns in &namespaces {
                let api: Api<MatrixUser> = Api::namespaced(client.clone(), ns);
                items.extend(
                    api.list(&ListParams::default())
                        .await
                        .map_err(|e| format!("cannot list the MatrixUsers of namespace {ns}: {e}"))?
                        .items,
                );
            }
            items
        }
    };
    for u in &live {
        writer.apply_watcher_event(&watcher::Event::Apply(u.clone()));
    }
    let config = Config {
        digest_key: digest_key.clone().unwrap_or_else(DigestKey::generate),
        ..Config::default()
    };
    let ctx = Context::new(client.clone(), config, writer.as_reader(), Metrics::new());
    for m in manifests {
        let namespace = m.user.namespace().unwrap_or(default_namespace.clone());
        let mut user = m.user;
        user.metadata.namespace = Some(namespace.clone());
        // What the cluster holds of it: the status (ownership, password
        // digest, rooms joined) and what identifies it.
        let current = live
            .iter()
            .find(|l| l.namespace().as_deref() == Some(namespace.as_str()) && l.name_any() == user.name_any());
        if let Some(current) = current {
            user.status = current.status.clone();
            user.metadata.uid = current.metadata.uid.clone();
            user.metadata.creation_timestamp = current.metadata.creation_timestamp.clone();
            let record = current.annotations().get(PENDING_CREATION).cloned();
            let annotations = user.metadata.annotations.get_or_insert_default();
            match record {
                Some(r) => annotations.insert(PENDING_CREATION.to_string(), r),
                None => annotations.remove(PENDING_CREATION),
            };
        } else {
            user.status = None;
        }
        let mut plan = UserPlan {
            file: m.file,
            namespace,
            name: user.name_any(),
            management_policy: format!("{:?}", user.spec.management_policy),
            ..UserPlan::default()
        };
        if let Err(e) = plan_user(&ctx, &user, digest_key.as_ref(), &mut plan).await {
            // What the operator would report and wait on a change for,
            // as opposed to what kept this command from finding out.
            let refused = matches!(
                e,
                Error::Refused(_)
                    | Error::InvalidSpec(_)
                    | Error::InvalidUserId(_)
                    | Error::DuplicateUser { .. }
                    | Error::CredentialsSecretNotOwned { .. }
                    | Error::SecretNotFound { .. }
                    | Error::SecretKeyMissing { .. }
                    | Error::HomeserverNotFound { .. }
            );
            plan.action = if refused { "refused" } else { "error" }.to_string();
            plan.reason = Some(e.reason().to_string());
            plan.message = Some(e.to_string());
        }
        tally(&mut report.summary, &plan);
        report.users.push(plan);
    }
    Ok(report)
}

fn tally(s: &mut Summary, p: &UserPlan) {
    match p.action.as_str() {
        "create" | "update" => s.changes += 1,
        "none" => s.unchanged += 1,
        "refused" => s.refused += 1,
        "observe" => {
            s.observed += 1;
            if p.observed.as_deref() != Some("InSync") {
                s.drifted += 1;
            }
        }
        _ => s.errors += 1,
    }
}

/// The operator's key of the password digests, if it can be read (a GET:
/// the operator makes it, this never does).
async fn read_digest_key(client: &Client, namespace: &str) -> Option<DigestKey> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api.get_opt(digest_key::SECRET_NAME).await.ok()??;
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(digest_key::KEY))
        .and_then(|v| DigestKey::from_bytes(&v.0))
}

/// The password the operator would set, read without writing: the
/// Secret's key, or the generated Secret's (`None` inside when it does
/// not exist yet: one would be generated).
async fn password_of(ctx: &Context, user: &MatrixUser) -> Result<Option<Option<SecretString>>, Error> {
    let Some(p) = &user.spec.password else {
        return Ok(None);
    };
    let ns = user.namespace().unwrap_or_default();
    let value = match (&p.secret_ref, p.generate) {
        (Some(r), _) => Some(ctx.secret_value(&ns, r).await?),
        (None, true) => {
            let name = secrets::credentials_secret_name(user);
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            match api.get_opt(&name).await? {
                None => None,
                Some(existing) => {
                    let owned = user
                        .uid()
                        .is_some_and(|uid| existing.owner_references().iter().any(|o| o.uid == uid));
                    if !owned {
                        return Err(Error::CredentialsSecretNotOwned { name });
                    }
                    let r = crate::api::SecretKeyRef {
                        name,
                        key: "password".into(),
                    };
                    Some(secrets::read_key_at(&ctx.client, &ns, &r).await?.0)
                }
            }
        }
        (None, false) => {
            return Err(Error::InvalidSpec("password needs secretRef or generate: true".into()));
        }
    };
    if let Some(v) = &value {
        check_password(v, p.secret_ref.as_ref().map(|r| (r.name.as_str(), r.key.as_str())))?;
    }
    Ok(Some(value))
}

/// Plans one MatrixUser as a pass of the operator would, up to the first
/// write: the same checks, the same plan.
async fn plan_user(
    ctx: &Context,
    user: &MatrixUser,
    digest_key: Option<&DigestKey>,
    out: &mut UserPlan,
) -> Result<(), Error> {
    let ns = user.namespace().unwrap_or_default();
    let hs = ctx.homeserver(&ns, &user.spec.homeserver_ref.name).await?;
    let ready = ready_status(&hs).map_err(|not_ready| Error::HomeserverNotReady {
        name: hs.name_any(),
        message: not_ready.message,
        waiting: not_ready.waiting,
    })?;
    let backend = ctx.backend(&hs).await?;
    let name = user.name_any();
    let user_id = UserId::new(user.spec.effective_localpart(&name), &ready.server_name)?;
    out.user_id = Some(user_id.to_string());
    let old = user.status.clone().unwrap_or_default();
    let owned = old.user_id.as_deref() == Some(user_id.as_str());
    if ready.admin_user_id.as_deref() == Some(user_id.as_str()) {
        return Err(Error::InvalidSpec(format!(
            "{user_id} is the account of the Homeserver's admin token, which the operator does not manage"
        )));
    }
    ownership::check_unique(ctx, user, &user_id, owned)?;
    for t in user.spec.threepids.iter().flatten() {
        validate_threepid(t.medium, &t.address).map_err(Error::InvalidSpec)?;
    }
    if user.spec.management_policy == ManagementPolicy::Observe {
        return observe(&backend, user, &user_id, &old, out).await;
    }

    let password = password_to_plan(ctx, user, &old, digest_key, out).await?;
    let desired = desired_from_spec(&user.spec, user_id.clone(), password);
    let authority = Authority {
        owned,
        adopt_requested: user.spec.adopt,
        adoption_allowed: hs.spec.policy.allow_adoption,
        admin_allowed: hs.spec.policy.allow_admin_users,
        owned_creation_ts: old.account_creation_ts,
        pending_creation: pending_creation_of(user, &user_id),
    };
    let preview = preview_account(&backend, &desired, authority, true).await?;
    let active_after = record_action(&desired, &preview, out)?;
    if let Some(listed) = &user.spec.rooms {
        let rooms = match &preview.account {
            Some(_) => preview_rooms(&backend, &user_id, listed, &old.rooms, active_after).await?,
            // A new account is in no room: every listed one is joined.
            None => crate::plan::plan_rooms(listed, &old.rooms, &BTreeSet::new(), &Default::default(), active_after),
        };
        record_rooms(&rooms, out);
    }
    Ok(())
}

/// What the operator would report for a MatrixUser it only observes
/// (`managementPolicy: Observe` changes nothing).
async fn observe(
    backend: &Backend,
    user: &MatrixUser,
    user_id: &UserId,
    old: &MatrixUserStatus,
    out: &mut UserPlan,
) -> Result<(), Error> {
    out.action = "observe".into();
    let desired = desired_from_spec(&user.spec, user_id.clone(), None);
    let preview = preview_account(backend, &desired, OBSERVER, false).await?;
    let rooms = match (&user.spec.rooms, &preview.account) {
        (Some(listed), Some(account)) => {
            Some(preview_rooms(backend, user_id, listed, &old.rooms, !account.deactivated).await?)
        }
        _ => None,
    };
    let (observed, message) = match observation(&preview, rooms.as_ref()) {
        Observation::InSync => ("InSync", format!("{user_id} is in line with the spec")),
        Observation::NotFound => {
            let e = Error::NotFound {
                user_id: user_id.to_string(),
            };
            ("NotFound", e.to_string())
        }
        Observation::Drifted(fields) => {
            out.fields = fields.iter().map(|f| f.to_string()).collect();
            let e = Error::Drifted {
                user_id: user_id.to_string(),
                fields,
            };
            ("Drifted", e.to_string())
        }
    };
    out.observed = Some(observed.into());
    out.message = Some(message);
    Ok(())
}

/// The password the plan compares, and what `plan` can say of it before
/// the plan: one to be generated is new; one whose digest cannot be
/// checked (no digest key) is taken as applied, and reported `unknown`.
async fn password_to_plan(
    ctx: &Context,
    user: &MatrixUser,
    old: &MatrixUserStatus,
    digest_key: Option<&DigestKey>,
    out: &mut UserPlan,
) -> Result<Option<DesiredPassword>, Error> {
    Ok(match password_of(ctx, user).await? {
        None => None,
        Some(None) => {
            out.password = Some("set".into());
            // To be generated: its value is unknown, but it is new.
            Some(DesiredPassword {
                value: SecretString::new("(generated)"),
                applied: false,
                logout_devices: false,
            })
        }
        Some(Some(value)) => {
            let applied = match (old.password_digest.as_deref(), digest_key) {
                (Some(d), Some(key)) => digest_matches(d, &value, key),
                (None, _) => false,
                (Some(_), None) => {
                    out.password = Some("unknown".into());
                    true
                }
            };
            Some(DesiredPassword {
                value,
                applied,
                logout_devices: false,
            })
        }
    })
}

/// Records the first round's plan in `out`: the action, the fields and
/// the password's fate. Returns whether the account is active after it
/// (what the room plan needs).
fn record_action(desired: &Desired, preview: &AccountPreview, out: &mut UserPlan) -> Result<bool, Error> {
    let plan = preview.plan.clone().map_err(Error::Refused)?;
    out.adopt = plan.adopt;
    let mut fields: Vec<&str> = Vec::new();
    let active_after = match (&plan.action, &preview.account) {
        (Some(Action::Create), _) => {
            out.action = "create".into();
            fields = preview.create_fields.clone();
            desired.deactivated != Some(true)
        }
        (Some(Action::Update(changes)), Some(account)) => {
            out.action = "update".into();
            fields = changes.field_names();
            out.deactivate = changes.deactivated == Some(true);
            out.reactivate = changes.deactivated == Some(false);
            !changes.deactivated.unwrap_or(account.deactivated)
        }
        (_, Some(account)) => {
            out.action = if plan.adopt || plan.created_by_pending {
                "update"
            } else {
                "none"
            }
            .into();
            !account.deactivated
        }
        (_, None) => true,
    };
    if out.password.is_none() && desired.password.is_some() {
        out.password = Some(
            if fields.contains(&"password") {
                "set"
            } else {
                "unchanged"
            }
            .into(),
        );
    }
    out.fields = fields.iter().map(|f| f.to_string()).collect();
    Ok(active_after)
}

/// Records the room plan in `out`: a plan that changes nothing else but
/// joins or leaves a room is an update.
fn record_rooms(rooms: &RoomPlan, out: &mut UserPlan) {
    out.join = rooms.join.iter().map(|j| j.listed_as.to_string()).collect();
    out.leave = rooms
        .leave
        .iter()
        .map(|r| r.alias.clone().unwrap_or_else(|| r.room_id.clone()))
        .collect();
    out.unresolved_rooms = rooms.unresolved.iter().map(|r| r.to_string()).collect();
    if out.action == "none" && !(out.join.is_empty() && out.leave.is_empty()) {
        out.action = "update".into();
    }
}

/// The text output: a block per MatrixUser, then the summary.
pub fn render(report: &Report) -> String {
    let mut s = String::new();
    for i in &report.ignored {
        let name = match i.name.is_empty() {
            true => String::new(),
            false => format!(" {:?}", i.name),
        };
        s.push_str(&format!(
            "note: {}: {}{name} ({}) is not a MatrixUser: ignored\n",
            i.file, i.kind, i.api_version
        ));
    }
    for u in &report.users {
        let id = u.user_id.as_deref().map(|i| format!(" ({i})")).unwrap_or_default();
        let head = format!("MatrixUser {}/{}{id}", u.namespace, u.name);
        match u.action.as_str() {
            "create" => s.push_str(&format!("{head}: will be created\n")),
            "update" => s.push_str(&format!("{head}: will be changed\n")),
            "none" => s.push_str(&format!("{head}: no changes\n")),
            "observe" => s.push_str(&format!(
                "{head}: {}; no changes will be made (Observe)\n",
                match u.observed.as_deref() {
                    Some("InSync") => "in line with the spec".to_string(),
                    Some("NotFound") => "no such account".to_string(),
                    _ => format!("drifted in {}", u.fields.join(", ")),
                }
            )),
            other => s.push_str(&format!(
                "{head}: {other} ({}): {}\n",
                u.reason.as_deref().unwrap_or_default(),
                u.message.as_deref().unwrap_or_default()
            )),
        }
        if !u.changes() {
            continue;
        }
        if u.adopt {
            s.push_str("  ~ adopt the existing account (spec.adopt)\n");
        }
        if u.action == "create" {
            s.push_str("  + create the account\n");
        }
        let fields: Vec<&str> = u
            .fields
            .iter()
            .map(String::as_str)
            .filter(|f| !matches!(*f, "password" | "deactivated"))
            .collect();
        if !fields.is_empty() {
            s.push_str(&format!("  ~ set {}\n", fields.join(", ")));
        }
        if u.password.as_deref() == Some("set") {
            s.push_str("  ~ set the password (from its Secret; not shown)\n");
        }
        if u.deactivate {
            s.push_str("  - deactivate\n");
        }
        if u.reactivate {
            s.push_str("  + re-activate\n");
        }
        for r in &u.join {
            s.push_str(&format!("  + join {r}\n"));
        }
        for r in &u.leave {
            s.push_str(&format!("  - leave {r}\n"));
        }
        for r in &u.unresolved_rooms {
            s.push_str(&format!("  ! {r}: no such alias (the operator would report it)\n"));
        }
        if u.password.as_deref() == Some("unknown") {
            s.push_str("  ? the password: cannot tell (the operator's digest key is not readable)\n");
        }
    }
    let m = &report.summary;
    s.push_str(&format!(
        "\nPlan: {} to change, {} unchanged, {} refused, {} errors, {} observed ({} drifted).\n",
        m.changes, m.unchanged, m.refused, m.errors, m.observed, m.drifted
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_gives_its_yaml_files_and_other_kinds_are_noted_not_planned() {
        let dir = std::env::temp_dir().join(format!("plan-cmd-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("nested")).unwrap();
        let user = |name: &str| {
            format!(
                "apiVersion: matrix-operator.io/v1alpha1\nkind: MatrixUser\nmetadata:\n  name: {name}\nspec:\n  homeserverRef:\n    name: hs\n"
            )
        };
        std::fs::write(dir.join("b.yaml"), format!("{}---\n{}", user("b1"), user("b2"))).unwrap();
        std::fs::write(dir.join("a.yml"), user("a")).unwrap();
        std::fs::write(dir.join("notes.txt"), user("txt")).unwrap();
        std::fs::write(dir.join("nested").join("c.yaml"), user("c")).unwrap();
        std::fs::write(
            dir.join("kustomization.yaml"),
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [a.yml]\n",
        )
        .unwrap();
        let mut ignored = Vec::new();
        let read = read_manifests(std::slice::from_ref(&dir), &mut ignored).unwrap();
        let names: Vec<String> = read.iter().map(|m| m.user.name_any()).collect();
        assert_eq!(names, ["a", "b1", "b2"]);
        let kinds: Vec<&str> = ignored.iter().map(|i| i.kind.as_str()).collect();
        assert_eq!(kinds, ["Kustomization"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
