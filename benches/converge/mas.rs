//! MAS mode of the convergence bench (`--backend mas`): the Homeserver has
//! `spec.mas`, so accounts are created in MAS's admin API and their profile
//! in Synapse's. Against the MAS stand-in of testkit/src/mas (and the real
//! MAS-mode Synapse it provisions), or against a real MAS when `MAS_URL`,
//! `MAS_CLIENT_ID`, `MAS_CLIENT_SECRET`, `MAS_SYNAPSE_URL`,
//! `MAS_SYNAPSE_ADMIN_TOKEN` and `MAS_SERVER_NAME` are set (as for
//! tests/mas_e2e.rs; it creates new users each run: MAS cannot delete any).
//!
//! MAS and Synapse each sit behind a counting proxy. For each N it prints:
//! the operator converging N new MatrixUsers (display name, password from a
//! Secret) against a script making the same calls without Kubernetes — the
//! calls the operator made for its first account, in order, taken from the
//! proxies' logs and replayed for each of the script's accounts; the calls
//! per account by method and endpoint, of both; Kubernetes writes per
//! account by kind; the operator's RSS and CPU per account; then a restarted
//! operator's start-up pass and its resyncs, with the calls per resync of
//! an in-sync user by endpoint. `--bcrypt` and `--creation` do not apply
//! (MAS hashes passwords itself); nothing about time is asserted.

use super::*;

use common::mas::MasTarget;
use matrix_user_operator::account::UserId;
use matrix_user_operator::backend::mas::{CreateOutcome, MasClient, MasConfig};
use matrix_user_operator::synapse::UserUpdate;

/// `METHOD endpoint` of a call through either proxy, with the IDs in the
/// path replaced by what they are: `GET users/by-username/{username}`,
/// `POST users/{id}/set-password`, `GET synapse users/{user_id}`.
fn endpoint(h: &Hit, on_synapse: bool) -> String {
    if on_synapse {
        let path = match h.path.strip_prefix("/_synapse/admin/v2/users/") {
            Some(rest) if !rest.contains('/') => "users/{user_id}".to_string(),
            _ => h.path.clone(),
        };
        return format!("{} synapse {path}", h.method);
    }
    let Some(rest) = h.path.strip_prefix("/api/admin/v1/") else {
        return format!("{} {}", h.method, h.path);
    };
    let mut out = Vec::new();
    let mut after_by_username = false;
    for segment in rest.split('/') {
        let ulid = segment.len() == 26 && segment.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        out.push(if after_by_username {
            "{username}"
        } else if ulid {
            "{id}"
        } else {
            segment
        });
        after_by_username = segment == "by-username";
    }
    format!("{} {}", h.method, out.join("/"))
}

fn by_endpoint(mas: &[Hit], synapse: &[Hit]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (hits, on_synapse) in [(mas, false), (synapse, true)] {
        for h in hits {
            *counts.entry(endpoint(h, on_synapse)).or_insert(0) += 1;
        }
    }
    counts
}

fn errors(mas: &[Hit], synapse: &[Hit]) -> usize {
    mas.iter()
        .chain(synapse)
        .filter(|h| h.status >= 400 && h.status != 404)
        .count()
}

/// One step of the script: a call the operator made for its first account.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    GetByUsername,
    Create,
    SetPassword,
    ListEmails,
    ListLinks,
    SynapseGet,
    SynapsePut,
}

impl Step {
    fn of(endpoint: &str) -> Option<Step> {
        Some(match endpoint {
            "GET users/by-username/{username}" => Step::GetByUsername,
            "POST users" => Step::Create,
            "POST users/{id}/set-password" => Step::SetPassword,
            "GET user-emails" => Step::ListEmails,
            "GET upstream-oauth-links" => Step::ListLinks,
            "GET synapse users/{user_id}" => Step::SynapseGet,
            "PUT synapse users/{user_id}" => Step::SynapsePut,
            // The token, the Homeserver's checks: not per account.
            "POST /oauth2/token" | "GET version" => return None,
            other => panic!("the script cannot replay {other:?}, a call the operator made for an account"),
        })
    }
}

