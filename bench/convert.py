"""``megamix convert`` on a locally generated ~1 GB Hugging Face checkpoint: time and peak memory. CPU.

Writes a random ``LlamaForCausalLM`` directory (fp32; hidden 1024, 16 blocks, 16 heads / 4 kv heads of 64,
ffn 2816, vocabulary 32000, untied head: 264 M parameters, 1.06 GB) in ``--shards`` safetensors shards
with an index, then times, each in a fresh Python process:

- ``copy``: copying those files (``shutil.copyfile``: in the kernel, the bytes never reach the process);
- ``copy_synced``: the same, then ``fsync`` of each copy — as durable as a checkpoint, which DCP syncs;
- ``hf_to_megamix``: HF → megamix ``step_0`` (the weights plus the fp32 zero Adam moments and run state that
  ``train.resume`` needs: 3× the bytes it reads, the moments as file holes);
- ``hf_to_megamix_weights_only``: the same with ``weights_only=True`` (``--weights-only``): the weights alone;
- ``megamix_to_hf``: that checkpoint → HF shards (``--shard-size`` GiB) with an index, fp32 as stored.

Each process imports torch and megamix first, then reads its resident memory (``VmRSS``) as the baseline;
``peak_rss_above_baseline_mb`` is its high-water mark (``VmHWM``) after the work minus that baseline. All
runs read warm files (the page cache holds the model after it is written) and start with nothing left to
write back (``os.sync()`` before each). Targets (issue 9): peak ≤ 1.5 GB
above the baseline, and conversion time within 2× of copying the files. ``time_over_copy`` divides by the
copy's time, ``time_over_copy_synced`` by the synced copy's; ``bytes_written`` (apparent sizes) and
``bytes_on_disk`` (allocated blocks) say what each wrote. Finally the exported tensors are compared with
the originals one by one (``round_trip_bit_identical``). Prints one JSON object.

    python bench/convert.py [--dir DIR] [--shards 4] [--shard-size 0.25] [--repeats 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 1024, 16, 16, 4, 64, 2816, 32000

# Run in a fresh interpreter: baseline after imports, then the work, then the high-water mark.
_CHILD = textwrap.dedent("""
    import json, os, shutil, sys, time
    from pathlib import Path
    import torch
    from megamix.convert.directions import hf_to_megamix, megamix_to_hf

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB → MiB
    phase, src, dst, shard_bytes = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    baseline = rss("VmRSS")
    start = time.perf_counter()
    if phase == "copy":
        dst.mkdir(parents=True)
        for file in sorted(src.iterdir()):
            shutil.copyfile(file, dst / file.name)
    elif phase == "copy_synced":
        dst.mkdir(parents=True)
        for file in sorted(src.iterdir()):
            shutil.copyfile(file, dst / file.name)
            with open(dst / file.name, "rb+") as g:
                os.fsync(g.fileno())
    elif phase == "hf_to_megamix":
        hf_to_megamix(src, dst)
    elif phase == "hf_to_megamix_weights_only":
        hf_to_megamix(src, dst, weights_only=True)
    else:
        megamix_to_hf(src, dst, max_shard_bytes=shard_bytes)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "baseline_rss_mb": baseline,
                      "peak_rss_above_baseline_mb": rss("VmHWM") - baseline}))
