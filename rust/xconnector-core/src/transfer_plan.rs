//! The scheduler side of the vLLM v1 connector: which blocks of which request to load and to save
//! in each step. Plain request ids, token counts and vLLM block ids in, plain load and save
//! descriptions out; the binding's caller slices tokens and names and builds vLLM's objects.
//!
//! A wrong save is wrong KV served later, so the rules are stated here and each one is tested:
//!
//! 1. **Whole engine blocks only.** A save covers `len / engine_block * engine_block` tokens of
//!    the prompt, and exactly the vLLM blocks holding them; without all of those blocks (or with
//!    no whole engine block) the request is not saved at all.
//! 2. **A save waits for its loads.** The vLLM blocks a load writes are *in flight* until the
//!    workers confirm that load's step. KV computed over an in-flight block (the request's own
//!    load, or a block vLLM's prefix cache shares with a request that loaded) is good only if
//!    that load was, so a save over one is never unconditional: it waits for the confirmation.
//! 3. **Conditional only in the load's own step, with one worker.** A single worker can tell
//!    itself whether any load of this step failed, so a save whose blocks are in flight for this
//!    step only is planned `if_loads_ok` (the worker skips it after a failed load). With several
//!    workers a failed load on one rank spoils all of them, so every rank must confirm first.
//! 4. **A failed request is planned again.** The workers report a request whose load failed (or
//!    whose conditional save they skipped); it is saved once vLLM has recomputed the prompt, by
//!    the same rules, never before.
//! 5. **A resumed request replaces its blocks.** vLLM hands a preempted request new blocks when
//!    it resumes; the old ids are not its KV any more.
//! 6. **Loads stop when nothing confirms them.** After `unconfirmed_steps` steps with a load
//!    unconfirmed, the workers never report back (a vLLM without the worker-metadata channel):
//!    nothing computed over a load could ever be saved, so loads are turned off; saves go on.
//! 7. **A finished request's blocks wait for its saves.** A request with a save planned is
//!    reported by `finished` so vLLM holds its blocks until the workers have saved them
//!    (`v1_worker` rule 4): the workers see exactly the saves planned here.

use std::collections::{BTreeMap, HashMap, HashSet};

/// A vLLM block id (vLLM's ints; never negative in practice, any i64 accepted).
pub type BlockId = i64;

/// Blocks of one request to load: tokens `[0, tokens)` go into `block_ids`; the blocks before
/// `first_block` are not loaded (vLLM holds them already).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub req_id: String,
    pub tokens: usize,
    pub block_ids: Vec<BlockId>,
    pub first_block: usize,
}

/// Blocks of one request to save: tokens `[0, tokens)`, a whole number of engine blocks, held
/// exactly by `block_ids`. `if_loads_ok`: planned in the step of a load it depends on (one
/// worker only), done only if no load of that step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Save {
    pub req_id: String,
    pub tokens: usize,
    pub block_ids: Vec<BlockId>,
    pub if_loads_ok: bool,
}

/// What one scheduled request adds to a step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Planned {
    pub load: Option<Load>,
    pub save: Option<Save>,
}

#[derive(Debug)]
struct Tracked {
    num_tokens: usize,
    block_ids: Vec<BlockId>,
    saved: bool,
}

/// The per-step load/save plan of one vLLM scheduler (see the module's rules).
#[derive(Debug)]
pub struct TransferPlanner {
    block_size: usize,
    engine_block: usize,
    world: usize,
    unconfirmed_steps: u64,
    step: u64,
    loads_off: bool,
    /// Scheduled requests with a key (the only ones saved).
    tracked: HashMap<String, Tracked>,
    /// Loads planned at allocation, handed to the workers when the request is scheduled.
    pending: HashMap<String, Load>,
    /// The local (vLLM prefix cache) hit each request's last lookup answer was relative to.
    local_hits: HashMap<String, usize>,
    /// vLLM blocks written by loads of steps the workers have not confirmed, by step. A step
    /// with a load has an entry, even with no block written: it is unconfirmed all the same.
    inflight: BTreeMap<u64, HashSet<BlockId>>,
    /// Requests with a save planned (rule 7), until finished.
    saves_planned: HashSet<String>,
}

