#!/usr/bin/env python3
"""edgechat against llama.cpp, in one sitting, on the same GGUF and the same threads.

Builds llama.cpp's `llama-bench` from pinned sources (the llama-cpp-python sdist on PyPI; edgechat's
cpu backend links the ggml that llama-cpp-sys-2 vendors), then runs it and `edgechat bench` on both backends with 512 prompt
and 128 generated tokens, 3 runs each, and prints a markdown table (tokens/s, ratios to llama.cpp, peak
RSS, the adapter's share of decode time). Standard library only.

The engines take turns: each round runs every engine once, so a host whose speed drifts over minutes (a
shared machine's moved llama.cpp's own prefill by 30 % between sittings) moves them all alike. Speeds
are medians over the rounds; ratios are the median of each round's own ratio.

    python3 benches/peers.py [MODEL_ID]      # default gemma-3-270m (`cargo xtask demo-model`)

EDGECHAT_THREADS sets the threads for both (default: every core). edgechat is built as `cargo run`
builds it, unless EDGECHAT_BIN names a binary to measure.
"""

import hashlib
import json
import os
import pathlib
import resource
from statistics import median
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
        # Native, but without AMX tiles: a virtual machine may report them and fault on their first use
        # (llama-bench died of SIGILL in ggml's AMX Q8_0 kernel on such a host), and edgechat keeps its
        # weights in ggml's plain layout, which AMX kernels do not read. Every other extension is on.
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if os.uname().machine == "x86_64" else ""
        run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_OPENMP=OFF",
             f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}",
             "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"], env=env, stdout=subprocess.DEVNULL)
        run(["cmake", "--build", build, "--target", "llama-bench", "-j", str(threads)], env=env, stdout=subprocess.DEVNULL)
        print(f"built llama-bench in {time.time() - started:.0f} s", file=sys.stderr)
    return version, binary


def edgechat_bench(binary, model, engine, threads, prompt=PROMPT, gen=GEN):
    """One run of `edgechat bench` on engine (backend, dtype, adapter engine): (its --json object, peak RSS)."""
    backend, dtype, adapter_engine = engine
    env = dict(os.environ, EDGECHAT_THREADS=str(threads), EDGECHAT_ADAPTER_ENGINE=adapter_engine)
    out, rss = peak_rss_of([binary, "--backend", backend, "bench", model, "--dtype", dtype, "--prompt-tokens", str(prompt),
                            "--gen-tokens", str(gen), "--runs", "1", "--json"], env)
    result = json.loads(out.strip().splitlines()[-1])
    return result, result.get("peak_rss_bytes") or rss


def llama_round(llama_bench, gguf, threads):
    """One llama.cpp run of each: (prefill tok/s, decode tok/s at the prompt's depth, peak RSS)."""
    common = [llama_bench, "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json"]
    out, rss_pp = peak_rss_of(common + ["-p", str(PROMPT), "-n", "0"])
    pp = json.loads(out)[0]["avg_ts"]
    # edgechat's decode follows its 512-token prompt, so llama.cpp's generation is measured at that depth
    # too (llama-bench's plain tg128 starts from an empty context).
    out, rss_tg = peak_rss_of(common + ["-p", "0", "-n", str(GEN), "-d", str(PROMPT)])
    tg = json.loads(out)[0]["avg_ts"]
    return pp, tg, max((r for r in (rss_pp, rss_tg) if r), default=None)


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

    # The cpu backend multiplies the GGUF's blocks as stored (auto); MLX runs them dequantized to f32.
    engines = (("cpu", "auto", "cranelift"), ("cpu", "auto", "pulley"), ("mlx", "f32", "cranelift"))
    llama, ours = [], {e: [] for e in engines}
    for round_ in range(RUNS):
        # (llama.cpp's first round runs before any edgechat process: a child's peak RSS is only
        # attributable while it is the largest so far.)
        llama.append(llama_round(llama_bench, gguf, threads))
        for e in engines:
            if round_ == 0:
                # A first run compiles the adapter for this engine into the cache (as a user's first run
                # does): the measured runs load it, so their peak RSS is the model's, not the compiler's.
                edgechat_bench(edgechat, model, e, threads, prompt=8, gen=2)
            ours[e].append(edgechat_bench(edgechat, model, e, threads))

    def rss_of(values):
        return max((v for v in values if v), default=None)

    rows = [(f"llama.cpp ({version})", median(r[0] for r in llama), median(r[1] for r in llama), 1.0, 1.0,
             rss_of(r[2] for r in llama), None)]
    # The tensors' bytes as stored (the file less its header: 235 MiB of Gemma 3's 241), as llama-bench's
    # "size" column counts them too.
    weights = next((r.get("weight_bytes") for runs in ours.values() for r, _ in runs if r.get("weight_bytes")), None)
    for (backend, _, engine), runs in ours.items():
        results = [r for r, _ in runs]
        rows.append((f"edgechat {backend} ({results[0]['dtype']}, adapter on {engine})",
                     median(r["prefill_tokens_per_s"] for r in results), median(r["decode_tokens_per_s"] for r in results),
                     median(r["prefill_tokens_per_s"] / l[0] for r, l in zip(results, llama)),
                     median(r["decode_tokens_per_s"] / l[1] for r, l in zip(results, llama)),
                     rss_of(rss for _, rss in runs), median(r["boundary_share"] for r in results)))

    size = gguf.stat().st_size
    weights = weights or size
    print(f"\n{model} ({gguf.name}, {size / 2**20:.1f} MiB, weights {weights / 2**20:.1f} MiB), {threads} threads, {PROMPT} prompt tokens, then {GEN} generated, "
          f"{RUNS} rounds with the engines taking turns, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| engine | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp | peak RSS | RSS / weight bytes | graph building share of decode |")
    print("|---|---|---|---|---|---|---|---|")
    for label, pp, tg, pp_ratio, tg_ratio, rss, share in rows:
        rss_text = f"{rss / 2**20:.0f} MiB" if rss else "n/a"
        ratio = f"{rss / weights:.2f}x" if rss else "n/a"
        share_text = f"{share * 100:.1f} %" if share is not None else "-"
        print(f"| {label} | {pp:.1f} | {tg:.1f} | {pp_ratio:.2f}x | {tg_ratio:.2f}x | {rss_text} | {ratio} | {share_text} |")
    # Each round's figures, to see the drift the medians smooth out.
    for i, l in enumerate(llama):
        turns = ", ".join(f"{e[0]}/{e[2]} {ours[e][i][0]['prefill_tokens_per_s']:.0f}/{ours[e][i][0]['decode_tokens_per_s']:.1f}" for e in engines)
        print(f"round {i + 1}: llama.cpp {l[0]:.0f}/{l[1]:.1f}, {turns} (prefill/decode tok/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
