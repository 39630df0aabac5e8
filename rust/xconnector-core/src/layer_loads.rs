//! Loads that hand the model its KV one layer at a time, so the forward pass starts as soon as
//! its first layer is in place instead of after the whole step's loads (vLLM's
//! `wait_for_layer_load`).
//!
//! A step's loads are pinned first (how many blocks each request gets is fixed before any byte
//! moves), then copied layer by layer, in a given order, across all the step's requests;
//! [`LayerProgress`] says how many layers of that order are in place. A layer's attention must
//! wait for it: reading a layer before its copy ends would attend over whatever the blocks held
//! before, which is wrong KV.

use std::panic::{catch_unwind, AssertUnwindSafe};

use parking_lot::{Condvar, Mutex};

use crate::bulk_copy::BulkCopy;
use crate::engine::{Engine, PinnedPrefix};
use crate::engine_blocks::EngineBlocks;
use crate::error::{CoreError, Result};
use crate::hashing::HashExtras;
use crate::kv_layout::PagedKv;

#[derive(Default)]
struct Progress {
    /// Layers in place, as positions in the copy order, of the batch running.
    done: usize,
    /// A batch is running: layers from `done` on are not in place.
    running: bool,
}

/// Told how far a batch of layer loads has come.
pub trait LayerSink {
    /// The layers at positions `0..done` of the copy order are in place.
    fn layers_done(&self, done: usize);
    /// The batch ended: nothing more will be written, whatever was copied.
    fn finish(&self);
}

/// How far the current batch of layer loads has come. Starts idle (every layer in place).
#[derive(Default)]
pub struct LayerProgress {
    state: Mutex<Progress>,
    changed: Condvar,
}

impl LayerProgress {
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch starts: no layer is in place until [`layers_done`](Self::layers_done) says so.
    pub fn start(&self) {
        *self.state.lock() = Progress { done: 0, running: true };
    }

    /// Whether the layer at `position` of the copy order may be read now.
    pub fn is_ready(&self, position: usize) -> bool {
        let s = self.state.lock();
        !s.running || position < s.done
    }

    /// Waits until the layer at `position` of the copy order may be read.
    pub fn wait_ready(&self, position: usize) {
        let mut s = self.state.lock();
        while s.running && position >= s.done {
            self.changed.wait(&mut s);
        }
    }

    /// Waits until the batch ended.
    pub fn wait_finished(&self) {
        let mut s = self.state.lock();
        while s.running {
            self.changed.wait(&mut s);
        }
    }

    pub fn running(&self) -> bool {
        self.state.lock().running
    }
}

impl LayerSink for LayerProgress {
    fn layers_done(&self, done: usize) {
        self.state.lock().done = done;
        self.changed.notify_all();
    }

    fn finish(&self) {
        self.state.lock().running = false;
        self.changed.notify_all();
    }
}

/// The order a worker copies layers in, learned from which layers its forward pass waited for:
/// layers nobody waits for first (they must be in place before the forward pass starts, since
/// nothing tells when they are read), then the waited-for ones in registration order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerOrder {
    waited: Vec<bool>,
    layers: Vec<usize>,
    position: Vec<usize>,
}

impl LayerOrder {
    /// From the layers a step waited for; None when it waited for none (loads stay whole).
    pub fn learn(waited: &[bool]) -> Option<Self> {
        if !waited.contains(&true) {
            return None;
        }
        let (first, rest): (Vec<usize>, Vec<usize>) = (0..waited.len()).partition(|&l| !waited[l]);
        let layers: Vec<usize> = first.into_iter().chain(rest).collect();
        let mut position = vec![0; layers.len()];
        for (p, &l) in layers.iter().enumerate() {
            position[l] = p;
        }
        Some(Self { waited: waited.to_vec(), layers, position })
    }

    /// Layers in copy order (for [`load_by_layer`]).
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// The position of `layer` in the copy order: a reader of `layer` waits for it.
    pub fn position(&self, layer: usize) -> usize {
        self.position[layer]
    }

    /// How many leading positions hold layers nobody waits for.
    pub fn unwaited(&self) -> usize {
        self.waited.iter().filter(|w| !**w).count()
    }

    /// Whether a batch whose waits were `seen` left a layer unwaited that was learned as waited
    /// for: it may have been read mid-copy.
    pub fn missed(&self, seen: &[bool]) -> bool {
        self.waited.iter().zip(seen).any(|(&w, &s)| w && !s)
    }

    /// The order once `seen` is all a batch waited for: layers that went unwaited join those
    /// copied first (None when no waited layer is left).
    pub fn narrowed(&self, seen: &[bool]) -> Option<Self> {
        let still: Vec<bool> = self.waited.iter().zip(seen).map(|(&w, &s)| w && s).collect();
        Self::learn(&still)
    }
}

/// One request's load: the longest cached prefix of `tokens`, into KV blocks `ids`, those
/// before position `first_block` not written (the worker holds them already).
pub struct LayerLoad<'a> {
    pub tokens: &'a [u32],
    pub ids: &'a [u32],
    pub first_block: usize,
    pub extras: HashExtras<'a>,
}

