"""Real training on CPU through `primus run`: tiny Llama, 6 steps, loss must fall.

Each test starts `primus` as a user would (1 process in-process, 2 under torchrun with gloo).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mg_helpers import EXAMPLE, REPO, assert_trained, run_dir, train, train_losses

from tests.support import attempts, primus_env
from tests.support import run_primus as run_primus_with

pytestmark = pytest.mark.slow

# the one-process run's losses (same seed, same global batch) with megatron-core's local attention:
# SDPAttention (the default), TP, DP and FSDP layouts reproduce them
REFERENCE = {1: 6.234398, 2: 6.240412, 3: 6.176030, 4: 6.073338, 5: 5.736605, 6: 5.775445}


def test_one_process_mock_data(tmp_path: Path) -> None:
    result = train(tmp_path, "eval_interval=3", "eval_iters=1")
    losses = assert_trained(result, tmp_path)
    out = run_dir(tmp_path)
    # Primus's SDPAttention, the default core attention without TransformerEngine (issue 17), gives the
    # losses of megatron-core's local DotProductAttention (REFERENCE, recorded with it) in fp32
    log = (out / "logs" / "pre_trainer" / "rank-0" / "primus.log").read_text()
    assert "fast path: attention SDPA (torch scaled_dot_product_attention); TransformerEngine is not installed" in log
    assert losses == pytest.approx(REFERENCE, abs=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "loss" in r)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(step)
    assert step["tokens_per_s"] > 0 and step["grad_norm"] > 0
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert (out / "checkpoints" / "iter_0000006" / "common.pt").is_file()
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"




# DP=2 (with its checkpoint resumed) is test_gpu_node.py's fully parallel save test
@pytest.mark.parametrize("layout", ["parallel.tensor=2"])
def test_two_processes(layout: str, tmp_path: Path) -> None:
    # disable_last_saving keeps these runs short; checkpoints have their own tests
    result = train(tmp_path, layout, "disable_last_saving=true", nproc=2)
    losses = assert_trained(result, tmp_path)
    # same seed and same global batch: TP and DP (with the distributed optimizer, on by default)
    # reproduce the one-process run
    assert losses == pytest.approx(REFERENCE, abs=1e-4)


def test_torch_fsdp2_matches_the_reference_and_resumes(tmp_path: Path) -> None:
    # parallel.fsdp maps to use_torch_fsdp2: megatron-core's FSDP2 wrapper over gloo on CPU
    stopped = train(tmp_path, "parallel.fsdp=true", "parallel.data=2", "exit_interval=3", nproc=2)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert (run_dir(tmp_path) / "checkpoints" / "iter_0000003").is_dir()
    resumed = train(tmp_path, "parallel.fsdp=true", "parallel.data=2", "disable_last_saving=true", nproc=2)
    losses = assert_trained(resumed, tmp_path)
    assert attempts(run_dir(tmp_path) / "metrics.jsonl")[2] == [4, 5, 6]
    assert losses == pytest.approx(REFERENCE, abs=1e-4)
    assert "use_torch_fsdp2 shards the optimizer state itself" in resumed.stdout + resumed.stderr


def test_manual_pipeline_split_builds_uneven_stages(tmp_path: Path) -> None:
    # 3 layers do not divide over 2 stages; upstream's manual split puts 2 on the first, 1 on the last
    result = train(tmp_path, "parallel.pipeline=2", "num_layers=3", "decoder_pipeline_manual_split_list=[2,1]",
                   "disable_last_saving=true", nproc=2)
    assert_trained(result, tmp_path)
    logs = run_dir(tmp_path) / "logs" / "pre_trainer"
    assert "decoder layers on this pipeline rank: 1-2" in (logs / "rank-0" / "primus.log").read_text()
    assert "decoder layers on this pipeline rank: 3-3" in (logs / "rank-1" / "primus.log").read_text()


def test_upstreams_layers_per_virtual_stage_interleave_the_pipeline(tmp_path: Path) -> None:
    # num_layers_per_virtual_pipeline_stage is Megatron-LM's other spelling of the chunk count; the
    # translator derives virtual_pipeline_model_parallel_size from it (the trainer reads only that),
    # so each rank holds two one-layer chunks instead of two adjacent layers
    result = train(tmp_path, "parallel.pipeline=2", "num_layers=4", "num_layers_per_virtual_pipeline_stage=1",
                   "deallocate_pipeline_outputs=false", "disable_last_saving=true", nproc=2)
    assert_trained(result, tmp_path)
    logs = run_dir(tmp_path) / "logs" / "pre_trainer"
    assert "decoder layers on this pipeline rank: 1-1, 3-3" in (logs / "rank-0" / "primus.log").read_text()
    assert "decoder layers on this pipeline rank: 2-2, 4-4" in (logs / "rank-1" / "primus.log").read_text()


def test_pipeline_parallel_with_warmup_and_schedule_dump(tmp_path: Path) -> None:
    plain, featured = tmp_path / "plain", tmp_path / "featured"
    reference = assert_trained(train(plain, "parallel.pipeline=2", "disable_last_saving=true", nproc=2), plain)
    result = train(featured, "parallel.pipeline=2", "disable_last_saving=true", "pp_warmup=true", "dump_pp_data=true",
                   nproc=2)
    # the warm-up leaves weights, gradients and RNG as they were: the same curve, bit for bit
    assert assert_trained(result, featured) == reference
    assert "pp_warmup: one forward/backward on every stage" in result.stdout + result.stderr
    stages = {}
    for rank in (0, 1):
        dump = json.loads((run_dir(featured) / "pp_data" / f"rank-{rank}.json").read_text())
        assert dump["primus"]["pipeline_rank"] == rank and dump["primus"]["pipeline_size"] == 2
        assert any(e["ph"] == "X" for e in dump["traceEvents"])  # Chrome trace events for Perfetto
        events = dump["primus"]["events"]
        for step in range(0, 7):  # step 0 is the warm-up; 4 samples / micro batch 2 = 2 microbatches a step
            for kind in ("forward", "backward"):
                assert sorted(e["microbatch"] for e in events if e["step"] == step and e["kind"] == kind) == [0, 1]
        stages[rank] = events
    for step in range(1, 7):
        first = {r: min((e for e in stages[r] if e["step"] == step and e["kind"] == "forward"),
                        key=lambda e: e["start_us"]) for r in (0, 1)}
        # stage 1 can only start a microbatch once stage 0 has sent its activations
        assert first[1]["start_us"] >= first[0]["end_us"], (step, first)


@pytest.mark.parametrize("model", ["qwen3_tiny.yaml", "mixtral_tiny.yaml"])
def test_other_families_train(model: str, tmp_path: Path) -> None:
    assert_trained(train(tmp_path, f"model={model}", "disable_last_saving=true", "train.lr=5.0e-3"), tmp_path)


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert_trained(train(whole, "disable_last_saving=true"), whole)
    stopped = train(parts, "exit_interval=3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert sorted(train_losses(parts)) == [1, 2, 3]
    resumed = train(parts, "disable_last_saving=true")  # checkpoint.resume: auto in the example
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(train_losses(parts)) == list(range(1, 7))
    assert attempts(run_dir(parts) / "metrics.jsonl")[2] == [4, 5, 6]  # resumed, not retrained from 1
    assert train_losses(parts)[6] == train_losses(whole)[6]


def test_feature_flags_keep_the_loss_curve_and_trackers_record_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    plain, featured = tmp_path / "plain", tmp_path / "featured"
    common = ["disable_last_saving=true", "eval_interval=3", "eval_iters=1"]
    reference = assert_trained(train(plain, *common), plain)
    flags = ["recompute_granularity=full", "recompute_layer_ids=[0]", "disable_tensorboard=false",
             "disable_wandb=false", "disable_mlflow=false", "use_rocm_mem_info=true"]
    result = train(featured, *common, *flags)
    losses = assert_trained(result, featured)
    assert losses == reference  # recomputing a layer changes memory, never the numbers
    log = result.stdout + result.stderr
    # 6 steps x 2 microbatches x 1 listed layer went through the checkpointed path, the other layer did not
    assert "recompute_layer_ids [0]: 12 layer forwards checkpointed (recomputed in backward), 12 kept" in log
    assert "use_rocm_mem_info: reports GPU memory only; nothing to report on cpu" in log

    out = run_dir(featured)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("lm loss")] == \
        [(k, round(v, 4)) for k, v in losses.items()]
    assert [e.step for e in events.Scalars("lm loss validation")] == [3, 6]

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the file store needs it as writing did
    client = mlflow.MlflowClient((out / "mlflow").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(out.name).experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lm loss")}
    assert history == pytest.approx(losses)
    assert run.data.params["train_iters"] == "6"

    (wandb_run,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_run.stat().st_size > 0


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    import psutil
    from mg_helpers import PRIMUS, free_port

    env = primus_env()
    args = [*PRIMUS, "run", str(EXAMPLE), f"workspace={tmp_path}", "parallel.data=2", "--nproc-per-node", "2"]
    log = (tmp_path / "primus.log").open("w")
    proc = subprocess.Popen([*args, "train.steps=400", "--master-port", str(free_port())], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.time() + 180
    while time.time() < deadline and len(train_losses(tmp_path) if (run_dir(tmp_path) / "metrics.jsonl").exists()
                                         else {}) < 2:
        time.sleep(0.2)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "primus.runs.worker" in " ".join(c.cmdline())]
    (rank1,) = [w for w in workers if w.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGTERM)  # only rank 1: rank 0 must learn it at the step boundary
    assert proc.wait(timeout=180) == 143  # a graceful stop under torchrun, not a crash
    statuses = [json.loads((run_dir(tmp_path) / f"logs/pre_trainer/rank-{r}/status.json").read_text())
                for r in (0, 1)]
    assert {s["state"] for s in statuses} == {"preempted"}, statuses
    stopped = statuses[0]["step"]
    assert statuses[1]["step"] == stopped and 2 <= stopped < 400
    ckpts = run_dir(tmp_path) / "checkpoints"
    # the stop's checkpoint is an ordinary one: test_resume_matches_uninterrupted_run resumes those
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    assert (ckpts / f"iter_{stopped:07d}").is_dir()


def _write_corpus_and_tokenizer(folder: Path) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ["the", "a", "model", "learns", "tokens", "from", "text", "while", "loss", "falls", "and", "steps", "go", "by", "on", "a", "small", "cpu"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(200)]
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir()
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    return corpus, tok_dir


def test_local_jsonl_corpus_is_indexed_once_and_trains(tmp_path: Path) -> None:
    corpus, tokenizer = _write_corpus_and_tokenizer(tmp_path)
    cache = tmp_path / "cache"
    data = [f"data.path={corpus}", f"data.tokenizer={tokenizer}", "data.mock=false", "disable_last_saving=true",
            f"data_cache_path={cache}"]
    assert_trained(train(tmp_path / "ws", *data), tmp_path / "ws")
    built = sorted(p.name for p in cache.glob("*.idx"))
    assert len(built) == 1
    again = train(tmp_path / "ws2", *data)
    assert again.returncode == 0
    assert sorted(p.name for p in cache.glob("*.idx")) == built  # reused, not rebuilt


SHARED = REPO / "examples" / "data"


@pytest.mark.skipif(not (SHARED / "corpus.jsonl").is_file() or not (SHARED / "tokenizer" / "tokenizer.json").is_file(),
                    reason="the shared corpus and tokenizer (examples/data) are not in this checkout yet")
def test_shared_corpus_trains(tmp_path: Path) -> None:
    data = [f"data.path={SHARED / 'corpus.jsonl'}", f"data.tokenizer={SHARED / 'tokenizer'}", "data.mock=false",
            "disable_last_saving=true", "train.lr=5.0e-3"]
    assert_trained(train(tmp_path, *data), tmp_path)


def test_data_prepare_converts_ahead_of_the_run(tmp_path: Path) -> None:
    from mg_helpers import run_primus  # noqa: PLC0415

    corpus, tokenizer = _write_corpus_and_tokenizer(tmp_path)
    cache = tmp_path / "cache"
    args = ["data", "prepare", str(EXAMPLE), "--backend", "megatron", f"data.path={corpus}",
            f"data.tokenizer={tokenizer}", "data.mock=false", f"data_cache_path={cache}"]
    result = run_primus(*args)
    assert result.returncode == 0, result.stderr
    assert "indexed dataset ready" in result.stdout
    assert len(list(cache.glob("*.bin"))) == 1 and len(list(cache.glob("*.idx"))) == 1
    # without data_cache_path it converts where a run of the experiment looks: <workspace>/.cache/megatron
    result = run_primus_with(*args[:-1], f"workspace={tmp_path / 'ws'}", env={"PRIMUS_CACHE_DIR": ""}, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "ws" / ".cache" / "megatron").glob("*.idx"))) == 1, result.stdout
