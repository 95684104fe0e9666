//! Choosing the next token: small filters composed in transformers' order — repetition penalty,
//! temperature, top-k, top-p, min-p — then a draw.
//!
//! Nothing sorts the whole vocabulary (262 144 logits for Gemma 3): top-k selects its k in linear time
//! and sorts only those; top-p sorts a growing head (64, 256, ... candidates, each found in linear time)
//! until it holds the nucleus; min-p is a threshold. Greedy decoding is an argmax.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off; keeps tokens with probability >= min_p * the top probability.
    pub min_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: None }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// The logits with the repetition penalty applied, when there is one.
    penalized: Vec<f32>,
}

/// Tokens still in the running, with their logit (after temperature) or probability.
type Candidates = Vec<(u32, f32)>;

fn descending(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1)
}

/// CTRL's penalty, as transformers applies it: seen tokens' logits are divided (if positive) or
/// multiplied (if negative) by `penalty`.
pub fn repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let seen: HashSet<u32> = history.iter().copied().collect();
    for id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// The `k` highest, in order.
pub fn top_k(candidates: &mut Candidates, k: usize) {
    if k == 0 || k >= candidates.len() {
        return;
    }
    candidates.select_nth_unstable_by(k - 1, descending);
    candidates.truncate(k);
    candidates.sort_unstable_by(descending);
}

/// Logits to probabilities over the candidates (softmax).
fn softmax(candidates: &mut Candidates) {
    let max = candidates.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for c in candidates.iter_mut() {
        c.1 = (c.1 - max).exp();
        total += c.1;
    }
    for c in candidates.iter_mut() {
        c.1 /= total;
    }
}

/// The smallest most-probable set whose probability reaches `p` (probabilities in, sorted head out).
pub fn top_p(candidates: &mut Candidates, p: f32) {
    if p >= 1.0 {
        return;
    }
    let mut head = 64.min(candidates.len());
    loop {
        if head < candidates.len() {
            candidates.select_nth_unstable_by(head - 1, descending);
        }
        candidates[..head].sort_unstable_by(descending);
        let mut cumulative = 0.0;
        if let Some(last) = candidates[..head].iter().position(|c| {
            cumulative += c.1;
            cumulative >= p
        }) {
            candidates.truncate(last + 1);
            return;
        }
        if head == candidates.len() {
            return; // rounding: the whole set sums to just under p
        }
        head = (head * 4).min(candidates.len());
    }
}