/// Runs `loads` into `kv` one layer at a time, the layers in `order` (every layer once),
/// telling `progress` after each; `progress` must have been [`start`](LayerProgress::start)ed by
/// the caller (before anyone may wait on it), and is finished here whatever happens, a panic
/// included. Returns each load's tokens, or why it loaded nothing. Block ids must have been
/// checked against `kv`.
pub fn load_by_layer(
    engine: &Engine,
    kv: &PagedKv,
    loads: &[LayerLoad<'_>],
    order: &[usize],
    progress: &impl LayerSink,
) -> Vec<Result<usize>> {
    struct Finish<'p, S: LayerSink>(&'p S);
    impl<S: LayerSink> Drop for Finish<'_, S> {
        fn drop(&mut self) {
            self.0.finish();
        }
    }
    let _finish = Finish(progress);
    let run = || {
        let mut seen = vec![false; kv.num_layers()];
        if order.len() != seen.len() || order.iter().any(|&l| l >= seen.len() || std::mem::replace(&mut seen[l], true))
        {
            return Err(CoreError::invalid(format!("{order:?} is not an order of the {} layers", seen.len())));
        }
        let cfg = engine.config();
        let geometry = EngineBlocks::new(kv.block_size(), kv.block_bytes(), cfg.block_size, cfg.block_bytes)?;
        let total = loads.iter().map(|l| l.ids.len() * kv.block_bytes()).sum();
        let copy = BulkCopy::for_transfer(total);
        let pinned: Vec<Result<PinnedPrefix<'_>>> = loads
            .iter()
            .map(|l| engine.pin_for_load(l.tokens, l.extras, geometry.load_engine_blocks(l.ids.len())))
            .collect();
        for (position, &layer) in order.iter().enumerate() {
            for (load, prefix) in loads.iter().zip(&pinned) {
                let Ok(prefix) = prefix else { continue };
                prefix.read(|i, bytes| {
                    for (pos, range) in geometry.parts(i, load.first_block) {
                        kv.unpack_block_layer(load.ids[pos], layer, &bytes[range], copy);
                    }
                });
            }
            progress.layers_done(position + 1);
        }
        Ok(pinned.into_iter().map(|p| p.map(|p| p.tokens())).collect::<Vec<_>>())
    };
    let failed = |e: &CoreError| loads.iter().map(|_| Err(CoreError::Internal(e.to_string()))).collect();
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => failed(&e),
        Err(_) => failed(&CoreError::Internal("a panic in a layer-wise load".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::sync::Arc;

    #[test]
    fn layers_nobody_waits_for_are_copied_first_and_each_layer_waits_for_its_own_position() {
        let order = LayerOrder::learn(&[true, false, true, false, true]).unwrap();
        assert_eq!(order.layers(), &[1, 3, 0, 2, 4]);
        assert_eq!(order.unwaited(), 2);
        for (p, &l) in order.layers().iter().enumerate() {
            assert_eq!(order.position(l), p, "layer {l}");
        }
        // A reader of layer 0 waits until positions 0..=2 are copied: layers 1, 3 and 0.
        let p = LayerProgress::new();
        p.start();
        p.layers_done(2);
        assert!(!p.is_ready(order.position(0)) && p.is_ready(order.position(3)));
        assert_eq!(LayerOrder::learn(&[false, false]), None, "nothing waited: loads stay whole");
    }

    #[test]
    fn a_learned_layer_left_unwaited_is_missed_and_then_copied_first() {
        let order = LayerOrder::learn(&[true, true, false]).unwrap();
        assert!(!order.missed(&[true, true, false]));
        assert!(!order.missed(&[true, true, true]), "a wait for a layer copied first is harmless");
        assert!(order.missed(&[true, false, false]));
        let narrowed = order.narrowed(&[true, false, false]).unwrap();
        assert_eq!((narrowed.layers(), narrowed.unwaited()), (&[1, 2, 0][..], 2));
        assert!(!narrowed.missed(&[true, false, false]));
        assert_eq!(order.narrowed(&[false, false, true]), None, "no waited layer left");
    }

    #[test]
    fn a_layer_is_ready_only_once_copied_and_every_layer_once_the_batch_ends() {
        let p = LayerProgress::new();
        assert!(p.is_ready(5), "idle: nothing is being written");
        p.start();
        assert!(!p.is_ready(0));
        p.layers_done(2);
        assert!(p.is_ready(1) && !p.is_ready(2));
        p.wait_ready(1); // returns at once
        p.finish();
        assert!(p.is_ready(7) && !p.running());
    }

    #[test]
    fn a_waiter_wakes_when_its_layer_is_copied() {
        let p = Arc::new(LayerProgress::new());
        p.start();
        let (woke, seen) = channel();
        let waiter = {
            let p = Arc::clone(&p);
            std::thread::spawn(move || {
                p.wait_ready(1);
                woke.send(p.is_ready(1)).unwrap();
            })
        };
        p.layers_done(2);
        assert!(seen.recv().unwrap());
        waiter.join().unwrap();
    }
}
