//! Pack/unpack between paged KV tensors and per-block payloads: every layout, contiguous and
//! permuted strides, random contents and random block tables; bytes restored into other
//! physical blocks equal the originals exactly.

use proptest::prelude::*;
use xconnector_core::bulk_copy::{BulkCopy, STREAM_FROM_BYTES};
use xconnector_core::kv_layout::{block_ids_from_slots, KvLayout, PagedKv, StridedTensor};
use xconnector_core::{Engine, EngineConfig, HashExtras, Namespace};

/// A tensor in owned memory with a logical shape and an arbitrary physical dimension order.
struct Owned {
    mem: Vec<u8>,
    shape: Vec<usize>,
    strides: Vec<isize>,
    elem: usize,
}

impl Owned {
    /// `order` lists logical dimensions from outermost to innermost in memory.
    fn new(shape: &[usize], order: &[usize], elem: usize, seed: u64) -> Self {
        let mut strides = vec![0isize; shape.len()];
        let mut s = 1isize;
        for &d in order.iter().rev() {
            strides[d] = s;
            s *= shape[d] as isize;
        }
        let n: usize = shape.iter().product::<usize>() * elem;
        let mut x = seed | 1;
        let mem = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Self { mem, shape: shape.to_vec(), strides, elem }
    }

    fn desc(&mut self) -> StridedTensor {
        StridedTensor {
            addr: self.mem.as_mut_ptr() as usize,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            elem_size: self.elem,
        }
    }

    /// The element at a logical index, as bytes.
    fn at(&self, idx: &[usize]) -> &[u8] {
        let off: isize = idx.iter().zip(&self.strides).map(|(&i, &s)| i as isize * s).sum();
        let off = off as usize * self.elem;
        &self.mem[off..off + self.elem]
    }

    /// All bytes of block `b` (block dimension `bd`) in logical order.
    fn block(&self, bd: usize, b: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let dims: Vec<usize> = (0..self.shape.len()).filter(|&d| d != bd).collect();
        let total: usize = dims.iter().map(|&d| self.shape[d]).product();
        for flat in 0..total {
            let mut idx = vec![0; self.shape.len()];
            idx[bd] = b;
            let mut rem = flat;
            for &d in dims.iter().rev() {
                idx[d] = rem % self.shape[d];
                rem /= self.shape[d];
            }
            out.extend_from_slice(self.at(&idx));
        }
        out
    }
}

fn shape_of(layout: KvLayout, blocks: usize, bs: usize, heads: usize, dim: usize) -> Vec<usize> {
    match layout {
        KvLayout::FlashAttn => vec![2, blocks, bs, heads, dim],
        KvLayout::FlashInfer => vec![blocks, 2, bs, heads, dim],
        KvLayout::Standard => vec![blocks, heads, bs, 2 * dim],
        KvLayout::Mla => vec![blocks, bs, dim],
    }
}

fn paged(layers: &mut [Owned], bs: usize, layout: Option<KvLayout>) -> PagedKv {
    let descs: Vec<StridedTensor> = layers.iter_mut().map(Owned::desc).collect();
    // SAFETY: the tensors' memory outlives the PagedKv within each test and nothing else touches it.
    unsafe { PagedKv::new(&descs, bs, layout, None) }.unwrap()
}

/// An engine with only a memory tier of `capacity_bytes`.
fn memory_engine(block_size: usize, block_bytes: usize, capacity_bytes: u64) -> Engine {
    let (namespace, disk, redis, events) = (Namespace::default(), None, None, None);
    Engine::new(EngineConfig { block_size, block_bytes, capacity_bytes, namespace, disk, redis, events }).unwrap()
}

