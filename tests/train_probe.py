"""Run under `accelerate launch` by the multi-process tests: train, then record what this rank ended with.

Usage: train_probe.py OUT_PREFIX --config CONFIG [section.key=value ...]
Writes OUT_PREFIX.rank<N>.json with the world size this rank saw, its final step, how it stopped, its
metrics and a checksum of its weights, so a test can assert a real multi-process world whose ranks ended
identical. Before training it writes OUT_PREFIX.rank<N>.pid (a test may signal one rank alone).

For the tests of mis-launched jobs, rank 1 can be made to differ from the others:
SPKDIST_PROBE_RANK1_OVERRIDES (extra overrides, space-separated) and SPKDIST_PROBE_RANK1_CWD (a working
directory, so relative paths such as data.shards point elsewhere).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from spkdist.config import load_config
from spkdist.train import main as train_main
from spkdist.train import run


def weights_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> int:
    prefix, args = sys.argv[1], sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{prefix}.rank{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        args += os.environ.get("SPKDIST_PROBE_RANK1_OVERRIDES", "").split()
        if "SPKDIST_PROBE_RANK1_CWD" in os.environ:
            os.chdir(os.environ["SPKDIST_PROBE_RANK1_CWD"])
    assert args[0] == "--config"
    if os.environ.get("SPKDIST_PROBE_CLI"):  # the real entry point, for tests of its error handling
        return train_main(args)
    result = run(load_config(args[1], args[2:]))
    from accelerate import PartialState

    state = PartialState()
    record = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "step": result.step,
        "stopped_by": result.stopped_by,
        "checksum": weights_checksum(result.model),
        "metrics": result.metrics,
    }
    with open(f"{prefix}.rank{state.process_index}.json", "w") as f:
        json.dump(record, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
