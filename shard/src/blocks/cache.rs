//! Keys and values a session has seen, per block, in buffers that grow by doubling.

use candle_core::Tensor;

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
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
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
            if l.k.dim(1)? > max_len {
                l.k = l.k.narrow(1, 0, max_len)?.contiguous()?;
                if let Some(v) = l.v.as_mut() {
                    *v = v.narrow(1, 0, max_len)?.contiguous()?;
                }
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
/// Latent attention (DeepSeek) caches keys only: one row per token whose first
/// columns are also its value.
#[derive(Debug)]
pub(super) struct LayerKv {
    pub(super) k: Tensor,
    pub(super) v: Option<Tensor>,
    pub(super) len: usize,
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
        let (k, v) = Self::append_rows(slot, k, Some(v), max_len)?;
        match v {
            Some(v) => Ok((k, v)),
            None => candle_core::bail!("a key-only cache given values"),
        }
    }

    /// Appends keys only (`[1, seq, width]`, latent attention) and returns all held.
    pub(super) fn append_keys(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        max_len: usize,
    ) -> candle_core::Result<Tensor> {
        Ok(Self::append_rows(slot, k, None, max_len)?.0)
    }

    fn append_rows(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: Option<&Tensor>,
        max_len: usize,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let seq = k.dim(1)?;
        let (len, cap) = match slot {
            Some(l) => (l.len, l.k.dim(1)?),
            None => (0, 0),
        };
        if len + seq > cap {
            let new_cap = (cap * 2).max(64).min(max_len).max(len + seq);
            let grown = |t: &Tensor, old: Option<&Tensor>| -> candle_core::Result<Tensor> {
                let (n, _, w) = t.dims3()?;
                let new = Tensor::zeros((n, new_cap, w), t.dtype(), t.device())?;
                if let Some(old) = old.filter(|_| len > 0) {
                    new.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
                Ok(new)
            };
            let old = slot.take();
            let nk = grown(k, old.as_ref().map(|l| &l.k))?;
            let nv = match v {
                Some(v) => Some(grown(v, old.as_ref().and_then(|l| l.v.as_ref()))?),
                None => None,
            };
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let Some(l) = slot.as_mut() else {
            candle_core::bail!("key/value cache missing");
        };
        l.k.slice_set(&k.contiguous()?, 1, l.len)?;
        if let (Some(cache), Some(v)) = (&l.v, v) {
            cache.slice_set(&v.contiguous()?, 1, l.len)?;
        }
        l.len += seq;
        let values = match &l.v {
            Some(cache) => Some(cache.narrow(1, 0, l.len)?),
            None => None,
        };
        Ok((l.k.narrow(1, 0, l.len)?, values))
    }
}
