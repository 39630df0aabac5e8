//! vLLM v0 batches (DESIGN 3.2). A v0 `model_input` holds its sequences' query tokens back to
//! back in one flattened input, prefill sequences first. [`prefills`] finds each prefill's range
//! from the attention metadata; [`Skip`] gives the batch's index fields once the cached prefix of
//! some prefills is loaded instead of computed.
//!
//! Invariant: a prefill keeps at least its last query token (its logits are sampled; see
//! `prefix::usable_prefix`), so no query range becomes empty and every sampled index still
//! points at the token it pointed at. [`Skip::new`] refuses anything else.

use crate::error::{CoreError, Result};

/// One prefill sequence: its query tokens are `start..end` of the flattened input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefill {
    pub start: usize,
    pub end: usize,
    /// The query covers the whole sequence: nothing of it was computed before this step.
    pub fresh: bool,
}

/// The batch's prefills, in order. Query ranges come from `query_start_loc` when the batch has
/// it, else from the query lengths (`query_lens`, or `seq_lens` when that is absent or empty).
/// `num_prefills` defaults to every sequence.
pub fn prefills(
    num_tokens: usize,
    num_slots: usize,
    seq_lens: &[i64],
    num_prefills: Option<usize>,
    query_start_loc: Option<&[i64]>,
    query_lens: Option<&[i64]>,
) -> Result<Vec<Prefill>> {
    if num_slots != num_tokens {
        return Err(CoreError::invalid(format!("slot_mapping has {num_slots} entries for {num_tokens} input tokens")));
    }
    let num_prefills = num_prefills.unwrap_or(seq_lens.len());
    let starts: Vec<i64> = match query_start_loc {
        Some(qsl) => qsl.to_vec(),
        None => {
            let lens = query_lens.filter(|l| !l.is_empty()).unwrap_or(seq_lens);
            let ends = lens.iter().take(seq_lens.len()).scan(0, |end, n| {
                *end += n;
                Some(*end)
            });
            std::iter::once(0).chain(ends).collect()
        }
    };
    if starts.len() <= num_prefills || seq_lens.len() < num_prefills {
        return Err(CoreError::invalid(format!(
            "attn_metadata describes {} sequences / {} query ranges for {num_prefills} prefills",
            seq_lens.len(),
            starts.len().saturating_sub(1)
        )));
    }
    (0..num_prefills)
        .map(|i| {
            let (start, end) = (starts[i], starts[i + 1]);
            if start < 0 || start > end || end > num_tokens as i64 {
                return Err(CoreError::invalid(format!(
                    "query range {start}..{end} of sequence {i} is out of the batch"
                )));
            }
            let fresh = end - start == seq_lens[i];
            Ok(Prefill { start: start as usize, end: end as usize, fresh })
        })
        .collect()
}

/// The fields of a v0 batch that index its flattened input (vLLM's names); None where the
/// batch lacks one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// One entry per input token.
    pub input_tokens: Option<Vec<i64>>,
    pub input_positions: Option<Vec<i64>>,
    pub slot_mapping: Option<Vec<i64>>,
    /// Positions in the flattened input.
    pub query_start_loc: Option<Vec<i64>>,
    pub selected_token_indices: Option<Vec<i64>>,
    /// One entry per sequence.
    pub context_lens: Option<Vec<i64>>,
    pub query_lens: Option<Vec<i64>>,
    pub num_prefill_tokens: Option<i64>,
    pub max_query_len: Option<i64>,
}

/// A batch of `num_tokens` input tokens without the first `skip[i]` query tokens of prefill `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    num_tokens: usize,
    /// Removed positions of the flattened input, ascending.
    removed: Vec<usize>,
    skip: Vec<usize>,
    /// Each prefill's new query length (at least 1).
    query_lens: Vec<usize>,
}

impl Skip {
    pub fn new(num_tokens: usize, prefills: &[Prefill], skip: &[usize]) -> Result<Self> {
        if prefills.len() != skip.len() {
            return Err(CoreError::invalid(format!("{} skip counts for {} prefills", skip.len(), prefills.len())));
        }
        let mut removed = Vec::new();
        let mut query_lens = Vec::with_capacity(prefills.len());
        for (i, (p, &n)) in prefills.iter().zip(skip).enumerate() {
            let len = p.end.saturating_sub(p.start);
            if n >= len || p.end > num_tokens {
                return Err(CoreError::invalid(format!("cannot skip {n} of {len} tokens of request {i}")));
            }
            removed.extend(p.start..p.start + n);
            query_lens.push(len - n);
        }
        removed.sort_unstable();
        removed.dedup();
        Ok(Self { num_tokens, removed, skip: skip.to_vec(), query_lens })
    }

