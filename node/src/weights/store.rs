//! Parts of models in the cache: `<cache>/parts/<model id>/<label>.gguf`, each with its
//! model's manifest beside it. A part being fetched is `<label>.gguf.part` with a
//! journal of the chunks written (`<label>.gguf.journal`); only a part whose every chunk
//! was checked is renamed to `.gguf`, so a partial download never passes for a
//! complete one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use shard::manifest::Manifest;
use shard::ModelFile;

/// The tensors of blocks `start..end` and the small tensors every block needs (the
/// final norm, rope factors): what a server of that span holds. The embeddings and the
/// LM head, the largest tensors outside the blocks, are the client's.
pub fn span_tensors(manifest: &Manifest, start: usize, end: usize) -> Vec<String> {
    let prefixes: Vec<String> = (start..end).map(|i| format!("blk.{i}.")).collect();
    manifest
        .tensors()
        .iter()
        .map(|t| &t.name)
        .filter(|n| {
            if n.starts_with("blk.") {
                prefixes.iter().any(|p| n.starts_with(p.as_str()))
            } else {
                !is_client_only(n)
            }
        })
        .cloned()
        .collect()
}

/// Everything outside the blocks: embeddings, final norm, LM head, rope factors.
pub fn head_tensors(manifest: &Manifest) -> Vec<String> {
    manifest
        .tensors()
        .iter()
        .map(|t| &t.name)
        .filter(|n| !n.starts_with("blk."))
        .cloned()
        .collect()
}

fn is_client_only(name: &str) -> bool {
    name == "token_embd.weight" || name == "output.weight"
}

/// The parts kept under a cache directory, within a byte budget.
#[derive(Clone, Debug)]
pub struct PartStore {
    dir: PathBuf,
    budget: Option<u64>,
}

impl PartStore {
    /// Parts under `cache_dir/parts`, together at most `budget` bytes (`None`: no limit
    /// but the disk's).
    pub fn new(cache_dir: &Path, budget: Option<u64>) -> Self {
        PartStore {
            dir: cache_dir.join("parts"),
            budget,
        }
    }

    /// Where part `label` of model `model_id` is kept once complete.
    pub fn path(&self, model_id: &str, label: &str) -> PathBuf {
        self.dir.join(model_id).join(format!("{label}.gguf"))
    }

