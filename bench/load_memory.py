"""Benchmark: peak resident memory while loading MM-DiT files, as a multiple of the file size.

Writes a wide random MM-DiT (default 6 blocks of width 1536, about 1 GB in bf16) as the files
users hold -- a ComfyUI bf16 single file (``model.diffusion_model.`` prefix), a ComfyUI
"scaled fp8" file and a GGUF Q8_0 file -- then loads each through ``load_transformer`` in a fresh
process and prints: the peak resident memory above the process's baseline as a multiple of the
file size (target: at most 1.2x for every format, as for bf16), the same against the bf16 path's
ratio in this run, and the memory the loaded model holds against bf16. The baseline is taken after
importing the libraries (diffusers' model and GGUF code included): their code is not load memory.

    python bench/load_memory.py [--layers 6] [--width 1536] [--dir /tmp/firered-bench] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch, diffusers, accelerate, safetensors, gguf  # libraries count in the baseline
from diffusers import QwenImageTransformer2DModel  # (diffusers imports lazily: the model's code too)
from diffusers.quantizers.gguf import GGUFQuantizer
from firered_core.formats.fp8_layers import model_memory_bytes
from firered_core.formats.transformer_files import load_transformer
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
r0 = rss()
t = time.perf_counter()
m = load_transformer({path!r}, dtype=torch.bfloat16)
dt = time.perf_counter() - t
# VmHWM: this process's peak resident set (ru_maxrss would carry the parent's over exec)
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({{"peak": peak - r0, "held": model_memory_bytes(m), "seconds": dt}}))
"""


def write_files(folder: Path, layers: int, width: int) -> dict[str, Path]:
    import gguf
    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    with init_empty_weights():
        model = QwenImageTransformer2DModel(
            num_layers=layers, attention_head_dim=128, num_attention_heads=width // 128,
            joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
        )
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    files = {"bf16": folder / "firered_wide_bf16.safetensors", "fp8_scaled": folder / "firered_wide_fp8_scaled.safetensors",
             "gguf_q8_0": folder / "firered_wide-Q8_0.gguf"}
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, files["bf16"])
    fp8 = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and "norm" not in k:
            scale = v.float().abs().max() / 448
            fp8[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            fp8[k.replace(".weight", ".scale_weight")] = scale.reshape(1)
        else:
            fp8[k] = v
    save_file(fp8, files["fp8_scaled"])
    w = gguf.GGUFWriter(str(files["gguf_q8_0"]), arch="qwen_image")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    Q = gguf.GGMLQuantizationType
    for k, v in sd.items():
        a = v.float().numpy()
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(k, gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(k, a.astype(np.float16), raw_dtype=Q.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--dir", help="where to write the files (default: a temporary folder, removed after)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    tmp = None if args.dir else tempfile.TemporaryDirectory()
    folder = Path(args.dir or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    files = write_files(folder, args.layers, args.width)
    results = {}
    for name, path in files.items():
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), path=str(path))],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        results[name]["file"] = path.stat().st_size
    bf16_held = results["bf16"]["held"]
    bf16_ratio = results["bf16"]["peak"] / results["bf16"]["file"]
    print(f"MM-DiT: {args.layers} blocks x width {args.width}; peak RSS above baseline while loading, in a fresh process")
    for name, r in results.items():
        r["peak_over_file"] = r["peak"] / r["file"]
        r["vs_bf16_path"] = r["peak_over_file"] / bf16_ratio
        print(f"  {name:10s} file {r['file'] / 2**30:6.3f} GiB  load {r['seconds']:5.1f} s  "
              f"peak {r['peak'] / 2**30:6.3f} GiB = {r['peak_over_file']:.2f}x file ({r['vs_bf16_path']:.2f}x the bf16 path's)  "
              f"model holds {r['held'] / 2**30:6.3f} GiB = {r['held'] / bf16_held:.3f}x bf16")
    g = results["gguf_q8_0"]
    print(f"GGUF peak / file {g['peak_over_file']:.2f}x (target <= 1.2x) against bf16 {bf16_ratio:.2f}x in the same run: "
          f"{'met' if g['peak_over_file'] <= 1.2 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": args.layers, "width": args.width, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