/// Tokens at least `min_p` times as probable as the most probable one (probabilities in).
pub fn min_p(candidates: &mut Candidates, min_p: f32) {
    if min_p <= 0.0 {
        return;
    }
    let floor = candidates.iter().map(|c| c.1).fold(0.0, f32::max) * min_p;
    candidates.retain(|c| c.1 >= floor);
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng, penalized: Vec::new() }
    }

    /// Picks the next token from `logits`, given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        // Penalized in a copy: the logits are the backend's (lent where they lie).
        let logits = if p.repetition_penalty == 1.0 {
            logits
        } else {
            self.penalized.clear();
            self.penalized.extend_from_slice(logits);
            repetition_penalty(&mut self.penalized, history, p.repetition_penalty);
            &self.penalized
        };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut candidates: Candidates = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
        top_k(&mut candidates, p.top_k);
        softmax(&mut candidates);
        top_p(&mut candidates, p.top_p);
        min_p(&mut candidates, p.min_p);
        self.draw(&candidates)
    }

    /// A draw proportional to the (possibly unnormalized) probabilities.
    fn draw(&mut self, candidates: &Candidates) -> u32 {
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut draw = self.rng.random::<f32>() * total;
        for &(id, prob) in candidates {
            draw -= prob;
            if draw <= 0.0 {
                return id;
            }
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

/// The first position of the largest value (NaNs ignored; 0 when there is none). Greedy decoding runs it
/// on every token's 262k logits: the maximum is taken in 16 lanes, which compile to packed max
/// instructions, and its position found 64 values at a time — ~3x faster than one compare-and-branch per
/// value.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for (k, chunk) in logits.chunks(64).enumerate() {
        if chunk.iter().fold(false, |found, &v| found | (v == max)) {
            return (k * 64 + chunk.iter().position(|&v| v == max).unwrap_or(0)) as u32;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// How often each token is drawn in 2000 seeded draws.
    fn counts(params: SamplingParams, logits: &[f32], history: &[u32]) -> Vec<usize> {
        let mut sampler = Sampler::new(SamplingParams { seed: Some(11), ..params });
        let mut counts = vec![0; logits.len()];
        for _ in 0..2000 {
            counts[sampler.sample(&mut logits.to_vec(), history) as usize] += 1;
        }
        counts
    }

    fn warm() -> SamplingParams {
        SamplingParams { temperature: 1.0, ..Default::default() }
    }

    // Each filter test shows the filtered token is drawn often without the filter, and never with it:
    // switched off, the filter would fail its test.

    #[test]
    fn top_k_decides() {
        let logits = [3.0, 2.9, 2.8, 2.7];
        assert!(counts(warm(), &logits, &[])[3] > 300);
        let kept = counts(SamplingParams { top_k: 2, ..warm() }, &logits, &[]);
        assert_eq!((kept[2], kept[3]), (0, 0));
        assert!(kept[0] > 800 && kept[1] > 800);
    }

    #[test]
    fn top_p_decides() {
        let logits = [2.0, 1.9, 1.8, 0.0]; // probabilities ~0.38, 0.34, 0.31, 0.05
        assert!(counts(warm(), &logits, &[])[2] > 400);
        let kept = counts(SamplingParams { top_p: 0.5, ..warm() }, &logits, &[]);
        assert_eq!((kept[2], kept[3]), (0, 0));
        assert!(kept[1] > 700, "the nucleus holds the two most probable");
    }

    #[test]
    fn min_p_decides() {
        let logits = [1.0, 0.95, 0.0]; // token 1 is 0.95 as probable as token 0, token 2 0.37
        assert!(counts(warm(), &logits, &[])[2] > 200);
        let kept = counts(SamplingParams { min_p: 0.9, ..warm() }, &logits, &[]);
        assert_eq!(kept[2], 0);
        assert!(kept[1] > 700);
    }

    #[test]
    fn repetition_penalty_decides() {
        let greedy = SamplingParams::default;
        assert_eq!(counts(greedy(), &[3.0, 2.9], &[0])[0], 2000);
        assert_eq!(counts(SamplingParams { repetition_penalty: 1.2, ..greedy() }, &[3.0, 2.9], &[0])[1], 2000, "3.0 / 1.2 < 2.9");
        assert_eq!(counts(SamplingParams { repetition_penalty: 1.2, ..greedy() }, &[-1.0, -1.1], &[0])[1], 2000, "-1.0 * 1.2 < -1.1");
    }

    #[test]
    fn temperature_sharpens_and_zero_is_greedy() {
        let logits = [1.0, 0.5];
        let cold = counts(SamplingParams { temperature: 0.1, ..warm() }, &logits, &[]);
        let hot = counts(warm(), &logits, &[]);
        assert!(cold[1] < 30 && hot[1] > 500, "{cold:?} {hot:?}");
        assert_eq!(counts(SamplingParams::default(), &logits, &[])[0], 2000);
    }

    #[test]
    fn a_seed_makes_sampling_repeatable() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() });
            (0..32).map(|_| s.sample(&mut [1.0, 1.1, 0.9, 1.05], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    /// The same filters by sorting everything: the oracle the fast ones must agree with.
    fn allowed_by_full_sort(logits: &[f32], k: usize, p: f32, min: f32) -> Vec<u32> {
        let mut c: Candidates = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        c.sort_by(descending);
        if k > 0 {
            c.truncate(k);
        }
        softmax(&mut c);
        if p < 1.0 {
            let mut cumulative = 0.0;
            let keep = c.iter().position(|x| {
                cumulative += x.1;
                cumulative >= p
            });
            c.truncate(keep.map_or(c.len(), |i| i + 1));
        }
        let floor = c[0].1 * min;
        let mut ids: Vec<u32> = c.iter().filter(|x| min <= 0.0 || x.1 >= floor).map(|x| x.0).collect();
        ids.sort();
        ids
    }

    proptest! {
        #[test]
        fn argmax_is_the_first_largest_value(
            logits in prop::collection::vec(prop_oneof![4 => -3.0f32..3.0, 1 => Just(1.5f32), 1 => Just(f32::NAN), 1 => Just(f32::NEG_INFINITY), 1 => Just(f32::INFINITY)], 0..300)
        ) {
            let mut want = None::<usize>;
            for (i, &v) in logits.iter().enumerate() {
                if !v.is_nan() && want.is_none_or(|w| v > logits[w]) {
                    want = Some(i);
                }
            }
            prop_assert_eq!(argmax(&logits), want.unwrap_or(0) as u32);
        }

        #[test]
        fn the_partial_sorts_keep_what_a_full_sort_keeps(
            // Distinct logits: with ties, which of two equal tokens survives a cut is arbitrary.
            logits in proptest::collection::hash_set(-80_000i32..80_000, 1..3000).prop_map(|s| s.into_iter().map(|v| v as f32 / 10_000.0).collect::<Vec<f32>>()),
            k in prop_oneof![Just(0usize), 1usize..100],
            p in prop_oneof![Just(1.0f32), 0.05f32..0.999],
            min in prop_oneof![Just(0.0f32), 0.001f32..0.5],
        ) {
            let mut c: Candidates = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            top_k(&mut c, k);
            softmax(&mut c);
            top_p(&mut c, p);
            min_p(&mut c, min);
            let ids: std::collections::BTreeSet<u32> = c.iter().map(|x| x.0).collect();
            // The two softmaxes sum in different orders, so a token whose probability sits within
            // rounding of a cut may fall on either side: what a slightly stricter cut keeps must be kept,
            // and nothing a slightly looser cut drops may be.
            const EPS: f32 = 1e-4;
            let (p_strict, p_loose) = if p < 1.0 { (p - EPS, (p + EPS).min(0.99999)) } else { (p, p) };
            let (min_strict, min_loose) = if min > 0.0 { (min + EPS, min - EPS) } else { (min, min) };
            let strict: std::collections::BTreeSet<u32> = allowed_by_full_sort(&logits, k, p_strict, min_strict).into_iter().collect();
            let loose: std::collections::BTreeSet<u32> = allowed_by_full_sort(&logits, k, p_loose, min_loose).into_iter().collect();
            prop_assert!(strict.is_subset(&ids), "kept too little: {:?} missing", strict.difference(&ids).collect::<Vec<_>>());
            prop_assert!(ids.is_subset(&loose), "kept too much: {:?} extra", ids.difference(&loose).collect::<Vec<_>>());
        }
    }
}
