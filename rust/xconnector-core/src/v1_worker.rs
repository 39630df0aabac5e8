//! The worker side of the vLLM v1 connector: what each step's loads and saves did, kept for vLLM
//! (the blocks it must recompute) and for the scheduler (the steps whose loads ran, the requests
//! to save again), the counterpart of `transfer_plan`'s rules.
//!
//! 1. **A short load is a failed load.** Loading fewer tokens than planned (evicted since the
//!    lookup, refused as not this block's KV, or an error) makes every block from the first one
//!    not written an error for vLLM to recompute, and the request and the step failed.
//! 2. **KV computed over a failed load is never saved.** A save planned `if_loads_ok` in a step
//!    where any load failed is skipped, and its request reported failed, so the scheduler plans
//!    it again once vLLM has recomputed it (`transfer_plan` rule 4).
//! 3. **Every step with loads is reported.** The scheduler waits for that report before saving
//!    anything computed over those loads, so a step whose loads all failed is reported too.
//! 4. **A request's blocks are held while its saves run.** When saves run after their step, the
//!    scheduler holds back the blocks of a finished request it planned a save for
//!    (`transfer_plan`'s `finished`) and says so in the step's metadata (`hold`); the workers see
//!    the same saves planned, and report such a request finished (vLLM frees its blocks) once
//!    none of its saves is in flight, every such request exactly once.
//!
//! A step's saves may run after the report for that step (vLLM defers them with speculative
//! decoding), so a failed step is remembered until a later step's transfers arrive.

use std::collections::{BTreeSet, HashSet};

use crate::transfer_plan::BlockId;

/// What one load did, for the worker's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOutcome {
    /// Tokens written into vLLM's blocks (those before `first_block` were there already).
    pub written_tokens: usize,
    /// Fewer tokens than planned (rule 1).
    pub failed: bool,
}

/// One worker's record of its loads and saves since it last reported (see the module's rules).
#[derive(Debug, Default)]
pub struct WorkerLedger {
    block_size: usize,
    load_errors: BTreeSet<BlockId>,
    failed_requests: BTreeSet<String>,
    loaded_steps: BTreeSet<u64>,
    failed_steps: BTreeSet<u64>,
    /// Requests with a save planned, not finished yet (rule 4).
    saving: HashSet<String>,
    /// Finished requests whose blocks wait for their saves (rule 4).
    finishing: BTreeSet<String>,
}

impl WorkerLedger {
    /// `block_size`: tokens per vLLM block.
    pub fn new(block_size: usize) -> Self {
        Self { block_size: block_size.max(1), ..Self::default() }
    }

    /// A load of `step` for `req_id`: `planned` tokens into `block_ids`, of which `loaded` were
    /// loaded; blocks before `first_block` were not to be written.
    pub fn load_done(
        &mut self,
        step: u64,
        req_id: &str,
        planned: usize,
        block_ids: &[BlockId],
        first_block: usize,
        loaded: usize,
    ) -> LoadOutcome {
        self.forget_steps_before(step);
        self.loaded_steps.insert(step);
        let failed = loaded < planned;
        if failed {
            let start = (loaded / self.block_size).max(first_block);
            self.load_errors.extend(block_ids.iter().skip(start).copied());
            self.failed_requests.insert(req_id.to_owned());
            self.failed_steps.insert(step);
        }
        let written_tokens = loaded.saturating_sub(first_block * self.block_size);
        LoadOutcome { written_tokens, failed }
    }

    /// Whether a save of `step` must be skipped (rule 2); the request is then reported failed.
    /// Skipped or not, with `hold` the scheduler holds the request's blocks for it (rule 4).
    pub fn skip_save(&mut self, step: u64, req_id: &str, if_loads_ok: bool, hold: bool) -> bool {
        self.forget_steps_before(step);
        if hold {
            self.saving.insert(req_id.to_owned());
        }
        let skip = if_loads_ok && self.failed_steps.contains(&step);
        if skip {
            self.failed_requests.insert(req_id.to_owned());
        }
        skip
    }