fn layout_strategy() -> impl Strategy<Value = KvLayout> {
    prop::sample::select(KvLayout::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Pack blocks from one cache, unpack them into other blocks of a second cache with a
    /// different physical dimension order: each restored block equals its original exactly, and
    /// blocks not written keep their bytes.
    #[test]
    fn round_trip_into_other_blocks(
        layout in layout_strategy(),
        blocks in 3usize..12,
        bs in prop::sample::select(vec![1usize, 4, 16]),
        heads in 1usize..4,
        dim in prop::sample::select(vec![1usize, 2, 8]),
        elem in prop::sample::select(vec![1usize, 2, 4]),
        layers in 1usize..4,
        perm_seed in any::<u64>(),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 1..6),
    ) {
        let shape = shape_of(layout, blocks, bs, heads, dim);
        let rank = shape.len();
        // The destination's physical order: a pseudo-random permutation of the dimensions.
        let mut order: Vec<usize> = (0..rank).collect();
        let mut x = perm_seed | 1;
        for i in (1..rank).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            order.swap(i, (x >> 33) as usize % (i + 1));
        }
        let ident: Vec<usize> = (0..rank).collect();
        let mut src: Vec<Owned> = (0..layers).map(|l| Owned::new(&shape, &ident, elem, 7 + l as u64)).collect();
        let mut dst: Vec<Owned> = (0..layers).map(|l| Owned::new(&shape, &order, elem, 1000 + l as u64)).collect();
        let before: Vec<Vec<u8>> = dst.iter().map(|t| t.mem.clone()).collect();
        let a = paged(&mut src, bs, None);
        let b = paged(&mut dst, bs, Some(layout));
        prop_assert_eq!(a.layout(), layout);
        prop_assert_eq!(a.block_bytes(), b.block_bytes());

        // Distinct source blocks, mapped onto distinct (shuffled) destination blocks.
        let mut from: Vec<u32> = picks.iter().map(|p| p.index(blocks) as u32).collect();
        from.sort_unstable();
        from.dedup();
        let to: Vec<u32> = from.iter().map(|&f| (blocks as u32 - 1) - f).collect();
        let mut payload = vec![0u8; from.len() * a.block_bytes()];
        a.pack(&from, &mut payload).unwrap();
        b.unpack(&to, &payload).unwrap();

        let bd = layout.block_dim();
        for l in 0..layers {
            for (&f, &t) in from.iter().zip(&to) {
                prop_assert_eq!(src[l].block(bd, f as usize), dst[l].block(bd, t as usize));
            }
        }
        // Untouched blocks are unchanged.
        for (l, t) in dst.iter().enumerate() {
            let reference = Owned { mem: before[l].clone(), shape: t.shape.clone(), strides: t.strides.clone(), elem };
            for blk in (0..blocks).filter(|x| !to.contains(&(*x as u32))) {
                prop_assert_eq!(t.block(bd, blk), reference.block(bd, blk));
            }
        }
    }
}

#[test]
fn detection_by_shape_and_its_errors() {
    assert_eq!(KvLayout::detect(&[2, 100, 16, 8, 128], 16, None).unwrap(), KvLayout::FlashAttn);
    assert_eq!(KvLayout::detect(&[100, 2, 16, 8, 128], 16, None).unwrap(), KvLayout::FlashInfer);
    assert_eq!(KvLayout::detect(&[100, 8, 32, 256], 32, None).unwrap(), KvLayout::Standard);
    assert_eq!(KvLayout::detect(&[100, 16, 576], 16, None).unwrap(), KvLayout::Mla);
    let err = KvLayout::detect(&[2, 2, 16, 8, 128], 16, None).unwrap_err().to_string();
    assert!(err.contains("fits several layouts (flash_attn, flashinfer); pass num_blocks"), "{err}");
    assert!(KvLayout::detect(&[2, 2, 16, 8, 128], 16, Some(2)).is_err());
    let err = KvLayout::detect(&[100, 8, 16, 256], 32, None).unwrap_err().to_string();
    assert!(err.contains("matches no known layout for block_size 32") && err.contains("mla (num_blocks"), "{err}");
    assert_eq!(KvLayout::parse("flashinfer"), Some(KvLayout::FlashInfer));
}

#[test]
fn bad_block_ids_and_mismatched_layers_are_errors_before_any_copy() {
    let mut layers = vec![Owned::new(&[4, 2, 4, 8], &[0, 1, 2, 3], 2, 1)];
    let kv = paged(&mut layers, 4, None);
    let before = layers[0].mem.clone();
    let payload = vec![0xAAu8; 2 * kv.block_bytes()];
    let err = kv.unpack(&[1, 4], &payload).unwrap_err().to_string();
    assert_eq!(err, "block id 4 is out of range: the KV cache has 4 blocks");
    assert_eq!(layers[0].mem, before, "nothing may be written when one id is bad");
    let err = kv.unpack(&[1], &payload).unwrap_err().to_string();
    assert!(err.contains("buffer is 256 bytes; 1 block(s) of 128 bytes need 128"), "{err}");

    let mut mixed = [Owned::new(&[4, 2, 4, 8], &[0, 1, 2, 3], 2, 1), Owned::new(&[5, 2, 4, 8], &[0, 1, 2, 3], 2, 1)];
    let descs: Vec<StridedTensor> = mixed.iter_mut().map(Owned::desc).collect();
    // SAFETY: the memory outlives the call.
    let err = unsafe { PagedKv::new(&descs, 4, None, None) }.unwrap_err().to_string();
    assert!(err.starts_with("layer 1: shape [5, 2, 4, 8] is not the standard layout"), "{err}");
}

