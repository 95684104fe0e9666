//! Property tests: whatever message list a user (or a file) supplies, formatting through a real adapter
//! component either succeeds or fails with the template's own error; it never traps the adapter or
//! panics the host.

mod common;

use edgechat::adapter::bindings::exports::edgechat::adapter::prompt::{FormatOptions, Message};
use edgechat::adapter::AdapterError;
use proptest::prelude::*;

fn role() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("user".to_owned()),
        Just("assistant".to_owned()),
        Just("system".to_owned()),
        Just("tool".to_owned()),
        ".{0,12}",
    ]
}

fn messages() -> impl Strategy<Value = Vec<Message>> {
    prop::collection::vec((role(), any::<String>()).prop_map(|(role, content)| Message { role, content }), 0..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_messages_never_crash_an_adapter(messages in messages(), add_generation_prompt: bool) {
        for name in ["gemma", "leap"] {
            let mut session = common::load(name).instantiate().unwrap();
            let options = FormatOptions { add_generation_prompt, tokenizer_config: None };
            match session.format(&messages, &options) {
                Ok(formatted) => {
                    let bos = if name == "gemma" { "<bos>" } else { "<|startoftext|>" };
                    prop_assert!(formatted.text.starts_with(bos));
                    // Content reaches the prompt verbatim (Gemma trims, as its template says).
                    for m in messages.iter().filter(|m| m.role != "system") {
                        let content = if name == "gemma" { m.content.trim_matches(adapter_whitespace) } else { m.content.as_str() };
                        prop_assert!(formatted.text.contains(content));
                    }
                }
                Err(AdapterError::Refused(_)) => {}
                Err(trap @ AdapterError::Trapped { .. }) => prop_assert!(false, "{name} trapped: {trap}"),
            }
        }
    }

    #[test]
    fn arbitrary_tokenizer_configs_never_crash_an_adapter(config in ".{0,64}", template in ".{0,48}") {
        let one = [Message { role: "user".into(), content: "hi".into() }];
        for tokenizer_config in [config.clone(), serde_json::json!({ "chat_template": template }).to_string()] {
            let mut session = common::load("gemma").instantiate().unwrap();
            let options = FormatOptions { add_generation_prompt: true, tokenizer_config: Some(tokenizer_config) };
            if let Err(trap @ AdapterError::Trapped { .. }) = session.format(&one, &options) {
                prop_assert!(false, "trapped: {trap}");
            }
        }
    }
}

/// Python's `str.strip()` whitespace, which Gemma's template `trim` follows.
fn adapter_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// One tensor op with guest-chosen (often absurd) arguments; `usize`s pick arrays from the pool.
#[derive(Debug, Clone)]
enum Op {
    FromF32(Vec<u32>),
    Reshape(usize, Vec<i32>),
    Transpose(usize, Vec<u32>),
    Binary(usize, usize, u8),
    Matmul(usize, usize),
    Slice(usize, Vec<i32>, Vec<i32>),
    SliceUpdate(usize, usize, Vec<i32>, Vec<i32>),
    Concatenate(Vec<usize>, i32),
    Take(usize, Vec<i32>, i32),
    Softmax(usize, i32),
    RmsNorm(usize, usize),
    Rope(usize, u32, u32),
    Attention(usize, usize, usize, u8),
    Conv(usize, usize),
    Astype(usize, u8),
    Read(usize),
    /// scale, add-scalar, tanh, sigmoid, silu, gelu-tanh.
    Unary(usize, u8),
}

fn dim() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0i32..6, 1 => Just(-1), 1 => Just(i32::MAX), 1 => Just(65536), 1 => Just(i32::MIN)]
}

fn op() -> impl Strategy<Value = Op> {
    let shape = || prop::collection::vec(dim(), 0..6);
    let udims = prop::collection::vec(prop_oneof![4 => 0u32..6, 1 => Just(u32::MAX), 1 => Just(1 << 16)], 0..6);
    let i = || 0usize..8;
    prop_oneof![
        udims.prop_map(Op::FromF32),
        (i(), shape()).prop_map(|(a, s)| Op::Reshape(a, s)),
        (i(), prop::collection::vec(0u32..6, 0..5)).prop_map(|(a, x)| Op::Transpose(a, x)),
        (i(), i(), 0u8..4).prop_map(|(a, b, k)| Op::Binary(a, b, k)),
        (i(), i()).prop_map(|(a, b)| Op::Matmul(a, b)),
        (i(), shape(), shape()).prop_map(|(a, s, e)| Op::Slice(a, s, e)),
        (i(), i(), shape(), shape()).prop_map(|(a, u, s, e)| Op::SliceUpdate(a, u, s, e)),
        (prop::collection::vec(i(), 0..4), dim()).prop_map(|(v, x)| Op::Concatenate(v, x)),
        (i(), prop::collection::vec(dim(), 0..4), dim()).prop_map(|(a, v, x)| Op::Take(a, v, x)),
        (i(), dim()).prop_map(|(a, x)| Op::Softmax(a, x)),
        (i(), i()).prop_map(|(a, b)| Op::RmsNorm(a, b)),
        (i(), prop_oneof![Just(0u32), Just(2), Just(4), Just(u32::MAX)], prop_oneof![Just(0u32), Just(u32::MAX)]).prop_map(|(a, d, o)| Op::Rope(a, d, o)),
        (i(), i(), i(), 0u8..3).prop_map(|(q, k, v, m)| Op::Attention(q, k, v, m)),
        (i(), i()).prop_map(|(a, b)| Op::Conv(a, b)),
        (i(), 0u8..6).prop_map(|(a, d)| Op::Astype(a, d)),
        i().prop_map(Op::Read),
        (i(), 0u8..6).prop_map(|(a, k)| Op::Unary(a, k)),
    ]
}

