"""A tiny in-process training run with experiment trackers, in a process of its own.

``python -m tests.trackrun SPEC_JSON``: trains the tiny model at ``spec["model"]`` on colours
into ``spec["run_dir"]`` with ``[trainer.args]`` ``spec["args"]``, the trainer's log on stdout.
A fresh process because trackio reads its store folder (``TRACKIO_DIR``) once, at import.
``spec["block"]``: modules made unimportable (None in ``sys.modules``: a package that is not
installed). ``spec["break_at"]``: at that step's progress line, the paths in
``spec["break_paths"]`` (folders the trackers write to) are replaced by plain files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec: dict) -> int:
    for name in spec.get("block", []):
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError

    import torch

    from backend.adapters import adapter_for
    from backend.trainer import MultimodalGRPOTrainer
    from environments import make_env
    from tests.tinytrainer import load_tiny, tiny_cfg

    torch.set_num_threads(1)
    torch.manual_seed(0)
    broken = f"step {spec['break_at']}/" if spec.get("break_at") else None

    def log(line: str) -> None:
        print(line, flush=True)
        if broken and line.startswith(broken):
            for p in map(Path, spec["break_paths"]):
                for attempt in range(100):  # a tracker's thread may be making folders in it right now
                    try:
                        if p.is_dir():
                            p.rename(p.with_name(f"{p.name}.gone{attempt}"))
                        p.write_text("not a folder\n")
                        break
                    except OSError:
                        continue

    model, processor = load_tiny(Path(spec["model"]))
    adapter = adapter_for(model.config, processor=processor, max_length=1024)
    trainer = MultimodalGRPOTrainer(model, processor, adapter, tiny_cfg(**spec["args"]), env=make_env("colors", {}),
                                    run_dir=spec["run_dir"], log=log)
    trainer.train()
    print(f"trackrun: done, {trainer.step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