    /// The requests vLLM may free the blocks of now (rule 4): of those with a save planned,
    /// the ones finished now or before (`finished`) that have no save `in_flight` any more.
    pub fn finished<'a>(
        &mut self,
        finished: impl IntoIterator<Item = &'a str>,
        in_flight: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        for req_id in finished {
            if self.saving.remove(req_id) {
                self.finishing.insert(req_id.to_owned());
            }
        }
        let done: Vec<String> = self.finishing.iter().filter(|r| !in_flight(r)).cloned().collect();
        for req_id in &done {
            self.finishing.remove(req_id);
        }
        done
    }

    /// Requests whose blocks are held for saves still running.
    pub fn held(&self) -> usize {
        self.finishing.len()
    }

    /// The blocks vLLM must recompute, once each: those of failed loads since the last call.
    pub fn take_load_errors(&mut self) -> Vec<BlockId> {
        std::mem::take(&mut self.load_errors).into_iter().collect()
    }

    /// The report for the scheduler (rule 3): the steps whose loads ran and the requests that
    /// failed, or None when there is nothing new to report.
    pub fn take_report(&mut self) -> Option<(Vec<u64>, Vec<String>)> {
        if self.loaded_steps.is_empty() && self.failed_requests.is_empty() {
            return None;
        }
        let steps = std::mem::take(&mut self.loaded_steps).into_iter().collect();
        Some((steps, std::mem::take(&mut self.failed_requests).into_iter().collect()))
    }

    /// Transfers of `step` arrived: the saves of earlier steps have all run.
    fn forget_steps_before(&mut self, step: u64) {
        self.failed_steps = self.failed_steps.split_off(&step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_load_makes_the_blocks_from_the_first_missing_one_errors() {
        let mut l = WorkerLedger::new(4);
        // 16 tokens planned into blocks 10..14, only 6 loaded: block 11 is half written.
        let out = l.load_done(1, "a", 16, &[10, 11, 12, 13], 0, 6);
        assert_eq!(out, LoadOutcome { written_tokens: 6, failed: true });
        assert_eq!(l.take_load_errors(), vec![11, 12, 13]);
        assert!(l.take_load_errors().is_empty(), "each error is reported once");
        assert_eq!(l.take_report(), Some((vec![1], vec!["a".to_owned()])));
    }

    #[test]
    fn blocks_vllm_held_already_are_neither_errors_nor_written() {
        let mut l = WorkerLedger::new(4);
        // Blocks 0 and 1 were vLLM's own; nothing loaded at all.
        let out = l.load_done(1, "a", 16, &[5, 6, 7, 8], 2, 0);
        assert_eq!(out, LoadOutcome { written_tokens: 0, failed: true });
        assert_eq!(l.take_load_errors(), vec![7, 8]);
        let out = l.load_done(2, "b", 16, &[5, 6, 7, 8], 2, 16);
        assert_eq!(out, LoadOutcome { written_tokens: 8, failed: false });
    }

    #[test]
    fn a_conditional_save_is_skipped_only_after_a_failed_load_of_its_step() {
        let mut l = WorkerLedger::new(4);
        l.load_done(1, "a", 8, &[1, 2], 0, 8);
        assert!(!l.skip_save(1, "b", true, true), "the step's loads all succeeded");
        l.load_done(2, "c", 8, &[3, 4], 0, 4);
        assert!(!l.skip_save(2, "d", false, true), "an unconditional save never waits");
        assert!(l.skip_save(2, "e", true, true));
        let (steps, failed) = l.take_report().unwrap();
        assert_eq!(steps, vec![1, 2]);
        assert_eq!(failed, vec!["c".to_owned(), "e".to_owned()]);
        l.load_done(3, "f", 8, &[5, 6], 0, 8);
        assert!(!l.skip_save(3, "g", true, true), "step 3's loads all succeeded");
    }

    #[test]
    fn a_finished_request_is_released_once_its_saves_ran_and_only_if_a_save_was_planned() {
        let mut l = WorkerLedger::new(4);
        l.skip_save(1, "a", false, true);
        l.skip_save(1, "b", false, true);
        l.skip_save(1, "x", false, false); // saved inside the step: its blocks were not held
        let busy = |r: &str| r == "a";
        // "c" never had a save planned: the scheduler did not hold its blocks.
        assert_eq!(l.finished(["a", "b", "c", "x"], busy), vec!["b".to_owned()]);
        assert_eq!(l.held(), 1);
        assert_eq!(l.finished([], busy), Vec::<String>::new(), "a's save still runs");
        assert_eq!(l.finished([], |_| false), vec!["a".to_owned()]);
        assert_eq!(l.finished(["a", "b"], |_| false), Vec::<String>::new(), "each once");
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn a_skipped_save_still_holds_the_blocks_until_finished() {
        let mut l = WorkerLedger::new(4);
        l.load_done(1, "a", 8, &[1, 2], 0, 0);
        assert!(l.skip_save(1, "a", true, true));
        assert_eq!(l.finished(["a"], |_| false), vec!["a".to_owned()]);
    }

    #[test]
    fn a_save_deferred_past_its_steps_report_still_sees_the_failed_load() {
        // vLLM with speculative decoding: the report is built before the step's saves run.
        let mut l = WorkerLedger::new(4);
        l.load_done(1, "a", 8, &[1, 2], 0, 4);
        assert_eq!(l.take_report(), Some((vec![1], vec!["a".to_owned()])));
        assert!(l.skip_save(1, "b", true, true), "computed over step 1's failed load");
        assert_eq!(l.take_report(), Some((vec![], vec!["b".to_owned()])), "reported next time");
        assert!(!l.skip_save(2, "c", true, true), "a later step starts over");
    }

    #[test]
    fn no_load_no_report() {
        let mut l = WorkerLedger::new(4);
        assert_eq!(l.take_report(), None);
        l.load_done(3, "a", 4, &[1], 0, 4);
        assert_eq!(l.take_report(), Some((vec![3], vec![])));
        assert_eq!(l.take_report(), None);
    }
}
