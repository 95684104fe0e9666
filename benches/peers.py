#!/usr/bin/env python3
"""edgechat against llama.cpp, in one sitting, on the same GGUF and the same threads.

Builds llama.cpp's `llama-bench` from pinned sources (the llama-cpp-python sdist on PyPI; edgechat's
cpu backend links the ggml that llama-cpp-sys-2 vendors), then runs it and `edgechat bench` on both backends with 512 prompt
and 128 generated tokens, 3 runs each, and prints a markdown table (tokens/s, ratios to llama.cpp, peak
RSS, the adapter's share of decode time). Standard library only.

    python3 benches/peers.py [MODEL_ID]      # default gemma-3-270m (`cargo xtask demo-model`)

EDGECHAT_THREADS sets the threads for both (default: every core). edgechat is built as `cargo run`
builds it, unless EDGECHAT_BIN names a binary to measure.
"""

import hashlib
import json
import os
import pathlib
import resource
import subprocess
import sys
import tarfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPT, GEN, RUNS = 512, 128, 3


def run(cmd, **kw):
    print("$", " ".join(str(c) for c in cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, text=True, **kw)


def peak_rss_of(cmd, env=None):
    """Runs cmd, returns (stdout, its peak RSS in bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = run(cmd, stdout=subprocess.PIPE, env=env).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of any child so far; it is only attributable when it grew.
    return out, after * 1024 if after > before else None


# llama.cpp as the llama-cpp-python sdist on PyPI vendors it (the crate's vendored copy leaves out the
# tools): pinned by version and sha256.
SDIST = ("0.3.36", "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
         "llama_cpp_python-0.3.36.tar.gz", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")


def llama_cpp_sources():
    version, url, sha256 = SDIST
    root = ROOT / "target" / "peers"
    src = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not src.exists():
        root.mkdir(parents=True, exist_ok=True)
        archive = root / f"llama_cpp_python-{version}.tar.gz"
        if not archive.exists():
            print(f"fetching {url}", file=sys.stderr)
            urllib.request.urlretrieve(url, archive)
        if hashlib.sha256(archive.read_bytes()).hexdigest() != sha256:
            archive.unlink()
            sys.exit(f"{url} does not have the pinned sha256")
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    return f"llama-cpp-python {version}", src


def build_llama_bench(threads):
    version, src = llama_cpp_sources()
    build = src.parent.parent / "build"
    binary = build / "bin" / "llama-bench"
    if not binary.exists():
        started = time.time()
        # The cmake variables edgechat's build sets for MLX must not reach this build.
        env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_TOOLCHAIN_FILE", "CPATH", "BINDGEN_EXTRA_CLANG_ARGS")}
        run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_OPENMP=OFF",
             "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"], env=env, stdout=subprocess.DEVNULL)
        run(["cmake", "--build", build, "--target", "llama-bench", "-j", str(threads)], env=env, stdout=subprocess.DEVNULL)
        print(f"built llama-bench in {time.time() - started:.0f} s", file=sys.stderr)
    return version, binary


def edgechat_bench(binary, model, backend, dtype, threads, adapter_engine="cranelift"):
    env = dict(os.environ, EDGECHAT_THREADS=str(threads), EDGECHAT_ADAPTER_ENGINE=adapter_engine)
    # A first run compiles the adapter for this engine into the cache (as a user's first run does); the
    # measured run below loads it, so its peak RSS is the model's, not the compiler's.
    run([binary, "--backend", backend, "bench", model, "--dtype", dtype, "--prompt-tokens", "8", "--gen-tokens", "2",
         "--runs", "1", "--json"], stdout=subprocess.DEVNULL, env=env)
    out, rss = peak_rss_of([binary, "--backend", backend, "bench", model, "--dtype", dtype, "--prompt-tokens", str(PROMPT),
                                "--gen-tokens", str(GEN), "--runs", str(RUNS), "--json"], env)
    return json.loads(out.strip().splitlines()[-1]), rss


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "gemma-3-270m"
    threads = int(os.environ.get("EDGECHAT_THREADS") or os.cpu_count())
    version, llama_bench = build_llama_bench(threads)
    # The workspace's one profile (dependencies and the shell at opt-level 3), as `cargo run` builds it;
    # EDGECHAT_BIN measures a binary built already.
    if os.environ.get("EDGECHAT_BIN"):
        edgechat = pathlib.Path(os.environ["EDGECHAT_BIN"])
    else:
        run(["cargo", "build", "--quiet", "-p", "edgechat"], cwd=ROOT)
        edgechat = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "debug" / "edgechat"
    data = pathlib.Path(os.environ.get("EDGECHAT_HOME") or pathlib.Path.home() / ".local/share/edgechat")
    gguf = data / "Models" / model / "model.gguf"
    if not gguf.exists():
        sys.exit(f"{gguf} not found: import the model first (cargo xtask demo-model)")

    rows, weights = [], None
    # edgechat's decode follows its 512-token prompt, so llama.cpp's generation is measured at that depth
    # too (llama-bench's plain tg128 starts from an empty context).
    common = [llama_bench, "-m", gguf, "-t", str(threads), "-r", str(RUNS), "-o", "json"]
    out, rss_pp = peak_rss_of(common + ["-p", str(PROMPT), "-n", "0"])
    pp = json.loads(out)[0]["avg_ts"]
    out, rss_tg = peak_rss_of(common + ["-p", "0", "-n", str(GEN), "-d", str(PROMPT)])
    tg = json.loads(out)[0]["avg_ts"]
    rss = max(r for r in (rss_pp, rss_tg) if r) if (rss_pp or rss_tg) else None
    rows.append((f"llama.cpp ({version})", pp, tg, rss, None))
    # The cpu backend multiplies the GGUF's blocks as stored (auto); MLX runs them dequantized to f32.
    for backend, dtype, engine in (("cpu", "auto", "cranelift"), ("cpu", "auto", "pulley"), ("mlx", "f32", "cranelift")):
        result, rss = edgechat_bench(edgechat, model, backend, dtype, threads, engine)
        # The tensors' bytes as stored (the file less its header: 235 MiB of Gemma 3's 241), as llama-bench's
        # "size" column counts them too.
        weights = weights or result.get("weight_bytes")
        label = f"edgechat {backend} ({result['dtype']}, adapter on {engine})"
        rows.append((label, result["prefill_tokens_per_s"], result["decode_tokens_per_s"], result.get("peak_rss_bytes") or rss,
                     result["boundary_share"]))

    size = gguf.stat().st_size
    weights = weights or size
    base_pp, base_tg = rows[0][1], rows[0][2]
    print(f"\n{model} ({gguf.name}, {size / 2**20:.1f} MiB, weights {weights / 2**20:.1f} MiB), {threads} threads, {PROMPT} prompt tokens, then {GEN} generated, "
          f"{RUNS} runs, {time.strftime('%Y-%m-%d')}\n")
    print("| engine | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp | peak RSS | RSS / weight bytes | graph building share of decode |")
    print("|---|---|---|---|---|---|---|---|")
    for label, pp, tg, rss, share in rows:
        rss_text = f"{rss / 2**20:.0f} MiB" if rss else "n/a"
        ratio = f"{rss / weights:.2f}x" if rss else "n/a"
        share_text = f"{share * 100:.1f} %" if share is not None else "-"
        print(f"| {label} | {pp:.1f} | {tg:.1f} | {pp / base_pp:.2f}x | {tg / base_tg:.2f}x | {rss_text} | {ratio} | {share_text} |")


if __name__ == "__main__":
    main()
