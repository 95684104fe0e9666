//! The backend self-test behind `edgechat doctor`: a small graph built through the `tensor` import, so
//! the shell can check the whole path (guest -> batch -> host -> backend -> read-back) against plain
//! arithmetic.

use crate::ops::{self, Tensor};

/// Returns [a @ b, rms-norm(a, ones, 1e-6), softmax(a, -1)] for n x n row-major `a` and `b`.
pub fn run(a: &[f32], b: &[f32], n: u32) -> Result<Vec<Vec<f32>>, String> {
    let a = Tensor::from_f32(a, &[n, n])?;
    let b = Tensor::from_f32(b, &[n, n])?;
    let ones = Tensor::from_f32(&vec![1.0; n as usize], &[n])?;
    let product = ops::matmul(&a, &b)?;
    let normed = ops::rms_norm(&a, &ones, 1e-6)?;
    let probs = ops::softmax(&a, -1)?;
    ops::eval(&[&product, &normed, &probs])?;
    [&product, &normed, &probs].into_iter().map(ops::read_f32).collect()
}
