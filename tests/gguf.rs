//! GGUF reading: every supported ggml type dequantizes as ggml's reference does (fixtures made with the
//! `gguf` package: tests/fixtures/gguf/make_quants.py), metadata is exposed, and broken files fail
//! with an error naming the file (and the tensor).

mod common;

use edgechat::host::weights::gguf::GgufCheckpoint;

#[test]
fn every_supported_type_dequantizes_like_ggml() {
    let checkpoint = GgufCheckpoint::open(&common::fixture("gguf/quants.gguf")).unwrap();
    let expected_bytes = std::fs::read(common::fixture("gguf/quants-expected.safetensors")).unwrap();
    let expected = safetensors::SafeTensors::deserialize(&expected_bytes).unwrap();
    let mut names = expected.names();
    names.sort();
    assert_eq!(names.len(), 11);
    for name in names {
        let want: Vec<f32> =
            expected.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let (got, shape) = checkpoint.dequantize(name).unwrap();
        assert_eq!(shape, [4, 256], "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{name}[{i}]: {g} != {w}");
        }
    }
}

#[test]
fn metadata_is_exposed() {
    let checkpoint = GgufCheckpoint::open(&common::fixture("gguf/quants.gguf")).unwrap();
    assert_eq!(checkpoint.architecture(), Some("test"));
    assert_eq!(checkpoint.metadata()["test.answer"], 42);
    assert_eq!(checkpoint.metadata()["test.small_list"], serde_json::json!([1, 2, 3]));
}

#[test]
fn broken_files_fail_with_a_clear_error() {
    let original = std::fs::read(common::fixture("gguf/quants.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");

    std::fs::write(&path, b"GGML not really").unwrap();
    let err = GgufCheckpoint::open(&path).err().unwrap();
    assert!(format!("{err:#}").contains("broken.gguf is not a valid GGUF file: no GGUF magic"), "{err:#}");

    for cut in [10, 100, 600] {
        std::fs::write(&path, &original[..cut]).unwrap();
        let err = GgufCheckpoint::open(&path).err().unwrap();
        assert!(format!("{err:#}").contains("truncated"), "cut {cut}: {err:#}");
    }

    // Header intact, data cut: refused at open (every tensor is checked to lie inside the file), naming
    // the file and the tensor.
    std::fs::write(&path, &original[..original.len() - 100]).unwrap();
    let err = format!("{:#}", GgufCheckpoint::open(&path).err().unwrap());
    assert!(err.contains("broken.gguf") && err.contains("t.q6_k") && err.contains("outside the file"), "{err}");
    let checkpoint = GgufCheckpoint::open(&common::fixture("gguf/quants.gguf")).unwrap();
    assert!(checkpoint.dequantize("no.such.tensor").unwrap_err().contains("no tensor no.such.tensor"));
}

/// A GGUF header written field by field, for files no converter would make.
struct Gguf(Vec<u8>);

impl Gguf {
    fn new(tensors: u64, kvs: u64) -> Gguf {
        let mut g = Gguf(b"GGUF".to_vec());
        g.u32(3).u64(tensors).u64(kvs);
        g
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend(s.as_bytes());
        self
    }
    /// A tensor entry: name, dims (innermost first), type, offset.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
}

fn refusal(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = GgufCheckpoint::open(&path).err().expect("the file must be refused");
    let message = format!("{err:#}");
    assert!(message.contains("hostile.gguf"), "the error names the file: {message}");
    message
}

#[test]
fn deeply_nested_metadata_is_refused_not_recursed() {
    // 100 000 nested arrays: recursion without a bound would overflow the stack (a signal, not an error).
    let mut g = Gguf::new(0, 1);
    g.str("deep").u32(9);
    for _ in 0..100_000 {
        g.u32(9).u64(1);
    }
    g.u32(4).u64(1).u32(7);
    assert!(refusal(&g.0).contains("nested more than"));
}

#[test]
fn absurd_tensor_directories_are_refused() {
    let with = |dims: &[u64], ty: u32, offset: u64| {
        let mut g = Gguf::new(1, 0);
        g.tensor("blk.0.attn_q.weight", dims, ty, offset);
        g.0.resize(g.0.len() + 4096, 0);
        refusal(&g.0)
    };
    assert!(with(&[0, 32], 0, 0).contains("dimension of 0"), "zero-size matrix");
    assert!(with(&[u64::MAX, 2], 0, 0).contains("dimension of"), "absurd dimension");
    assert!(with(&[1 << 31, 1 << 31, 1 << 31, 1 << 31], 0, 0).contains("dimension of"));
    assert!(with(&[1 << 30, 1 << 30, 1 << 30, 1 << 30], 0, 0).contains("impossibly"), "overflowing element count");
    assert!(with(&[32, 1 << 20], 8, 0).contains("outside the file"), "more data than the file holds");
    assert!(with(&[32], 0, u64::MAX - 8).contains("tensor"), "offset overflow");
    assert!(with(&[31], 8, 0).contains("not whole"), "partial block");
    assert!(with(&[4, 4, 4, 4, 4], 0, 0).contains("dimensions"), "rank 5");
    let mut twice = Gguf::new(2, 0);
    twice.tensor("a", &[4], 0, 0).tensor("a", &[4], 0, 0);
    twice.0.resize(twice.0.len() + 64, 0);
    assert!(refusal(&twice.0).contains("listed twice"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 400, ..Default::default() })]

    /// Random byte flips, overwrites with extreme values and truncations of a real file: the reader
    /// answers Ok or a clear Err, never a panic, a hang or a signal; whatever it accepts reads safely.
    #[test]
    fn mutated_real_headers_never_crash_the_reader(
        flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..8),
        extreme in proptest::option::of((0usize..1024, proptest::sample::select(vec![0u64, 1, u32::MAX as u64, i64::MAX as u64, u64::MAX]))),
        cut in proptest::option::of(0usize..8192),
    ) {
        let mut bytes = std::fs::read(common::fixture("gguf/quants.gguf")).unwrap();
        for (at, value) in flips {
            let at = at % bytes.len();
            bytes[at] = value;
        }
        if let Some((at, value)) = extreme {
            let at = at.min(bytes.len() - 8);
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.min(bytes.len()));
        }
        if let Ok((_, tensors, _)) = GgufCheckpoint::parse(&bytes) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.gguf");
            std::fs::write(&path, &bytes).unwrap();
            let checkpoint = GgufCheckpoint::open(&path).unwrap();
            for name in tensors.keys() {
                let _ = checkpoint.dequantize(name);
            }
        }
    }
}

/// A header whose data would start past the end of the file (no tensors, a 1 MiB alignment) opens: the
/// header pages handed back after parsing are clamped to the file's mapping (`whole_pages_before`, unit
/// tested in `gguf.rs`; madvise checks no bounds and past the mapping would drop a neighbour's pages).
#[test]
fn a_data_start_past_the_end_of_the_file_opens() {
    let mut g = Gguf::new(0, 1);
    g.str("general.alignment").u32(4).u32(1 << 20); // type 4: u32
    g.0.resize(3 * 4096 + 100, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("far.gguf");
    std::fs::write(&path, &g.0).unwrap();
    let checkpoint = GgufCheckpoint::open(&path).unwrap();
    assert!(edgechat::host::weights::Checkpoint::names(&checkpoint).is_empty());
    assert_eq!(edgechat::host::weights::Checkpoint::stored_bytes(&checkpoint), 0);
}
