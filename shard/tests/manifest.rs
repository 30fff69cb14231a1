//! Manifests and parts of models: an id names exactly one set of bytes, every chunk is
//! checked, and a file of part of a model holds its tensors and nothing else.

use std::os::unix::fs::FileExt;

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use shard::manifest::{Manifest, ManifestError};
use shard::{ModelFile, Span};

mod common;
use common::*;

/// The tiny model, written in a fresh directory, with its manifest computed.
fn tiny() -> Result<(tempfile::TempDir, std::path::PathBuf, Manifest)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, GgmlDType::Q8_0, false)?;
    let m = Manifest::for_file(&path)?;
    Ok((dir, path, m))
}

#[test]
fn an_id_names_the_manifest_and_the_manifest_every_byte() -> Result<()> {
    let (_dir, path, m) = tiny()?;
    let id = m.id()?;
    // The file's id is its manifest's, and the manifest kept beside it is reused.
    assert!(Manifest::sidecar(&path).is_file());
    assert_eq!(ModelFile::open(&path)?.id(), id);
    assert_eq!(Manifest::for_file(&path)?, m);
    let bytes = m.encode();
    assert_eq!(Manifest::decode_for(&bytes, &id)?, m);
    // Another id, a changed hash, cut bytes: refused, each with its reason.
    assert!(matches!(
        Manifest::decode_for(&bytes, "tiny-4x64-00000000000000000000000000000000"),
        Err(ManifestError::WrongId { .. })
    ));
    let mut changed = bytes.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    let e = Manifest::decode_for(&changed, &id).expect_err("a changed hash passed");
    assert!(matches!(e, ManifestError::WrongId { .. }), "{e}");
    let e = Manifest::decode(&bytes[..bytes.len() / 2]).expect_err("half a manifest passed");
    assert!(matches!(e, ManifestError::Invalid(_)), "{e}");
    // A file that changes gets a new manifest and id (the kept one no longer matches).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
    let name = "blk.0.attn_q.weight";
    let file = ModelFile::open(&path)?;
    let at = {
        let whole = std::fs::read(&path)?;
        let t = file.tensor_bytes(name).expect("held");
        whole
            .windows(t.len())
            .position(|w| w == t)
            .expect("the tensor's bytes are in the file") as u64
    };
    f.write_all_at(&[0x42], at + 7)?;
    drop((f, file));
    let changed = Manifest::for_file(&path)?;
    assert_ne!(changed.id()?, id);
    Ok(())
}

#[test]
fn chunks_of_the_wrong_size_or_bytes_are_refused() -> Result<()> {
    let (_dir, path, m) = tiny()?;
    let file = ModelFile::open(&path)?;
    let name = "blk.1.ffn_down.weight";
    let good = file.tensor_bytes(name).expect("held").to_vec();
    m.check_chunk(name, 0, &good)?;
    let e = m
        .check_chunk(name, 0, &good[1..])
        .expect_err("a short chunk passed");
    assert!(matches!(e, ManifestError::WrongSize { .. }), "{e}");
    assert!(e.to_string().contains("bytes, not"), "{e}");
    let mut bad = good.clone();
    bad[3] ^= 0x10;
    let e = m
        .check_chunk(name, 0, &bad)
        .expect_err("a changed chunk passed");
    assert!(matches!(e, ManifestError::WrongHash { .. }), "{e}");
    for (tensor, index) in [(name, 1), ("blk.9.ffn_down.weight", 0)] {
        let e = m
            .check_chunk(tensor, index, &good)
            .expect_err("a chunk that does not exist passed");
        assert!(matches!(e, ManifestError::NoSuchChunk { .. }), "{e}");
    }
    Ok(())
}

#[test]
fn a_part_holds_its_tensors_and_computes_as_the_whole() -> Result<()> {
    let (dir, path, m) = tiny()?;
    let whole = ModelFile::open(&path)?;
    let names: Vec<String> = m
        .tensors()
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| n.starts_with("blk.2.") || n.starts_with("blk.3."))
        .collect();
    let layout = m.part_layout(&names)?;
    let part = dir.path().join("part.gguf");
    let f = std::fs::File::create(&part)?;
    f.set_len(layout.len)?;
    f.write_all_at(&layout.header, 0)?;
    for n in &names {
        f.write_all_at(whole.tensor_bytes(n).expect("held"), layout.offsets[n])?;
    }
    drop(f);
    // Without the model's manifest beside it, a part is refused with the reason.
    let Err(e) = ModelFile::open(&part) else {
        panic!("a part without its manifest opened");
    };
    assert!(e.to_string().contains("manifest"), "{e}");
    m.keep_beside(&part)?;
    // Kept beside a part, the manifest leaves out the metadata the part holds.
    let kept = |p: &std::path::Path| std::fs::metadata(Manifest::sidecar(p)).map(|m| m.len());
    assert!(kept(&part)? < kept(&path)?);
    let p = ModelFile::open(&part)?;
    assert_eq!(p.id(), whole.id());
    assert_eq!(p.config().n_layers, LAYERS);
    assert_eq!(p.block_bytes(0), whole.block_bytes(0));
    let mut held = p.held_tensors();
    held.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(held, want);
    // A block it does not hold: a clear error, not a panic.
    let Err(e) = Span::load(&p, 0, 1, &Device::Cpu, |_, _| {}) else {
        panic!("a block outside the part loaded");
    };
    assert!(e.to_string().contains("holds part of the model"), "{e}");
    // Its blocks compute what the whole file's do.
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (5, HIDDEN), &dev)?;
    let ours = Span::load(&p, 2, 4, &dev, |_, _| {})?;
    let theirs = Span::load(&whole, 2, 4, &dev, |_, _| {})?;
    let a = ours.forward(&x, &mut ours.new_cache(16))?;
    let b = theirs.forward(&x, &mut theirs.new_cache(16))?;
    assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
    Ok(())
}
