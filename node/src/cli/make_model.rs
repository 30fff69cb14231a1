//! `shoal make-model`: random weights in a real model's shape, for tests and benchmarks.

use std::time::Instant;

use anyhow::{bail, Context};
use shard::ModelFile;

/// `shoal make-model`: random weights in a real model's shape.
pub fn make_model(args: crate::args::MakeModelArgs) -> anyhow::Result<()> {
    let names: Vec<&str> = shard::synth::SHAPES.iter().map(|s| s.name).collect();
    let shape = shard::synth::shape(&args.shape).with_context(|| {
        format!(
            "unknown shape `{}`: one of {}",
            args.shape,
            names.join(", ")
        )
    })?;
    if args.out.exists() && !args.force {
        bail!("{} exists; --force replaces it", args.out.display());
    }
    let format = match (&args.dtype, args.format) {
        (Some(d), _) => {
            shard::synth::SynthFormat::for_dtype(d, &args.out).map_err(anyhow::Error::msg)?
        }
        (None, Some(f)) => f,
        (None, None) => shard::synth::SynthFormat::Gguf(shard::synth::GgufWeights::Uniform(
            shard::candle_core::quantized::GgmlDType::Q4_0,
        )),
    };
    let donor_path = match &args.tokenizer_from {
        Some(p) => p.clone(),
        None => crate::model_cache::default_model()?,
    };
    let donor = ModelFile::open(&donor_path)?;
    let started = Instant::now();
    let blocks = args.blocks.unwrap_or(shape.blocks);
    eprintln!(
        "writing a random {} ({blocks} blocks, {:?}) to {}",
        shape.name,
        format,
        args.out.display()
    );
    shard::synth::write(
        &shape,
        args.blocks,
        format,
        &args.out,
        &donor,
        args.seed,
        |done, total| {
            if done == total || done % 8 == 0 {
                eprintln!("  {done}/{total} blocks");
            }
        },
    )?;
    let file = ModelFile::open(&args.out)
        .with_context(|| format!("the written model {} does not open", args.out.display()))?;
    println!(
        "wrote {} in {:.1}s: {} blocks of {} bytes each, model id {}",
        args.out.display(),
        started.elapsed().as_secs_f64(),
        file.config().n_layers,
        file.block_bytes(0),
        file.id()
    );
    Ok(())
}