/// The calls made for one account, oldest first: those naming its
/// username, MAS ID or Matrix ID.
fn calls_of(mas: &[Hit], synapse: &[Hit], localpart: &str, user_id: &str) -> Vec<String> {
    let mut mine: Vec<(Instant, String)> = Vec::new();
    let named = format!("/by-username/{localpart}");
    let mas_id = mas
        .iter()
        .find(|h| h.path.ends_with(&named) && h.status == 200)
        .and_then(|h| serde_json::from_str::<Value>(&h.answer).ok())
        .and_then(|v| v["data"]["id"].as_str().map(String::from));
    for h in mas {
        let about = h.path.ends_with(&named)
            || (h.path == "/api/admin/v1/users"
                && h.method == http::Method::POST
                && h.body.contains(&format!("\"{localpart}\"")))
            || mas_id
                .as_deref()
                .is_some_and(|id| h.path.contains(id) || h.query.contains(id));
        if about {
            mine.push((h.at, endpoint(h, false)));
        }
    }
    for h in synapse {
        if h.path.ends_with(user_id) {
            mine.push((h.at, endpoint(h, true)));
        }
    }
    mine.sort_by_key(|(at, _)| *at);
    mine.into_iter().map(|(_, e)| e).collect()
}

/// Waits until neither proxy has answered anything for a second (at most
/// two minutes).
async fn settle(w: &World) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = [&w.mas, &w.synapse]
            .iter()
            .filter_map(|p| p.hits.lock().unwrap().last().map(|h| h.at))
            .max();
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct World {
    target: MasTarget,
    mas: Proxy,
    synapse: Proxy,
}

fn tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:x}", nanos % 0xff_ffff_ffff)
}

fn password_of(i: usize, tag: &str) -> String {
    format!("Tortoise-Lantern-{i}-Quarry-{tag}")
}

/// The script: for each account, `steps` in order through the library's
/// clients (which fetch and keep MAS's token as the operator does), as the
/// operator has them: `accounts` at a time (its reconcile slots), each
/// client with `in_flight` requests at most (the Homeserver's
/// maxConcurrentRequests, which the operator's MAS and Synapse clients
/// each have).
async fn script(
    w: &World,
    steps: &[Step],
    localparts: &[String],
    accounts: usize,
    in_flight: usize,
    tag: &str,
) -> Duration {
    let t = &w.target;
    let mut config = MasConfig::new(&w.mas.url, &t.client_id, SecretString::new(&t.client_secret));
    config.max_concurrent_requests = in_flight;
    let mas = MasClient::new(config).expect("a MAS client");
    let mut config = ClientConfig::new(&w.synapse.url, SecretString::new(&t.synapse_admin_token));
    config.max_concurrent_requests = in_flight;
    let synapse = SynapseClient::new(config).expect("a Synapse client");
    let started = Instant::now();
    futures::stream::iter(localparts.iter().enumerate().map(|(i, lp)| {
        let (mas, synapse) = (&mas, &synapse);
        async move {
            let user_id = UserId::new(lp, &t.server_name).expect("a valid Matrix ID");
            let mut id: Option<String> = None;
            let id_of = |id: &Option<String>| id.clone().unwrap_or_else(|| panic!("{lp}: no MAS ID yet"));
            for step in steps {
                match step {
                    Step::GetByUsername => {
                        if let Some(u) = mas.user_by_username(lp).await.expect("GET by-username") {
                            id = Some(u.id);
                        }
                    }
                    Step::Create => match mas.create_user(lp).await.expect("POST users") {
                        CreateOutcome::Created(u) => id = Some(u.id),
                        CreateOutcome::Exists => panic!("{lp} exists already"),
                    },
                    Step::SetPassword => {
                        let password = SecretString::new(password_of(i, tag));
                        mas.set_password(&id_of(&id), &password).await.expect("set-password");
                    }
                    Step::ListEmails => {
                        mas.emails_of(&id_of(&id)).await.expect("list emails");
                    }
                    Step::ListLinks => {
                        mas.links_of(&id_of(&id)).await.expect("list links");
                    }
                    Step::SynapseGet => {
                        synapse.get_user(&user_id).await.expect("Synapse GET");
                    }
                    Step::SynapsePut => {
                        let update = UserUpdate {
                            displayname: Some(format!("User {i}")),
                            ..UserUpdate::default()
                        };
                        synapse.put_user(&user_id, &update).await.expect("Synapse PUT");
                    }
                }
            }
        }
    }))
    .buffer_unordered(accounts)
    .collect::<Vec<_>>()
    .await;
    started.elapsed()
}

