//! A Python virtualenv under `<target>/`, holding one pinned PyPI package,
//! installed once and shared by every test binary that needs it (the Synapse
//! harness, the Helm chart tests).
//!
//! `<target>` is `$CARGO_TARGET_DIR` or `<crate>/target`. The first run
//! creates `<target>/<dir>/` with `python -m venv` and pip-installs the
//! package (network access to PyPI, or a mirror / wheel cache through pip's
//! usual settings such as `PIP_INDEX_URL` / `PIP_FIND_LINKS`); a marker file
//! records a finished install, a file lock `<target>/<dir>.lock` serialises
//! test binaries that install at the same time, and pip's output is kept in
//! `<target>/<dir>.install.log`. Later runs only check the marker.
//!
//! Nothing is skipped: a missing Python, venv module or pip is an `Err`
//! naming what is missing and how to install it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

/// How many lines of a failed command's output an error message carries.
pub const LOG_TAIL_LINES: usize = 60;

/// What to install, and the words the messages use for it.
pub struct Venv<'a> {
    /// Prefix of the progress lines, e.g. `synapse harness`.
    pub harness: &'a str,
    /// Directory name under `<target>/`, e.g. `synapse-venv-1.163.2`.
    pub dir: &'a str,
    /// The pip requirement, e.g. `matrix-synapse==1.163.2`.
    pub requirement: &'a str,
    /// What needs the Python version, e.g. `Synapse 1.163.2`.
    pub needs: &'a str,
    /// The environment variable naming another interpreter than `python3`.
    pub python_env: &'a str,
    /// The oldest Python the package supports.
    pub min_python: (u32, u32),
    /// How long the first install takes, for the progress line, e.g. `≈40 s`.
    pub duration: &'a str,
}

/// Makes sure `<target>/<dir>/` holds `requirement`; returns the venv's path.
pub fn ensure_venv(target: &Path, spec: &Venv) -> Result<PathBuf, String> {
    let Venv {
        harness,
        dir,
        requirement,
        needs,
        python_env,
        min_python,
        duration,
    } = *spec;
    let min = format!("{}.{}", min_python.0, min_python.1);
    let venv = target.join(dir);
    let venv_python = venv.join("bin").join("python");
    let marker = venv.join(".installed-by-matrix-user-operator-tests");
    fs::create_dir_all(target).map_err(|e| format!("creating {}: {e}", target.display()))?;

    // Serialise installs between test binaries running at the same time.
    let lock_path = target.join(format!("{dir}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;

    if marker.is_file() && venv_python.is_file() {
        return Ok(venv); // dropping `lock` unlocks
    }

    let system_python = std::env::var(python_env).unwrap_or_else(|_| "python3".to_owned());
    announce(&format!(
        "{harness}: installing {requirement} into {} \
         (first run only, {duration}, needs PyPI)",
        venv.display()
    ));
    let install_started = Instant::now();

    // Python itself, new enough.
    let version = Command::new(&system_python)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .stdin(Stdio::null())
        .output();
    let version = match version {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        Ok(output) => {
            return Err(format!(
                "`{system_python}` does not run ({}): install Python >= {min} \
                 (apt-get install python3 python3-venv) or set {python_env} to one\n{}",
                output.status,
                output_text(&output)
            ));
        }
        Err(e) => {
            return Err(format!(
                "`{system_python}` not found ({e}): install Python >= {min} \
                 (apt-get install python3 python3-venv) or set {python_env} to one"
            ));
        }
    };
    let too_old = version
        .split_once('.')
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?)))
        .is_none_or(|v| v < min_python);
    if too_old {
        return Err(format!(
            "`{system_python}` is Python {version}, but {needs} needs >= {min}: \
             install a newer python3 or set {python_env} to one"
        ));
    }

    // The venv (start clean: a missing marker means an earlier install broke off).
    if venv.exists() {
        fs::remove_dir_all(&venv).map_err(|e| format!("removing {}: {e}", venv.display()))?;
    }
    let mut make_venv = Command::new(&system_python);
    make_venv.args(["-m", "venv"]).arg(&venv).stdin(Stdio::null());
    die_with_parent(&mut make_venv, libc::SIGKILL);
    let output = make_venv
        .output()
        .map_err(|e| format!("running `{system_python} -m venv`: {e}"))?;
    if !output.status.success() || !venv_python.is_file() {
        return Err(format!(
            "`{system_python} -m venv {}` failed ({}): install python3-venv \
             (apt-get install python3-venv), which also brings ensurepip/pip\n{}",
            venv.display(),
            output.status,
            output_text(&output)
        ));
    }

    // pip install, output kept in a log next to the venv.
    let log_path = target.join(format!("{dir}.install.log"));
    let log = File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let mut pip = Command::new(&venv_python);
    pip.args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input"])
        .arg(requirement)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    die_with_parent(&mut pip, libc::SIGKILL);
    let status = pip
        .status()
        .map_err(|e| format!("running {} -m pip: {e}", venv_python.display()))?;
    if !status.success() {
        let log_text = fs::read_to_string(&log_path).unwrap_or_default();
        let hint = if log_text.contains("No module named pip") {
            "the venv has no pip: install python3-venv / python3-pip (apt-get install python3-venv python3-pip)"
        } else {
            "pip needs network access to PyPI (https://pypi.org) on the first run, \
             or a configured mirror/wheel cache (PIP_INDEX_URL, PIP_FIND_LINKS)"
        };
        return Err(format!(
            "`pip install {requirement}` failed ({status}): {hint}\n\
             --- last {LOG_TAIL_LINES} lines of {} ---\n{}",
            log_path.display(),
            tail(&log_text, LOG_TAIL_LINES)
        ));
    }

    fs::write(&marker, format!("{requirement}\n")).map_err(|e| format!("writing {}: {e}", marker.display()))?;
    announce(&format!(
        "{harness}: installed {requirement} in {:.1}s",
        install_started.elapsed().as_secs_f64()
    ));
    Ok(venv)
}

/// `$CARGO_TARGET_DIR`, or the workspace's `target/` (the repository's: the
/// kit is its `testkit/`), shared by the kit's and the operator's tests.
pub fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the kit sits in the workspace");
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace.join(dir), // join keeps absolute paths
        _ => workspace.join("target"),
    }
}

/// Writes straight to the process's stderr, bypassing libtest's capture, so the
/// line shows up in CI logs even for passing tests.
pub fn announce(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// Makes the child get `signal` when the spawning thread dies (for the
/// Synapse harness: the keeper, which lives as long as the process).
pub fn die_with_parent(command: &mut Command, signal: libc::c_int) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid) and no allocation
    // between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died before prctl took effect: do not outlive it.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a command's stdout and stderr.
pub fn output_text(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    tail(&text, LOG_TAIL_LINES)
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
