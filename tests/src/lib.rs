//! Multi-node tests across Shoal's crates live in `tests/` of this package.
