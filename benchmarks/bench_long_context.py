"""Long-context targets (issue 16), measured and predicted with ``dpo-fast profile-memory``.

1. ``flex``: CPU, tiny Llama, prefix_shared 16k + 16k (128-token prompt), reference forward:
   peak with FlexAttention's block mask vs the dense sdpa mask (target: flex under 1.5 GB).
2. ``layers``: CPU, tiny Llama, prefix_shared training step with sdpa and the dense mask,
   2 vs 4 layers, no checkpointing: peak growth per extra layer vs the activations one layer
   keeps (target: within 10%, i.e. no per-layer copy of the mask).
3. ``estimate``: Llama-3-8B, bf16, gradient checkpointing, 80 GB, predicted on fake tensors:
   the longest prefix-shared pair vs the naive path's and TRL 1.16's head's (targets: >= 4x and
   >= 1.3x).

    python benchmarks/bench_long_context.py [--only flex,layers,estimate]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from dpo_fast.app.profile_memory import MODEL_CONFIGS, longest_fit, parse_args, sweep

try:
    from common import RESULTS_DIR, print_table, write_results
except ImportError:  # run as a module: python -m benchmarks.bench_long_context
    from .common import RESULTS_DIR, print_table, write_results

GIB = 2**30


def _run(argv: list[str]):
    args = parse_args(argv)
    return sweep(args, log=lambda line: print("  " + line, flush=True))


def flex_vs_dense(out: str) -> list[dict]:
    methods = "ours-prefix_shared:flex_attention,ours-prefix_shared:sdpa"
    points = _run(
        [
            *("--model-config", "tiny", "--device", "cpu", "--forward-only", "--prompt-length", "128"),
            *(
                "--lengths",
                str(128 + 16384),
                "--methods",
                methods,
                "--device-memory",
                "12",
                "--output-dir",
                out,
            ),
        ]
    )
    rows = [
        {
            "target": "flex",
            "attention": p.attention,
            "length": p.length,
            "peak_GiB": p.peak / GIB,
            "mask_GiB": p.breakdown["mask"] / GIB,
            "seconds": p.seconds,
        }
        for p in points
    ]
    flex = next(r for r in rows if r["attention"] == "flex_attention")
    print(
        f"flex: peak {flex['peak_GiB']:.3f} GiB (target < 1.5 GB = 1.397 GiB): "
        f"{'met' if flex['peak_GiB'] * GIB < 1.5e9 else 'MISSED'}"
    )
    return rows


def per_layer_growth(out: str) -> list[dict]:
    rows, points = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for layers in (2, 4):
            values = dict(MODEL_CONFIGS["tiny"], num_hidden_layers=layers)
            config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
            path = Path(folder) / f"tiny-{layers}"
            config.save_pretrained(path)
            (point,) = _run(
                [
                    *("--model-config", str(path / "config.json"), "--device", "cpu", "--lengths", "2048"),
                    *(
                        "--methods",
                        "ours-prefix_shared:sdpa",
                        "--no-gradient-checkpointing",
                        "--output-dir",
                        out,
                    ),
                ]
            )
            points[layers] = point
    growth = (points[4].peak - points[2].peak) / 2
    activations = (points[4].breakdown["activations"] - points[2].breakdown["activations"]) / 2
    ratio = growth / activations
    rows.append(
        {
            "target": "layers",
            "attention": "sdpa",
            "length": 2048,
            "peak_growth_per_layer_MiB": growth / 2**20,
            "activations_per_layer_MiB": activations / 2**20,
            "ratio": ratio,
            "mask_MiB": points[2].breakdown["mask"] / 2**20,
        }
    )
    print(
        f"layers: peak grows {growth / 2**20:.2f} MiB per layer, activations {activations / 2**20:.2f} MiB "
        f"(ratio {ratio:.3f}, target within 10%: {'met' if abs(ratio - 1) <= 0.1 else 'MISSED'})"
    )
    return rows


def predicted_8b(out: str) -> list[dict]:
    lengths = ",".join(str(2**k) for k in range(12, 18))
    points = _run(
        [
            *("--estimate", "--model-config", "llama-3-8b", "--device", "cuda", "--device-memory", "80"),
            *("--lengths", lengths, "--methods", "naive,trl,ours-prefix_shared", "--output-dir", out),
        ]
    )
    fits = longest_fit(points)
    naive, trl, ours = fits["naive:sdpa"], fits["trl:sdpa"], fits["ours-prefix_shared:flex_attention"]
    rows = [
        {
            "target": "estimate",
            "attention": p.attention,
            "method": p.method,
            "length": p.length,
            "peak_GiB": p.peak / GIB,
            "fits_80GB": p.status == "ok",
        }
        for p in points
    ]
    vs_naive, vs_trl = (ours / naive if naive else float("inf")), (ours / trl if trl else float("inf"))
    print(
        f"estimate: longest pair on 80 GB: naive {naive}, TRL {trl}, ours prefix_shared {ours}: "
        f"{vs_naive:.1f}x naive (target >= 4x: {'met' if vs_naive >= 4 else 'MISSED'}), "
        f"{vs_trl:.1f}x TRL (target >= 1.3x: {'met' if vs_trl >= 1.3 else 'MISSED'})"
    )
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="flex,layers,estimate")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name, part in (("flex", flex_vs_dense), ("layers", per_layer_growth), ("estimate", predicted_8b)):
            if name in args.only.split(","):
                print(f"== {name} ==", flush=True)
                rows += part(out)
    print_table(rows, sorted({key for row in rows for key in row}, key=lambda k: (k != "target", k)))
    # a partial run keeps the other targets' rows of the previous results
    previous = RESULTS_DIR / "bench_long_context-cpu.json"
    if previous.exists():
        ran = {row["target"] for row in rows}
        rows = [row for row in json.loads(previous.read_text())["results"] if row["target"] not in ran] + rows
    path = write_results("bench_long_context", torch.device("cpu"), {"targets": "flex,layers,estimate"}, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
