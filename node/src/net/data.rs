//! The data plane: one long-lived stream per pair of peers carrying steps, outputs and
//! failure reports as one-way frames, written by the sending task and read by a task
//! per stream, never through the event loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use protocol::Frame;
use tokio::sync::mpsc;

use super::handle::Command;
use super::InboundFrame;
use super::Network;

/// The outbound half of the data plane: one stream per peer, opened on first use and
/// kept. Frames are written from the sending task itself, not through the event loop.
///
/// One per-connection leak is left, in libp2p-stream 0.5.0-alpha itself: its `Shared`
/// keeps a channel sender for every connection it has seen (`senders` in its
/// `shared.rs` is never pruned), about 250 bytes each (heaptrack, server heap after 30
/// and 330 clients). A server's resident memory grew ~1.4 KB per fresh client over
/// 1,200 of them (`FRESH=1200 SAME=0 bench/soak.sh`), against ~85 KB before the stream
/// to each departed peer was dropped.
pub(super) struct DataStreams {
    /// Where inbound data-plane messages go straight from the task reading their stream
    /// (see [`Network::on_data`]); the inbound queue when unset.
    pub(super) sink: Arc<std::sync::RwLock<Option<DataSink>>>,
    /// Cloned for each stream opened: one shared control opens one stream at a time, and
    /// an open that hangs (a peer that died) must not hold up the others.
    pub(super) control: std::sync::Mutex<libp2p_stream::Control>,
    /// The stream to each peer. An entry lives from the first send to the peer until
    /// the peer's presence ends (the event loop calls [`DataStreams::forget`]: a stream
    /// holds its connection's state, ~85 KB for QUIC, so one kept per departed client
    /// was a server's steady leak) or until a send finds no way to open one.
    pub(super) open: std::sync::Mutex<HashMap<PeerId, DataSlot>>,
}

/// The stream to one peer, opened by whichever send needs it first; sends to a peer
/// take turns on it.
pub(super) type DataSlot = Arc<tokio::sync::Mutex<Option<libp2p::Stream>>>;

impl DataStreams {
    /// Drops the stream to `peer` (its presence ended: the connection it ran on is gone
    /// or going). A write under way finishes on it; the next send opens a new one.
    pub(super) fn forget(&self, peer: &PeerId) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
    }
}

/// Takes an inbound data-plane frame without blocking; false if its receiver is gone.
pub type DataSink = Arc<dyn Fn(InboundFrame) -> bool + Send + Sync>;

/// Longest wait to write one frame (a prefill chunk can be megabytes on a slow link).
pub(super) const DATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait to open a data stream, dialling included.
pub(super) const OPEN_DATA_TIMEOUT: Duration = Duration::from_secs(5);

impl Network {
    /// Sends a one-way message (a step, an output, a failure report) on the data plane:
    /// the stream to `peer`, opened on first use (dialling `addrs` if need be) and kept.
    /// Returns once the frame is written; nothing is answered. A broken stream is
    /// reopened once.
    pub async fn send(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        frame: Frame,
    ) -> anyhow::Result<()> {
        if let Some(shaping) = self.shaping {
            shaping.wait(frame.hidden_bytes()).await;
        }
        self.send_raw(peer, addrs, protocol::encode_frame(&frame)?)
            .await
    }

