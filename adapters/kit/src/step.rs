//! Decode steps recorded once and run again by the shell (the contract's `tensor.template`).
//!
//! A decode step (one token after the cache, last position's logits) records the same ~600 ops at every
//! position: only the rotary offsets and the sliding windows' query offsets move with it, and the caches
//! it reads are the ones the step before left. So once two consecutive steps have recorded the same op
//! list (those offsets aside, each at its own position), the list becomes a template: each later step is
//! one `run` with the token's ids, the caches and how far on it is, and model code does not run at all.
//!
//! Anything else that changes between positions shows up as a difference in the comparison, and such a
//! step is never replayed. What changes only now and then is the caches' compaction (a bounded history
//! drops old positions every [`COMPACT_STEP`](crate::nn::COMPACT_STEP) tokens, and a sliding window's
//! key offset moves with it): a step that would compact, or a cache compacted since the template was
//! made, is recorded by model code again.

use crate::adapter::Graph;
use crate::nn::{self, History};
use crate::ops::{self, Batch, Tensor};
use crate::wit::edgechat::adapter::tensor::{Array, BatchMask, Op, Template};

/// A cache's decode template, once it has one, and the last step recorded as a candidate for it.
#[derive(Default)]
pub struct Replay {
    candidate: Option<Recorded>,
    template: Option<Kept>,
}

impl Replay {
    /// Forgets both: the cache was changed other than by a decode step.
    pub fn forget(&mut self) {
        *self = Replay::default();
    }
}

/// Where a step's input comes from.
#[derive(Clone)]
enum Slot {
    /// The same tensor every step (a weight).
    Fixed(Tensor),
    /// The step's token ids.
    Tokens,
    /// The current data of the cache's history at this index.
    History(usize),
}

impl PartialEq for Slot {
    fn eq(&self, other: &Slot) -> bool {
        match (self, other) {
            (Slot::Fixed(a), Slot::Fixed(b)) => a.same(b),
            (Slot::Tokens, Slot::Tokens) => true,
            (Slot::History(a), Slot::History(b)) => a == b,
            _ => false,
        }
    }
}

/// One decode step as model code recorded it.
struct Recorded {
    position: u32,
    ops: Vec<Op>,
    /// The logits' value, then each history's new data.
    keep: Vec<u32>,
    inputs: Vec<Slot>,
    /// Each history's first position (compaction moves it).
    starts: Vec<u32>,
}

/// A template the shell holds, the arrays every run reads, and what the inputs each run gives up are.
struct Kept {
    template: Template,
    position: u32,
    fixed: ops::Lent,
    inputs: Vec<Slot>,
    starts: Vec<u32>,
}

/// The logits of `token` after what `cache` holds, advancing the cache: by the template when it has a
/// usable one, else by model code (and then this step may complete a template).
pub fn decode<G: Graph>(graph: &G, token: u32, cache: &mut G::Cache, replay: &mut Replay) -> Result<Array, String> {
    let position = G::cache_length(cache);
    let ids = nn::token_ids(&[token])?;
    if let Some(kept) = &replay.template {
        let mut histories = G::histories(cache);
        if kept.usable(position, &histories) {
            return kept.run(position, ids, &mut histories);
        }
        replay.forget();
    }
    ops::flush()?;
    let sent = ops::batches_sent();
    let before: Vec<(Option<Tensor>, u32, u32)> = G::histories(cache).iter().map(|h| (h.data().cloned(), h.start(), h.end())).collect();
    let logits = graph.forward(&[token], &ids, cache, false)?;
    let batch = ops::take_batch();
    let recorded = if ops::batches_sent() == sent {
        Recorded::capture(&batch, position, &ids, &logits, &before, &G::histories(cache))
    } else {
        None // model code sent part of the step itself (it asked for a shape, say)
    };
    ops::send(batch)?;
    let logits = logits.into_array()?;
    replay.candidate = match (replay.candidate.take(), recorded) {
        (Some(last), Some(this)) if this.repeats(&last) => {
            replay.template = Some(this.keep()?);
            None
        }
        (_, this) => this,
    };
    Ok(logits)
}

