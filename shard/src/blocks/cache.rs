//! Keys and values a session has seen, per block, in buffers that grow by doubling.

use candle_core::Tensor;

use crate::kernels::attend::KEY_STRIDE_STEP;

/// The keys and values one session has seen, for every block of a span.
#[derive(Debug)]
pub struct KvCache {
    /// First block this cache covers (a session may use a sub-span of a server's span).
    pub(super) start: usize,
    /// Per block: keys and values.
    pub(super) layers: Vec<Option<LayerKv>>,
    /// Tokens held (the position of the next token).
    pub(super) len: usize,
    /// Longest sequence this cache may grow to.
    pub(super) max_len: usize,
}

impl KvCache {
    /// Tokens held so far: the position the next token will take.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when no token has been seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Longest sequence allowed.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    /// Blocks `[start, end)` this cache covers.
    pub fn blocks(&self) -> (usize, usize) {
        (self.start, self.start + self.layers.len())
    }
    /// Forgets every position from `len` on (drafted tokens a verify step rejected):
    /// the next token takes position `len`. Positions not held are left as they are.
    /// Blocks that hold more than the cache (a step that failed partway through the
    /// span appended to the blocks before the failure) are cut back too, so a retried
    /// step does not see the failed one's rows as history.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        self.len = len;
        for l in self.layers.iter_mut().flatten() {
            l.len = l.len.min(len);
        }
    }

    /// Sets the longest sequence this cache may grow to (a session kept between turns
    /// of a conversation: shrunk to what it holds while it waits, grown again for the
    /// next turn). Buffers larger than the new limit are cut down to it, so a waiting
    /// session holds no more memory than its tokens. Refused below the tokens held.
    pub fn set_max_len(&mut self, max_len: usize) -> candle_core::Result<()> {
        if max_len < self.len {
            candle_core::bail!(
                "a cache holding {} tokens cannot be limited to {max_len}",
                self.len
            );
        }
        self.max_len = max_len;
        for l in self.layers.iter_mut().flatten() {
            let (dim, room) = LayerKv::key_room(l.transposed, max_len);
            if l.k.dim(dim)? > room {
                l.k = l.k.narrow(dim, 0, room)?.contiguous()?;
            }
            if let Some(v) = l.v.as_mut().filter(|v| v.dim(1).is_ok_and(|c| c > max_len)) {
                *v = v.narrow(1, 0, max_len)?.contiguous()?;
            }
        }
        Ok(())
    }

    /// Bytes held by keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let values = l.v.as_ref().map_or(0, Tensor::elem_count);
                (l.k.elem_count() + values) * l.k.dtype().size_in_bytes()
            })
            .sum()
    }
}

/// One block's keys and values for one session: `[kv_heads, capacity, head_dim]`
/// buffers whose first `len` positions are filled. They grow by doubling (up to the
/// session's length), so appending a token copies that token only, where concatenating
/// would copy the whole cache at every step of every block.
///
/// Where attention runs in [`crate::kernels::attend`] (the CPU in f32), keys are kept
/// transposed instead, `[kv_heads, head_dim, stride]` with the stride a multiple of
/// [`KEY_STRIDE_STEP`] positions: that kernel reads one dimension of many positions as
/// a vector. (The padding, up to 63 positions of keys per block, is not in a server's
/// reckoning of its cache by tokens.)
///
/// Latent attention (DeepSeek) caches keys only: one row per token whose first
/// columns are also its value.
#[derive(Debug)]
pub(super) struct LayerKv {
    pub(super) k: Tensor,
    pub(super) v: Option<Tensor>,
    pub(super) len: usize,
    /// Keys kept `[kv_heads, head_dim, stride]`.
    pub(super) transposed: bool,
}