    /// Writes `frame` as it is to the data stream to `peer`: [`Network::send`] without
    /// the encoding, for tools and tests that probe how a peer takes malformed input.
    pub async fn send_raw(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        frame: Vec<u8>,
    ) -> anyhow::Result<()> {
        let slot = {
            let mut open = self.data.open.lock().unwrap_or_else(|p| p.into_inner());
            open.entry(peer).or_default().clone()
        };
        let mut stream = slot.lock().await;
        let mut last_error = None;
        for _ in 0..2 {
            if stream.is_none() {
                match self.open_data_stream(peer, &addrs).await {
                    Ok(s) => *stream = Some(s),
                    Err(e) => {
                        last_error = Some(e);
                        continue;
                    }
                }
            }
            let Some(s) = stream.as_mut() else { continue };
            let write = async {
                s.write_all(&frame).await?;
                s.flush().await
            };
            match tokio::time::timeout(DATA_TIMEOUT, write).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last_error = Some(anyhow!("writing to {peer}: {e}")),
                Err(_) => last_error = Some(anyhow!("writing to {peer}: timed out")),
            }
            *stream = None;
        }
        // No stream could be opened: the slot goes, or every failed send to peers that
        // left (a server reporting to a client that is gone) would leave one behind.
        drop(stream);
        let mut open = self.data.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.get(&peer).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            open.remove(&peer);
        }
        Err(last_error.unwrap_or_else(|| anyhow!("no data stream to {peer}")))
    }

    pub(super) async fn open_data_stream(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
    ) -> anyhow::Result<libp2p::Stream> {
        self.open_stream(peer, addrs, protocol::DATA_PROTOCOL).await
    }

    /// Opens a new stream of `protocol` to `peer` (dialling `addrs` if need be), for
    /// protocols of a stream per exchange (the weights protocol).
    pub async fn open_stream(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
        protocol: &'static str,
    ) -> anyhow::Result<libp2p::Stream> {
        if !addrs.is_empty() {
            let addrs = addrs.to_vec();
            self.call(|reply| Command::AddAddresses { peer, addrs, reply })
                .await?;
        }
        let mut control = self.stream_control();
        let open = control.open_stream(peer, StreamProtocol::new(protocol));
        match tokio::time::timeout(OPEN_DATA_TIMEOUT, open).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(anyhow!("cannot open a {protocol} stream to {peer}: {e}")),
            Err(_) => Err(anyhow!(
                "cannot open a {protocol} stream to {peer}: timed out"
            )),
        }
    }

    /// A handle of the stream behaviour of its own: one shared handle opens one stream
    /// at a time, and an open that hangs (a peer that died) must not hold up others.
    fn stream_control(&self) -> libp2p_stream::Control {
        self.data
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The streams of `protocol` other peers open to this node (one taker per protocol:
    /// a second call for the same one fails).
    pub fn accept_streams(
        &self,
        protocol: &'static str,
    ) -> anyhow::Result<libp2p_stream::IncomingStreams> {
        let mut control = self.stream_control();
        control
            .accept(StreamProtocol::new(protocol))
            .map_err(|e| anyhow!("cannot take {protocol} streams: {e}"))
    }

    /// Hands every inbound data-plane frame (steps, outputs, failure reports) to `sink`,
    /// called on the task that read it: no task hop between the stream and the receiver.
    /// The sink must not block. Frames that arrive before a sink is set are dropped
    /// (nothing can be due then: a frame belongs to a session, opened on the control
    /// plane, and servers and clients set their sink before they take any).
    pub fn on_data(&self, sink: DataSink) {
        *self.data.sink.write().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }
}

/// Accepts the data-plane streams other peers open to this node, and reads each in a
/// task of its own: frames go straight to the data sink, never through the event loop.
/// A frame that does not decode (a control request is not a frame either) ends that
/// stream and is a strike against its sender (an honest one reopens a stream).
pub(super) async fn accept_data_streams(
    mut incoming: libp2p_stream::IncomingStreams,
    sink: Arc<std::sync::RwLock<Option<DataSink>>>,
    report: mpsc::WeakSender<Command>,
) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let sink = sink.clone();
        let report = report.clone();
        tokio::spawn(async move {
            let misbehaved = |reason: String| async move {
                if let Some(cmd) = report.upgrade() {
                    let _ = cmd.send(Command::Misbehaved { peer, reason }).await;
                }
            };
            loop {
                let frame: Frame = match crate::net::codec::read_frame(&mut stream).await {
                    Ok(r) => r,
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            misbehaved(format!("undecodable frame on the data plane: {e}")).await;
                        } else if e.kind() != std::io::ErrorKind::UnexpectedEof {
                            tracing::debug!(%peer, "data stream closed: {e}");
                        }
                        return;
                    }
                };
                let direct = sink.read().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(sink) = direct else {
                    tracing::debug!(%peer, "a data frame before anyone takes them: dropped");
                    continue;
                };
                if !sink(InboundFrame { peer, frame }) {
                    return;
                }
            }
        });
    }
}
