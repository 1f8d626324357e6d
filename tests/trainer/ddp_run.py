"""Run the SFT stage in one process of a torchrun launch and leave what that process holds
(``python ddp_run.py CONFIG key=value ...``): ``<output_dir>/rank<R>.safetensors`` its trainable
tensors after the run, ``<output_dir>/rank<R>.batches.json`` the sample indices it trained on at
each step. Only rank 0 writes the LoRA files; this shows whether every rank ended with the same
weights (what gradient averaging guarantees) and which samples each one saw."""

import contextlib
import json
import os
import sys


@contextlib.contextmanager
def recording_batches(batches: list):
    """Append the sample indices of every batch the bucket sampler hands out to ``batches``
    (not the quiet draws of ``preview``, the feature cache's plan)."""
    from firered_trainer import buckets

    draw = buckets.BucketBatchSampler.next_batch

    def draw_and_record(self):
        b = draw(self)
        if not self._quiet:
            batches.append(list(b.indices))
        return b

    buckets.BucketBatchSampler.next_batch = draw_and_record
    try:
        yield batches
    finally:
        buckets.BucketBatchSampler.next_batch = draw


def main() -> None:
    from safetensors.torch import save_file

    from firered_trainer import sft

    held, batches = {}, []
    build = sft.build_transformer

    def build_and_hold(*args, **kwargs):
        held["model"] = build(*args, **kwargs)
        return held["model"]

    sft.build_transformer = build_and_hold
    with recording_batches(batches):
        res = sft.run(sys.argv[1], overrides=sys.argv[2:])
    rank = int(os.environ.get("RANK", "0"))
    save_file({n: p.detach().cpu().contiguous() for n, p in held["model"].named_parameters() if p.requires_grad},
              str(res.output_dir / f"rank{rank}.safetensors"))
    (res.output_dir / f"rank{rank}.batches.json").write_text(json.dumps(batches))


if __name__ == "__main__":
    main()
