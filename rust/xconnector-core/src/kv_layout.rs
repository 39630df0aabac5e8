//! vLLM's paged KV caches as strided memory, and the copy of one block between them and the
//! engine's per-block payload.
//!
//! A block's payload is, layer after layer, that layer's sub-array for the block (every dimension
//! but the block dimension) in logical row-major order. The same bytes come out whatever the
//! tensor's strides, so a block packed from one layout's physical arrangement (e.g. a permuted
//! HND view) unpacks into any other arrangement of the same logical layout.

use crate::bulk_copy::BulkCopy;
use crate::error::{CoreError, Result};

/// The KV cache layouts vLLM uses (DESIGN section 3.2), by logical shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvLayout {
    /// `(2, num_blocks, block_size, kv_heads, head_dim)`: v0 and early v1 flash-attn.
    FlashAttn,
    /// `(num_blocks, 2, block_size, kv_heads, head_dim)`: flashinfer.
    FlashInfer,
    /// `(num_blocks, kv_heads, block_size, 2 * head_dim)`: vLLM 0.32's standardized view, also
    /// the CPU backend.
    Standard,
    /// `(num_blocks, block_size, head_dim)`: multi-head latent attention (one latent per token).
    Mla,
}

impl KvLayout {
    pub const ALL: [KvLayout; 4] = [Self::FlashAttn, Self::FlashInfer, Self::Standard, Self::Mla];

    pub fn name(self) -> &'static str {
        match self {
            Self::FlashAttn => "flash_attn",
            Self::FlashInfer => "flashinfer",
            Self::Standard => "standard",
            Self::Mla => "mla",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }

