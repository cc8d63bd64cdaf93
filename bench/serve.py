"""Benchmark: ``cookbook serve`` under concurrent clients (continuous batching), against the same work sent as one
batched request, and ``distill generate --backend openai`` against the server vs ``--backend cookbook``.

The model is random (``--hidden-size`` etc., as bench/generate.py) with a byte-level BPE tokenizer trained here on the
standard library's sources, written as a Hugging Face folder in a temporary directory. The server runs in its own
process (``python -m cookbook serve``, ``--max-batch-size 32``), the clients in this one (one thread each, standard
library HTTP). Prompts are ``--prompt-len`` random token ids; decoding is greedy, so both sides of a comparison
generate the same tokens (rows are batch-invariant) and tokens/s counts the server's own ``usage``.

1. For N in ``--clients`` (1, 8, 32): N single-prompt requests sent at once by N clients ("concurrent"), against one
   request holding the N prompts ("batched"); ``--repeats`` rounds alternating the order; the median wall time per
   side gives tokens/s and the ratio concurrent / batched (the goal: at least 0.8 at N = 32).
2. Under load: N = 32 streaming clients (``stream: true``): time to first token (median, 90th percentile) and tokens/s
   per client and in all.
3. ``cookbook distill generate`` on the same prompts (document prefixes from a jsonl written here), once with
   ``--backend cookbook --batch-size 32`` (the model in that process) and once with ``--backend openai --concurrency
   32`` against the server; the wall time of each command (process start and model load included on both sides; the
   server was loaded before) and the ratio (the goal: at least 0.8).

Timings on a shared machine move with other processes' load: the share of CPU time other processes used is printed
(Linux); compare ratios within one run, and repeat.

    python bench/serve.py                                          # CPU: hidden 512, 8 layers, vocab 8000
    python bench/serve.py --device cuda --dtype bf16 --hidden-size 2048 --num-layers 16 --max-tokens 128
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.train import OtherLoad  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(args, root: Path) -> Path:
    """A random model and a tokenizer trained here, as a Hugging Face folder under ``root``."""
    from cookbook.data.sample_corpus import stdlib_sources
    from cookbook.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer
    from cookbook.formats import hf
    from cookbook.formats.stream import Checkpoint, expected_shapes
    from cookbook.model import ModelConfig, Transformer

    texts, size = [], 0
    for path in stdlib_sources():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text)
        if size > 4_000_000:
            break
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_tokenizer(
        TokenizerTrainConfig([str(root / "docs.jsonl")], str(root / "tok"), kind="hf-bpe", vocab_size=args.vocab_size)
    )
    heads = max(1, args.hidden_size // 64)
    cfg = ModelConfig(
        vocab_size=args.vocab_size + 64,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 2),
        intermediate_size=256 * round(8 * args.hidden_size / 768),
        max_seq_len=max(256, args.prompt_len + args.max_tokens),
        init_std=0.05,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    state = model.state_dict()
    names = list(expected_shapes(cfg))
    ckpt = Checkpoint(
        cfg,
        lambda: ((n, state[n]) for n in names),
        {n: state[n].dtype for n in names},
        hf_files={f.name: f for f in Path(tok).iterdir()},
    )
    folder = root / "model"
    folder.mkdir()
    hf.write(folder, ckpt, ckpt.tensors(), ckpt.dtypes)
    print(
        f"model: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads ({cfg.num_kv_heads} kv), "
        f"FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}; {cfg.num_params() / 1e6:.1f}M parameters"
    )
    return folder


def environment(args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def start_server(folder: Path, args) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cookbook",
            "serve",
            "--load",
            str(folder),
            "--port",
            "0",
            "--quiet",
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--max-batch-size",
            str(max(args.clients)),
            "--served-model-name",
            "bench",
        ],
        env=environment(args),
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # "serving bench at http://127.0.0.1:PORT/v1"
    if " at " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split(" at ")[1].strip().removesuffix("/v1")


class Client:
    """One keep-alive connection to the server."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3600)

    def complete(self, body: dict) -> dict:
        self.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise SystemExit(f"the server answered {r.status}: {data[:300]!r}")
        return json.loads(data)

    def stream(self, body: dict) -> tuple[float, float, int]:
        """(seconds to the first text, seconds to the end, tokens) of a streamed completion."""
        start = time.perf_counter()
        self.conn.request(
            "POST",
            "/v1/completions",
            json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
            {"Content-Type": "application/json"},
        )
        r = self.conn.getresponse()
        first, tokens = None, 0
        for raw in r:  # the chunked body, line by line
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and any(c["text"] for c in event["choices"]):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return first if first is not None else float("nan"), time.perf_counter() - start, tokens


def batched(clients: list[Client], prompts: list[list[int]], body: dict) -> tuple[float, int]:
    start = time.perf_counter()
    out = clients[0].complete({**body, "prompt": prompts})
    return time.perf_counter() - start, out["usage"]["completion_tokens"]


