//! Template runs computed without recording them (cpu backend). A decode step's run records the same
//! ~600 ops as the run before it, and the only shapes that differ are the caches': one row longer. So
//! once a run has been recorded and the kept ggml graph computed it (`cpu/lower/step.rs`), a later run
//! whose inputs differ from that run's only in the shapes of caches that are appended to in place is
//! computed by binding the graph to its inputs, skipping the recording of every op and the evaluation's
//! bookkeeping (~1.5 ms of a ~25 ms step).
//!
//! Every check a recorded run would make still decides: an op whose operands' shapes changed is checked
//! again by its own check function (only appends and attention may be such ops here); the values that
//! vary per run are checked as their ops check them (rope and window offsets, gathered token ids); the
//! memory and handle caps are checked against everything the recorded run would have held at its
//! peak. Anything these do not cover, and any check that fails, sends the run down the recorded path,
//! which refuses it by name exactly as before.

use super::batch::later;
use super::cpu::step::{self, StepPlan, StepValues};
use super::wit::{BatchMask, Op};
use super::{active::AnyArray, checks, cpu, DType, Handle, Mask, TensorHandle};
use crate::host::HostState;
use rustc_hash::FxHashMap as HashMap;

/// What a template's last run recorded or computed, value by value (a value is an op's result).
pub struct LastRun {
    shapes: Vec<Vec<i32>>,
    dtypes: Vec<DType>,
    /// Per input: its dtype and block format.
    inputs: Vec<(DType, Option<u32>)>,
    /// The values that are inputs (`input` ops).
    input_values: Vec<usize>,
    /// The node ids of the recorded run's values, from which a plan is made.
    ids: Vec<u64>,
    plan: Option<StepPlan>,
    /// What it is charged against the templates' cap (see [`LastRun::bytes`]).
    charged: usize,
}

/// One value of a recorded run: its shape, type and cpu node.
pub struct Seen {
    pub shape: Vec<i32>,
    pub dtype: DType,
    pub id: u64,
}

impl LastRun {
    /// From a recorded run of `ops`: its values, and its inputs' types.
    pub fn recorded(ops: &[Op], values: Vec<Seen>, inputs: Vec<(DType, Option<u32>)>) -> LastRun {
        let input_values = ops.iter().enumerate().filter(|(_, op)| matches!(op, Op::Input(_))).map(|(v, _)| v).collect();
        let dtypes = values.iter().map(|v| v.dtype).collect();
        let ids: Vec<u64> = values.iter().map(|v| v.id).collect();
        let shapes: usize = values.iter().map(|v| std::mem::size_of::<Vec<i32>>() + 4 * v.shape.len()).sum();
        // (A plan, made later, holds about as much again per value as the ids.)
        let charged = shapes + values.len() + 16 * ids.len() + 8 * inputs.len();
        LastRun { shapes: values.into_iter().map(|v| v.shape).collect(), dtypes, inputs, input_values, ids, plan: None, charged }
    }

    /// The memory it holds, charged with its template's, as it was when recorded.
    pub fn bytes(&self) -> usize {
        self.charged
    }
}

/// This run's shapes: the last run's, but for those that changed.
struct Shapes<'a> {
    last: &'a [Vec<i32>],
    changed: Vec<Option<Vec<i32>>>,
}

impl Shapes<'_> {
    fn get(&self, value: usize) -> Option<&[i32]> {
        match self.changed.get(value)? {
            Some(shape) => Some(shape),
            None => self.last.get(value).map(Vec::as_slice),
        }
    }
}

/// This run's values, as checked.
struct Run<'a> {
    shapes: Shapes<'a>,
    dtypes: &'a [DType],
    inputs: Vec<&'a cpu::Array>,
    input_values: &'a [usize],
    ops: &'a [Op],
    shift: u32,
}

