//! `shoal inspect`: a model file's id, shape and memory per block.

use crate::args::InspectArgs;
use crate::model_cache::open_model;

/// `shoal inspect`: a model's id, shape and per-block memory.
pub async fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let file = open_model(&args.model)?;
    let cfg = file.config();
    let block_bytes = file.block_bytes(0);
    let info = serde_json::json!({
        "path": file.path(),
        "model_id": file.id(),
        "name": cfg.name,
        "blocks": cfg.n_layers,
        "hidden": cfg.hidden,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "context": cfg.max_seq_len,
        "block_bytes": block_bytes,
        "block_memory_estimate": crate::server::span::block_memory(&file, 0, 0),
        "kv_bytes_per_token_per_block": cfg.kv_bytes_per_token(1),
        "node_overhead_bytes": crate::server::span::node_overhead(&file),
        "params_total": file.params().0,
        "params_active": file.params().1,
    });
    if args.json {
        println!("{info}");
    } else {
        println!("{}", serde_json::to_string_pretty(&info)?);
    }
    Ok(())
}
