"""Run under `accelerate launch` by the multi-process tests: train, then record what this rank ended with.

Usage: train_probe.py OUT_JSON_PREFIX --config CONFIG [section.key=value ...]
Writes OUT_JSON_PREFIX.rank<N>.json with the world size this rank saw, its final step and a checksum of
its weights, so the test can assert a real multi-process world whose ranks ended identical.
"""

import hashlib
import json
import sys

import torch

from spkdist.config import load_config
from spkdist.train import run


def weights_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    prefix, args = sys.argv[1], sys.argv[2:]
    assert args[0] == "--config"
    result = run(load_config(args[1], args[2:]))
    from accelerate import PartialState

    state = PartialState()
    record = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "step": result.step,
        "checksum": weights_checksum(result.model),
        "metrics": result.metrics,
    }
    with open(f"{prefix}.rank{state.process_index}.json", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