impl LayerKv {
    /// Appends `k` and `v` (`[kv_heads, seq, head_dim]`) to the cache in `slot` (made or
    /// grown as needed, to at most `max_len` positions unless more are needed) and
    /// returns views of everything held, `[kv_heads, len, head_dim]`.
    pub(super) fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
        max_len: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = Self::append_rows(slot, k, Some(v), max_len, false)?;
        match v {
            Some(v) => Ok((k, v)),
            None => candle_core::bail!("a key-only cache given values"),
        }
    }

    /// [`LayerKv::append`] to a cache whose keys are kept transposed, for
    /// [`crate::kernels::attend`] (which reads the buffers themselves).
    pub(super) fn append_transposed(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
        max_len: usize,
    ) -> candle_core::Result<()> {
        Self::append_rows(slot, k, Some(v), max_len, true)?;
        Ok(())
    }

    /// Appends keys only (`[1, seq, width]`, latent attention) and returns all held.
    pub(super) fn append_keys(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        max_len: usize,
    ) -> candle_core::Result<Tensor> {
        Ok(Self::append_rows(slot, k, None, max_len, false)?.0)
    }

    /// The keys' position axis.
    fn key_axis(transposed: bool) -> usize {
        if transposed {
            2
        } else {
            1
        }
    }

    /// The keys' position axis, and how many positions it is given for a cache of
    /// `positions` (transposed keys pad it to a whole step).
    fn key_room(transposed: bool, positions: usize) -> (usize, usize) {
        let room = if transposed {
            positions.next_multiple_of(KEY_STRIDE_STEP)
        } else {
            positions
        };
        (Self::key_axis(transposed), room)
    }

    /// Positions that fit without growing.
    fn capacity(&self) -> candle_core::Result<usize> {
        match &self.v {
            Some(v) => v.dim(1),
            None => self.k.dim(1),
        }
    }

    fn append_rows(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: Option<&Tensor>,
        max_len: usize,
        transposed: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let seq = k.dim(1)?;
        let (len, cap) = match slot {
            Some(l) if l.transposed != transposed => {
                candle_core::bail!("a cache's keys kept in another layout")
            }
            Some(l) => (l.len, l.capacity()?),
            None => (0, 0),
        };
        let k = if transposed {
            k.transpose(1, 2)?.contiguous()?
        } else {
            k.contiguous()?
        };
        if len + seq > cap {
            let new_cap = (cap * 2).max(64).min(max_len).max(len + seq);
            // `t` grown along `dim` to `room`, what `old` held copied over.
            let grown = |t: &Tensor,
                         old: Option<&Tensor>,
                         dim: usize,
                         room: usize|
             -> candle_core::Result<Tensor> {
                let mut shape = t.dims().to_vec();
                shape[dim] = room;
                let new = Tensor::zeros(shape, t.dtype(), t.device())?;
                if let Some(old) = old.filter(|_| len > 0) {
                    new.slice_set(&old.narrow(dim, 0, len)?.contiguous()?, dim, 0)?;
                }
                Ok(new)
            };
            let old = slot.take();
            let (dim, room) = Self::key_room(transposed, new_cap);
            let nk = grown(&k, old.as_ref().map(|l| &l.k), dim, room)?;
            let nv = match v {
                Some(v) => Some(grown(
                    v,
                    old.as_ref().and_then(|l| l.v.as_ref()),
                    1,
                    new_cap,
                )?),
                None => None,
            };
            *slot = Some(LayerKv {
                k: nk,
                v: nv,
                len,
                transposed,
            });
        }
        let Some(l) = slot.as_mut() else {
            candle_core::bail!("key/value cache missing");
        };
        let axis = Self::key_axis(transposed);
        l.k.slice_set(&k, axis, l.len)?;
        if let (Some(cache), Some(v)) = (&l.v, v) {
            cache.slice_set(&v.contiguous()?, 1, l.len)?;
        }
        l.len += seq;
        let values = match &l.v {
            Some(cache) => Some(cache.narrow(1, 0, l.len)?),
            None => None,
        };
        Ok((l.k.narrow(axis, 0, l.len)?, values))
    }
}
