//! Which model a node with no model file takes part in: the swarm's (the one its
//! servers announce, or the one `--model-id` names), from a file already here when
//! one has that id, else from the swarm.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use libp2p::PeerId;
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

/// The models the swarm's servers announce now.
pub async fn swarm_models(net: &Network) -> Vec<SwarmModel> {
    let seen = crate::client::survey::survey(net, None, Duration::from_secs(5)).await;
    let mut models: BTreeMap<String, Vec<Source>> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.answering()) {
        let a = &s.announcement;
        let Ok(peer) = a.peer_id.parse::<PeerId>() else {
            continue;
        };
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
    match join_model(net, from.model_id.as_deref(), &from.here()).await? {
        None => crate::model_cache::open_model(model),
        Some(Joined::Here(path)) => Ok(shard::ModelFile::open(path)?),
        Some(Joined::FromSwarm { model, manifest }) => {
            let names = super::store::head_tensors(&manifest);
            let fetched = super::fetch::fetch_part(
                net,
                &manifest,
                &names,
                &model.sources,
                &from.store(),
                "head",
            )
            .await?;
            Ok(shard::ModelFile::open(&fetched.path)?)
        }
    }
}
