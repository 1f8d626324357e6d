"""Run the SFT stage in one process of a torchrun launch and leave what that process holds
(``python ddp_run.py CONFIG key=value ...``): ``<output_dir>/rank<R>.safetensors`` its trainable
tensors after the run, ``<output_dir>/rank<R>.batches.json`` the sample indices it trained on at
each step. Only rank 0 writes the LoRA files; this shows whether every rank ended with the same
weights (what gradient averaging guarantees) and which samples each one saw."""

import json
import os
import sys

from safetensors.torch import save_file

from firered_trainer import buckets, sft

held, batches = {}, []
build, draw = sft.build_transformer, buckets.BucketBatchSampler.next_batch


def build_and_hold(*args, **kwargs):
    held["model"] = build(*args, **kwargs)
    return held["model"]


def draw_and_record(self):
    b = draw(self)
    if not self._quiet:  # preview() (the cache plan) draws on a quiet copy
        batches.append(list(b.indices))
    return b


sft.build_transformer = build_and_hold
buckets.BucketBatchSampler.next_batch = draw_and_record
res = sft.run(sys.argv[1], overrides=sys.argv[2:])
rank = int(os.environ.get("RANK", "0"))
save_file({n: p.detach().cpu().contiguous() for n, p in held["model"].named_parameters() if p.requires_grad},
          str(res.output_dir / f"rank{rank}.safetensors"))
(res.output_dir / f"rank{rank}.batches.json").write_text(json.dumps(batches))
