//! Where a server's span comes from: the whole model file, or a part fetched from the
//! swarm for each span it takes (a server that moves fetches the new span's tensors
//! and frees the old ones).

use std::sync::Arc;

use libp2p::PeerId;
use shard::manifest::Manifest;
use shard::ModelFile;

use super::fetch::{fetch_part, Source};
use super::share::Sharing;
use super::store::{span_tensors, PartStore};
use crate::net::Network;

/// The file a server's blocks load from.
pub enum SpanFiles {
    /// The whole model: every span loads from it.
    Whole(Arc<ModelFile>),
    /// Parts fetched from the swarm, one per span taken.
    Fetched {
        /// The part holding the current span.
        current: Arc<ModelFile>,
        /// The model's manifest.
        manifest: Arc<Manifest>,
        /// Where parts are kept.
        store: PartStore,
        /// What this node shares (its current part), if it shares.
        sharing: Option<Arc<Sharing>>,
    },
}

impl SpanFiles {
    /// The model file (whole, or the current part).
    pub fn file(&self) -> &Arc<ModelFile> {
        match self {
            SpanFiles::Whole(f) => f,
            SpanFiles::Fetched { current, .. } => current,
        }
    }

    /// A file holding blocks `start..end`: the whole model, or a part fetched now from
    /// the servers of the model (this node left out). Call [`SpanFiles::settle`] once
    /// the new span is loaded and serving.
    pub async fn for_span(
        &self,
        net: &Network,
        start: usize,
        end: usize,
    ) -> anyhow::Result<Arc<ModelFile>> {
        let (manifest, store) = match self {
            SpanFiles::Whole(f) => return Ok(f.clone()),
            SpanFiles::Fetched {
                manifest, store, ..
            } => (manifest, store),
        };
        let id = self.file().id().to_string();
        let me = net.peer_id();
        let sources: Vec<Source> = net
            .find_servers(&id)
            .await?
            .into_iter()
            .filter_map(|a| {
                let peer: PeerId = a.peer_id.parse().ok()?;
                (peer != me).then(|| Source {
                    peer,
                    addrs: a.addrs.iter().filter_map(|x| x.parse().ok()).collect(),
                })
            })
            .collect();
        let names = span_tensors(manifest, start, end);
        let label = format!("blocks-{start}-{end}");
        let fetched = fetch_part(net, manifest, &names, &sources, store, &label).await?;
        Ok(Arc::new(ModelFile::open(&fetched.path)?))
    }

    /// Takes `file` (from [`SpanFiles::for_span`]) as the current one: shared from now
    /// on, and the previous part removed from the cache.
    pub fn settle(&mut self, file: Arc<ModelFile>) {
        if let SpanFiles::Fetched {
            current,
            store,
            sharing,
            ..
        } = self
        {
            if current.path() == file.path() {
                return;
            }
            if let Some(s) = sharing {
                s.replace_file(file.clone());
            }
            let old = std::mem::replace(current, file);
            let freed = store.remove(old.path());
            tracing::info!("removed the previous span's part ({} MiB)", freed >> 20);
        }
    }
}