mod host_ops {
    use super::Op;
    use edgechat::adapter::bindings::edgechat::adapter::tensor::{self as wit, Host, HostArray};
    use edgechat::host::tensor::TensorHandle;
    use edgechat::host::{HostState, Limits};
    use wasmtime::component::Resource;

    type H = Resource<TensorHandle>;

    fn borrow(h: &H) -> H {
        Resource::new_borrow(h.rep())
    }

    /// Runs `ops` through the real tensor host. Every op answers a value, a refusal (a non-empty
    /// sentence) or a trap for a cap (the call would end); nothing may panic or crash the process.
    pub fn run(ops: &[Op]) {
        let limits = Limits { max_tensor_bytes: 64 << 20, ..Limits::default() };
        let mut state = HostState::new("proptest", &limits);
        let mut pool: Vec<H> = Vec::new();
        // The single head [1, 1, 2, 4] makes views whose size-1 axes have unpacked strides (rope's).
        for shape in [vec![2u32, 3], vec![1, 2, 4, 4], vec![4], vec![1, 1, 2, 4]] {
            let n = shape.iter().product::<u32>() as usize;
            pool.push(state.from_f32((0..n).map(|v| v as f32 * 0.25).collect(), shape).unwrap().unwrap());
        }
        for op in ops {
            let pick = |i: usize| borrow(&pool[i % pool.len()]);
            let result: wasmtime::Result<Result<H, String>> = match op.clone() {
                Op::FromF32(shape) => {
                    let n = shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64)).min(64) as usize;
                    state.from_f32(vec![1.0; n], shape)
                }
                Op::Reshape(a, s) => state.reshape(pick(a), s),
                Op::Transpose(a, x) => state.transpose(pick(a), x),
                Op::Binary(a, b, k) => match k {
                    0 => state.add(pick(a), pick(b)),
                    1 => state.subtract(pick(a), pick(b)),
                    2 => state.multiply(pick(a), pick(b)),
                    _ => state.divide(pick(a), pick(b)),
                },
                Op::Matmul(a, b) => state.matmul(pick(a), pick(b)),
                Op::Slice(a, s, e) => state.slice(pick(a), s, e),
                Op::SliceUpdate(a, u, s, e) => state.slice_update(pick(a), pick(u), s, e),
                Op::Concatenate(v, x) => state.concatenate(v.into_iter().map(pick).collect(), x),
                Op::Take(a, ids, x) => {
                    let n = ids.len() as u32;
                    match state.from_i32(ids, vec![n]) {
                        Ok(Ok(idx)) => state.take(pick(a), idx, x),
                        other => other,
                    }
                }
                Op::Softmax(a, x) => state.softmax(pick(a), x),
                Op::RmsNorm(a, b) => state.rms_norm(pick(a), pick(b), 1e-6),
                Op::Rope(a, dims, offset) => state.rope(pick(a), wit::RopeParams { dims, traditional: false, base: 1e4, scale: 1.0, offset }),
                Op::Attention(q, k, v, m) => {
                    let mask = match m {
                        0 => wit::Mask::None,
                        1 => wit::Mask::Causal,
                        _ => wit::Mask::SlidingWindow(wit::WindowMask { window: 2, query_offset: 3, key_offset: 0 }),
                    };
                    state.attention(pick(q), pick(k), pick(v), 0.5, mask)
                }
                Op::Conv(a, b) => state.conv1d_depthwise(pick(a), pick(b)),
                Op::Astype(a, d) => {
                    let dtype = [wit::Dtype::Float32, wit::Dtype::Float16, wit::Dtype::Bfloat16, wit::Dtype::Int32, wit::Dtype::Uint32, wit::Dtype::Uint8][d as usize];
                    state.astype(pick(a), dtype)
                }
                Op::Unary(a, k) => match k {
                    0 => state.scale(pick(a), 2.0),
                    1 => state.add_scalar(pick(a), 1.0),
                    2 => state.tanh(pick(a)),
                    3 => state.sigmoid(pick(a)),
                    4 => state.silu(pick(a)),
                    _ => state.gelu_tanh(pick(a)),
                },
                Op::Read(a) => {
                    match state.read_f32(pick(a)) {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => assert!(!e.is_empty()),
                        Err(trap) => assert!(!trap.to_string().is_empty()),
                    }
                    continue;
                }
            };
            match result {
                Ok(Ok(h)) => pool.push(h),
                Ok(Err(refusal)) => assert!(!refusal.is_empty(), "{op:?}"),
                Err(trap) => {
                    // A cap: the adapter call would end here.
                    assert!(trap.to_string().contains("limit"), "{op:?}: {trap}");
                    return;
                }
            }
        }
        let all: Vec<H> = pool.iter().map(borrow).collect();
        let _ = state.eval(all);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Random op sequences with random, also absurd, shapes and indices through the real tensor host:
    /// no panic, no signal, every refusal a sentence.
    #[test]
    fn random_op_sequences_never_crash_the_host(ops in prop::collection::vec(op(), 1..12)) {
        host_ops::run(&ops);
    }
}
