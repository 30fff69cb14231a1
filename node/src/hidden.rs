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
