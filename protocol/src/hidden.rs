//! Hidden states on the wire: `{dtype, shape, bytes}`, little-endian.

use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// Element type of hidden states on the wire. The client chooses it per session: f32
/// (the default) makes a swarm compute exactly what one process computes; f16 and bf16
/// halve the traffic at the cost of rounding between spans.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WireDType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl WireDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::Bf16 => 2,
        }
    }
}

impl std::str::FromStr for WireDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WireDType::F32),
            "f16" => Ok(WireDType::F16),
            "bf16" => Ok(WireDType::Bf16),
            other => Err(format!(
                "unknown wire dtype {other:?}: use f32, f16 or bf16"
            )),
        }
    }
}

/// A tensor of hidden states, `shape` = `[tokens, hidden]` for one sequence.
///
/// The invariant `bytes.len() == product(shape) * dtype.size()` is checked by
/// [`HiddenState::validate`], which servers call before touching the bytes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HiddenState {
    /// Element type of `bytes`.
    pub dtype: WireDType,
    /// Dimensions, outermost first.
    pub shape: Vec<u32>,
    /// Little-endian elements, row-major. Encoded as one byte string (a length and a
    /// copy), not element by element as serde would a plain `Vec<u8>`.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl HiddenState {
    /// Encodes `values` (row-major, `shape`) as `dtype`.
    pub fn from_f32(values: &[f32], shape: Vec<u32>, dtype: WireDType) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        match dtype {
            WireDType::F32 => {
                for v in values {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            WireDType::F16 => {
                for v in values {
                    bytes.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
            WireDType::Bf16 => {
                for v in values {
                    bytes.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
                }
            }
        }
        HiddenState {
            dtype,
            shape,
            bytes,
        }
    }

    /// Number of elements the shape describes, or an error if it overflows.
    pub fn elem_count(&self) -> Result<usize, ProtocolError> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d as usize))
            .ok_or(ProtocolError::BadHiddenState {
                reason: format!("shape {:?} overflows", self.shape),
            })
    }

    /// Checks that the byte length matches the shape and dtype.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let want = self
            .elem_count()?
            .checked_mul(self.dtype.size())
            .ok_or_else(|| ProtocolError::BadHiddenState {
                reason: "byte length overflows".into(),
            })?;
        if want != self.bytes.len() {
            return Err(ProtocolError::BadHiddenState {
                reason: format!(
                    "shape {:?} of {:?} needs {want} bytes, frame carries {}",
                    self.shape,
                    self.dtype,
                    self.bytes.len()
                ),
            });
        }
        Ok(())
    }

    /// Decodes the elements to f32, after [`validate`](Self::validate).
    pub fn to_f32(&self) -> Result<Vec<f32>, ProtocolError> {
        self.validate()?;
        let out = match self.dtype {
            WireDType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            WireDType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            WireDType::Bf16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_each_dtype() {
        let v = [0.0f32, 1.5, -2.25, 1024.0, -0.125, 3.0];
        for dt in [WireDType::F32, WireDType::F16, WireDType::Bf16] {
            let h = HiddenState::from_f32(&v, vec![2, 3], dt);
            assert_eq!(h.bytes.len(), 6 * dt.size());
            assert_eq!(h.to_f32().expect("valid"), v, "{dt:?}");
        }
    }

    #[test]
    fn rejects_mismatched_lengths_and_overflow() {
        let mut h = HiddenState::from_f32(&[1.0, 2.0], vec![2], WireDType::F32);
        h.bytes.pop();
        assert!(h.to_f32().is_err());
        let h = HiddenState {
            dtype: WireDType::F32,
            shape: vec![u32::MAX, u32::MAX, u32::MAX],
            bytes: vec![],
        };
        assert!(h.validate().is_err());
    }
}
