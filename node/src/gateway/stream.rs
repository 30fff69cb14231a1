//! A generation answered as server-sent events, for every API the gateway speaks.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};

use super::board::Tracker;
use super::openai::{generate, ApiError};
use super::ApiState;
use crate::generation::{GenerateRequest, Generation, Trip, TripWatch};

/// Makes an event of a generation's route, sent when the route is chosen and after
/// each failover.
pub(super) type TripEvent = Box<dyn Fn(&Trip) -> Event + Send + Sync>;

/// Runs `req` in a task of its own and answers with its events: `first`, then
/// `piece(text)` for each piece of text as soon as it is decoded (and `trip(route)`
/// whenever the route is chosen or changes, if given), then what `end` makes of the
/// result. A client that hangs up cancels the generation (dropping it closes its
/// sessions on the servers: RemoteSession's Drop).
#[allow(clippy::too_many_arguments)]
pub(super) fn events(
    state: Arc<ApiState>,
    mut req: GenerateRequest,
    tracker: Tracker,
    first: Vec<Event>,
    piece: impl Fn(&str) -> Event + Send + 'static,
    trip: Option<TripEvent>,
    end: impl FnOnce(&ApiState, Result<(Generation, Trip), ApiError>) -> Vec<Event> + Send + 'static,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    for e in first {
        let _ = tx.send(e);
    }
    if let Some(trip) = trip {
        let trip_tx = tx.clone();
        req.watch = Some(TripWatch(Arc::new(move |t: &Trip| {
            let _ = trip_tx.send(trip(t));
        })));
    }
    tokio::spawn(async move {
        let piece_tx = tx.clone();
        let generation = generate(&state, &req, move |text| {
            let _ = piece_tx.send(piece(text));
        });
        let result = tokio::select! {
            r = generation => r,
            () = tx.closed() => return,
        };
        tracker.finish(&result);
        for e in end(&state, result) {
            let _ = tx.send(e);
        }
    });
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events).into_response()
}