def concurrent(
    clients: list[Client], prompts: list[list[int]], body: dict, pool: ThreadPoolExecutor
) -> tuple[float, int]:
    start = time.perf_counter()
    outs = list(pool.map(lambda cp: cp[0].complete({**body, "prompt": cp[1]}), zip(clients, prompts)))
    return time.perf_counter() - start, sum(o["usage"]["completion_tokens"] for o in outs)


def distill(args, folder: Path, root: Path, backend: str, url: str, run: int) -> float:
    out = root / f"distill-{backend}-{run}"
    cmd = [
        sys.executable,
        "-m",
        "cookbook",
        "distill",
        "generate",
        "--teacher",
        str(folder),
        "--backend",
        backend,
        "--prompts-from",
        str(root / "docs.jsonl"),
        "--prefix-tokens",
        str(args.prompt_len),
        "--max-tokens",
        str(args.max_tokens),
        "--num-prompts",
        str(args.distill_prompts),
        "--temperature",
        "0.7",
        "--seed",
        "1",
        "--no-dedup",
        "--output",
        str(out),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    cmd += ["--batch-size", "32"] if backend == "cookbook" else ["--endpoint", url, "--concurrency", "32"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=environment(args), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"distill generate --backend {backend} failed: {done.stderr[-500:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=8000, help="the tokenizer's (the model pads 64 more)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,8,32", help="the numbers of concurrent clients")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per N, alternating the order of the sides")
    ap.add_argument("--distill-prompts", type=int, default=128, help="prompts per distill generate side (0: skip)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the server and distill processes (on a "
        "busy machine more than one thread per process waits on the others at every op)",
    )
    args = ap.parse_args()
    args.clients = [int(n) for n in args.clients.split(",")]
    if min(args.clients + [args.repeats, args.prompt_len, args.max_tokens]) < 1:
        raise SystemExit("--clients, --repeats, --prompt-len and --max-tokens must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = build(args, root)
        print(
            f"{args.prompt_len}-token prompts, {args.max_tokens} new tokens, greedy; {args.dtype}; {args.device}; "
            f"threads {args.threads}; cpus {os.cpu_count()}; {platform.processor() or platform.machine()}; "
            f"torch {torch.__version__}"
        )
        server, url = start_server(folder, args)
        try:
            g = torch.Generator().manual_seed(1)
            prompts = torch.randint(300, args.vocab_size, (max(args.clients), args.prompt_len), generator=g).tolist()
            body = {"model": "bench", "max_tokens": args.max_tokens, "temperature": 0}
            clients = [Client(url) for _ in range(max(args.clients))]
            other = OtherLoad(pids=(server.pid,))
            other.start()
            with ThreadPoolExecutor(max(args.clients)) as pool:
                batched(clients, prompts[:2], body)  # warm-up
                print(f"\n{'N':>3s} {'batched tok/s':>14s} {'concurrent tok/s':>17s} {'concurrent/batched':>19s}")
                for n in args.clients:
                    times = {"batched": [], "concurrent": []}
                    tokens = {}
                    for r in range(args.repeats):
                        for side in ("batched", "concurrent") if r % 2 == 0 else ("concurrent", "batched"):
                            seconds, tokens[side] = (
                                batched(clients, prompts[:n], body)
                                if side == "batched"
                                else concurrent(clients, prompts[:n], body, pool)
                            )
                            times[side].append(seconds)
                    rate = {s: tokens[s] / statistics.median(t) for s, t in times.items()}
                    print(
                        f"{n:3d} {rate['batched']:14.1f} {rate['concurrent']:17.1f} "
                        f"{rate['concurrent'] / rate['batched']:18.2f}x"
                    )
                n = max(args.clients)
                runs = list(pool.map(lambda cp: cp[0].stream({**body, "prompt": cp[1]}), zip(clients, prompts[:n])))
                ttft = sorted(r[0] for r in runs)
                wall = max(r[1] for r in runs)
                print(
                    f"\nunder load: {n} streaming clients: time to first token median {statistics.median(ttft):.3f} s, "
                    f"p90 {ttft[int(0.9 * (len(ttft) - 1))]:.3f} s; tokens/s per client (median) "
                    f"{statistics.median(r[2] / r[1] for r in runs):.1f}, all clients {sum(r[2] for r in runs) / wall:.1f}"
                )
            if args.distill_prompts:
                seconds = {"cookbook": [], "openai": []}
                order = ("cookbook", "openai", "openai", "cookbook") if args.repeats >= 2 else ("cookbook", "openai")
                for run, side in enumerate(order):
                    seconds[side].append(distill(args, folder, root, side, url, run))
                med = {s: statistics.median(t) for s, t in seconds.items()}
                print(
                    f"\ndistill generate, {args.distill_prompts} prompts x {args.max_tokens} tokens (temperature 0.7): "
                    f"--backend cookbook {med['cookbook']:.1f} s, --backend openai --concurrency 32 against serve "
                    f"{med['openai']:.1f} s; openai/cookbook throughput {med['cookbook'] / med['openai']:.2f}x"
                )
            share = other.stop()
            if share is not None:
                print(
                    f"other processes used {100 * share:.0f}% of the machine's CPU time during the run; above a few % "
                    "the figures are disturbed"
                )
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