impl StepValues for Run<'_> {
    fn input(&self, value: usize) -> Option<&cpu::Array> {
        match self.ops.get(value)? {
            Op::Input(n) => self.inputs.get(*n as usize).copied(),
            _ => None,
        }
    }

    fn inputs(&self) -> &[usize] {
        self.input_values
    }

    fn shape(&self, value: usize) -> &[i32] {
        self.shapes.get(value).unwrap_or(&[])
    }

    fn dtype(&self, value: usize) -> DType {
        self.dtypes[value]
    }

    fn rope_offset(&self, value: usize) -> Option<i32> {
        match self.ops.get(value)? {
            Op::Rope((_, p)) => i32::try_from(later(p.offset, self.shift).ok()?).ok(),
            _ => None,
        }
    }

    fn mask(&self, value: usize) -> Option<(Mask<'_, cpu::Array>, i64, i64)> {
        let Some(Op::Attention(a)) = self.ops.get(value) else { return None };
        let mask = match a.mask {
            BatchMask::None => Mask::None,
            BatchMask::Causal => Mask::Causal,
            BatchMask::SlidingWindow(w) => {
                let int = |v: u32| i32::try_from(v).ok();
                Mask::SlidingWindow { window: int(w.window)?, query_offset: int(later(w.query_offset, self.shift).ok()?)?, key_offset: int(w.key_offset)? }
            }
            BatchMask::Explicit(_) => return None,
        };
        Some((mask, *self.shapes.get(a.q as usize)?.get(2)? as i64, *self.shapes.get(a.k as usize)?.get(2)? as i64))
    }
}

/// Computes a run of `ops` over `inputs` without recording it, when the last run allows; None when it
/// must be recorded.
pub fn run(state: &mut HostState, ops: &[Op], keep: &[u32], last: &mut LastRun, inputs: &[Handle], shift: u32) -> wasmtime::Result<Option<Result<Vec<Handle>, String>>> {
    if last.inputs.len() != inputs.len() || ops.len() != last.shapes.len() {
        return Ok(None);
    }
    let mut arrays = Vec::with_capacity(inputs.len());
    let mut ranges = Vec::with_capacity(inputs.len());
    for (h, &(dtype, blocks)) in inputs.iter().zip(&last.inputs) {
        let entry = state.entry(h)?;
        let AnyArray::Cpu(array) = &entry.array else { return Ok(None) };
        if entry.dtype != dtype || entry.blocks != blocks {
            return Ok(None);
        }
        arrays.push(array);
        ranges.push(entry.known_range);
    }
    let Some((changed, bytes)) = checked_shapes(ops, last, &arrays, &ranges, shift) else { return Ok(None) };
    // The caps, against all a recorded run would hold at once: every result, and the largest scores.
    let t = &state.tensors;
    if t.live_bytes.saturating_add(bytes) > t.max_bytes || t.live_handles.saturating_add(ops.len()) >= t.max_handles {
        return Ok(None);
    }
    state.check_deadline()?;
    let run = Run { shapes: Shapes { last: &last.shapes, changed }, dtypes: &last.dtypes, inputs: arrays, input_values: &last.input_values, ops, shift };
    if last.plan.is_none() {
        // An op may return its operand's own array: a node is named by the first value that holds it,
        // an input's by the input.
        let mut ids: HashMap<u64, usize> = HashMap::default();
        for (v, &id) in last.ids.iter().enumerate() {
            if matches!(ops[v], Op::Input(_)) {
                ids.insert(id, v);
            } else {
                ids.entry(id).or_insert(v);
            }
        }
        last.plan = step::plan(&ids, &run).filter(|plan| fits(plan, ops, keep));
    }
    let Some(plan) = &last.plan else { return Ok(None) };
    let started = std::time::Instant::now();
    let computed = step::run(plan, &run);
    let changed = run.shapes.changed;
    state.tensors.computed_in_calls += started.elapsed();
    let outputs = match computed {
        None => {
            last.plan = None;
            return Ok(None);
        }
        // As the evaluation of a recorded run would fail (the graph is not kept past it).
        Some(Err(e)) => return Ok(Some(Err(e))),
        Some(Ok(outputs)) => outputs,
    };
    for (v, shape) in changed.into_iter().enumerate() {
        if let Some(shape) = shape {
            last.shapes[v] = shape;
        }
    }
    let mut handles = Vec::with_capacity(keep.len());
    for &v in keep {
        let Some((_, array)) = outputs.iter().find(|(value, _)| *value == v as usize) else { wasmtime::bail!("a template run lost a result") };
        let (dtype, bytes) = (last.dtypes[v as usize], checks::bytes(&last.shapes[v as usize], last.dtypes[v as usize]).unwrap_or(0));
        let t = &mut state.tensors;
        t.live_handles += 1;
        t.live_bytes += bytes;
        t.peak_bytes = t.peak_bytes.max(t.live_bytes);
        handles.push(state.table.push(TensorHandle { array: AnyArray::Cpu(array.clone()), dtype, bytes, known_range: None, blocks: None })?);
    }
    state.tensors.unrecorded_runs += 1;
    Ok(Some(Ok(handles)))
}

