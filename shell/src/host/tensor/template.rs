//! `template`: an op list the shell keeps and records again per token. An adapter records a decode step
//! once; for each later token it passes that token's inputs (its ids, the caches the last step left) and
//! how many positions further on it is, and the shell records the same ops through [`batch::record`], so
//! each op is checked, charged and refused exactly as its single call would be. The adapter's own code
//! does not run again, and the step crosses the boundary in one call instead of ~1 100.

use super::replay::{self, LastRun};
use super::wit::Op;
use super::{batch, BackendKind, Handle};
use crate::host::HostState;
use wasmtime::component::Resource;

type Outcome<T> = wasmtime::Result<Result<T, String>>;

/// The memory all of an instance's live templates may hold together, in bytes of ops and of the lists
/// inside them (a Gemma 3 decode step is ~600 ops, ~60 KB; an adapter keeps one per conversation).
pub const MAX_TEMPLATE_BYTES: usize = 64 << 20;

/// What `op` costs to keep: itself and the lists it holds.
fn bytes(op: &Op) -> usize {
    let lists = match op {
        Op::Reshape((_, shape)) => shape.len(),
        Op::Transpose((_, axes)) => axes.len(),
        Op::Slice((_, start, stop)) | Op::SliceUpdate((_, _, start, stop)) => start.len() + stop.len(),
        Op::Concatenate((parts, _)) => parts.len(),
        _ => 0,
    };
    std::mem::size_of::<Op>() + 4 * lists
}

pub struct Template {
    ops: Vec<Op>,
    keep: Vec<u32>,
    /// What it is charged against [`MAX_TEMPLATE_BYTES`].
    bytes: usize,
    /// The last run, for computing the next without recording it (cpu backend, see [`replay`]).
    last: Option<LastRun>,
}

impl super::wit::HostTemplate for HostState {
    fn create(&mut self, ops: Vec<Op>, keep: Vec<u32>) -> Outcome<Resource<Template>> {
        create(self, ops, keep)
    }

    fn run(&mut self, template: Resource<Template>, fixed: Vec<Handle>, inputs: Vec<Handle>, shift: u32) -> Outcome<Vec<Handle>> {
        run(self, &template, fixed, inputs, shift)
    }

    fn drop(&mut self, template: Resource<Template>) -> wasmtime::Result<()> {
        drop(self, template)
    }
}

fn create(state: &mut HostState, ops: Vec<Op>, keep: Vec<u32>) -> Outcome<Resource<Template>> {
    let bytes = ops.iter().map(bytes).sum::<usize>() + 4 * keep.len();
    let t = &mut state.tensors;
    if t.template_bytes.saturating_add(bytes) > MAX_TEMPLATE_BYTES {
        return Ok(Err(format!(
            "template: {bytes} more bytes of ops would exceed the {MAX_TEMPLATE_BYTES} that live templates may hold ({} held)",
            t.template_bytes
        )));
    }
    if t.live_handles >= t.max_handles {
        wasmtime::bail!("adapter exceeded the limit of {} live tensor handles", t.max_handles);
    }
    t.template_bytes += bytes;
    t.live_handles += 1;
    Ok(Ok(state.table.push(Template { ops, keep, bytes, last: None })?))
}

fn run(state: &mut HostState, template: &Resource<Template>, fixed: Vec<Handle>, inputs: Vec<Handle>, shift: u32) -> Outcome<Vec<Handle>> {
    // Taken out while they are recorded (recording needs the whole state) and put back after.
    let kept = state.table.get_mut(template)?;
    let (ops, keep, mut last) = (std::mem::take(&mut kept.ops), std::mem::take(&mut kept.keep), kept.last.take());
    state.tensors.template_runs += 1;
    let all: Vec<Handle> = fixed.into_iter().chain(inputs.iter().map(|h| Resource::new_borrow(h.rep()))).collect();
    let replayed = match &mut last {
        Some(last) => replay::run(state, &ops, &keep, last, &all, shift),
        None => Ok(None),
    };
    let result = match replayed {
        Ok(Some(kept)) => Ok(kept),
        Ok(None) => record(state, all, &ops, &keep, shift, &mut last),
        Err(trap) => Err(trap),
    };
    let kept = state.table.get_mut(template)?;
    (kept.ops, kept.keep, kept.last) = (ops, keep, last);
    // Given up: what the results need of them stays recorded through the results.
    for input in inputs {
        super::wit::HostArray::drop(state, input)?;
    }
    result
}

/// Records a run op by op; on the cpu backend, remembers it so that the next may be computed without
/// recording (its memory charged with the templates', and not kept past their cap).
fn record(state: &mut HostState, all: Vec<Handle>, ops: &[Op], keep: &[u32], shift: u32, last: &mut Option<LastRun>) -> Outcome<Vec<Handle>> {
    if let Some(old) = last.take() {
        state.tensors.template_bytes -= old.bytes();
    }
    if state.tensors.backend.kind() != BackendKind::Cpu {
        return batch::record(state, all, ops, keep, shift, None);
    }
    let types = all.iter().map(|h| state.entry(h).map(|e| (e.dtype, e.blocks))).collect::<wasmtime::Result<Vec<_>>>()?;
    let mut seen = Vec::with_capacity(ops.len());
    let result = batch::record(state, all, ops, keep, shift, Some(&mut seen));
    if matches!(result, Ok(Ok(_))) {
        let recorded = LastRun::recorded(ops, seen, types);
        let t = &mut state.tensors;
        if t.template_bytes.saturating_add(recorded.bytes()) <= MAX_TEMPLATE_BYTES {
            t.template_bytes += recorded.bytes();
            *last = Some(recorded);
        }
    }
    result
}

