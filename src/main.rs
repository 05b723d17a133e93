use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use futures::FutureExt;
use matrix_user_operator::leader::{LeaderElector, LeaderError, LeaseConfig};
use matrix_user_operator::metrics::Metrics;
use matrix_user_operator::{controller, health, tls};
use tracing::{error, info};

/// Keeps Matrix accounts on a Synapse homeserver in line with MatrixUser resources.
#[derive(Parser)]
#[command(name = "matrix-user-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (Homeserver, MatrixUser) as YAML.
    Crd,
    /// Run the operator against the cluster of the in-cluster config or KUBECONFIG.
    Run(RunArgs),
    /// Print what applying MatrixUser manifests would do, writing nothing
    /// (exit code 0: no changes, 2: changes, 1: an error or a refusal).
    Plan(controller::plan_cmd::PlanArgs),
    /// Write a MatrixUser manifest for each account of a Homeserver that no
    /// MatrixUser manages yet (reads only; see README, "Importing accounts").
    Import(matrix_user_operator::import::ImportArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only these namespaces: repeat the flag or separate them with commas (default: all namespaces).
    #[arg(long = "namespace", env = "WATCH_NAMESPACE", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// How often each resource is checked against Synapse for drift, e.g. 30s, 10m, 1h (each resource at a phase of the interval of its own).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    resync_interval: Duration,
    /// Reconciles in flight at once, per kind (16 keeps a Synapse busy
    /// while the others wait on Kubernetes: `cargo bench --bench converge`).
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Limit on each admin API request, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Limit on one MatrixUser pass's work with the homeserver, all its
    /// requests together, e.g. 2m (default: 4 × --request-timeout). A pass
    /// that hits it fails with the transient reason TooSlow and is retried
    /// with backoff; each Homeserver also gets only its share of
    /// --concurrency, so a slow one does not stall the others.
    #[arg(long, value_parser = parse_duration)]
    reconcile_timeout: Option<Duration>,
    /// How often each Homeserver's accounts are counted into its status
    /// (managed / unmanaged / deactivated): a count pages through the
    /// server's whole user list (see README, "Account counts"). `0` turns
    /// counting off.
    #[arg(long, default_value = "1h", value_parser = parse_interval_or_off)]
    account_count_interval: Duration,
    /// Address for /healthz, /readyz and /metrics; `0` disables it.
    #[arg(long, default_value = "0.0.0.0:8080", value_parser = parse_listen_addr)]
    health_addr: ListenAddr,
    /// Leader election on a Lease, so one replica of several reconciles:
    /// `auto` is on inside a cluster and off elsewhere.
    #[arg(long, value_enum, default_value_t = LeaderElection::Auto)]
    leader_election: LeaderElection,
    /// Namespace of the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// This replica's name in the Lease (default: the pod name, else host name and process ID).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// Log format: `text` for terminals, `json` for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, in RUST_LOG syntax (default: RUST_LOG, else `info`).
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LeaderElection {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy)]
struct ListenAddr(Option<SocketAddr>);

fn parse_listen_addr(s: &str) -> Result<ListenAddr, String> {
    if s == "0" {
        return Ok(ListenAddr(None));
    }
    s.parse()
        .map(|a| ListenAddr(Some(a)))
        .map_err(|e| format!("{e} (expected HOST:PORT, or 0 to disable)"))
}

/// The longest duration a flag takes: beyond it, time arithmetic on the
/// value (a resync's phase, a deadline) could overflow, and no interval of
/// the operator's is meant to be that long.
const MAX_FLAG_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// `30s`, `10m`, `1h30m`, `500ms`, or whole seconds; above zero and at most
/// a year.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (use e.g. 30s, 10m, 1h)");
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|_| bad())?,
    };
    if d.is_zero() {
        return Err(bad());
    }
    if d > MAX_FLAG_DURATION {
        return Err(format!("{s:?} is longer than a year, the longest a flag takes"));
    }
    Ok(d)
}