""")


def generate(directory: Path, shards: int) -> dict:
    """A random fp32 Llama in ``shards`` safetensors files + index + config.json; returns its size."""
    import torch
    from safetensors.torch import save_file

    h, q, kv = HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (q, h),
                   f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.v_proj.weight": (kv, h),
                   f"{p}.self_attn.o_proj.weight": (h, q), f"{p}.post_attention_layernorm.weight": (h,),
                   f"{p}.mlp.gate_proj.weight": (FFN, h), f"{p}.mlp.up_proj.weight": (FFN, h),
                   f"{p}.mlp.down_proj.weight": (h, FFN)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    names = list(shapes)
    total = sum(math.prod(s) for s in shapes.values()) * 4
    directory.mkdir(parents=True)
    weight_map, generator, start = {}, torch.Generator().manual_seed(0), 0
    for k in range(shards):  # consecutive runs of about total / shards bytes
        file, tensors, size = f"model-{k + 1:05d}-of-{shards:05d}.safetensors", {}, 0
        while start < len(names) and (size < total / shards or k == shards - 1):
            name = names[start]
            tensors[name] = torch.randn(shapes[name], generator=generator) * 0.02
            size += tensors[name].nbytes
            weight_map[name] = file
            start += 1
        save_file(tensors, directory / file, metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": h,
              "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
              "dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    return {"parameters": total // 4, "bytes": total, "files": len(set(weight_map.values())), "tensors": len(names)}


def run_phase(phase: str, src: Path, dst: Path, shard_bytes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, phase, str(src), str(dst), str(shard_bytes)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tree_bytes(path: Path) -> tuple[int, int]:
    """Apparent and allocated bytes of the files under ``path``."""
    files = [f.stat() for f in path.rglob("*") if f.is_file()]
    return sum(f.st_size for f in files), sum(512 * f.st_blocks for f in files)


def identical(a: Path, b: Path) -> bool:
    """Every tensor of HF directory ``a`` is in ``b`` with the same dtype and bits (read one at a time)."""
    import torch

    from megamix.convert.hf import SafetensorsReader

    left, right = SafetensorsReader(a), SafetensorsReader(b)
    return left.names == right.names and all(torch.equal(left.get(n), right.get(n)) and left.dtype(n) ==
                                             right.dtype(n) for n in sorted(left.names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed afterwards)")
    parser.add_argument("--shards", type=int, default=4, help="safetensors files of the generated model")
    parser.add_argument("--shard-size", type=float, default=0.25, help="GiB per exported shard")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each phase; the best time counts")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="megamix-bench-convert-"))
    try:
        model = generate(work / "hf", args.shards)
        shard_bytes = int(args.shard_size * 2**30)
        phases = {"copy": (work / "hf", "copy"), "copy_synced": (work / "hf", "copy2"),
                  "hf_to_megamix": (work / "hf", "ckpt"),
                  "hf_to_megamix_weights_only": (work / "hf", "weights"), "megamix_to_hf": (work / "ckpt", "back")}
        results = {}
        for phase, (src, name) in phases.items():
            runs = []
            for _ in range(args.repeats):
                shutil.rmtree(work / name, ignore_errors=True)
                os.sync()  # no earlier phase's dirty pages left to flush during this one
                runs.append(run_phase(phase, src, work / name, shard_bytes))
            best = min(runs, key=lambda r: r["seconds"])
            results[phase] = {"seconds": round(best["seconds"], 3),
                              "seconds_all": [round(r["seconds"], 3) for r in runs],
                              "peak_rss_above_baseline_mb": round(max(r["peak_rss_above_baseline_mb"] for r in runs), 1),
                              "baseline_rss_mb": round(best["baseline_rss_mb"], 1),
                              **dict(zip(("bytes_written", "bytes_on_disk"), tree_bytes(work / name)))}
        copy, synced = results["copy"]["seconds"], results["copy_synced"]["seconds"]
        for phase in ("hf_to_megamix", "hf_to_megamix_weights_only", "megamix_to_hf"):
            results[phase]["time_over_copy"] = round(results[phase]["seconds"] / copy, 2)
            results[phase]["time_over_copy_synced"] = round(results[phase]["seconds"] / synced, 2)
        round_trip = results["hf_to_megamix"]["seconds"] + results["megamix_to_hf"]["seconds"]
        weights_round_trip = results["hf_to_megamix_weights_only"]["seconds"] + results["megamix_to_hf"]["seconds"]
        report = {
            "model": model, **results,
            "round_trip_seconds": round(round_trip, 3),
            "round_trip_time_over_two_copies": round(round_trip / (2 * copy), 2),
            "weights_only_round_trip_time_over_two_copies": round(weights_round_trip / (2 * copy), 2),
            "round_trip_bit_identical": identical(work / "hf", work / "back"),
            "targets": {"peak_rss_above_baseline_mb": 1536, "time_over_copy": 2.0},
        }
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
