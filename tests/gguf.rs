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

    // Header intact, data cut: opening works, reading the lost tensor names file and tensor.
    std::fs::write(&path, &original[..original.len() - 100]).unwrap();
    let checkpoint = GgufCheckpoint::open(&path).unwrap();
    let err = checkpoint.dequantize("t.q6_k").unwrap_err();
    assert!(err.contains("broken.gguf") && err.contains("t.q6_k") && err.contains("outside the file"), "{err}");
    assert!(checkpoint.dequantize("no.such.tensor").unwrap_err().contains("no tensor no.such.tensor"));
}