impl Recorded {
    /// The step in `batch`, if it is one a template can repeat: every history was there before, grew by
    /// one position and was not compacted, and what the batch keeps is exactly the logits and the
    /// histories' new data.
    fn capture(batch: &Batch, position: u32, ids: &Tensor, logits: &Tensor, before: &[(Option<Tensor>, u32, u32)], after: &[&mut History]) -> Option<Recorded> {
        let mut keep = vec![logits.pending_value()?];
        for ((old, start, end), now) in before.iter().zip(after) {
            if old.is_none() || now.start() != *start || now.end() != end + 1 {
                return None;
            }
            keep.push(now.data()?.pending_value()?);
        }
        let mut held = batch.held();
        let mut kept = keep.clone();
        held.sort_unstable();
        kept.sort_unstable();
        if held != kept {
            return None;
        }
        let inputs = batch
            .inputs
            .iter()
            .map(|t| {
                if t.same(ids) {
                    return Slot::Tokens;
                }
                match before.iter().position(|(old, ..)| old.as_ref().is_some_and(|old| old.same(t))) {
                    Some(i) => Slot::History(i),
                    None => Slot::Fixed(t.clone()),
                }
            })
            .collect();
        let starts = before.iter().map(|(_, start, _)| *start).collect();
        Some(Recorded { position, ops: batch.ops.clone(), keep, inputs, starts })
    }

    /// Whether this step, recorded one position after `last`, made the same ops from the same inputs.
    fn repeats(&self, last: &Recorded) -> bool {
        self.position == last.position + 1
            && self.keep == last.keep
            && self.inputs == last.inputs
            && self.starts == last.starts
            && self.ops.len() == last.ops.len()
            && self.ops.iter().zip(&last.ops).all(|(op, earlier)| shifted(earlier, 1).as_ref() == Some(op))
    }

    /// The template: fixed inputs first, then those each run gives up, renumbered so.
    fn keep(self) -> Result<Kept, String> {
        let (fixed, given): (Vec<usize>, Vec<usize>) = (0..self.inputs.len()).partition(|&i| matches!(self.inputs[i], Slot::Fixed(_)));
        let mut number = vec![0; self.inputs.len()];
        for (n, &i) in fixed.iter().chain(&given).enumerate() {
            number[i] = n as u32;
        }
        let ops: Vec<Op> = self.ops.into_iter().map(|op| if let Op::Input(i) = op { Op::Input(number[i as usize]) } else { op }).collect();
        let fixed = ops::Lent::new(fixed.iter().filter_map(|&i| if let Slot::Fixed(t) = &self.inputs[i] { Some(t.clone()) } else { None }).collect())?;
        let template = Template::create(&ops, &self.keep)?;
        let inputs = given.iter().map(|&i| self.inputs[i].clone()).collect();
        Ok(Kept { template, position: self.position, fixed, inputs, starts: self.starts })
    }
}

impl Kept {
    /// Whether the step at `position` repeats the template: no history was trimmed or compacted since
    /// (nor would this step compact one), and nothing but the cache holds their data (a run gives it up).
    fn usable(&self, position: u32, histories: &[&mut History]) -> bool {
        position > self.position
            && histories.len() == self.starts.len()
            && histories.iter().zip(&self.starts).all(|(h, &start)| h.data().is_some_and(Tensor::sole) && h.start() == start && !h.compacts_after(1))
    }

    /// Runs the template at `position` (see [`Kept::usable`]), advancing the histories.
    fn run(&self, position: u32, ids: Tensor, histories: &mut [&mut History]) -> Result<Array, String> {
        // The run gives up the token ids and the histories' data it replaces (their tensors stay, to
        // hold the new data).
        let mut ids = Some(ids);
        let mut inputs = Vec::with_capacity(self.inputs.len());
        for slot in &self.inputs {
            inputs.push(match slot {
                Slot::Tokens => ids.take().ok_or("the token ids are used twice")?.into_array()?,
                Slot::History(i) => histories[*i].data().ok_or("a history emptied")?.give_up()?,
                Slot::Fixed(_) => return Err("a fixed input among those given".into()),
            });
        }
        let mut results = self.template.run(&self.fixed.arrays(), inputs, position - self.position)?.into_iter();
        let logits = results.next().ok_or("the template returned no logits")?;
        for (history, data) in histories.iter_mut().zip(results) {
            history.advance(data, 1)?;
        }
        Ok(logits)
    }
}

/// `op` as recorded `shift` positions further on (what the shell's `run` does to it).
fn shifted(op: &Op, shift: u32) -> Option<Op> {
    let mut op = op.clone();
    match &mut op {
        Op::Rope((_, params)) => params.offset = params.offset.checked_add(shift)?,
        Op::Attention(args) => {
            if let BatchMask::SlidingWindow(window) = &mut args.mask {
                window.query_offset = window.query_offset.checked_add(shift)?;
            }
        }
        _ => {}
    }
    Some(op)
}
