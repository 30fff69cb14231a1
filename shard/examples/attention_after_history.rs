//! How long a prompt takes after a long cached history (a conversation's next turn),
//! and whether a prompt's outputs depend on how its tokens are grouped into steps.
//!
//! ```text
//! cargo run -p shoal-shard --example attention_after_history -- MODEL.gguf [HISTORY] [ROWS]
//! ```
//!
//! Runs the whole model's blocks on the CPU over hidden states of a fixed
//! pseudo-random sequence (attention's cost does not depend on the values):
//! 1. 120 rows sent whole, as 40 + 40 + 40, as 77 + 1 + 1 + 41, and one by one: prints
//!    the largest difference of each grouping's outputs from the whole (0 when the
//!    arithmetic does not depend on the grouping);
//! 2. `HISTORY` positions (default 1,052) prefilled, then `ROWS` rows (default 83) after
//!    them, best of 5: the time of that forward, and of the same rows with no history;
//!    and of one row (a decode step) after the history.

use std::time::Instant;

use shard::candle_core::{Device, Tensor};
use shard::{KvCache, ModelFile, Span};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: attention_after_history MODEL [HISTORY] [ROWS]")?;
    let history: usize = args.next().map_or(Ok(1052), |a| a.parse())?;
    let rows: usize = args.next().map_or(Ok(83), |a| a.parse())?;
    let file = ModelFile::open(&path)?;
    let cfg = file.config().clone();
    let span = Span::load(&file, 0, cfg.n_layers, &Device::Cpu, |_, _| {})?;
    let inputs = |n: usize, seed: u64| -> Result<Tensor, Box<dyn std::error::Error>> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values: Vec<f32> = (0..n * cfg.hidden)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Ok(Tensor::from_vec(values, (n, cfg.hidden), &Device::Cpu)?)
    };

    let prompt = inputs(120, 1)?;
    let run = |cuts: &[usize]| -> Result<Vec<f32>, Box<dyn std::error::Error>> {
        let mut cache = span.new_cache(4096);
        let mut out = Vec::new();
        for w in cuts.windows(2) {
            let x = prompt.narrow(0, w[0], w[1] - w[0])?;
            out.extend(
                span.forward(&x, &mut cache)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    };
    let whole = run(&[0, 120])?;
    let one_by_one: Vec<usize> = (0..=120).collect();
    for (name, cuts) in [
        ("40 + 40 + 40", vec![0, 40, 80, 120]),
        ("77 + 1 + 1 + 41", vec![0, 77, 78, 79, 120]),
        ("one by one", one_by_one),
    ] {
        let got = run(&cuts)?;
        let worst = whole
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("grouping {name}: largest difference from whole {worst}");
    }

    let time = |cache: &mut KvCache, x: &Tensor| -> Result<f64, Box<dyn std::error::Error>> {
        let held = cache.len();
        let mut best = f64::INFINITY;
        let tries = if x.dim(0)? == 1 { 30 } else { 5 };
        for _ in 0..tries {
            cache.truncate(held);
            let t = Instant::now();
            span.forward(x, cache)?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(best)
    };
    let x = inputs(rows, 2)?;
    let mut fresh = span.new_cache(history + rows + 1);
    let alone = time(&mut fresh, &x)?;
    let mut cache = span.new_cache(history + rows + 1);
    let past = inputs(history, 3)?;
    for at in (0..history).step_by(256) {
        span.forward(&past.narrow(0, at, 256.min(history - at))?, &mut cache)?;
    }
    let after = time(&mut cache, &x)?;
    println!(
        "{rows} rows through {} blocks: {alone:.1} ms alone, {after:.1} ms after {history} \
         positions (best of 5)",
        cfg.n_layers
    );
    let step = time(&mut cache, &inputs(1, 4)?)?;
    println!("one row (a decode step) after {history} positions: {step:.2} ms (best of 30)");
    Ok(())
}
