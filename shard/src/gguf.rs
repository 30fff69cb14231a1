//! The GGUF container: its header read by this crate, so that files holding tensor
//! types candle cannot read (gpt-oss's MXFP4 experts, the IQ4_NL and IQ4_XS tensors of
//! many Q4_K_M downloads) open, and a type nothing here runs is named before anything
//! loads.
//!
//! Layout (ggml's `docs/gguf.md`): magic `GGUF`, version (2 or 3), tensor and metadata
//! counts (u64), the metadata key/values, the tensor table (name, dims innermost first,
//! ggml type, offset), then the tensor data from the next multiple of
//! `general.alignment` (32 by default).
//!
//! Types candle runs are handed to it as they are. MXFP4, IQ4_NL and IQ4_XS are
//! *widened* at load into Q8_0, whose blocks hold the same integers: a block of 32
//! 4-bit indices into a table of small integers and one scale becomes 32 signed bytes
//! (the table's values) and an f16 scale. The products our Q8_0 kernels then compute are
//! the integer products llama.cpp computes for these types (it also multiplies them
//! with 8-bit activations), exactly for MXFP4 (power-of-two scales) and IQ4_NL (f16
//! scales), and to within f16 rounding of each 32-value sub-block's scale for IQ4_XS.
//! The price is memory: 8.5 bits a weight where the file has 4.25 to 4.5. So on the CPU
//! they are not widened but rewritten as 32-value blocks of nibbles and an f16 scale
//! ([`to_table4`]), 4.5 bits a weight, whose kernel looks the nibbles up in the type's
//! table and then multiplies exactly as the widened Q8_0 would: the same numbers.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use half::f16;

/// How a tensor is stored in the file and how it loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TensorType {
    /// A type candle reads.
    Candle(GgmlDType),
    /// A type widened to Q8_0 at load (see the module's docs).
    Widened(Widened),
}

/// The 4-bit table types this crate widens to Q8_0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Widened {
    /// OCP microscaling FP4: per 32 values a power-of-two scale (E8M0) and 4-bit
    /// indices into the E2M1 values (doubled to integers).
    Mxfp4,
    /// Per 32 values an f16 scale and 4-bit indices into a non-linear table.
    Iq4Nl,
    /// IQ4_NL's table in super-blocks of 256: an f16 scale and a 6-bit scale per 32.
    Iq4Xs,
}

/// The E2M1 values of MXFP4, doubled (so integers), as ggml's `kvalues_mxfp4`.
pub(crate) const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
/// IQ4_NL's table (ggml's `kvalues_iq4nl`).
pub(crate) const IQ4NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl From<GgmlDType> for TensorType {
    fn from(t: GgmlDType) -> Self {
        TensorType::Candle(t)
    }
}

impl TensorType {
    /// The type of ggml type id `id`, or its name when nothing here loads it.
    fn from_id(id: u32) -> Result<Self, &'static str> {
        use GgmlDType as G;
        Ok(match id {
            0 => Self::Candle(G::F32),
            1 => Self::Candle(G::F16),
            2 => Self::Candle(G::Q4_0),
            3 => Self::Candle(G::Q4_1),
            6 => Self::Candle(G::Q5_0),
            7 => Self::Candle(G::Q5_1),
            8 => Self::Candle(G::Q8_0),
            9 => Self::Candle(G::Q8_1),
            10 => Self::Candle(G::Q2K),
            11 => Self::Candle(G::Q3K),
            12 => Self::Candle(G::Q4K),
            13 => Self::Candle(G::Q5K),
            14 => Self::Candle(G::Q6K),
            15 => Self::Candle(G::Q8K),
            20 => Self::Widened(Widened::Iq4Nl),
            23 => Self::Widened(Widened::Iq4Xs),
            30 => Self::Candle(G::BF16),
            39 => Self::Widened(Widened::Mxfp4),
            other => return Err(ggml_type_name(other)),
        })
    }

    /// Values per block and bytes per block in the file.
    pub(crate) fn stored_block(self) -> (usize, usize) {
        match self {
            Self::Candle(d) => (d.block_size(), d.type_size()),
            Self::Widened(Widened::Mxfp4) => (32, 17),
            Self::Widened(Widened::Iq4Nl) => (32, 18),
            Self::Widened(Widened::Iq4Xs) => (256, 136),
        }
    }

    /// Bytes `elems` values take in the file.
    pub(crate) fn stored_bytes(self, elems: usize) -> usize {
        let (block, size) = self.stored_block();
        elems / block * size
    }

    /// Bytes `elems` values take once loaded (widened types as Q8_0, as a GPU holds
    /// them; the CPU holds them in 4.5 bits, so a CPU server's budget over-counts them).
    pub(crate) fn loaded_bytes(self, elems: usize) -> usize {
        match self {
            Self::Candle(d) => elems / d.block_size() * d.type_size(),
            Self::Widened(_) => elems / 32 * 34,
        }
    }

    /// A short name, for model ids and messages.
    pub(crate) fn name(self) -> String {
        match self {
            Self::Candle(d) => format!("{d:?}"),
            Self::Widened(Widened::Mxfp4) => "MXFP4".into(),
            Self::Widened(Widened::Iq4Nl) => "IQ4_NL".into(),
            Self::Widened(Widened::Iq4Xs) => "IQ4_XS".into(),
        }
    }
}

