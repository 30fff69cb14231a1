//! Hugging Face directories of f16 or bf16 safetensors (Llama shapes): one file per
//! block, so memory stays at one block's size.

use std::path::Path;

use half::{bf16, f16};

use super::{block_matrices, fill, value, Shape};
use crate::{ModelFile, Result, ShardError, TextCodec};

pub(super) fn write_safetensors(
    s: &Shape,
    vocab: usize,
    bf: bool,
    out: &Path,
    donor: &ModelFile,
    seed: u64,
    progress: &mut impl FnMut(usize, usize),
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let io = |source| ShardError::Open {
        path: out.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out).map_err(io)?;
    let dtype = if bf { Dtype::BF16 } else { Dtype::F16 };
    let matrix = |rows: usize, cols: usize, seed: u64| -> Vec<u8> {
        let std = 1.0 / (cols as f32).sqrt();
        if bf {
            fill(rows * cols, seed, |r| {
                bf16::from_f32(value(r, std)).to_le_bytes()
            })
            .concat()
        } else {
            fill(rows * cols, seed, |r| {
                f16::from_f32(value(r, std)).to_le_bytes()
            })
            .concat()
        }
    };
    let ones = |n: usize| -> Vec<u8> {
        let one = if bf {
            bf16::ONE.to_le_bytes()
        } else {
            f16::ONE.to_le_bytes()
        };
        one.repeat(n)
    };
    let save = |file: &str, tensors: Vec<(String, Vec<usize>, Vec<u8>)>| -> Result<()> {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, shape, bytes)| {
                TensorView::new(dtype, shape.clone(), bytes)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ShardError::BadInput(format!("{n}: {e}")))
            })
            .collect::<Result<_>>()?;
        safetensors::serialize_to_file(views, None, &out.join(file))
            .map_err(|e| ShardError::BadInput(format!("writing {file}: {e}")))
    };
    let hf = crate::hf_name;
    save(
        "model-embeddings.safetensors",
        vec![
            (
                hf("token_embd.weight"),
                vec![vocab, s.hidden],
                matrix(vocab, s.hidden, seed),
            ),
            (hf("output_norm.weight"), vec![s.hidden], ones(s.hidden)),
            (
                hf("output.weight"),
                vec![vocab, s.hidden],
                matrix(vocab, s.hidden, seed + 1),
            ),
        ],
    )?;
    for i in 0..s.blocks {
        let mut tensors = vec![
            (
                hf(&format!("blk.{i}.attn_norm.weight")),
                vec![s.hidden],
                ones(s.hidden),
            ),
            (
                hf(&format!("blk.{i}.ffn_norm.weight")),
                vec![s.hidden],
                ones(s.hidden),
            ),
        ];
        for (j, m) in block_matrices(s, i).into_iter().enumerate() {
            let values = matrix(m.rows, m.cols, seed + 100 * (i as u64 + 1) + j as u64);
            tensors.push((hf(&m.name), vec![m.rows, m.cols], values));
        }
        save(&format!("model-block-{i:04}.safetensors"), tensors)?;
        progress(i + 1, s.blocks);
    }
    let text = TextCodec::from_model(donor)?;
    let stop = text.stop_ids().first().copied().unwrap_or(0);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.blocks,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": vocab,
        "rope_theta": s.rope_theta,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": s.context,
        "tie_word_embeddings": false,
        "eos_token_id": stop,
        "torch_dtype": if bf { "bfloat16" } else { "float16" },
    });
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        std::fs::write(out.join(name), v.to_string()).map_err(io)
    };
    write_json("config.json", &config)?;
    write_json(
        "generation_config.json",
        &serde_json::json!({"eos_token_id": stop}),
    )?;
    std::fs::write(out.join("tokenizer.json"), text.tokenizer_json()?).map_err(io)?;
    Ok(())
}
