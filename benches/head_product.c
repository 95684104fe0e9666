// One decode step's output-head product, as ggml computes it with the weight as stored and repacked
// for its AMX buffer type (what edgechat's cpu backend does on AMX processors, shell/src/host/tensor/
// cpu/packed.rs). Build and run with benches/head_product.sh; arguments: K N rows type iterations
// (Gemma 3 270M's head: 640 262144 1 8 20, type 8 = Q8_0).
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern ggml_backend_reg_t ggml_backend_init(void);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s K N rows type iterations\n", argv[0]);
        return 1;
    }
    const int k = atoi(argv[1]), n = atoi(argv[2]), rows = atoi(argv[3]), type = atoi(argv[4]), iterations = atoi(argv[5]);
    ggml_cpu_init();
    ggml_backend_reg_t reg = ggml_backend_init();
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    ggml_backend_buffer_type_t * (*extra)(ggml_backend_dev_t) = ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    ggml_backend_buffer_type_t amx = NULL;
    for (ggml_backend_buffer_type_t * t = extra(dev); *t; t++) {
        if (!strcmp(ggml_backend_buft_name(*t), "AMX")) amx = *t;
    }
    const size_t bytes = ggml_row_size(type, k) * n;
    unsigned char * stored = malloc(bytes);
    float * values = malloc(sizeof(float) * k * 64);
    for (long i = 0; i < (long) k * 64; i++) values[i] = rand() / (float) RAND_MAX - 0.5f;
    for (int r = 0; r < n; r += 64) ggml_quantize_chunk(type, values, stored + ggml_row_size(type, k) * r, 0, 64, k, NULL);
    for (int repacked = 0; repacked < 2; repacked++) {
        if (repacked && !amx) {
            printf("repacked: this processor or module has no AMX buffer type\n");
            break;
        }
        struct ggml_init_params params = { 1 << 20, NULL, true };
        struct ggml_context * ctx = ggml_init(params);
        struct ggml_tensor * w = ggml_new_tensor_2d(ctx, type, k, n);
        struct ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, rows);
        struct ggml_tensor * y = ggml_mul_mat(ctx, w, x);
        ggml_backend_buffer_t buffer = NULL;
        if (repacked) {
            buffer = ggml_backend_buft_alloc_buffer(amx, ggml_backend_buft_get_alloc_size(amx, w));
            ggml_backend_tensor_alloc(buffer, w, ggml_backend_buffer_get_base(buffer));
            ggml_backend_tensor_set(w, stored, 0, bytes);
        } else {
            w->data = stored;
        }
        x->data = malloc(sizeof(float) * k * rows);
        for (long i = 0; i < (long) k * rows; i++) ((float *) x->data)[i] = values[i % (k * 64)];
        y->data = malloc(sizeof(float) * n * rows);
        struct ggml_cgraph * graph = ggml_new_graph(ctx);
        ggml_build_forward_expand(graph, y);
        struct ggml_threadpool_params tp = ggml_threadpool_params_default(2);
        struct ggml_threadpool * pool = ggml_threadpool_new(&tp);
        struct ggml_cplan plan = ggml_graph_plan(graph, 2, pool);
        plan.work_data = malloc(plan.work_size + 64);
        ggml_graph_compute(graph, &plan);
        const double start = now();
        for (int i = 0; i < iterations; i++) ggml_graph_compute(graph, &plan);
        const double each = (now() - start) / iterations;
        printf("%s: %.2f ms a product, %.1f GB/s of stored weight, y[1] = %.5f\n", repacked ? "repacked (AMX buffer type)" : "as stored",
            each * 1e3, bytes / each / 1e9, ((float *) y->data)[1]);
        ggml_threadpool_free(pool);
        if (buffer) ggml_backend_buffer_free(buffer);
        ggml_free(ctx);
    }
    return 0;
}