/// The ggml type id of a candle type (the inverse of [`TensorType::from_id`]'s table).
pub(crate) fn ggml_type_id(ty: TensorType) -> Option<u32> {
    (0..64).find(|&id| TensorType::from_id(id) == Ok(ty))
}

/// The name of ggml tensor type `id` (ggml.h's `ggml_type`).
pub(crate) fn ggml_type_name(id: u32) -> &'static str {
    match id {
        4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        21 => "IQ3_S",
        22 => "IQ2_S",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        _ => "unknown",
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub(crate) struct TensorEntry {
    /// Dimensions, outermost first (candle's order: `[rows, cols]`).
    pub dims: Vec<usize>,
    pub ty: TensorType,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
}

impl TensorEntry {
    pub(crate) fn elems(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A GGUF file's header.
#[derive(Debug)]
pub(crate) struct Gguf {
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorEntry>,
    /// Where the data section starts in the file.
    pub data_offset: u64,
    /// The format version (2 or 3).
    pub version: u32,
    /// Where the metadata key/values lie in the header, and how many there are: copied
    /// as they are into a file of some of the tensors ([`Gguf::subset_header`]).
    pub kv: (std::ops::Range<usize>, u64),
    /// Where the tensor table lies in the header.
    pub table_bytes: std::ops::Range<usize>,
    /// `general.alignment`: tensor data starts at multiples of it.
    pub alignment: u64,
}

/// The metadata key a file of some of a model's tensors carries: the whole model's id
/// (a span downloaded from the swarm names the model it is part of).
pub(crate) const PART_OF_KEY: &str = "shoal.part_of";

/// The metadata entry a part of a model carries last: [`PART_OF_KEY`] = `id`.
pub(crate) fn part_of_entry(id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for s in [PART_OF_KEY, id] {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        if s == PART_OF_KEY {
            out.extend_from_slice(&8u32.to_le_bytes()); // a string
        }
    }
    out
}

/// The header of the whole model a part was cut from, rebuilt from the part's header
/// (whose metadata is the model's, byte for byte, then [`part_of_entry`]) and the
/// model's tensor table: `None` if the part's metadata does not end that way.
pub(crate) fn whole_header(
    part_header: &[u8],
    part: &Gguf,
    part_of: &str,
    n_tensors: u64,
    table: &[u8],
    header_len: u64,
) -> Option<Vec<u8>> {
    let (range, n_kv) = &part.kv;
    let kv = part_header.get(range.clone())?;
    let ours = part_of_entry(part_of);
    let theirs = kv.strip_suffix(ours.as_slice())?;
    let mut out = Vec::with_capacity(header_len as usize);
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&part.version.to_le_bytes());
    out.extend_from_slice(&n_tensors.to_le_bytes());
    out.extend_from_slice(&(n_kv.checked_sub(1)?).to_le_bytes());
    out.extend_from_slice(theirs);
    out.extend_from_slice(table);
    if out.len() as u64 > header_len {
        return None;
    }
    out.resize(header_len as usize, 0);
    Some(out)
}

/// Where things go in a file of some of a model's tensors ([`Gguf::subset_header`]).
#[derive(Debug, Clone)]
pub(crate) struct SubsetLayout {
    /// The file's first bytes, up to its tensor data.
    pub header: Vec<u8>,
    /// Where each tensor's data starts in the file.
    pub offsets: HashMap<String, u64>,
    /// The file's length.
    pub len: u64,
}

/// A little-endian reader over the file's bytes that reports where it ran out.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "the header ends early (at byte {} of {}): a truncated or damaged file",
                self.at,
                self.bytes.len()
            ));
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count, bounded by what the rest of the file could hold (so a damaged header
    /// cannot ask for a huge allocation).
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            return Err(format!(
                "the header ends early (a list of {n} entries at byte {} of {}): a truncated or damaged file",
                self.at,
                self.bytes.len()
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.count(1)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "a string that is not UTF-8".to_string())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 if depth < 4 => {
                let item = self.u32()?;
                let n = self.count(1)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("a metadata value of unknown type {other}")),
        })
    }
}