/// A duration as [`parse_duration`] takes it, or `0`: off (a zero
/// duration).
fn parse_interval_or_off(s: &str) -> Result<Duration, String> {
    match s {
        "0" | "0s" => Ok(Duration::ZERO),
        _ => parse_duration(s),
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    info!("shutting down");
}

/// The default `--reconcile-timeout`, in request timeouts: a pass makes a
/// few calls (read, create, update), and one of a homeserver that answers
/// within the request timeout still finishes.
const RECONCILE_TIMEOUTS_PER_REQUEST: u32 = 4;

const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// The operator's own namespace: where its Lease and the key of its
/// password digests live. The pod's (`POD_NAMESPACE`, or the service
/// account's), else the kubeconfig context's when run from a workstation.
fn operator_namespace(args: &RunArgs, client: &kube::Client) -> String {
    args.leader_election_namespace
        .clone()
        .or_else(|| {
            std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| client.default_namespace().to_string())
}

fn lease_config(args: &RunArgs) -> Option<LeaseConfig> {
    let on = match args.leader_election {
        LeaderElection::On => true,
        LeaderElection::Off => false,
        LeaderElection::Auto => in_cluster(),
    };
    if !on {
        return None;
    }
    let namespace = args
        .leader_election_namespace
        .clone()
        .or_else(|| {
            std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "default".to_string());
    let identity = args.leader_election_identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    Some(LeaseConfig::new(namespace, identity))
}

async fn run(args: RunArgs) -> Result<(), String> {
    tls::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach Kubernetes (in-cluster config or KUBECONFIG): {e}"))?;
    let listener = health::bind(args.health_addr.0)
        .await
        .map_err(|e| format!("cannot listen for health checks: {e}"))?;
    let metrics = Metrics::new();
    let readiness = health::Readiness::default();
    let health_task = listener.map(|l| tokio::spawn(health::serve(l, readiness.clone(), metrics.clone())));
    let lease = lease_config(&args);
    let digest_key = controller::digest_key::load_or_create(client.clone(), &operator_namespace(&args, &client))
        .await
        .map_err(|e| e.to_string())?;
    let config = controller::Config {
        resync_interval: args.resync_interval,
        request_timeout: args.request_timeout,
        namespaces: args.namespaces,
        concurrency: args.concurrency,
        digest_key,
        reconcile_timeout: args
            .reconcile_timeout
            .unwrap_or(args.request_timeout.saturating_mul(RECONCILE_TIMEOUTS_PER_REQUEST)),
        account_count_interval: args.account_count_interval,
    };
    info!(
        namespaces = %if config.namespaces.is_empty() { "(all)".to_string() } else { config.namespaces.join(",") },
        resync = ?config.resync_interval,
        reconcile_timeout = ?config.reconcile_timeout,
        leader_election = lease.is_some(),
        "starting"
    );
    let shutdown = shutdown_signal().shared();
    let result = match lease {
        None => {
            let ready = readiness.clone();
            controller::run(client, config, metrics, shutdown, move || ready.set_ready()).await;
            Ok(())
        }
        Some(lease) => {
            readiness.set_standby();
            info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "standing by for the lease");
            let elector = LeaderElector::new(client.clone(), lease);
            let (ready, leading) = (readiness.clone(), readiness.clone());
            let work = {
                let shutdown = shutdown.clone();
                move || -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
                    Box::pin(controller::run(client, config, metrics, shutdown, move || {
                        ready.set_ready()
                    }))
                }
            };
            match elector.run(work, move || leading.set_leader(), shutdown).await {
                Ok(()) | Err(LeaderError::ShutDown) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    if let Some(task) = health_task {
        task.abort();
    }
    result
}

/// See Cargo.toml: fewer bytes of RSS per byte of heap than glibc's or
/// musl's malloc (the image is built with musl).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match matrix_user_operator::api::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRDs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Plan(args) => controller::plan_cmd::main(args),
        Command::Import(args) => {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(matrix_user_operator::import::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            init_logging(args.log_format, args.log_level.as_deref());
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "m", "10x", "0s", "10m5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        // Values whose arithmetic overflowed (a panic at start) are refused.
        for absurd in ["99999999999999999999h", "18446744073709551615", "400d"] {
            assert!(parse_duration(absurd).is_err(), "{absurd}");
        }
    }

    #[test]
    fn an_interval_of_zero_is_off_and_any_other_a_duration() {
        assert_eq!(parse_interval_or_off("0"), Ok(Duration::ZERO));
        assert_eq!(parse_interval_or_off("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_interval_or_off("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_interval_or_off("soon").is_err());
        assert!(parse_interval_or_off("400d").is_err());
    }

    #[test]
    fn listen_addr_zero_disables() {
        assert!(parse_listen_addr("0").unwrap().0.is_none());
        assert_eq!(
            parse_listen_addr("127.0.0.1:9000").unwrap().0,
            Some("127.0.0.1:9000".parse().unwrap())
        );
        assert!(parse_listen_addr("nope").is_err());
    }
}