#[test]
fn slot_mappings_give_block_ids() {
    let slots: Vec<i64> = (32..40).chain(8..16).chain(100..103).collect();
    assert_eq!(block_ids_from_slots(&slots, 8).unwrap(), vec![4, 1]);
    let err = block_ids_from_slots(&[3, 4, 5, 6], 4).unwrap_err().to_string();
    assert!(err.contains("slot 3 of block 0 does not start a cache block"), "{err}");
    let err = block_ids_from_slots(&[4, 5, 7, 6], 4).unwrap_err().to_string();
    assert!(err.contains("not consecutive"), "{err}");
}

/// The engine stores straight from the KV tensors and loads straight into them.
#[test]
fn engine_stores_from_and_loads_into_paged_kv() {
    let shape = [8, 2, 4, 2, 8];
    let mut src = vec![Owned::new(&shape, &[0, 1, 2, 3, 4], 2, 3), Owned::new(&shape, &[0, 1, 2, 3, 4], 2, 4)];
    let mut dst = vec![Owned::new(&shape, &[0, 3, 1, 2, 4], 2, 5), Owned::new(&shape, &[0, 3, 1, 2, 4], 2, 6)];
    let a = paged(&mut src, 4, None);
    let b = paged(&mut dst, 4, None);
    let engine = memory_engine(4, a.block_bytes(), 64 * a.block_bytes() as u64);
    let tokens: Vec<u32> = (0..14).collect(); // 3 full blocks + 2 tokens
    let src_ids = [5u32, 0, 7];
    let out = engine
        .store_with(&tokens, HashExtras::default(), |i, slot| {
            a.pack_block(src_ids[i], slot, BulkCopy::for_transfer(STREAM_FROM_BYTES))
        })
        .unwrap();
    assert_eq!(out.stored, 3);
    let dst_ids = [2u32, 3, 4];
    let loaded = engine
        .load_with(&tokens, HashExtras::default(), 3, |i, bytes| {
            b.unpack_block(dst_ids[i], bytes, BulkCopy::for_transfer(STREAM_FROM_BYTES))
        })
        .unwrap();
    assert_eq!(loaded, 12);
    for l in 0..2 {
        for (s, d) in src_ids.iter().zip(dst_ids) {
            assert_eq!(src[l].block(0, *s as usize), dst[l].block(0, d as usize));
        }
    }
}

/// Checks, each time a layer-wise load says the layers at positions `0..done` of `order` are in
/// place, that exactly those layers of the loaded blocks hold the stored KV and every other layer
/// still holds what it held.
struct CheckingSink<'a> {
    dst: &'a [Owned],
    order: &'a [usize],
    /// Per layer, per expected block: the bytes before the load, and those it must write.
    before: Vec<Vec<Vec<u8>>>,
    src: Vec<Vec<Vec<u8>>>,
    /// The destination blocks the load writes.
    expect: Vec<usize>,
    reports: std::cell::RefCell<Vec<usize>>,
    finished: std::cell::Cell<u32>,
}

impl CheckingSink<'_> {
    fn check(&self, done: usize) {
        for (l, layer) in self.dst.iter().enumerate() {
            let in_place = self.order[..done].contains(&l);
            for (k, b) in self.expect.iter().enumerate() {
                let want = if in_place { &self.src[l][k] } else { &self.before[l][k] };
                assert_eq!(&layer.block(0, *b), want, "layer {l}, block {b}, {done} layer(s) reported done");
            }
        }
    }
}

impl xconnector_core::layer_loads::LayerSink for CheckingSink<'_> {
    fn layers_done(&self, done: usize) {
        self.check(done);
        self.reports.borrow_mut().push(done);
    }
    fn finish(&self) {
        self.finished.set(self.finished.get() + 1);
    }
}