/// Whether the plan binds what a decode step is made of: inputs in place of data, the template's ropes,
/// attentions and appends where it rewrites them, and exactly the kept values as outputs.
fn fits(plan: &StepPlan, ops: &[Op], keep: &[u32]) -> bool {
    let is = |v: usize, f: fn(&Op) -> bool| ops.get(v).is_some_and(f);
    let mut outputs: Vec<usize> = plan.outputs().to_vec();
    let mut kept: Vec<usize> = keep.iter().map(|&v| v as usize).collect();
    outputs.sort_unstable();
    kept.sort_unstable();
    plan.inputs().all(|v| is(v, |op| matches!(op, Op::Input(_))))
        && plan.ropes().iter().all(|&v| is(v, |op| matches!(op, Op::Rope(_))))
        && plan.attentions().iter().all(|&v| is(v, |op| matches!(op, Op::Attention(_))))
        && plan.appends().all(|v| is(v, |op| matches!(op, Op::Concatenate(_))))
        && outputs == kept
}

/// Which values' shapes this run changes (and to what), and the bytes a recorded run would hold at its
/// peak, checked as recording would check them; None when a check fails or is one this path does not make.
fn checked_shapes(ops: &[Op], last: &LastRun, arrays: &[&cpu::Array], ranges: &[Option<(i64, i64)>], shift: u32) -> Option<(Vec<Option<Vec<i32>>>, u64)> {
    let mut changed: Vec<Option<Vec<i32>>> = vec![None; ops.len()];
    let (mut held, mut scores) = (0u64, 0u64);
    for (v, op) in ops.iter().enumerate() {
        let (mut moved, mut later_value) = (false, false);
        each_operand(op, |o| match changed.get(o as usize) {
            Some(c) if (o as usize) < v => moved |= c.is_some(),
            _ => later_value = true,
        });
        if later_value {
            return None;
        }
        let shape = |x: u32| changed[x as usize].as_deref().or_else(|| last.shapes.get(x as usize).map(Vec::as_slice));
        let new = match op {
            Op::Input(n) => {
                let now = arrays.get(*n as usize)?.shape();
                changed[v] = (now != last.shapes[v]).then(|| now.to_vec());
                continue;
            }
            Op::Concatenate((parts, axis)) if moved => {
                let parts: Vec<&[i32]> = parts.iter().map(|&p| shape(p)).collect::<Option<_>>()?;
                Some(checks::concatenate(&parts, *axis).ok()?)
            }
            Op::Attention(a) if moved => {
                let (out, s) = checks::attention(shape(a.q)?, shape(a.k)?, shape(a.v)?, None).ok()?;
                if matches!(a.mask, BatchMask::Explicit(_)) || shape(a.k)?.get(2) == Some(&0) || out != last.shapes[v] {
                    return None;
                }
                scores = scores.max(s.saturating_mul(2));
                None
            }
            // Only appends and attention are checked again here; anything else reading a changed shape is recorded.
            _ if moved => return None,
            Op::Take((a, indices, axis)) => {
                // Gathered ids are checked against the table every run, as `take` checks them.
                let Some(Op::Input(n)) = ops.get(*indices as usize) else { return None };
                let (low, high) = (*ranges.get(*n as usize)?)?;
                let table = shape(*a)?;
                let (_, at) = checks::take(table, shape(*indices)?, last.dtypes[*indices as usize], *axis).ok()?;
                if low < 0 || high >= table[at] as i64 {
                    return None;
                }
                None
            }
            Op::Rope((_, p)) => {
                i32::try_from(later(p.offset, shift).ok()?).ok()?;
                None
            }
            Op::Attention(a) => {
                if let BatchMask::SlidingWindow(w) = a.mask {
                    i32::try_from(later(w.query_offset, shift).ok()?).ok()?;
                }
                None
            }
            _ => None,
        };
        let bytes = checks::bytes(new.as_deref().unwrap_or(&last.shapes[v]), last.dtypes[v]).ok()?;
        held = held.saturating_add(bytes);
        changed[v] = new.filter(|new| *new != last.shapes[v]);
    }
    Some((changed, held.saturating_add(scores)))
}

