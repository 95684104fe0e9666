//! The fixture case: a model directory run through the adapter against a transformers reference —
//! last-position logits within 1e-4, the 32 greedy tokens exact (a divergence at a near-tie, top-2
//! margin under 0.01, is compared teacher-forced instead), the same call twice identical, and a cache
//! trimmed and resumed equal to a fresh run.

use super::{Fixture, Usage};
use crate::adapter::Adapter;
use crate::engine::Model;
use crate::host::weights::Precision;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Instant;

const TOLERANCE: f32 = 1e-4;
const NEAR_TIE: f32 = 0.01;

#[derive(Deserialize)]
struct Reference {
    sequences: BTreeMap<String, Sequence>,
}

#[derive(Deserialize)]
struct Sequence {
    input_ids: Vec<u32>,
    greedy_32: Vec<u32>,
    last_logits_full: Vec<f32>,
}

pub(super) fn check(adapter: &Adapter, fixture: &Fixture, usage: &mut Usage) -> Result<String> {
    let text = crate::paths::read_capped(&fixture.reference, crate::paths::MAX_JSON_BYTES)?;
    let reference: Reference = serde_json::from_str(&text).with_context(|| format!("{} is not a reference (sequences.<name>.input_ids, greedy_32, last_logits_full)", fixture.reference.display()))?;
    if reference.sequences.is_empty() {
        bail!("{} holds no sequences", fixture.reference.display());
    }
    let files = crate::models::ModelFiles::inspect(&fixture.model)?;
    let started = Instant::now();
    let mut model = Model::load(adapter, files.open(Precision::F32)?)?;
    usage.call("runtime.model.load", started.elapsed());
    let (mut worst, mut near_ties) = (0.0f32, 0);
    for (name, seq) in &reference.sequences {
        let started = Instant::now();
        let logits = last_logits(&mut model, &seq.input_ids)?;
        usage.call("model.forward", started.elapsed());
        if logits.len() != seq.last_logits_full.len() {
            bail!("{name}: {} logits, the reference has {}", logits.len(), seq.last_logits_full.len());
        }
        let diff = max_abs_diff(&logits, &seq.last_logits_full);
        if diff > TOLERANCE {
            bail!("{name}: last-position logits differ from the reference by {diff:.2e} (tolerance {TOLERANCE:.0e})");
        }
        worst = worst.max(diff);
        if last_logits(&mut model, &seq.input_ids)? != logits {
            bail!("{name}: the same forward pass twice gave different logits");
        }
        near_ties += greedy(&mut model, seq).with_context(|| format!("{name}: greedy tokens"))?;
        trim_and_resume(&mut model, &seq.input_ids, &logits).with_context(|| format!("{name}: cache trim/resume"))?;
    }
    usage.session(model.session());
    let ties = if near_ties > 0 { format!(" ({near_ties} near-ties compared teacher-forced)") } else { String::new() };
    Ok(format!("{} sequences: logits within {worst:.1e}, greedy tokens exact{ties}, deterministic, trim/resume equal to fresh", reference.sequences.len()))
}

fn last_logits(model: &mut Model, ids: &[u32]) -> Result<Vec<f32>> {
    let cache = model.new_cache()?;
    model.forward(ids, &cache, false)
}

/// Follows the reference's greedy tokens (teacher-forced), requiring each of ours to equal it unless
/// our top two logits are within the near-tie margin. Returns the number of near-ties.
fn greedy(model: &mut Model, seq: &Sequence) -> Result<usize> {
    let cache = model.new_cache()?;
    let mut logits = model.forward(&seq.input_ids, &cache, false)?;
    let mut near_ties = 0;
    for (step, &expected) in seq.greedy_32.iter().enumerate() {
        let (best, margin) = top_two(&logits);
        if best != expected {
            if margin >= NEAR_TIE {
                bail!("step {step}: token {best}, the reference has {expected} (margin {margin:.3})");
            }
            near_ties += 1;
        }
        logits = model.forward(&[expected], &cache, false)?;
    }
    Ok(near_ties)
}

/// Runs the whole sequence, trims the cache back to half and feeds the rest again: the last logits must
/// equal those of a fresh run.
fn trim_and_resume(model: &mut Model, ids: &[u32], fresh: &[f32]) -> Result<()> {
    if ids.len() < 2 {
        return Ok(());
    }
    let keep = ids.len() / 2;
    let cache = model.new_cache()?;
    model.forward(ids, &cache, false)?;
    model.trim(&cache, keep as u32)?;
    let resumed = model.forward(&ids[keep..], &cache, false)?;
    let diff = max_abs_diff(&resumed, fresh);
    if diff > TOLERANCE {
        bail!("resuming after trimming to {keep} tokens differs from a fresh run by {diff:.2e}");
    }
    Ok(())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn top_two(logits: &[f32]) -> (u32, f32) {
    let (mut best, mut first, mut second) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > first {
            (second, first, best) = (first, v, i);
        } else if v > second {
            second = v;
        }
    }
    (best as u32, first - second)
}