    /// The part at `path` opened, if it is complete (checked at fetch, then kept with
    /// its manifest beside it).
    pub fn complete(&self, path: &Path) -> Option<ModelFile> {
        if !path.is_file() || !Manifest::sidecar(path).is_file() {
            return None;
        }
        match ModelFile::open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(
                    "{}: not a usable part ({e}); fetching it again",
                    path.display()
                );
                None
            }
        }
    }

    /// The in-progress file and journal of the part at `path`.
    pub(super) fn in_progress(path: &Path) -> (PathBuf, PathBuf) {
        let with = |ext: &str| {
            let mut p = path.as_os_str().to_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        (with(".part"), with(".journal"))
    }

    /// Every file of every part kept, with its size and modification time.
    fn files(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        let Ok(models) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for m in models.flatten() {
            let Ok(parts) = std::fs::read_dir(m.path()) else {
                continue;
            };
            for p in parts.flatten() {
                if let Ok(meta) = p.metadata() {
                    if meta.is_file() {
                        let t = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                        out.push((p.path(), meta.len(), t));
                    }
                }
            }
        }
        out
    }

    /// Bytes all kept parts take.
    pub fn bytes_used(&self) -> u64 {
        self.files().iter().map(|f| f.1).sum()
    }

    /// Makes room for `needed` more bytes within the budget, removing the parts used
    /// longest ago first, never those of `keep` (the part being fetched, parts in use).
    pub fn make_room(&self, needed: u64, keep: &[PathBuf]) -> anyhow::Result<()> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        if needed > budget {
            bail!(
                "the part needs {} MiB but --cache-budget is {} MiB",
                needed >> 20,
                budget >> 20
            );
        }
        let kept = |p: &Path| {
            keep.iter().any(|k| {
                let (part, journal) = Self::in_progress(k);
                p == k || p == part || p == journal || p == Manifest::sidecar(k)
            })
        };
        let mut files = self.files();
        let in_use: u64 = files.iter().filter(|f| kept(&f.0)).map(|f| f.1).sum();
        if in_use + needed > budget {
            // Refused before anything is removed: removing could not make it fit.
            bail!(
                "--cache-budget {} MiB cannot hold this part ({} MiB) beside the parts in use ({} MiB)",
                budget >> 20,
                needed >> 20,
                in_use >> 20
            );
        }
        let mut used: u64 = files.iter().map(|f| f.1).sum();
        // Oldest first; a part's files go together.
        files.sort_by_key(|f| f.2);
        for (p, _, _) in files {
            if used + needed <= budget {
                break;
            }
            if kept(&p) {
                continue;
            }
            let base = base_of(&p);
            let freed = self.remove(&base);
            tracing::info!(
                "removed {} ({} MiB) to stay within --cache-budget",
                base.display(),
                freed >> 20
            );
            used = used.saturating_sub(freed);
        }
        if used + needed > budget {
            bail!(
                "--cache-budget {} MiB: {} MiB are taken by files that could not be removed",
                budget >> 20,
                used >> 20
            );
        }
        Ok(())
    }

    /// Removes the part at `path` and everything kept with it; the bytes freed.
    pub fn remove(&self, path: &Path) -> u64 {
        let (part, journal) = Self::in_progress(path);
        let mut freed = 0;
        for p in [path.to_path_buf(), Manifest::sidecar(path), part, journal] {
            if let Ok(meta) = std::fs::metadata(&p) {
                if std::fs::remove_file(&p).is_ok() {
                    freed += meta.len();
                }
            }
        }
        freed
    }

    /// Makes the directory of the part at `path`.
    pub(super) fn prepare(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().context("a part path without a directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
    }
}

/// The part a kept file belongs to (`x.gguf` for `x.gguf.part`, `.journal`, its
/// manifest).
fn base_of(p: &Path) -> PathBuf {
    let s = p.to_string_lossy();
    for ext in [".part", ".journal", ".shoal-manifest"] {
        if let Some(base) = s.strip_suffix(ext) {
            return PathBuf::from(base);
        }
    }
    p.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake part of `bytes` bytes (and a small manifest beside it), written `age`
    /// seconds ago.
    fn fake_part(store: &PartStore, label: &str, bytes: u64, age: u64) -> PathBuf {
        let path = store.path("m", label);
        store.prepare(&path).expect("dir");
        let f = std::fs::File::create(&path).expect("part");
        f.set_len(bytes).expect("len");
        let then = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
        f.set_modified(then).expect("time");
        std::fs::write(Manifest::sidecar(&path), b"manifest").expect("manifest");
        let m = std::fs::File::options()
            .write(true)
            .open(Manifest::sidecar(&path))
            .expect("manifest");
        m.set_modified(then).expect("time");
        path
    }

    #[test]
    fn the_budget_removes_the_oldest_parts_never_those_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PartStore::new(dir.path(), Some(1000));
        let old = fake_part(&store, "old", 400, 300);
        let kept = fake_part(&store, "kept", 400, 600);
        let new = fake_part(&store, "new", 100, 10);
        // 300 more bytes: the oldest part not kept goes, the rest stay.
        store
            .make_room(300, std::slice::from_ref(&kept))
            .expect("room");
        assert!(!old.exists() && !Manifest::sidecar(&old).exists());
        assert!(kept.exists() && new.exists());
        // More than the budget holds beside what is kept: refused, nothing removed.
        let e = store
            .make_room(700, std::slice::from_ref(&kept))
            .expect_err("a part larger than the budget allows was given room");
        assert!(e.to_string().contains("--cache-budget"), "{e}");
        assert!(kept.exists());
        let e = store
            .make_room(2000, &[])
            .expect_err("larger than the budget");
        assert!(e.to_string().contains("--cache-budget"), "{e}");
        // No budget: anything goes.
        PartStore::new(dir.path(), None)
            .make_room(u64::MAX, &[])
            .expect("no budget");
    }
}