pub(crate) fn run(o: &Options, runtime: &tokio::runtime::Runtime) {
    let (target, what) = match MasTarget::from_env() {
        Some(t) => {
            let what = format!(
                "a REAL MAS at {} (MAS_URL) with its Synapse at {}",
                t.mas_url, t.synapse_url
            );
            (t, what)
        }
        None => {
            let t = common::mas::mas_standin().target();
            let what = format!(
                "the MAS {} stand-in (testkit/src/mas, in this process) at {} with a real Synapse {} (SQLite) \
                 in MAS mode at {}",
                common::mas::MAS_VERSION,
                t.mas_url,
                common::SYNAPSE_VERSION,
                t.synapse_url
            );
            (t, what)
        }
    };
    println!(
        "converge, MAS mode: {what}, each behind a counting proxy; Kubernetes is the in-process FAKE API server, \
         the operator the real binary against it; {} CPUs shared by all",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let w = World {
        mas: start_proxy(&target.mas_url),
        synapse: start_proxy(&target.synapse_url),
        target,
    };
    let mut rows = Vec::new();
    for &n in &o.sizes {
        for &c in &o.concurrency {
            // The operator's calls in flight: the Homeserver's
            // maxConcurrentRequests (default 8), within its slots.
            let in_flight = (o.max_requests.unwrap_or(8) as usize).min(c as usize);
            println!();
            println!(
                "== MAS, N = {n}, --concurrency {c}, maxConcurrentRequests {}",
                o.max_requests.map_or("default (8)".to_string(), |m| m.to_string())
            );
            rows.push((n, c, runtime.block_on(run_once(&w, n, c, in_flight, o))));
        }
    }
    println!();
    println!("| MAS | N | concurrency | script | operator | operator/script |");
    println!("|---|---|---|---|---|---|");
    for (n, c, (script, operator)) in rows {
        println!(
            "| {} | {n} | {c} | {:.2} s | {:.2} s | {:.2}× |",
            if MasTarget::from_env().is_some() {
                "real"
            } else {
                "stand-in"
            },
            script.as_secs_f64(),
            operator.as_secs_f64(),
            operator.as_secs_f64() / script.as_secs_f64()
        );
    }
}

/// One (N, concurrency): the operator converging N users, the script
/// replaying its calls on N others, then the resyncs. Returns the script's
/// and the operator's times.
async fn run_once(w: &World, n: usize, concurrency: u16, in_flight: usize, o: &Options) -> (Duration, Duration) {
    let t = &w.target;
    let tag = format!("mb{}-n{n}-c{concurrency}", tag());
    let dir = std::env::temp_dir().join(format!("mxu-converge-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();

    // The operator, against a fake API server of its own.
    let (_, fake) = FakeApiServer::start();
    let mut spec = json!({
        "url": w.synapse.url,
        "adminTokenSecretRef": {"name": "admin", "key": "token"},
        "mas": {"url": w.mas.url, "clientId": t.client_id, "clientSecretRef": {"name": "mas-client", "key": "secret"}},
    });
    if let Some(m) = o.max_requests {
        spec["maxConcurrentRequests"] = json!(m);
    }
    for (name, key, value) in [
        ("admin", "token", &t.synapse_admin_token),
        ("mas-client", "secret", &t.client_secret),
    ] {
        create_as_user(
            &fake,
            o.apply,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "stringData": {key: value}}),
        );
    }
    create_as_user(
        &fake,
        o.apply,
        json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
        "metadata": {"name": "hs", "namespace": NS}, "spec": spec}),
    );
    let operator = Operator::start(
        &fake,
        concurrency,
        Duration::from_secs(600),
        &dir.join("operator-1.log"),
    );
    wait_homeserver_ready(&fake).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, idle_rss, idle_cpu) = operator.usage();

    let localparts: Vec<String> = (0..n).map(|i| format!("op-{tag}-{i}")).collect();
    fake.clear_requests();
    w.mas.clear();
    w.synapse.clear();
    *w.mas.watched.lock().unwrap() = Some(format!("/api/admin/v1/users/by-username/{}", localparts[0]));
    let started = Instant::now();
    for (i, lp) in localparts.iter().enumerate() {
        let name = user_name(i);
        create_as_user(
            &fake,
            o.apply,
            json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("{name}-password"), "namespace": NS},
            "stringData": {"password": password_of(i, &tag)}}),
        );
        create_as_user(
            &fake,
            o.apply,
            json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": format!("User {i}"),
                     "password": {"secretRef": {"name": format!("{name}-password"), "key": "password"}}}}),
        );
    }
    let paths: Vec<String> = (0..n).map(user_path).collect();
    let timeout = Duration::from_secs(120 + n as u64);
    let done = match wait_in_sync(&fake, paths, timeout).await {
        Ok(at) => at,
        Err(left) => {
            println!(
                "operator: {left} of {n} not in sync after {timeout:?}; see {}",
                dir.display()
            );
            Instant::now()
        }
    };
    let took = done - started;
    let (peak, rss, cpu) = operator.usage();
    *w.mas.watched.lock().unwrap() = None;
    let (mas_hits, synapse_hits) = (w.mas.hits_since(started), w.synapse.hits_since(started));
    let op_calls = by_endpoint(&mas_hits, &synapse_hits);
    let op_errors = errors(&mas_hits, &synapse_hits);
    let first = calls_of(&mas_hits, &synapse_hits, &localparts[0], &t.user_id(&localparts[0]));
    let kube = kube_counts(&fake.requests());
    // The script runs without the operator.
    let (peak1, _, cpu1) = operator.stop();

    let steps: Vec<Step> = first.iter().filter_map(|e| Step::of(e)).collect();
    let script_accounts: Vec<String> = (0..n).map(|i| format!("script-{tag}-{i}")).collect();
    w.mas.clear();
    w.synapse.clear();
    let mark = Instant::now();
    let script_time = script(w, &steps, &script_accounts, concurrency as usize, in_flight, &tag).await;
    let (s_mas, s_synapse) = (w.mas.hits_since(mark), w.synapse.hits_since(mark));
    let script_calls = by_endpoint(&s_mas, &s_synapse);
    let script_errors = errors(&s_mas, &s_synapse);

    println!("operator's calls for its first account, in order (MAS, and synapse = Synapse's admin API): {first:?}");
    println!(
        "script:   {n} accounts in {:.2} s ({:.1}/s), {concurrency} accounts and up to {in_flight} requests to \
         each of MAS and Synapse in flight, making those calls for each account through the library's MAS and \
         Synapse clients, without Kubernetes",
        script_time.as_secs_f64(),
        n as f64 / script_time.as_secs_f64(),
    );
    println!(
        "  calls per account (counted by the proxies): {}; answers >= 400 except 404: {script_errors}",
        per_account(&script_calls, n)
    );
    println!(
        "operator: {n} accounts in {:.2} s ({:.1}/s); ratio operator/script {:.2}",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        took.as_secs_f64() / script_time.as_secs_f64()
    );
    println!(
        "  calls per new account (counted by the proxies): {}; answers >= 400 except 404: {op_errors}",
        per_account(&op_calls, n)
    );
    let writes: BTreeMap<String, usize> = kube
        .iter()
        .filter(|(k, _)| {
            ["create ", "update ", "patch ", "delete "]
                .iter()
                .any(|v| k.starts_with(v))
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    println!(
        "  Kubernetes writes per new account, by kind: {:.2} in all: {} (the fake API server's log; each a Raft \
         commit and a watch fan-out on a real API server, which the fake cannot show)",
        writes.values().sum::<usize>() as f64 / n as f64,
        per_account(&writes, n)
    );
    println!(
        "  operator process: peak RSS {:.1} MiB (idle {:.1} MiB), RSS then {:.1} MiB, CPU {:.2} s for the converge; \
         per account: {:.1} KiB peak RSS above idle, {:.2} ms CPU",
        mib(peak),
        mib(idle_rss),
        mib(rss),
        cpu - idle_cpu,
        peak.saturating_sub(idle_rss) as f64 / n as f64,
        (cpu - idle_cpu) * 1e3 / n as f64
    );
    if o.converge_only {
        println!("  operator peak RSS {:.1} MiB, CPU {:.2} s in all", mib(peak1), cpu1);
        let _ = std::fs::remove_dir_all(&dir);
        return (script_time, took);
    }

    // A fresh operator with a short resync interval: its start-up pass goes
    // over N in-sync users at once, then their interval resyncs follow.
    // Each pass over a user begins with one GET of its MAS user by username.
    let resync = Duration::from_secs(o.resync_secs.unwrap_or((n as u64 / 25).max(20)));
    fake.clear_requests();
    w.mas.clear();
    w.synapse.clear();
    let started = Instant::now();
    let operator = Operator::start(&fake, concurrency, resync, &dir.join("operator-2.log"));
    let user_of: HashMap<String, usize> = localparts
        .iter()
        .enumerate()
        .map(|(i, lp)| (format!("/api/admin/v1/users/by-username/{lp}"), i))
        .collect();
    let first_gets = |since: Instant| {
        let mut seen: HashMap<usize, Instant> = HashMap::new();
        for h in w.mas.hits_since(since) {
            if h.method == http::Method::GET
                && let Some(i) = user_of.get(&h.path)
            {
                seen.entry(*i).or_insert(h.at);
            }
        }
        seen
    };
    let passes = |mas: &[Hit]| {
        mas.iter()
            .filter(|h| h.method == http::Method::GET && user_of.contains_key(&h.path))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 10);
    while first_gets(started).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let startup = first_gets(started);
    let startup_end = startup.values().max().copied().unwrap_or(started);
    // The pass's later calls (Synapse's GETs queue behind MAS's) land.
    settle(w).await;
    let (mas_hits, synapse_hits) = (w.mas.hits_since(started), w.synapse.hits_since(started));
    let kube = kube_counts(&fake.requests());
    let count = passes(&mas_hits);
    println!(
        "  start-up pass over {n} in-sync users (operator restarted): {} checked in {:.2} s from the process start, \
         its calls over after {:.2} s; {count} passes; calls per user: {}; answers >= 400 except 404: {}; \
         Kubernetes: {}",
        startup.len(),
        (startup_end - started).as_secs_f64(),
        (Instant::now() - started).as_secs_f64(),
        per_account(&by_endpoint(&mas_hits, &synapse_hits), n),
        errors(&mas_hits, &synapse_hits),
        totals(&kube)
    );

    let mark = Instant::now();
    fake.clear_requests();
    let (_, _, cpu_before) = operator.usage();
    let deadline = mark + resync * 3 / 2 + Duration::from_secs(30);
    while first_gets(mark).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resynced = first_gets(mark);
    let (peak2, _, cpu_after) = operator.usage();
    let (mas_hits, synapse_hits) = (w.mas.hits_since(mark), w.synapse.hits_since(mark));
    let kube = kube_counts(&fake.requests());
    let count = passes(&mas_hits).max(1);
    let calls = by_endpoint(&mas_hits, &synapse_hits);
    let per_user: usize = calls
        .iter()
        .filter(|(k, _)| {
            ["{username}", "{id}", "{user_id}", "user-emails", "upstream-oauth-links"]
                .iter()
                .any(|p| k.contains(p))
        })
        .map(|(_, v)| v)
        .sum();
    println!(
        "  resync (interval {} s) of {n} in-sync users: {} resynced within {:.1} s, {count} resync passes \
         (a user may come twice, 0.5 to 1.5 intervals apart); per pass: {:.2} GETs on the user in all: {}; \
         writes {}; answers >= 400 except 404: {}; Kubernetes reads {} ({}); operator CPU {:.3} s",
        resync.as_secs(),
        resynced.len(),
        (Instant::now() - mark).as_secs_f64(),
        per_user as f64 / count as f64,
        per_account(&calls, count),
        mas_hits
            .iter()
            .chain(&synapse_hits)
            .filter(|h| h.method != http::Method::GET && h.path != "/oauth2/token")
            .count(),
        errors(&mas_hits, &synapse_hits),
        reads(&kube),
        totals(&kube),
        cpu_after - cpu_before
    );
    let (peak3, _, cpu3) = operator.stop();
    println!(
        "  operator peak RSS: {:.1} MiB (converge), {:.1} MiB (restart + resyncs); CPU {:.2} s + {:.2} s",
        mib(peak1),
        mib(peak2.max(peak3)),
        cpu1,
        cpu3
    );
    let _ = std::fs::remove_dir_all(&dir);
    (script_time, took)
}