/// Two requests stored from `src`, loaded layer by layer in `layer_order` into other blocks of
/// `dst`: engine blocks of `per` KV blocks; the first request `blocks_one` engine blocks, the
/// second 2, of which it already holds its first KV block. Flashinfer layout (block dim 0).
fn check_layer_wise_load(shape: [usize; 5], per: usize, layer_order: &[usize], blocks_one: usize) {
    use xconnector_core::layer_loads::{load_by_layer, LayerLoad};
    let (nb, bs, layers) = (shape[0], shape[2], layer_order.len());
    let dims = [0, 1, 2, 3, 4];
    let mut src: Vec<Owned> = (0..layers as u64).map(|l| Owned::new(&shape, &dims, 2, 10 + l)).collect();
    let mut dst: Vec<Owned> = (0..layers as u64).map(|l| Owned::new(&shape, &dims, 2, 20 + l)).collect();
    let a = paged(&mut src, bs, None);
    let b = paged(&mut dst, bs, None);
    let engine =
        memory_engine(bs * per, a.block_bytes() * per, 4 * (blocks_one + 2) as u64 * (a.block_bytes() * per) as u64);
    // KV blocks: request one from src 0.., into dst in reverse; request two from src after
    // those, into dst right after one's.
    let kv_one = blocks_one * per;
    let one: Vec<u32> = (0..(kv_one * bs + 2) as u32).collect();
    let two: Vec<u32> = (100_000..100_000 + (2 * per * bs) as u32).collect();
    let src_one: Vec<u32> = (0..kv_one as u32).collect();
    let src_two: Vec<u32> = (kv_one as u32..(kv_one + 2 * per) as u32).collect();
    let ids_one: Vec<u32> = (0..kv_one as u32).rev().map(|i| nb as u32 - 1 - i).collect();
    let ids_two: Vec<u32> = (0..(2 * per) as u32).collect();
    assert!(kv_one + 2 * per <= nb && ids_one.iter().all(|i| !ids_two.contains(i)));
    for (tokens, ids) in [(&one, &src_one), (&two, &src_two)] {
        let pack = |i: usize, slot: &mut [u8]| {
            for j in 0..per {
                let part = &mut slot[j * a.block_bytes()..(j + 1) * a.block_bytes()];
                a.pack_block(ids[i * per + j], part, BulkCopy::cached());
            }
        };
        engine.store_with(tokens, HashExtras::default(), pack).unwrap();
    }
    // (dst block, src block) of every KV block written: request two's first is held already.
    let pairs: Vec<(usize, usize)> = ids_one
        .iter()
        .zip(&src_one)
        .chain(ids_two.iter().zip(&src_two).skip(1))
        .map(|(&d, &s)| (d as usize, s as usize))
        .collect();
    let sink = CheckingSink {
        dst: &dst,
        order: layer_order,
        before: (0..layers).map(|l| pairs.iter().map(|&(d, _)| dst[l].block(0, d)).collect()).collect(),
        src: (0..layers).map(|l| pairs.iter().map(|&(_, s)| src[l].block(0, s)).collect()).collect(),
        expect: pairs.iter().map(|&(d, _)| d).collect(),
        reports: Default::default(),
        finished: Default::default(),
    };
    let loads = [
        LayerLoad { tokens: &one, ids: &ids_one, first_block: 0, extras: HashExtras::default() },
        LayerLoad { tokens: &two, ids: &ids_two, first_block: 1, extras: HashExtras::default() },
    ];
    let out = load_by_layer(&engine, &b, &loads, layer_order, &sink);
    let want = vec![kv_one * bs, 2 * per * bs];
    assert_eq!(out.into_iter().map(Result::unwrap).collect::<Vec<_>>(), want);
    assert_eq!(*sink.reports.borrow(), (1..=layers).collect::<Vec<_>>());
    assert_eq!(sink.finished.get(), 1);
    // Request two's first KV block (held already) is untouched in every layer.
    for (l, layer) in dst.iter().enumerate() {
        let fresh = Owned::new(&shape, &dims, 2, 20 + l as u64);
        assert_eq!(layer.block(0, ids_two[0] as usize), fresh.block(0, ids_two[0] as usize));
    }
}

#[test]
fn a_layer_wise_load_reports_each_layer_only_once_it_is_in_place() {
    check_layer_wise_load([8, 2, 4, 2, 8], 1, &[0, 1, 2], 3);
}

