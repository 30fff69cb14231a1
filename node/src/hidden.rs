//! Conversions between candle tensors and the protocol's hidden states.

use anyhow::{bail, Context};
use protocol::{HiddenState, WireDType};
use shard::candle_core::{Device, Tensor};

/// Encodes a `[tokens, hidden]` tensor for the wire.
pub fn to_wire(t: &Tensor, dtype: WireDType) -> anyhow::Result<HiddenState> {
    let (tokens, hidden) = t.dims2().context("hidden states must be 2-D")?;
    let values = t
        .to_dtype(shard::candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(HiddenState::from_f32(
        &values,
        vec![tokens as u32, hidden as u32],
        dtype,
    ))
}

/// Decodes hidden states from the wire, checking they are `[tokens >= 1, hidden]`.
pub fn from_wire(h: &HiddenState, hidden: usize, device: &Device) -> anyhow::Result<Tensor> {
    let [tokens, width] = h.shape[..] else {
        bail!(
            "hidden states of shape {:?}, expected [tokens, {hidden}]",
            h.shape
        );
    };
    if width as usize != hidden || tokens == 0 {
        bail!(
            "hidden states of shape {:?}, expected [tokens >= 1, {hidden}]",
            h.shape
        );
    }
    let values = h.to_f32()?;
    Ok(Tensor::from_vec(values, (tokens as usize, hidden), device)?)
}

/// Bytes of one row (one token) of `h`.
fn row_bytes(h: &HiddenState) -> usize {
    h.shape.get(1).copied().unwrap_or(0) as usize * h.dtype.size()
}

/// Rows `from..to` of a `[tokens, hidden]` state.
pub fn rows(h: &HiddenState, from: usize, to: usize) -> HiddenState {
    let rb = row_bytes(h);
    HiddenState {
        dtype: h.dtype,
        shape: vec![(to - from) as u32, h.shape.get(1).copied().unwrap_or(0)],
        bytes: h.bytes[from * rb..to * rb].to_vec(),
    }
}

/// Stacks `[tokens, hidden]` states of one dtype and width along the token axis.
pub fn concat(parts: &[HiddenState]) -> anyhow::Result<HiddenState> {
    let first = parts.first().context("nothing to concatenate")?;
    let mut out = HiddenState {
        dtype: first.dtype,
        shape: vec![0, first.shape.get(1).copied().unwrap_or(0)],
        bytes: Vec::with_capacity(parts.iter().map(|p| p.bytes.len()).sum()),
    };
    for p in parts {
        if p.dtype != out.dtype || p.shape.get(1) != out.shape.get(1) {
            bail!("cannot stack hidden states of different types or widths");
        }
        out.shape[0] += p.shape.first().copied().unwrap_or(0);
        out.bytes.extend_from_slice(&p.bytes);
    }
    Ok(out)
}

/// RMS of `a - b` relative to the RMS of `b` (same lengths): how far a server's output
/// is from a reference. NaN anywhere gives NaN.
pub fn relative_rms(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        diff += (*x as f64 - *y as f64).powi(2);
        norm += (*y as f64).powi(2);
    }
    (diff / norm.max(1e-30)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_concat_are_inverse() {
        let v: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let h = HiddenState::from_f32(&v, vec![4, 3], WireDType::F32);
        let parts = [rows(&h, 0, 1), rows(&h, 1, 3), rows(&h, 3, 4)];
        assert_eq!(
            parts[1].to_f32().expect("valid"),
            vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
        );
        assert_eq!(concat(&parts).expect("same shapes"), h);
    }
}
