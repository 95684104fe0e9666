"""What the HTTP server adds to a request: the same raw prompt through `edgechat run --json` (its own
generation time, load excluded) and through `edgechat serve` (a client's wall time for
POST /v1/completions, model preloaded; and the server's own generation time from its log), greedy,
same tokens. Prints all three: wall minus the server's generation is what HTTP, queueing, formatting and
JSON cost; run versus the server's generation is the same work in two processes.

    .toolchain/venv/bin/python benches/server_overhead.py gemma-3-270m [--tokens 32] [--runs 5]

Uses $EDGECHAT_HOME and target/debug/edgechat (or $EDGECHAT_BIN).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = os.environ.get("EDGECHAT_BIN", str(ROOT / "target/debug/edgechat"))
PROMPTS = ["The capital of France is", "A recipe for bread starts with", "The tallest mountain on Earth is"]


def run_once(model, prompt, tokens):
    out = subprocess.run([BIN, "run", model, prompt, "--raw", "--temperature", "0", "--max-tokens", str(tokens), "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return summary["generation_seconds"], summary["generated_tokens"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    env = {**os.environ, "EDGECHAT_LOG": "edgechat::server=info"}
    server = subprocess.Popen([BIN, "serve", "--port", "0", "--model", args.model], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        base = "http://" + re.search(r"http://(\S+)/v1", server.stdout.readline()).group(1)
        with httpx.Client(base_url=base, timeout=600) as client:
            while client.get("/health").status_code != 200:
                time.sleep(0.2)
            ran, served, inside = [], [], []
            for i in range(args.runs + 1):
                prompt = PROMPTS[i % len(PROMPTS)]  # a different prompt each time: no cache reuse
                seconds, generated = run_once(args.model, prompt, args.tokens)
                started = time.perf_counter()
                reply = client.post("/v1/completions", json={"model": args.model, "prompt": prompt, "max_tokens": args.tokens, "temperature": 0}).json()
                wall = time.perf_counter() - started
                assert reply["usage"]["completion_tokens"] == generated, reply
                logged = re.search(r"generated in (\d+) ms", server.stderr.readline())
                if i > 0:  # the first pair warms caches
                    ran.append(seconds)
                    served.append(wall)
                    inside.append(int(logged.group(1)) / 1e3)
    finally:
        server.kill()
    run_s, serve_s, inside_s = statistics.median(ran), statistics.median(served), statistics.median(inside)
    overhead = statistics.median([w - g for w, g in zip(served, inside)])
    print(f"edgechat run:   {run_s * 1e3:.0f} ms generating {args.tokens} tokens (median of {args.runs})")
    print(f"edgechat serve: {serve_s * 1e3:.0f} ms per request, client wall time; {inside_s * 1e3:.0f} ms of it generating")
    print(f"server overhead per request: {overhead * 1e3:.0f} ms ({100 * overhead / inside_s:.1f} % of its generation); wall vs run: {100 * (serve_s - run_s) / run_s:+.1f} %")


if __name__ == "__main__":
    main()