    /// How many input tokens are removed.
    pub fn removed(&self) -> usize {
        self.removed.len()
    }

    /// Where position `pos` of the old input lies in the new one: earlier by the removed
    /// positions before it.
    pub fn shift(&self, pos: i64) -> i64 {
        pos - self.removed.partition_point(|&r| (r as i64) < pos) as i64
    }

    /// The batch's `fields` (of `num_seqs` sequences, prefills first) after the skip: per-token
    /// fields keep the tokens not removed, positions shift, a prefill's skipped tokens move from
    /// its query to its context, and the longest query is recomputed (1 for a decode).
    pub fn apply(&self, fields: Fields, num_seqs: usize) -> Result<Fields> {
        let kept = |v: Option<Vec<i64>>, name: &str| -> Result<Option<Vec<i64>>> {
            let Some(v) = v else { return Ok(None) };
            if v.len() != self.num_tokens {
                let (n, total) = (v.len(), self.num_tokens);
                return Err(CoreError::invalid(format!("{name} has {n} entries for {total} input tokens")));
            }
            let stays = |(i, _): &(usize, i64)| self.removed.binary_search(i).is_err();
            Ok(Some(v.into_iter().enumerate().filter(stays).map(|(_, x)| x).collect()))
        };
        let shifted = |v: Option<Vec<i64>>| v.map(|v| v.into_iter().map(|p| self.shift(p)).collect());
        let context_lens = match fields.context_lens {
            Some(c) if c.len() < self.skip.len() => {
                let (n, k) = (c.len(), self.skip.len());
                return Err(CoreError::invalid(format!("context_lens_tensor has {n} entries for {k} prefills")));
            }
            Some(mut c) => {
                c.iter_mut().zip(&self.skip).for_each(|(c, &n)| *c += n as i64);
                Some(c)
            }
            None => None,
        };
        let query_lens = fields.query_lens.map(|old| {
            let new = self.query_lens.iter().map(|&q| q as i64);
            new.chain(old.into_iter().skip(self.query_lens.len())).collect()
        });
        let decode = usize::from(self.query_lens.len() < num_seqs);
        let longest = self.query_lens.iter().copied().max().unwrap_or(0).max(decode);
        Ok(Fields {
            input_tokens: kept(fields.input_tokens, "input_tokens")?,
            input_positions: kept(fields.input_positions, "input_positions")?,
            slot_mapping: kept(fields.slot_mapping, "slot_mapping")?,
            query_start_loc: shifted(fields.query_start_loc),
            selected_token_indices: shifted(fields.selected_token_indices),
            context_lens,
            query_lens,
            num_prefill_tokens: fields.num_prefill_tokens.map(|n| n - self.removed() as i64),
            max_query_len: fields.max_query_len.map(|_| longest as i64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(p: &[Prefill]) -> Vec<(usize, usize, bool)> {
        p.iter().map(|p| (p.start, p.end, p.fresh)).collect()
    }

    #[test]
    fn prefills_come_from_query_start_loc_or_the_query_lengths() {
        // Two fresh prefills of 5 and 3 tokens, one chunked prefill (4 of 10), one decode.
        let seq = [5, 3, 10, 7];
        let qsl = [0, 5, 8, 12, 13];
        let got = prefills(13, 13, &seq, Some(3), Some(&qsl), None).unwrap();
        assert_eq!(ranges(&got), [(0, 5, true), (5, 8, true), (8, 12, false)]);
        let lens = [5, 3, 4, 1];
        assert_eq!(got, prefills(13, 13, &seq, Some(3), None, Some(&lens)).unwrap());
        // Without query lengths (or with an empty list), every sequence's query is all of it.
        let all = prefills(8, 8, &[5, 3], None, None, Some(&[])).unwrap();
        assert_eq!(ranges(&all), [(0, 5, true), (5, 8, true)]);
    }

    #[test]
    fn inconsistent_metadata_is_invalid_input() {
        let err = |r: Result<Vec<Prefill>>| r.unwrap_err().to_string();
        assert!(err(prefills(4, 3, &[4], None, None, None)).contains("slot_mapping has 3"));
        assert!(err(prefills(4, 4, &[4], Some(2), None, None)).contains("for 2 prefills"));
        assert!(err(prefills(4, 4, &[4], None, Some(&[0, 5]), None)).contains("out of the batch"));
        assert!(err(prefills(4, 4, &[4], None, Some(&[-1, 3]), None)).contains("out of the batch"));
        assert!(err(prefills(4, 4, &[2, 2], None, Some(&[0, 3, 2]), None)).contains("3..2"));
    }

    fn batch() -> Fields {
        // Prefills of 5 and 3 tokens (all of them, then 3 of a 6-token sequence), one decode.
        Fields {
            input_tokens: Some((100..109).collect()),
            input_positions: Some(vec![0, 1, 2, 3, 4, 3, 4, 5, 6]),
            slot_mapping: Some((200..209).collect()),
            query_start_loc: Some(vec![0, 5, 8, 9]),
            selected_token_indices: Some(vec![4, 7, 8]),
            context_lens: Some(vec![0, 3, 6]),
            query_lens: Some(vec![5, 3, 1]),
            num_prefill_tokens: Some(8),
            max_query_len: Some(5),
        }
    }

    #[test]
    fn skipping_prefixes_rewrites_every_index_field() {
        let p = prefills(9, 9, &[5, 6, 7], Some(2), Some(&[0, 5, 8, 9]), None).unwrap();
        // 4 tokens of the first prefill loaded.
        let s = Skip::new(9, &p, &[4, 0]).unwrap();
        assert_eq!(s.removed(), 4);
        let got = s.apply(batch(), 3).unwrap();
        assert_eq!(got.input_tokens.unwrap(), [104, 105, 106, 107, 108]);
        assert_eq!(got.input_positions.unwrap(), [4, 3, 4, 5, 6]);
        assert_eq!(got.slot_mapping.unwrap(), [204, 205, 206, 207, 208]);
        assert_eq!(got.query_start_loc.unwrap(), [0, 1, 4, 5]);
        // The last token of each sequence is still the one sampled.
        assert_eq!(got.selected_token_indices.unwrap(), [0, 3, 4]);
        assert_eq!(got.context_lens.unwrap(), [4, 3, 6]);
        assert_eq!(got.query_lens.unwrap(), [1, 3, 1]);
        assert_eq!((got.num_prefill_tokens, got.max_query_len), (Some(4), Some(3)));
        // Tokens of both prefills; fields the batch lacks stay absent.
        let s = Skip::new(9, &p, &[2, 2]).unwrap();
        let got = s.apply(Fields { query_start_loc: Some(vec![0, 5, 8, 9]), ..Fields::default() }, 3);
        let got = got.unwrap();
        assert_eq!(got.query_start_loc.unwrap(), [0, 3, 4, 5]);
        assert_eq!(got.input_tokens, None);
        // Decodes only: their query of 1.
        let none = Skip::new(3, &[], &[]).unwrap();
        assert_eq!(
            none.apply(Fields { max_query_len: Some(1), ..Fields::default() }, 3).unwrap().max_query_len,
            Some(1)
        );
    }

    #[test]
    fn the_last_token_of_a_prefill_is_never_skipped() {
        let p = [Prefill { start: 0, end: 4, fresh: true }];
        assert!(Skip::new(4, &p, &[4]).unwrap_err().to_string().contains("cannot skip 4 of 4"));
        assert!(Skip::new(3, &p, &[1]).is_err()); // the range is out of the batch
        assert!(Skip::new(4, &p, &[]).is_err());
        let s = Skip::new(4, &p, &[3]).unwrap();
        let short = Fields { slot_mapping: Some(vec![1, 2, 3]), ..Fields::default() };
        assert!(s.apply(short, 1).unwrap_err().to_string().contains("slot_mapping has 3 entries"));
        let ctx = Fields { context_lens: Some(vec![]), ..Fields::default() };
        assert!(s.apply(ctx, 1).is_err());
        let none = Skip::new(4, &p, &[0]).unwrap();
        assert_eq!((none.removed(), none.shift(3)), (0, 3));
        assert_eq!(none.apply(batch_of(4), 1).unwrap(), batch_of(4));
    }

    fn batch_of(n: i64) -> Fields {
        Fields { input_tokens: Some((0..n).collect()), query_start_loc: Some(vec![0, n]), ..Fields::default() }
    }
}