    pub fn shape_doc(self) -> &'static str {
        match self {
            Self::FlashAttn => "(2, num_blocks, block_size, kv_heads, head_dim)",
            Self::FlashInfer => "(num_blocks, 2, block_size, kv_heads, head_dim)",
            Self::Standard => "(num_blocks, kv_heads, block_size, 2*head_dim)",
            Self::Mla => "(num_blocks, block_size, head_dim)",
        }
    }

    /// Which dimension indexes blocks.
    pub fn block_dim(self) -> usize {
        match self {
            Self::FlashAttn => 1,
            _ => 0,
        }
    }

    /// Does `shape` fit this layout for `block_size` (and `num_blocks`, when known)?
    fn fits(self, shape: &[usize], block_size: usize, num_blocks: Option<usize>) -> bool {
        let ok = match self {
            Self::FlashAttn => shape.len() == 5 && shape[0] == 2 && shape[2] == block_size,
            Self::FlashInfer => shape.len() == 5 && shape[1] == 2 && shape[2] == block_size,
            Self::Standard => shape.len() == 4 && shape[2] == block_size && shape[3].is_multiple_of(2),
            Self::Mla => shape.len() == 3 && shape[1] == block_size,
        };
        ok && num_blocks.is_none_or(|n| shape[self.block_dim()] == n)
    }

    /// The layout of a KV tensor of this `shape`. Shapes that fit two layouts (5-D with both of
    /// the first two dimensions 2) need `num_blocks` to tell them apart.
    pub fn detect(shape: &[usize], block_size: usize, num_blocks: Option<usize>) -> Result<Self> {
        let fits: Vec<KvLayout> = Self::ALL.into_iter().filter(|l| l.fits(shape, block_size, num_blocks)).collect();
        match fits.as_slice() {
            [one] => Ok(*one),
            [] => Err(CoreError::invalid(format!(
                "KV cache shape {shape:?} matches no known layout for block_size {block_size}{}; known: {}",
                num_blocks.map(|n| format!(" and {n} blocks")).unwrap_or_default(),
                Self::ALL.iter().map(|l| format!("{} {}", l.name(), l.shape_doc())).collect::<Vec<_>>().join(", ")
            ))),
            many => Err(CoreError::invalid(format!(
                "KV cache shape {shape:?} fits several layouts ({}); pass num_blocks or name the layout",
                many.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// One layer's KV cache: where it is and how it is laid out in memory.
#[derive(Clone, Debug)]
pub struct StridedTensor {
    /// Address of element `[0, 0, ...]`.
    pub addr: usize,
    pub shape: Vec<usize>,
    /// Per dimension, in elements (may be any sign, as numpy allows).
    pub strides: Vec<isize>,
    pub elem_size: usize,
}

/// Copy plan for one layer: the block dimension's stride, and the remaining dimensions merged
/// into (count, stride) runs, the innermost contiguous when the tensor allows it.
#[derive(Clone, Debug)]
struct LayerPlan {
    addr: usize,
    block_stride_bytes: isize,
    num_blocks: usize,
    /// Outer dimensions (count, stride in bytes), outermost first.
    outer: Vec<(usize, isize)>,
    /// Bytes copied at once: a contiguous innermost run.
    run_bytes: usize,
    block_bytes: usize,
    /// Where this layer's part starts in a block's payload (the layers before it, back to back).
    payload_offset: usize,
}

impl LayerPlan {
    fn new(t: &StridedTensor, layout: KvLayout, payload_offset: usize) -> Self {
        let e = t.elem_size as isize;
        let bd = layout.block_dim();
        let mut dims: Vec<(usize, isize)> = (0..t.shape.len())
            .filter(|&d| d != bd)
            .map(|d| (t.shape[d], t.strides[d] * e))
            .filter(|&(n, _)| n != 1)
            .collect();
        // Merge a dimension into its inner neighbour when the two are contiguous together.
        let mut merged: Vec<(usize, isize)> = Vec::new();
        while let Some((n, s)) = dims.pop() {
            match merged.last_mut() {
                Some(inner) if s == inner.1 * inner.0 as isize => inner.0 *= n,
                _ => merged.push((n, s)),
            }
        }
        merged.reverse();
        let elem = t.elem_size;
        let (run_bytes, outer) = match merged.last() {
            Some(&(n, s)) if s == e => (n * elem, merged[..merged.len() - 1].to_vec()),
            _ => (elem, merged),
        };
        let elems: usize = t.shape.iter().enumerate().filter(|&(d, _)| d != bd).map(|(_, &n)| n).product();
        LayerPlan {
            addr: t.addr,
            block_stride_bytes: t.strides[bd] * e,
            num_blocks: t.shape[bd],
            outer,
            run_bytes,
            block_bytes: elems * elem,
            payload_offset,
        }
    }

    /// Calls `run(address, offset_in_block)` for every contiguous run of block `block`.
    fn for_each_run(&self, block: usize, mut run: impl FnMut(*mut u8, usize)) {
        let base = self.addr as isize + block as isize * self.block_stride_bytes;
        let mut idx = vec![0usize; self.outer.len()];
        let mut offset = 0;
        loop {
            let addr = base + idx.iter().zip(&self.outer).map(|(&i, &(_, s))| i as isize * s).sum::<isize>();
            run(addr as *mut u8, offset);
            offset += self.run_bytes;
            // Odometer over the outer dimensions, innermost fastest.
            let mut d = self.outer.len();
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < self.outer[d].0 {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}

/// A model's paged KV caches (one tensor per layer), packed to and unpacked from per-block
/// payloads.
#[derive(Clone, Debug)]
pub struct PagedKv {
    layout: KvLayout,
    block_size: usize,
    layers: Vec<LayerPlan>,
    block_bytes: usize,
}

impl PagedKv {
    /// Describes the layers' KV tensors. `layout` is detected from the first layer when `None`;
    /// every layer must have it and the same number of blocks.
    ///
    /// # Safety
    /// Every element each `StridedTensor` describes must be valid, readable and writable memory
    /// for as long as this value is used, and nothing else may write a block while it is packed
    /// or access a block while it is unpacked.
    pub unsafe fn new(
        tensors: &[StridedTensor],
        block_size: usize,
        layout: Option<KvLayout>,
        num_blocks: Option<usize>,
    ) -> Result<Self> {
        let Some(first) = tensors.first() else {
            return Err(CoreError::invalid("no KV cache tensors given; pass one tensor per layer"));
        };
        let layout = match layout {
            Some(l) => l,
            None => KvLayout::detect(&first.shape, block_size, num_blocks)?,
        };
        let blocks = first.shape.get(layout.block_dim()).copied().unwrap_or(0);
        let mut layers = Vec::with_capacity(tensors.len());
        let mut block_bytes = 0;
        for (i, t) in tensors.iter().enumerate() {
            if t.shape.len() != t.strides.len() || t.elem_size == 0 {
                return Err(CoreError::invalid(format!("layer {i}: shape and strides differ in length")));
            }
            if !layout.fits(&t.shape, block_size, Some(blocks)) {
                return Err(CoreError::invalid(format!(
                    "layer {i}: shape {:?} is not the {} layout {} with {blocks} blocks of {block_size} tokens \
                     that layer 0 has; every layer must share one layout",
                    t.shape,
                    layout.name(),
                    layout.shape_doc()
                )));
            }
            let plan = LayerPlan::new(t, layout, block_bytes);
            if plan.block_bytes == 0 {
                return Err(CoreError::invalid(format!("layer {i}: shape {:?} holds no KV per block", t.shape)));
            }
            block_bytes += plan.block_bytes;
            layers.push(plan);
        }
        Ok(Self { layout, block_size, layers, block_bytes })
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.layers[0].num_blocks
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of one block's payload, all layers.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Checks block ids before any copy, so a bad id fails the call before anything is written.
    pub fn check_blocks(&self, ids: &[u32]) -> Result<()> {
        let n = self.num_blocks();
        match ids.iter().find(|&&b| b as usize >= n) {
            Some(b) => Err(CoreError::invalid(format!("block id {b} is out of range: the KV cache has {n} blocks"))),
            None => Ok(()),
        }
    }

    /// Copies block `id` of every layer into `dst` (`block_bytes` long). `id` must be checked.
    /// `copy` is the transfer's mode (streaming when the whole transfer is large).
    pub fn pack_block(&self, id: u32, dst: &mut [u8], copy: BulkCopy) {
        assert!(dst.len() == self.block_bytes && (id as usize) < self.num_blocks());
        let mut start = 0;
        for layer in &self.layers {
            let out = &mut dst[start..start + layer.block_bytes];
            layer.for_each_run(id as usize, |src, off| {
                // SAFETY: `src` addresses `run_bytes` bytes of the layer's block `id` (in range,
                // checked above), valid memory per `new`'s contract; `out` is a distinct Rust slice.
                unsafe { copy.copy_unfenced(src, out[off..off + layer.run_bytes].as_mut_ptr(), layer.run_bytes) };
            });
            start += layer.block_bytes;
        }
        copy.fence();
    }

    /// Copies a payload made by [`pack_block`](Self::pack_block) into block `id` of every layer.
    pub fn unpack_block(&self, id: u32, src: &[u8], copy: BulkCopy) {
        assert!(src.len() == self.block_bytes && (id as usize) < self.num_blocks());
        for layer in 0..self.layers.len() {
            self.unpack_layer_unfenced(id, layer, src, copy);
        }
        copy.fence();
    }

    /// Copies layer `layer`'s part of a [`pack_block`](Self::pack_block) payload into block `id`
    /// of that layer only: a load that hands the model its KV one layer at a time.
    pub fn unpack_block_layer(&self, id: u32, layer: usize, src: &[u8], copy: BulkCopy) {
        assert!(src.len() == self.block_bytes && (id as usize) < self.num_blocks() && layer < self.layers.len());
        self.unpack_layer_unfenced(id, layer, src, copy);
        copy.fence();
    }

    fn unpack_layer_unfenced(&self, id: u32, layer: usize, src: &[u8], copy: BulkCopy) {
        let plan = &self.layers[layer];
        let input = &src[plan.payload_offset..plan.payload_offset + plan.block_bytes];
        plan.for_each_run(id as usize, |dst, off| {
            // SAFETY: as in `pack_block`, with the KV memory as the destination; the payload
            // is engine or caller memory, never inside a KV tensor.
            unsafe { copy.copy_unfenced(input[off..off + plan.run_bytes].as_ptr(), dst, plan.run_bytes) };
        });
    }

    /// Packs `ids` back to back into `dst`.
    pub fn pack(&self, ids: &[u32], dst: &mut [u8]) -> Result<()> {
        self.check_blocks(ids)?;
        self.check_len(ids.len(), dst.len())?;
        let copy = BulkCopy::for_transfer(dst.len());
        for (i, &id) in ids.iter().enumerate() {
            self.pack_block(id, &mut dst[i * self.block_bytes..(i + 1) * self.block_bytes], copy);
        }
        Ok(())
    }

    /// Unpacks back-to-back payloads from `src` into blocks `ids`.
    pub fn unpack(&self, ids: &[u32], src: &[u8]) -> Result<()> {
        self.check_blocks(ids)?;
        self.check_len(ids.len(), src.len())?;
        let copy = BulkCopy::for_transfer(src.len());
        for (i, &id) in ids.iter().enumerate() {
            self.unpack_block(id, &src[i * self.block_bytes..(i + 1) * self.block_bytes], copy);
        }
        Ok(())
    }

    fn check_len(&self, blocks: usize, len: usize) -> Result<()> {
        if len == blocks * self.block_bytes {
            return Ok(());
        }
        Err(CoreError::invalid(format!(
            "buffer is {len} bytes; {blocks} block(s) of {} bytes need {}",
            self.block_bytes,
            blocks * self.block_bytes
        )))
    }
}

/// The block ids of a request's full blocks from its per-token slot mapping (vLLM v0:
/// `slot = block_id * block_size + offset`). Fails if a block's slots are not one physical block
/// in order, which would make the block's KV something other than one cache block.
pub fn block_ids_from_slots(slots: &[i64], block_size: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::with_capacity(slots.len() / block_size);
    for (b, chunk) in slots.chunks_exact(block_size).enumerate() {
        let first = chunk[0];
        if first < 0 || !(first as usize).is_multiple_of(block_size) {
            return Err(CoreError::invalid(format!(
                "slot {first} of block {b} does not start a cache block (block_size {block_size})"
            )));
        }
        if chunk.iter().enumerate().any(|(i, &s)| s != first + i as i64) {
            return Err(CoreError::invalid(format!(
                "the slots of block {b} are not consecutive within one cache block"
            )));
        }
        let id = first as usize / block_size;
        ids.push(u32::try_from(id).map_err(|_| CoreError::invalid(format!("slot {first} is out of range")))?);
    }
    Ok(ids)
}