impl TransferPlanner {
    /// `block_size`: tokens per vLLM block; `engine_block`: tokens per engine block (a multiple
    /// of it); `world`: the workers (tensor x pipeline ranks); `unconfirmed_steps`: rule 6.
    pub fn new(block_size: usize, engine_block: usize, world: usize, unconfirmed_steps: u64) -> Self {
        Self {
            block_size: block_size.max(1),
            engine_block: engine_block.max(1),
            world,
            unconfirmed_steps,
            step: 0,
            loads_off: false,
            tracked: HashMap::new(),
            pending: HashMap::new(),
            local_hits: HashMap::new(),
            inflight: BTreeMap::new(),
            saves_planned: HashSet::new(),
        }
    }

    /// The current step (0 before the first).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Whether loads are off (rule 6): lookups should promise nothing.
    pub fn loads_off(&self) -> bool {
        self.loads_off
    }

    /// A lookup answered for `req_id` relative to `local_hit` tokens vLLM holds already.
    pub fn note_lookup(&mut self, req_id: &str, local_hit: usize) {
        self.local_hits.insert(req_id.to_owned(), local_hit);
    }

    /// vLLM allocated `block_ids` for `req_id` with `external_tokens` to load beyond its local
    /// hit: the load to hand the workers when the request is scheduled. Nothing to load (or a
    /// request that cannot be keyed: `external_tokens` 0) drops any load planned before.
    pub fn plan_load(&mut self, req_id: &str, external_tokens: usize, block_ids: &[BlockId]) {
        if external_tokens == 0 {
            self.pending.remove(req_id);
            return;
        }
        let local = self.local_hits.get(req_id).copied().unwrap_or(0);
        // Counts past usize are no request vLLM can hold: no load (a recompute is always safe).
        let Some(total) = local.checked_add(external_tokens) else {
            self.pending.remove(req_id);
            return;
        };
        let blocks = block_ids[..block_ids.len().min(total / self.block_size)].to_vec();
        let load =
            Load { req_id: req_id.to_owned(), tokens: total, block_ids: blocks, first_block: local / self.block_size };
        self.pending.insert(req_id.to_owned(), load);
    }

    /// Starts the next step and returns its number, with, when loads turn off in it (rule 6),
    /// how many steps old the oldest unconfirmed load is.
    pub fn begin_step(&mut self) -> (u64, Option<u64>) {
        self.step += 1;
        let mut turned_off = None;
        if let Some(&oldest) = self.inflight.keys().next() {
            let age = self.step - oldest;
            if age > self.unconfirmed_steps && !self.loads_off {
                self.loads_off = true;
                turned_off = Some(age);
            }
        }
        (self.step, turned_off)
    }

    /// A request scheduled for the first time (or again under the same id): `num_tokens` in
    /// its key, `block_ids` its vLLM blocks, `computed` the tokens computed once this step ran.
    pub fn schedule_new(
        &mut self,
        req_id: &str,
        num_tokens: usize,
        block_ids: Vec<BlockId>,
        computed: usize,
    ) -> Planned {
        self.tracked.insert(req_id.to_owned(), Tracked { num_tokens, block_ids, saved: false });
        self.plan(req_id, computed)
    }

    /// A request scheduled before: `new_block_ids` its newly allocated blocks (None: none),
    /// which replace its blocks when it `resumed` after preemption (rule 5). Untracked requests
    /// (never keyed) plan nothing.
    pub fn schedule_cached(
        &mut self,
        req_id: &str,
        new_block_ids: Option<Vec<BlockId>>,
        resumed: bool,
        computed: usize,
    ) -> Planned {
        let Some(tracked) = self.tracked.get_mut(req_id) else {
            return Planned::default();
        };
        if resumed {
            tracked.block_ids = new_block_ids.unwrap_or_default();
        } else if let Some(ids) = new_block_ids {
            tracked.block_ids.extend(ids);
        }
        self.plan(req_id, computed)
    }