fn drop(state: &mut HostState, template: Resource<Template>) -> wasmtime::Result<()> {
    let template = state.table.delete(template)?;
    state.tensors.template_bytes -= template.bytes + template.last.as_ref().map_or(0, LastRun::bytes);
    state.tensors.live_handles -= 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::wit::{self, HostArray, HostTemplate, RopeParams};
    use super::super::Backend;
    use super::*;
    use crate::host::Limits;

    fn host() -> HostState {
        HostState::new("test", &Limits::default())
    }

    fn rope(offset: u32) -> Op {
        Op::Rope((0, RopeParams { dims: 4, traditional: false, base: 10_000.0, scale: 1.0, offset }))
    }

    fn values(state: &mut HostState, h: &Handle) -> Vec<f32> {
        let a = state.array(h).unwrap();
        state.tensors.backend.read_f32(a).unwrap()
    }

    /// x [1, 1, 2, 4]: two positions of one head.
    fn input(state: &mut HostState) -> Handle {
        let data: Vec<f32> = (0..8).map(|i| i as f32 * 0.25 - 1.0).collect();
        HostArray::from_f32(state, data, vec![1, 1, 2, 4]).unwrap().unwrap()
    }

    #[test]
    fn a_run_is_the_recorded_step_shifted_and_releases_what_it_does_not_keep() {
        let mut state = host();
        let x = input(&mut state);
        let given = input(&mut state);
        let template = HostTemplate::create(&mut state, vec![Op::Input(1), rope(3), Op::Scale((1, 2.0))], vec![2]).unwrap().unwrap();
        let handles = state.tensors.live_handles;
        let fixed = vec![Resource::new_borrow(x.rep())];
        let ran = HostTemplate::run(&mut state, Resource::new_borrow(template.rep()), fixed, vec![given], 2).unwrap().unwrap();
        assert_eq!(ran.len(), 1);
        assert_eq!(state.tensors.live_handles, handles, "the kept result stays, the input given up goes");
        let params = RopeParams { dims: 4, traditional: false, base: 10_000.0, scale: 1.0, offset: 5 };
        let direct = wit::Host::rope(&mut state, Resource::new_borrow(x.rep()), params).unwrap().unwrap();
        let direct = wit::Host::scale(&mut state, direct, 2.0).unwrap().unwrap();
        assert_eq!(values(&mut state, &ran[0]), values(&mut state, &direct));
        assert_eq!(state.tensors.template_runs, 1);
    }

    #[test]
    fn hostile_templates_are_refused_by_name() {
        let mut state = host();
        let x = input(&mut state);
        let run = |state: &mut HostState, ops: Vec<Op>, keep: Vec<u32>, fixed: Vec<u32>, shift: u32| {
            let fixed = fixed.into_iter().map(Resource::new_borrow).collect();
            let template = HostTemplate::create(state, ops, keep).unwrap().unwrap();
            let result = HostTemplate::run(state, Resource::new_borrow(template.rep()), fixed, vec![], shift).unwrap();
            HostTemplate::drop(state, template).unwrap();
            result.map(|kept| kept.len()).unwrap_err()
        };
        let live = state.tensors.live_handles;
        let error = run(&mut state, vec![Op::Input(1)], vec![], vec![x.rep()], 0);
        assert!(error.contains("op 0 (input): input 1 does not exist"), "{error}");
        let error = run(&mut state, vec![Op::Input(0), Op::Tanh(5)], vec![], vec![x.rep()], 0);
        assert!(error.contains("op 1 (tanh): value 5 is not the result of an earlier op"), "{error}");
        let error = run(&mut state, vec![Op::Input(0), Op::Tanh(0)], vec![0], vec![x.rep()], 0);
        assert!(error.contains("an input"), "{error}");
        let error = run(&mut state, vec![Op::Input(0), Op::Tanh(0)], vec![1, 1], vec![x.rep()], 0);
        assert!(error.contains("twice"), "{error}");
        let error = run(&mut state, vec![Op::Input(0), rope(3)], vec![1], vec![x.rep()], u32::MAX);
        assert!(error.contains("op 1 (rope): position 3 + 4294967295 overflows"), "{error}");
        assert_eq!(state.tensors.live_handles, live, "a refused run leaves nothing behind");
        assert_eq!(state.tensors.template_bytes, 0, "dropped templates give their memory back");
    }

    #[test]
    fn the_memory_live_templates_hold_is_capped() {
        let mut state = host();
        // Ops with long lists (here a reshape to 100 000 axes each) count at what they hold.
        let heavy = vec![Op::Reshape((0, vec![1; 100_000])); 100];
        let first = HostTemplate::create(&mut state, heavy.clone(), vec![]).unwrap().unwrap();
        let refused = HostTemplate::create(&mut state, heavy.clone(), vec![]).unwrap().map(|_| ()).unwrap_err();
        assert!(refused.contains("would exceed"), "{refused}");
        HostTemplate::drop(&mut state, first).unwrap();
        assert!(HostTemplate::create(&mut state, heavy, vec![]).unwrap().is_ok(), "dropping a template frees its share");
        assert_eq!(state.tensors.template_runs, 0);
    }
}