impl Gguf {
    /// Reads the header of the GGUF file whose bytes are `bytes`, and checks that every
    /// tensor is of a type this crate loads and lies inside the file.
    pub(crate) fn read(bytes: &[u8]) -> Result<Gguf, String> {
        let gguf = Self::read_header(bytes)?;
        // Every tensor inside the file: a truncated download is reported now, not
        // halfway through loading a span.
        for (name, t) in &gguf.tensors {
            let end = gguf
                .data_offset
                .saturating_add(t.offset)
                .saturating_add(t.ty.stored_bytes(t.elems()) as u64);
            if end > bytes.len() as u64 {
                return Err(format!(
                    "tensor {name} ends at byte {end} but the file has {} bytes (truncated download?)",
                    bytes.len()
                ));
            }
        }
        Ok(gguf)
    }

    /// Reads a GGUF header (`bytes` may end anywhere after it: a manifest holds the
    /// header alone) and checks every tensor's type, not where its data lies.
    pub(crate) fn read_header(bytes: &[u8]) -> Result<Gguf, String> {
        let mut r = Reader { bytes, at: 0 };
        let magic = r
            .array::<4>()
            .map_err(|_| "not a GGUF file (too short)".to_string())?;
        if &magic != b"GGUF" {
            return Err("not a GGUF file (it does not start with GGUF)".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version}; this version reads 2 and 3"
            ));
        }
        let n_tensors = r.count(24)?;
        let n_kv = r.count(12)?;
        let kv_start = r.at;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).map_err(|e| format!("metadata {key}: {e}"))?;
            metadata.insert(key, value);
        }
        let kv = (kv_start..r.at, n_kv as u64);
        let table_start = r.at;
        let mut tensors = HashMap::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 4 {
                return Err(format!("tensor {name} has {n_dims} dimensions"));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64()? as usize);
            }
            // GGUF lists the innermost dimension first.
            dims.reverse();
            let id = r.u32()?;
            let ty = TensorType::from_id(id).map_err(|type_name| {
                format!(
                    "tensor {name} is of type {type_name} (ggml type {id}), which this version cannot load (it loads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K, IQ4_NL, IQ4_XS and MXFP4)"
                )
            })?;
            let offset = r.u64()?;
            let entry = TensorEntry { dims, ty, offset };
            let (block, _) = ty.stored_block();
            if entry.dims.last().is_some_and(|&c| c % block != 0) {
                return Err(format!(
                    "tensor {name} has rows of {:?} values, not whole {} blocks",
                    entry.dims.last(),
                    ty.name()
                ));
            }
            tensors.insert(name, entry);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(Value::U32(a)) if *a > 0 => *a as usize,
            Some(Value::U64(a)) if *a > 0 => *a as usize,
            _ => 32,
        };
        let table_bytes = table_start..r.at;
        let data_offset = r.at.div_ceil(alignment) * alignment;
        Ok(Gguf {
            metadata,
            tensors,
            data_offset: data_offset as u64,
            version,
            kv,
            table_bytes,
            alignment: alignment as u64,
        })
    }

    /// The layout of a GGUF file holding only the tensors `names` of this header's model
    /// (`header`: the bytes this was read from): its header (this one's version and
    /// metadata, byte for byte, plus [`PART_OF_KEY`] = `part_of`, and a table of those
    /// tensors), padded to the alignment, and where each tensor's data then goes, from
    /// the start of the file. Unknown names are an error.
    pub(crate) fn subset_header(
        &self,
        header: &[u8],
        names: &[String],
        part_of: &str,
    ) -> Result<SubsetLayout, String> {
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        let (range, n_kv) = &self.kv;
        let Some(kv_bytes) = header.get(range.clone()) else {
            return Err("the header is shorter than its own metadata".into());
        };
        let mut out = Vec::with_capacity(kv_bytes.len() + 64 * names.len() + 256);
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(names.len() as u64).to_le_bytes());
        out.extend_from_slice(&(n_kv + 1).to_le_bytes());
        out.extend_from_slice(kv_bytes);
        out.extend_from_slice(&part_of_entry(part_of));
        let align = self.alignment;
        let mut at = 0u64;
        let mut relative = Vec::with_capacity(names.len());
        for name in names {
            let Some(t) = self.tensors.get(name) else {
                return Err(format!("no tensor {name} in the model"));
            };
            let Some(id) = ggml_type_id(t.ty) else {
                return Err(format!("tensor {name}: a type with no ggml id"));
            };
            put_str(&mut out, name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in t.dims.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&at.to_le_bytes());
            relative.push((name.clone(), at));
            at = (at + t.ty.stored_bytes(t.elems()) as u64).div_ceil(align) * align;
        }
        let data_offset = (out.len() as u64).div_ceil(align) * align;
        out.resize(data_offset as usize, 0);
        Ok(SubsetLayout {
            header: out,
            offsets: relative
                .into_iter()
                .map(|(n, o)| (n, data_offset + o))
                .collect(),
            len: data_offset + at,
        })
    }

    /// The stored bytes of tensor `t`.
    pub(crate) fn data<'a>(&self, file: &'a [u8], t: &TensorEntry) -> &'a [u8] {
        let start = self.data_offset as usize + t.offset as usize;
        &file[start..start + t.ty.stored_bytes(t.elems())]
    }
}

