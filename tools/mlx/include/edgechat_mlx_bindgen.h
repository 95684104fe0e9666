/* Force-included into mlx-sys's bindgen run (see .cargo/config.toml). mlx-c declares its float16 and
 * bfloat16 entry points only where the C compiler has those types (Apple silicon); on x86_64 supply
 * the typedefs so the bindings mlx-rs expects exist. The shell defines the matching symbols on Linux. */
#ifndef EDGECHAT_MLX_BINDGEN_H
#define EDGECHAT_MLX_BINDGEN_H
#if !defined(__aarch64__) && !defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC)
#include <stdint.h>
#define HAS_FLOAT16
#define HAS_BFLOAT16
typedef __fp16 float16_t;
typedef uint16_t bfloat16_t;
#endif
#endif
