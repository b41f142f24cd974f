"""The trainer over several ranks (FSDP2 over gloo, started by torch.distributed.run, as a run
starts it): the same update as one rank, sharded checkpoints that resume on any number of
ranks, weight sync from a sharded trainer, and `vlmrl run` with trainer.processes = 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from backend.config import validate_config
from backend.errors import ConfigError
from tests.serverproc import assert_server_follows, free_port, load_trainer_side, serving

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_trainer.py"
TOL = 5e-5  # fp32: the ranks sum the same terms in another order


def _run(model: Path, out: Path, ranks: int, *args: str) -> dict[str, Any]:
    """tests/dist_trainer.py on ``ranks`` ranks (torchrun for more than one); its result.pt."""
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(SCRIPT), str(model), str(out), *args]
    else:
        cmd = [sys.executable, str(SCRIPT), str(model), str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return torch.load(out / "result.pt", weights_only=True)


def _two_rank_config(tmp_path: Path, name: str, **trainer_args: Any) -> Path:
    """``configs/colors-tiny.toml`` with two trainer ranks, a free port, runs under ``tmp_path``."""
    import tomli_w

    from backend.config import read_toml

    data = read_toml(ROOT / "configs" / "colors-tiny.toml")
    data["inference"]["port"] = free_port()
    data["trainer"]["processes"] = 2
    data["trainer"]["args"].update(output_dir=str(tmp_path / "runs"), run_name=name, **trainer_args)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tiny_model_dir, tmp_path_factory.mktemp("one"), 1, "--steps", "2")


def test_two_ranks_make_the_update_one_rank_makes(tiny_model_dir: Path, tmp_path: Path,
                                                 one_rank: dict[str, Any]) -> None:
    two = _run(tiny_model_dir, tmp_path, 2, "--steps", "2")
    diff = _max_diff(one_rank["weights"], two["weights"])
    print(f"\n2 ranks vs 1 rank after 2 steps: max abs weight difference {diff:.2e}")
    assert diff < TOL
    for h1, h2 in zip(one_rank["history"], two["history"], strict=True):
        for key in ("loss", "grad_norm", "ir", "entropy", "clip_frac"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-4, abs=1e-6), key
        for key in ("loss_tokens", "trained_sequences", "num_rollouts", "tokens"):
            assert h2[key] == h1[key], key
    assert one_rank["weights"].keys() == two["weights"].keys()
    assert sum(t.numel() for t in two["weights"].values()) == sum(t.numel() for t in one_rank["weights"].values())


def test_a_rank_with_fewer_micro_batches_keeps_in_step_with_ghost_batches(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """3 ranks, one micro-batch per sequence, the first group all right (no gradient): rank 0
    has 2 sequences to train, the others 3, so rank 0 runs a zero-weight batch; same update."""
    one = _run(tiny_model_dir, tmp_path / "one", 1, "--steps", "1", "--micro", "1", "--uniform-first-group")
    three = _run(tiny_model_dir, tmp_path / "three", 3, "--steps", "1", "--micro", "1", "--uniform-first-group")
    assert three["history"][0]["trained_sequences"] == one["history"][0]["trained_sequences"] == 8
    assert _max_diff(one["weights"], three["weights"]) < TOL


def test_a_sharded_checkpoint_resumes_on_one_rank_and_on_two(tiny_model_dir: Path, tmp_path: Path,
                                                             one_rank: dict[str, Any]) -> None:
    from backend.models import load_model_and_processor

    _run(tiny_model_dir, tmp_path / "save", 2, "--steps", "1", "--save")
    ckpt = tmp_path / "save" / "run" / "checkpoints" / "1"
    assert (ckpt / "COMPLETE").is_file() and len(list((ckpt / "optimizer").glob("*.distcp"))) == 2
    # the weights are a consolidated Hugging Face export: loadable anywhere, one file set
    model, _ = load_model_and_processor(str(ckpt))
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in one_rank["weights"].values())
    for ranks in (1, 2):
        res = _run(tiny_model_dir, tmp_path / f"resume{ranks}", ranks, "--steps", "1", "--resume", str(ckpt))
        assert res["step"] == 2
        # step 1 on 2 ranks, a checkpoint, step 2 on `ranks` ranks = 2 steps on one rank
        assert _max_diff(one_rank["weights"], res["weights"]) < TOL, ranks


@pytest.mark.parametrize("ranks", [2, 3])
def test_batched_gathers_give_the_full_tensors(ranks: int) -> None:
    """One collective per group of tensors (the weight sync's gathers) = DTensor.full_tensor each;
    three ranks leave uneven and empty shards."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), str(ROOT / "tests" / "dist_gather.py")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.stdout + proc.stderr)[-3000:]


def test_weight_sync_from_two_ranks_makes_the_server_follow(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 0 sends what both ranks gather bucket by bucket: the server then answers greedily
    with exactly the trained weights (its ids are their argmax, its logprobs theirs)."""
    from backend.sampling import banned_token_ids, logit_bias_for
    from environments import make_env

    model, processor = load_trainer_side(tiny_model_dir)
    bias = logit_bias_for(banned_token_ids(processor.tokenizer))
    examples = make_env("colors", {}).eval_examples(3)
    with serving(tmp_path, "tok") as server:
        assert_server_follows(model, processor, server, examples, bias)  # the start weights
        res = _run(tiny_model_dir, tmp_path / "out", 2, "--steps", "2", "--sync", server.url, "tok",
                   str(free_port()))
        assert "weights updated to version 2" in server.log()
        model.load_state_dict(res["weights"])
        assert_server_follows(model, processor, server, examples, bias)  # now the trained ones
    start = {n: p.detach() for n, p in load_trainer_side(tiny_model_dir)[0].named_parameters()}
    assert _max_diff(res["weights"], start) > 1e-4  # the steps moved the weights: a different model


def test_processes_config() -> None:
    base = {"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"}}
    assert validate_config(base).trainer.ranks == 1
    assert validate_config({**base, "trainer": {"processes": 2}}).trainer.ranks == 2
    assert validate_config({**base, "trainer": {"gpus": 2}}).trainer.ranks == 2
    with pytest.raises(ConfigError, match="trainer.processes: is 3 but gpus is 2"):
        validate_config({**base, "trainer": {"processes": 3, "gpus": 2}})
    with pytest.raises(ConfigError, match="trainer.processes: LoRA with several trainer ranks"):
        validate_config({**base, "trainer": {"processes": 2, "args": {"lora": {"r": 8}}}})


def test_the_plan_starts_the_ranks_with_torchrun(tmp_path: Path) -> None:
    from vlmrl_tui.plan import build_plan

    cfg = validate_config({"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"},
                           "trainer": {"processes": 2, "args": {"output_dir": str(tmp_path)}}})
    plan = build_plan(cfg, None, sync_port=free_port())
    argv = plan.process("trainer").argv
    assert argv[1:7] == ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m")
    assert argv[7:9] == ("vlmrl_tui.cli", "train") and plan.process("trainer").restart_argv[-1] == "--resume"


@pytest.mark.slow
def test_vlmrl_run_with_two_trainer_ranks_completes_and_leaves_no_process(tmp_path: Path,
                                                                          tiny_model_dir: Path) -> None:
    cfg = _two_rank_config(tmp_path, "two", max_steps=4, save_every=2)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    proc = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    rd = tmp_path / "runs" / "two"
    steps = [json.loads(x)["step"] for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    log = (rd / "logs" / "trainer.log").read_text()
    assert "2 ranks (FSDP2 over gloo)" in log and "terminate called" not in log
    assert (rd / "checkpoints" / "4" / "optimizer").is_dir() and (rd / "checkpoints" / "2" / "COMPLETE").is_file()
    info = json.loads((rd / "run.json").read_text())
    assert info["status"] == "completed"


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_and_resume_continues_on_two_ranks(tmp_path: Path, tiny_model_dir: Path) -> None:
    """SIGINT to `vlmrl run` mid-run: the torchrun tree goes as one (no rank left), exit 130;
    `--resume` continues from the last sharded checkpoint on two ranks again."""
    import signal
    import time

    cfg = _two_rank_config(tmp_path, "cc", max_steps=400, save_every=2)
    rd = tmp_path / "runs" / "cc"
    p = subprocess.Popen([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (rd / "checkpoints" / "2" / "COMPLETE").is_file():
            assert p.poll() is None and time.monotonic() < deadline, "no checkpoint 2"
            time.sleep(0.5)
        ranks = [c for c in psutil.Process(p.pid).children(recursive=True) if "vlmrl_tui.cli" in " ".join(c.cmdline())
                 and "train" in c.cmdline()]
        assert len(ranks) >= 2, [c.cmdline() for c in ranks]  # two ranks under torchrun
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-3000:]
    assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks)
    cfg.write_text(cfg.read_text().replace("max_steps = 400", "max_steps = 6"))
    proc = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg), "--resume"], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = (rd / "logs" / "trainer.log").read_text()
    assert "resumed from" in log and "2 ranks (FSDP2 over gloo)" in log
    steps = [json.loads(x)["step"] for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and steps == sorted(set(steps))


@pytest.mark.slow
def test_the_colour_job_learns_with_a_two_rank_trainer(tmp_path: Path, tiny_model_dir: Path) -> None:
    """configs/colors-tiny.toml with trainer.processes = 2 through `vlmrl run`: the real server,
    weight sync from the sharded trainer after every step; one more seed before it fails, as the
    one-rank learning proof allows (server sampling is not seeded)."""
    import statistics

    failed = []
    for seed in (0, 1):
        cfg = _two_rank_config(tmp_path / f"seed{seed}", "two", seed=seed)
        proc = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg)], capture_output=True, text=True,
                              timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        rewards = [json.loads(x)["reward_mean"] for x in (tmp_path / f"seed{seed}" / "runs" / "two" / "metrics.jsonl")
                   .read_text().splitlines()]
        first, last = statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])
        print(f"\n2-rank colors-tiny seed {seed}: {len(rewards)} steps, reward first 10 {first:.3f}, last 10 {last:.3f}")
        if last >= 0.9 and first <= 0.35:
            return
        failed.append(f"seed {seed}: first 10 {first:.3f}, last 10 {last:.3f}")
    pytest.fail("did not learn with 2 ranks: " + "; ".join(failed))