    fn plan(&mut self, req_id: &str, computed: usize) -> Planned {
        let mut planned = Planned::default();
        if let Some(load) = self.pending.remove(req_id) {
            let written = load.block_ids.get(load.first_block..).unwrap_or(&[]);
            self.inflight.entry(self.step).or_default().extend(written.iter().copied());
            planned.load = Some(load);
        }
        let Some(tracked) = self.tracked.get_mut(req_id) else {
            return planned;
        };
        if tracked.saved || computed < tracked.num_tokens {
            return planned;
        }
        // Rule 1: whole engine blocks, and every vLLM block that holds them.
        let full = tracked.num_tokens / self.engine_block * self.engine_block;
        let needed = full / self.block_size;
        let save_blocks = &tracked.block_ids[..tracked.block_ids.len().min(needed)];
        if full == 0 || save_blocks.len() < needed {
            tracked.saved = true; // nothing whole to save
            return planned;
        }
        // Rules 2 and 3: the unconfirmed steps whose loads wrote any of these blocks.
        let waits: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, ids)| save_blocks.iter().any(|b| ids.contains(b)))
            .map(|(&s, _)| s)
            .collect();
        let conditional = !waits.is_empty();
        if conditional && (waits != [self.step] || self.world != 1) {
            return planned;
        }
        tracked.saved = true;
        self.saves_planned.insert(req_id.to_owned());
        planned.save = Some(Save {
            req_id: req_id.to_owned(),
            tokens: full,
            block_ids: save_blocks.to_vec(),
            if_loads_ok: conditional,
        });
        planned
    }

    /// What the workers reported: `steps` whose loads ran (confirmed, on every rank), and
    /// requests whose load failed or whose conditional save was skipped (rule 4): those are
    /// saved again once vLLM has recomputed them.
    pub fn confirm<'a>(&mut self, steps: impl IntoIterator<Item = u64>, failed: impl IntoIterator<Item = &'a str>) {
        for step in steps {
            self.inflight.remove(&step);
        }
        for req_id in failed {
            if let Some(t) = self.tracked.get_mut(req_id) {
                t.saved = false;
            }
        }
    }

    /// The request is done: everything kept for it goes. True when a save was planned for it:
    /// its blocks must wait for the workers' saves (rule 7).
    pub fn finished(&mut self, req_id: &str) -> bool {
        self.tracked.remove(req_id);
        self.pending.remove(req_id);
        self.local_hits.remove(req_id);
        self.saves_planned.remove(req_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    fn ids(r: std::ops::Range<BlockId>) -> Vec<BlockId> {
        r.collect()
    }

    /// A request that loaded `local + ext` tokens into blocks `0..n`, scheduled this step.
    fn loaded(p: &mut TransferPlanner, rid: &str, num_tokens: usize, blocks: Vec<BlockId>, ext: usize) -> Planned {
        p.note_lookup(rid, 0);
        p.plan_load(rid, ext, &blocks);
        p.schedule_new(rid, num_tokens, blocks, num_tokens)
    }

    #[test]
    fn token_counts_past_usize_plan_no_load() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.note_lookup("a", usize::MAX);
        p.plan_load("a", 2, &ids(0..3));
        p.begin_step();
        assert_eq!(p.schedule_new("a", 8, ids(0..3), 0).load, None);
    }

    #[test]
    fn a_computed_prompt_is_saved_once_in_whole_blocks() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.begin_step();
        let got = p.schedule_new("a", 10, ids(0..3), 10);
        assert_eq!(got.load, None);
        assert_eq!(got.save, Some(Save { req_id: "a".into(), tokens: 8, block_ids: vec![0, 1], if_loads_ok: false }));
        p.begin_step();
        assert_eq!(p.schedule_cached("a", Some(vec![3]), false, 11), Planned::default());
    }

    #[test]
    fn only_a_request_with_a_save_planned_holds_its_blocks_when_finished() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.begin_step();
        assert!(p.schedule_new("a", 10, ids(0..3), 10).save.is_some());
        assert!(p.schedule_new("b", 10, ids(3..6), 4).save.is_none(), "not computed yet");
        assert!(p.schedule_new("c", 3, ids(6..7), 3).save.is_none(), "no whole block");
        assert!(p.finished("a"));
        assert!(!p.finished("a"), "once");
        assert!(!p.finished("b") && !p.finished("c"));
    }

    #[test]
    fn nothing_is_saved_before_the_prompt_is_computed() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.begin_step();
        assert_eq!(p.schedule_new("a", 12, ids(0..3), 8).save, None);
        p.begin_step();
        let save = p.schedule_cached("a", None, false, 12).save.unwrap();
        assert_eq!((save.tokens, save.block_ids), (12, ids(0..3)));
    }

    #[test]
    fn never_a_partial_engine_block() {
        // Engine blocks of two vLLM blocks: 21 tokens hold two whole engine blocks (16 tokens).
        let mut p = TransferPlanner::new(BS, 2 * BS, 1, 256);
        p.begin_step();
        let save = p.schedule_new("a", 21, ids(0..6), 21).save.unwrap();
        assert_eq!(save.tokens, 16);
        assert_eq!(save.tokens % (2 * BS), 0);
        assert_eq!(save.block_ids, ids(0..4));
        // Shorter than one engine block: never saved, even when more blocks come.
        let mut p = TransferPlanner::new(BS, 2 * BS, 1, 256);
        p.begin_step();
        assert_eq!(p.schedule_new("b", 7, ids(0..2), 7).save, None);
        p.begin_step();
        assert_eq!(p.schedule_cached("b", Some(vec![2]), false, 8).save, None);
    }

    #[test]
    fn without_every_block_of_the_prompt_nothing_is_saved() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.begin_step();
        assert_eq!(p.schedule_new("a", 12, ids(0..2), 12).save, None);
        p.begin_step();
        assert_eq!(p.schedule_cached("a", Some(vec![2]), false, 13).save, None);
    }

    #[test]
    fn a_load_is_handed_over_when_its_request_is_scheduled() {
        let mut p = TransferPlanner::new(BS, BS, 2, 256);
        p.note_lookup("a", 4); // one block held by vLLM already
        p.plan_load("a", 6, &ids(10..14));
        p.begin_step();
        let got = p.schedule_new("a", 14, ids(10..14), 14);
        let load = got.load.unwrap();
        assert_eq!((load.tokens, load.block_ids, load.first_block), (10, ids(10..12), 1));
        // Nothing to load any more: the planned load is dropped.
        p.note_lookup("b", 0);
        p.plan_load("b", 8, &ids(20..22));
        p.plan_load("b", 0, &ids(20..22));
        assert_eq!(p.schedule_new("b", 9, ids(20..22), 1).load, None);
    }

    #[test]
    fn never_an_unconditional_save_over_blocks_of_an_unconfirmed_load() {
        // Several workers: waits for the confirmation, even in the load's own step.
        let mut p = TransferPlanner::new(BS, BS, 2, 256);
        p.begin_step();
        let got = loaded(&mut p, "a", 10, ids(0..3), 8);
        assert!(got.load.is_some());
        assert_eq!(got.save, None);
        // Another request sharing a loaded block (vLLM's prefix cache) waits too.
        assert_eq!(p.schedule_new("b", 8, vec![1, 7], 8).save, None);
        // A request over other blocks does not.
        assert!(p.schedule_new("c", 4, vec![9], 4).save.is_some());
        p.begin_step();
        assert_eq!(p.schedule_cached("a", None, false, 11).save, None);
        p.confirm([1], []);
        p.begin_step();
        let save = p.schedule_cached("a", None, false, 12).save.unwrap();
        assert!(!save.if_loads_ok);
        assert!(!p.schedule_cached("b", None, false, 9).save.unwrap().if_loads_ok);
    }

    #[test]
    fn conditional_only_with_one_worker_in_the_load_s_own_step() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.begin_step();
        let save = loaded(&mut p, "a", 10, ids(0..3), 8).save.unwrap();
        assert!(save.if_loads_ok);
        // Still unconfirmed a step later: no longer this step's, so it waits.
        p.begin_step();
        assert_eq!(p.schedule_new("b", 8, vec![0, 1], 8).save, None);
        // Blocks in flight for this step and an earlier one: waits as well.
        p.plan_load("c", 8, &[1, 5]);
        p.begin_step();
        let got = p.schedule_new("c", 8, vec![1, 5], 8);
        assert!(got.load.is_some());
        assert_eq!(got.save, None);
        p.confirm([1, 3], []);
        p.begin_step();
        assert!(!p.schedule_cached("b", None, false, 9).save.unwrap().if_loads_ok);
    }

    #[test]
    fn a_failed_request_is_planned_again_once_recomputed() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.begin_step();
        assert!(loaded(&mut p, "a", 10, ids(0..3), 8).save.unwrap().if_loads_ok);
        p.confirm([1], ["a", "unknown"]);
        // vLLM recomputes from the failed block: not saved before the prompt is computed again.
        p.begin_step();
        assert_eq!(p.schedule_cached("a", None, false, 9).save, None);
        p.begin_step();
        let save = p.schedule_cached("a", None, false, 10).save.unwrap();
        assert_eq!((save.tokens, save.if_loads_ok), (8, false));
        p.begin_step();
        assert_eq!(p.schedule_cached("a", None, false, 11).save, None);
    }

    #[test]
    fn a_resumed_request_replaces_its_block_ids() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.begin_step();
        assert_eq!(p.schedule_new("a", 12, ids(0..3), 4).save, None);
        p.begin_step();
        let save = p.schedule_cached("a", Some(ids(20..23)), true, 12).save.unwrap();
        assert_eq!(save.block_ids, ids(20..23));
        // Resumed with no new blocks: it holds none, so nothing is saved.
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.begin_step();
        p.schedule_new("b", 12, ids(0..3), 4);
        p.begin_step();
        assert_eq!(p.schedule_cached("b", None, true, 12).save, None);
    }

    #[test]
    fn untracked_requests_plan_nothing() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.begin_step();
        assert_eq!(p.schedule_cached("x", Some(ids(0..3)), false, 12), Planned::default());
        p.schedule_new("a", 12, ids(0..3), 4);
        p.finished("a");
        assert_eq!(p.schedule_cached("a", None, false, 12), Planned::default());
    }

    #[test]
    fn loads_turn_off_after_the_limit_of_unconfirmed_steps() {
        let mut p = TransferPlanner::new(BS, BS, 2, 3);
        p.begin_step();
        loaded(&mut p, "a", 10, ids(0..3), 8);
        for _ in 0..3 {
            assert_eq!(p.begin_step().1, None);
        }
        assert!(!p.loads_off());
        assert_eq!(p.begin_step(), (5, Some(4)));
        assert!(p.loads_off());
        assert_eq!(p.begin_step().1, None); // reported once
                                            // A load with no block written still counts as unconfirmed.
        let mut p = TransferPlanner::new(BS, BS, 2, 1);
        p.begin_step();
        p.note_lookup("b", 8);
        p.plan_load("b", 1, &ids(0..2));
        assert_eq!(p.schedule_new("b", 9, ids(0..3), 9).load.unwrap().block_ids.get(2..), Some(&[][..]));
        p.begin_step();
        assert_eq!(p.begin_step().1, Some(2));
    }

    #[test]
    fn confirmed_steps_keep_loads_on() {
        let mut p = TransferPlanner::new(BS, BS, 2, 3);
        for step in 1..20 {
            assert_eq!(p.begin_step(), (step, None));
            loaded(&mut p, &format!("r{step}"), 10, ids(0..3), 8);
            p.confirm([step], []);
        }
        assert!(!p.loads_off());
    }

    #[test]
    fn finished_requests_forget_their_pending_load() {
        let mut p = TransferPlanner::new(BS, BS, 1, 256);
        p.note_lookup("a", 0);
        p.plan_load("a", 8, &ids(0..2));
        p.finished("a");
        p.begin_step();
        assert_eq!(p.schedule_new("a", 9, ids(0..3), 1).load, None);
    }
}