/// Calls `block(scale, table, qs)` for each 32-value block of `bytes` of a widened
/// type: value `j` of the block is `scale * table[nibble j of qs]`, the low nibbles of
/// `qs` giving values 0..16 and the high ones 16..32 (as in Q4_0).
fn for_each_block(ty: Widened, bytes: &[u8], mut block: impl FnMut(f32, &[i8; 16], &[u8])) {
    match ty {
        Widened::Mxfp4 => {
            for b in bytes.chunks_exact(17) {
                // E8M0 halved, as ggml's GGML_E8M0_TO_FP32_HALF: 2^(e - 128).
                block(
                    ((b[0] as i32 - 128) as f32).exp2(),
                    &MXFP4_VALUES,
                    &b[1..17],
                );
            }
        }
        Widened::Iq4Nl => {
            for b in bytes.chunks_exact(18) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                block(d, &IQ4NL_VALUES, &b[2..18]);
            }
        }
        Widened::Iq4Xs => {
            for b in bytes.chunks_exact(136) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let scales_h = u16::from_le_bytes([b[2], b[3]]);
                for ib in 0..8 {
                    let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf;
                    let high = ((scales_h >> (2 * ib)) & 3) as u8;
                    let ls = (low | (high << 4)) as i32 - 32;
                    block(
                        d * ls as f32,
                        &IQ4NL_VALUES,
                        &b[8 + 16 * ib..8 + 16 * (ib + 1)],
                    );
                }
            }
        }
    }
}

