"""Time gpt-oss-nano training steps on the prepared corpus (GPU): `python scripts/nano_step_time.py .carry/nano`.

Prints ms per step and tokens per second at the default token budget, after warm-up, so a change to the training
twin can be judged before spending a full training run on it.
"""

import json
import sys
import time
from pathlib import Path

import torch

from ossscope.nano.train import AUX_LOSS_WEIGHT, Batches, NanoTwin, assistant_loss, load_corpus, nano_config


def main(data_dir: str, steps: int = 40, batch_tokens: int = 32_768) -> None:
    data = Path(data_dir)
    vocab = json.loads((data / "vocab_map.json").read_text())
    device = torch.device("cuda")
    twin = NanoTwin(nano_config(len(vocab["o200k_ids"]))).to(device)
    batches = iter(Batches(load_corpus(data / "corpus.npz"), batch_tokens, vocab["unknown_id"], device, 0))
    optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-3, fused=True)
    for label, quantized in (("float experts", False), ("quantization-aware", True)):
        twin.set_quantized(quantized)
        tokens_seen = 0
        for step in range(10 + steps):
            if step == 10:
                torch.cuda.synchronize()
                t0, tokens_seen = time.perf_counter(), 0
            tokens, mask = next(batches)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = assistant_loss(twin, tokens[:, :-1], tokens, mask) + AUX_LOSS_WEIGHT * twin.aux_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tokens_seen += tokens.numel()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        print(f"{label:20s} {seconds / steps * 1e3:7.1f} ms/step  {tokens_seen / seconds:10,.0f} padded tok/s  "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main(*sys.argv[1:2])