#[test]
fn a_layer_wise_load_in_any_layer_order_over_engine_blocks_of_two_kv_blocks() {
    check_layer_wise_load([10, 2, 4, 2, 8], 2, &[2, 0, 3, 1], 3);
}

#[test]
fn a_layer_wise_load_large_enough_to_stream_is_in_place_when_reported() {
    // 24 KV blocks of 3 x 64 KiB: past STREAM_FROM_BYTES, so the copy uses non-temporal stores.
    let shape = [26, 2, 16, 8, 128];
    let layer_block: usize = shape[1..].iter().product::<usize>() * 2;
    assert!((20 + 2) * 3 * layer_block >= STREAM_FROM_BYTES, "the two requests' 22 blocks must stream");
    check_layer_wise_load(shape, 1, &[1, 2, 0], 20);
}

#[test]
fn a_layer_order_that_is_not_one_of_the_layers_loads_nothing() {
    use xconnector_core::layer_loads::{load_by_layer, LayerLoad, LayerProgress};
    let shape = [4, 2, 4, 2, 8];
    let mut dst: Vec<Owned> = (0..2).map(|l| Owned::new(&shape, &[0, 1, 2, 3, 4], 2, l)).collect();
    let b = paged(&mut dst, 4, None);
    let engine = memory_engine(4, b.block_bytes(), 1 << 20);
    let tokens: Vec<u32> = (0..8).collect();
    engine.store_with(&tokens, HashExtras::default(), |_, slot| slot.fill(7)).unwrap();
    let before: Vec<Vec<u8>> = dst.iter().map(|t| t.mem.clone()).collect();
    let loads = [LayerLoad { tokens: &tokens, ids: &[0, 1], first_block: 0, extras: HashExtras::default() }];
    let progress = LayerProgress::new();
    for order in [&[0usize][..], &[0, 0], &[0, 2], &[1, 0, 1]] {
        progress.start();
        let out = load_by_layer(&engine, &b, &loads, order, &progress);
        assert!(matches!(&out[..], [Err(e)] if e.to_string().contains("not an order")), "{order:?}: {out:?}");
        assert!(!progress.running(), "the batch is finished even when refused");
    }
    assert!(dst.iter().zip(&before).all(|(t, b)| &t.mem == b), "nothing was written");
    // The same load in a valid order writes (the refusals above are not a broken load).
    progress.start();
    assert_eq!(load_by_layer(&engine, &b, &loads, &[1, 0], &progress)[0].as_ref().unwrap(), &8);
}

/// A sink whose second report panics: a failure after some layers are in place.
#[derive(Default)]
struct PanickingSink {
    finished: std::cell::Cell<u32>,
}

impl xconnector_core::layer_loads::LayerSink for PanickingSink {
    fn layers_done(&self, done: usize) {
        assert!(done < 2, "injected: a failure after the first layer");
    }
    fn finish(&self) {
        self.finished.set(self.finished.get() + 1);
    }
}

#[test]
fn a_failure_after_some_layers_fails_every_load_of_the_batch_and_finishes_it() {
    use xconnector_core::layer_loads::{load_by_layer, LayerLoad};
    let shape = [4, 2, 4, 2, 8];
    let mut dst: Vec<Owned> = (0..3).map(|l| Owned::new(&shape, &[0, 1, 2, 3, 4], 2, l)).collect();
    let b = paged(&mut dst, 4, None);
    let engine = memory_engine(4, b.block_bytes(), 1 << 20);
    let (one, two): (Vec<u32>, Vec<u32>) = ((0..8).collect(), (50..54).collect());
    for t in [&one, &two] {
        engine.store_with(t, HashExtras::default(), |_, slot| slot.fill(7)).unwrap();
    }
    let loads = [
        LayerLoad { tokens: &one, ids: &[0, 1], first_block: 0, extras: HashExtras::default() },
        LayerLoad { tokens: &two, ids: &[2], first_block: 0, extras: HashExtras::default() },
    ];
    let sink = PanickingSink::default();
    let out = load_by_layer(&engine, &b, &loads, &[0, 1, 2], &sink);
    // The first layer was written, so no load may count: vLLM recomputes every block.
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|r| r.as_ref().is_err_and(|e| e.to_string().contains("panic"))), "{out:?}");
    assert_eq!(sink.finished.get(), 1);
}
