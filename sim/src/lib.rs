//! The discrete-event swarm simulator. Not built yet: it will run `coordinator`'s decisions
//! over thousands of simulated nodes (see the simulator issue). This crate exists now so the
//! workspace has its final shape and dependency direction (`sim -> coordinator, protocol`).