/// Calls `f` with each value `op` reads.
fn each_operand(op: &Op, mut f: impl FnMut(u32)) {
    match op {
        Op::Input(_) => {}
        Op::Matmul((a, b)) | Op::Add((a, b)) | Op::Subtract((a, b)) | Op::Multiply((a, b)) | Op::Divide((a, b)) => {
            f(*a);
            f(*b);
        }
        Op::QuantizedMatmul(q) => [q.x, q.w, q.scales, q.biases].into_iter().for_each(f),
        Op::Dequantize(q) => [q.w, q.scales, q.biases].into_iter().for_each(f),
        Op::Scale((a, _)) | Op::AddScalar((a, _)) | Op::Astype((a, _)) | Op::Reshape((a, _)) | Op::Transpose((a, _)) => f(*a),
        Op::Tanh(a) | Op::Sigmoid(a) | Op::Silu(a) | Op::GeluTanh(a) => f(*a),
        Op::Slice((a, ..)) | Op::Softmax((a, _)) | Op::Rope((a, _)) => f(*a),
        Op::SliceUpdate((a, update, ..)) => {
            f(*a);
            f(*update);
        }
        Op::Concatenate((parts, _)) => parts.iter().copied().for_each(f),
        Op::Take((a, indices, _)) => {
            f(*a);
            f(*indices);
        }
        Op::RmsNorm((x, w, _)) | Op::Conv1dDepthwise((x, w)) => {
            f(*x);
            f(*w);
        }
        Op::Attention(a) => {
            [a.q, a.k, a.v].into_iter().for_each(&mut f);
            if let BatchMask::Explicit(m) = a.mask {
                f(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::wit::{self, AttentionArgs, HostArray, HostTemplate, RopeParams, WindowMask};
    use super::super::{ActiveBackend, BackendKind};
    use super::*;
    use crate::host::Limits;
    use wasmtime::component::Resource;

    const VOCAB: usize = 16;

    fn host() -> HostState {
        let mut state = HostState::new("test", &Limits::default());
        state.tensors.backend = ActiveBackend::of(BackendKind::Cpu);
        state
    }

    fn matrix(state: &mut HostState, rows: u32, columns: u32, seed: f32) -> Handle {
        let data = (0..rows * columns).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        HostArray::from_f32(state, data, vec![rows, columns]).unwrap().unwrap()
    }

    fn borrow<T: 'static>(h: &Resource<T>) -> Resource<T> {
        Resource::new_borrow(h.rep())
    }

    /// One head of 8 over caches of keys and values: a token's embedding (gathered from a table), its
    /// query, key and value, appends, sliding-window and full attention, an output product. Inputs: the
    /// four weights and the table (fixed), then the token's id and the two caches.
    fn decode_step() -> (Vec<Op>, Vec<u32>) {
        let rope = |x: u32| Op::Rope((x, RopeParams { dims: 8, traditional: false, base: 10_000.0, scale: 1.0, offset: 4 }));
        let head = |x: u32| Op::Reshape((x, vec![1, 1, 1, 8]));
        let window = BatchMask::SlidingWindow(WindowMask { window: 5, query_offset: 4, key_offset: 0 });
        let ops = vec![
            Op::Input(0), Op::Input(1), Op::Input(2), Op::Input(3), Op::Input(4), Op::Input(5), Op::Input(6), Op::Input(7),
            Op::Take((4, 5, 0)),                                  // 8: the token's embedding [1, 8]
            Op::Matmul((8, 0)), head(9), rope(10),                // 11: q
            Op::Matmul((8, 1)), head(12), rope(13),               // 14: k
            Op::Matmul((8, 2)), head(15),                         // 16: v
            Op::Concatenate((vec![6, 14], 2)),                    // 17: keys
            Op::Concatenate((vec![7, 16], 2)),                    // 18: values
            Op::Attention(AttentionArgs { q: 11, k: 17, v: 18, scale: 0.35, mask: window }),
            Op::Attention(AttentionArgs { q: 11, k: 17, v: 18, scale: 0.35, mask: BatchMask::None }),
            Op::Add((19, 20)), Op::Reshape((21, vec![1, 8])), Op::Matmul((22, 3)), // 23: logits
        ];
        (ops, vec![23, 17, 18])
    }

    struct Decoding {
        state: HostState,
        fixed: Vec<Handle>,
        caches: [Handle; 2],
        template: Option<Resource<Template>>,
    }

    use super::super::template::Template;

    impl Decoding {
        /// Four positions already cached.
        fn new() -> Decoding {
            let mut state = host();
            let fixed = vec![matrix(&mut state, 8, 8, 1.0), matrix(&mut state, 8, 8, 2.0), matrix(&mut state, 8, 8, 3.0), matrix(&mut state, 8, 8, 4.0), matrix(&mut state, VOCAB as u32, 8, 5.0)];
            let cache = |state: &mut HostState, seed: f32| {
                let data = (0..32).map(|i| (i as f32 * 0.11 + seed).cos()).collect();
                HostArray::from_f32(state, data, vec![1, 1, 4, 8]).unwrap().unwrap()
            };
            let caches = [cache(&mut state, 0.5), cache(&mut state, 1.5)];
            Decoding { state, fixed, caches, template: None }
        }

        /// Runs the step for `token` `shift` positions on, with the template kept from the last step or
        /// (`fresh`) a new one, which is always recorded. Returns the logits.
        fn step(&mut self, token: i32, shift: u32, fresh: bool) -> Result<Vec<f32>, String> {
            let state = &mut self.state;
            if fresh || self.template.is_none() {
                if let Some(old) = self.template.take() {
                    HostTemplate::drop(state, old).unwrap();
                }
                let (ops, keep) = decode_step();
                self.template = Some(HostTemplate::create(state, ops, keep).unwrap().unwrap());
            }
            let ids = HostArray::from_i32(state, vec![token], vec![1]).unwrap().unwrap();
            let fixed = self.fixed.iter().map(borrow).collect();
            // The caches are given up to the run, as the adapter gives them up.
            let [k, v] = [Resource::new_own(self.caches[0].rep()), Resource::new_own(self.caches[1].rep())];
            let template = borrow(self.template.as_ref().unwrap());
            let ran = HostTemplate::run(state, template, fixed, vec![ids, k, v], shift);
            let mut ran = match ran {
                Ok(Ok(ran)) => ran,
                Ok(Err(refused)) => return Err(refused),
                Err(trap) => return Err(format!("trap: {trap:#}")),
            };
            self.caches = [ran.remove(1), ran.remove(1)];
            let logits = wit::Host::read_f32(state, borrow(&ran[0])).unwrap().unwrap();
            HostArray::drop(state, ran.remove(0)).unwrap();
            Ok(logits)
        }
    }

    #[test]
    fn a_step_computed_without_recording_is_the_recorded_step() {
        let (mut kept, mut fresh) = (Decoding::new(), Decoding::new());
        // One after the other: a template learns from the graph that computed its own last run.
        let logits = |d: &mut Decoding, fresh: bool| (0..40u32).map(|step| d.step((step * 7 % VOCAB as u32) as i32, step, fresh).unwrap()).collect::<Vec<_>>();
        assert!(logits(&mut kept, false) == logits(&mut fresh, true));
        assert_eq!(fresh.state.tensors.unrecorded_runs, 0);
        // Tests running beside this one may take the kept graph now and then: such a step is recorded.
        assert!(kept.state.tensors.unrecorded_runs > 20, "{} of 40 steps were computed without recording", kept.state.tensors.unrecorded_runs);
        assert_eq!(kept.state.tensors.live_handles, fresh.state.tensors.live_handles);
        assert_eq!(kept.state.tensors.live_bytes, fresh.state.tensors.live_bytes);
        // What a template keeps of its last run is charged with it, and given back with it.
        let ops_only = {
            let (mut state, (ops, keep)) = (host(), decode_step());
            HostTemplate::create(&mut state, ops, keep).unwrap().unwrap();
            state.tensors.template_bytes
        };
        let charged = kept.state.tensors.template_bytes;
        let template = kept.template.take().unwrap();
        HostTemplate::drop(&mut kept.state, template).unwrap();
        assert!(charged > ops_only && kept.state.tensors.template_bytes == 0, "{charged} bytes charged, {ops_only} for the ops");
    }

    /// Keys and values that are one array (two handles to it) are joined by copying, as recorded runs
    /// join them: growing one buffer in place for both appends would give one the other's rows.
    #[test]
    fn caches_held_twice_are_computed_as_recorded() {
        let (mut kept, mut fresh) = warmed();
        for d in [&mut kept, &mut fresh] {
            let both = wit::Host::astype(&mut d.state, borrow(&d.caches[0]), wit::Dtype::Float32).unwrap().unwrap();
            let values = std::mem::replace(&mut d.caches[1], both);
            HostArray::drop(&mut d.state, values).unwrap();
        }
        let unrecorded = kept.state.tensors.unrecorded_runs;
        assert_eq!(kept.step(3, 30, false).unwrap(), fresh.step(3, 30, true).unwrap());
        assert_eq!(kept.state.tensors.unrecorded_runs, unrecorded, "recorded");
    }

    /// A pair decoding the same tokens, one through its kept template (past its first unrecorded step),
    /// one recording every step.
    fn warmed() -> (Decoding, Decoding) {
        let (mut kept, mut fresh) = (Decoding::new(), Decoding::new());
        for step in 0..20 {
            kept.step(1, step, false).unwrap();
            if kept.state.tensors.unrecorded_runs > 0 {
                for step in 0..=step {
                    fresh.step(1, step, true).unwrap();
                }
                return (kept, fresh);
            }
        }
        panic!("no step was computed without recording");
    }

    /// What a recorded run refuses, a run that would not be recorded refuses in the same words: the
    /// values checked per run (gathered ids, positions) and the caps. (Unchecked, the id past the table
    /// would abort the process in ggml's row gather.)
    #[test]
    fn refusals_are_the_recorded_runs() {
        let refused = |token: i32, shift: u32, cap: bool| {
            let (mut kept, mut fresh) = warmed();
            let unrecorded = kept.state.tensors.unrecorded_runs;
            for d in [&mut kept, &mut fresh].into_iter().filter(|_| cap) {
                d.state.tensors.max_bytes = d.state.tensors.live_bytes + 64;
            }
            let error = kept.step(token, shift, false).unwrap_err();
            assert_eq!(error, fresh.step(token, shift, true).unwrap_err());
            assert_eq!(kept.state.tensors.unrecorded_runs, unrecorded, "refused by the recorded path: {error}");
            error
        };
        let bad_id = refused(VOCAB as i32, 30, false);
        assert!(bad_id.contains("op 8 (take): take: index 16 is outside axis 0 of size 16"), "{bad_id}");
        let overflow = refused(1, u32::MAX, false);
        assert!(overflow.contains("op 11 (rope): position 4 + 4294967295 overflows"), "{overflow}");
        let capped = refused(1, 30, true);
        assert!(capped.contains("exceeded the tensor memory limit"), "{capped}");
    }
}