/// Rewrites `bytes` of a widened type as Q8_0 blocks (see the module's docs); `None`
/// when an MXFP4 scale falls outside what f16 holds exactly (below 2^-24 or above
/// 2^15), for the caller to load the tensor another way. (IQ4_XS's sub-block scales
/// are rounded to f16; IQ4_NL's are f16 already.)
pub(crate) fn widen_to_q8_0(ty: Widened, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    let mut exact = true;
    for_each_block(ty, bytes, |scale, table, qs| {
        let d = f16::from_f32(scale);
        exact &= ty != Widened::Mxfp4 || (d.to_f32() == scale && scale != 0.0);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(qs.iter().map(|b| table[(b & 0xf) as usize] as u8));
        out.extend(qs.iter().map(|b| table[(b >> 4) as usize] as u8));
    });
    exact.then_some(out)
}

/// Rewrites `bytes` of a widened type as 32-value blocks of an f16 scale and 16 bytes of
/// nibbles (IQ4_NL's layout), for [`crate::kernels::QFormat::Table4`]; with the table
/// the nibbles index. `None` where [`widen_to_q8_0`] would refuse too (an MXFP4 scale
/// f16 does not hold).
pub(crate) fn to_table4(ty: Widened, bytes: &[u8]) -> Option<(Vec<u8>, crate::kernels::Table)> {
    let mut out = Vec::with_capacity(bytes.len() * 18 / 16);
    let mut exact = true;
    for_each_block(ty, bytes, |scale, _, qs| {
        let d = f16::from_f32(scale);
        exact &= ty != Widened::Mxfp4 || (d.to_f32() == scale && scale != 0.0);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(qs);
    });
    let table = match ty {
        Widened::Mxfp4 => crate::kernels::Table::Mxfp4,
        Widened::Iq4Nl | Widened::Iq4Xs => crate::kernels::Table::Iq4Nl,
    };
    exact.then_some((out, table))
}

/// Dequantises `bytes` of a widened type to f32 (the fallback of [`widen_to_q8_0`]).
pub(crate) fn dequantize_widened(ty: Widened, bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for_each_block(ty, bytes, |scale, table, qs| {
        out.extend(qs.iter().map(|b| scale * table[(b & 0xf) as usize] as f32));
        out.extend(qs.iter().map(|b| scale * table[(b >> 4) as usize] as f32));
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Widening keeps every value: Q8_0's dequantisation of the widened blocks equals
    /// the direct dequantisation, for each type.
    #[test]
    fn widened_blocks_hold_the_same_values() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut byte = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        };
        for (ty, size) in [
            (Widened::Mxfp4, 17),
            (Widened::Iq4Nl, 18),
            (Widened::Iq4Xs, 136),
        ] {
            let mut bytes: Vec<u8> = (0..size * 8).map(|_| byte()).collect();
            for b in bytes.chunks_exact_mut(size) {
                match ty {
                    // Scales f16 holds (2^-10 .. 2^-1).
                    Widened::Mxfp4 => b[0] = 118 + b[0] % 10,
                    // Finite, modest f16 scales.
                    _ => {
                        let d = f16::from_f32(0.01 + b[0] as f32 * 1e-4);
                        b[..2].copy_from_slice(&d.to_le_bytes());
                    }
                }
            }
            let direct = dequantize_widened(ty, &bytes);
            let q8 = widen_to_q8_0(ty, &bytes).expect("in range");
            let mut via_q8 = Vec::new();
            for b in q8.chunks_exact(34) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                via_q8.extend(b[2..].iter().map(|&q| d * q as i8 as f32));
            }
            assert_eq!(direct.len(), via_q8.len());
            for (a, b) in direct.iter().zip(&via_q8) {
                // Exact but for IQ4_XS's sub-block scales rounded to f16.
                assert!((a - b).abs() <= a.abs() * 1e-3, "{ty:?}: {a} vs {b}");
            }
        }
        // Out of f16's range: no widening.
        let mut tiny = vec![0u8; 17];
        tiny[0] = 90;
        assert!(widen_to_q8_0(Widened::Mxfp4, &tiny).is_none());
    }
}
