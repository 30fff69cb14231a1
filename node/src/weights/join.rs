//! Which model a node with no model file takes part in: the swarm's (the one its
//! servers announce, or the one `--model-id` names), from a file already here when
//! one has that id, else from the swarm.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;
use shard::manifest::Manifest;

use super::fetch::{fetch_manifest, Source};
use crate::net::Network;

/// A model the swarm serves, and the servers that announce it.
#[derive(Clone, Debug)]
pub struct SwarmModel {
    /// Its id (the hash of its manifest).
    pub id: String,
    /// Servers that announce it, each a possible source of its weights.
    pub sources: Vec<Source>,
}

/// How a node with no model file takes part in the swarm's model.
pub enum Joined {
    /// A file here is that model (the default model, cached): no fetching.
    Here(PathBuf),
    /// The model's weights come from the swarm.
    FromSwarm {
        /// The model and its sources.
        model: SwarmModel,
        /// Its manifest, checked against its id.
        manifest: Arc<Manifest>,
    },
}

/// The models the swarm's servers announce now (their records in the DHT; a record
/// past its expiry is left out).
pub async fn swarm_models(net: &Network) -> Vec<SwarmModel> {
    let peers = net.find_all_servers().await.unwrap_or_default();
    let records = futures::future::join_all(peers.iter().map(|p| net.server_record(*p))).await;
    let now = crate::net::unix_ms();
    let mut models: BTreeMap<String, Vec<Source>> = BTreeMap::new();
    for (peer, record) in peers.into_iter().zip(records) {
        let Ok(Some(a)) = record else { continue };
        if a.expires_unix_ms < now {
            continue;
        }
        let addrs = a.addrs.iter().filter_map(|x| x.parse().ok()).collect();
        models
            .entry(a.model_id.clone())
            .or_default()
            .push(Source { peer, addrs });
    }
    models
        .into_iter()
        .map(|(id, sources)| SwarmModel { id, sources })
        .collect()
}

/// The model a node with no `--model` joins: `model_id`, or the swarm's only model;
/// `None` when the swarm serves none (the caller falls back to the default model).
/// A file among `here` with the model's id is used as it is.
pub async fn join_model(
    net: &Network,
    model_id: Option<&str>,
    here: &[PathBuf],
) -> anyhow::Result<Option<Joined>> {
    let models = swarm_models(net).await;
    let names = || {
        models
            .iter()
            .map(|m| format!("{} ({} servers)", m.id, m.sources.len()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let model = match model_id {
        Some(id) => match models.iter().find(|m| m.id == id) {
            Some(m) => m.clone(),
            None if models.is_empty() => bail!("--model-id {id}: the swarm serves no model yet"),
            None => bail!("--model-id {id}: the swarm does not serve it; it serves {}", names()),
        },
        None => match models.as_slice() {
            [] => return Ok(None),
            [one] => one.clone(),
            _ => bail!(
                "the swarm serves several models: choose one with --model-id (or give --model FILE): {}",
                names()
            ),
        },
    };
    for path in here {
        if let Ok(f) = shard::ModelFile::open(path) {
            if f.id() == model.id {
                tracing::info!("model {} is here already: {}", model.id, path.display());
                return Ok(Some(Joined::Here(path.clone())));
            }
        }
    }
    let manifest = fetch_manifest(net, &model.sources, &model.id).await?;
    Ok(Some(Joined::FromSwarm { model, manifest }))
}

/// The model file of a client (`shoal generate`, `shoal api`): `--model`, or without it
/// the swarm's model through `net`: the default model when it is that model (or when
/// there is no swarm or it serves none), else the model's embeddings, final norm and LM
/// head fetched from the swarm (no block).
pub async fn client_model(
    model: &crate::args::ModelArg,
    from: &crate::args::FromSwarmArgs,
    net: Option<&Network>,
) -> anyhow::Result<shard::ModelFile> {
    let net = match net {
        Some(n) if model.model.is_none() => n,
        _ => return crate::model_cache::open_model(model),
    };
    match join_model(net, from.model_id.as_deref(), &here(from)).await? {
        None => crate::model_cache::open_model(model),
        Some(Joined::Here(path)) => Ok(shard::ModelFile::open(path)?),
        Some(Joined::FromSwarm { model, manifest }) => {
            let names = super::store::head_tensors(&manifest);
            let fetched = super::fetch::fetch_part(
                net,
                &manifest,
                &names,
                &model.sources,
                &store(from),
                "head",
            )
            .await?;
            Ok(shard::ModelFile::open(&fetched.path)?)
        }
    }
}

/// The cache directory the options name: --cache-dir, or the usual one.
fn cache_dir(from: &crate::args::FromSwarmArgs) -> PathBuf {
    from.cache_dir
        .clone()
        .unwrap_or_else(crate::model_cache::cache_dir)
}

/// The store of fetched parts the options describe.
pub fn store(from: &crate::args::FromSwarmArgs) -> super::PartStore {
    super::PartStore::new(&cache_dir(from), from.cache_budget)
}

/// Model files already here that may be the swarm's model: the default model, if it
/// is in the cache directory.
pub fn here(from: &crate::args::FromSwarmArgs) -> Vec<PathBuf> {
    crate::model_cache::cached_default_model(&cache_dir(from))
        .into_iter()
        .collect()
}
