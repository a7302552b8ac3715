"""The recipe chain: in the shipped pipelines (tiny CPU, Qwen3-8B on GPUs) every stage reads what an
earlier stage writes, learned from each stage's own `--dry-run` plan (no GPU, no model needed), and
every `openai:` model a stage calls is served by a background stage it comes after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlm_train import cli
from rlm_train.errors import UserError
from rlm_train.pipeline.chain import check_chain
from rlm_train.pipeline.plans import plan_here
from rlm_train.pipeline.recipe import load_pipeline
from rlm_train.stage import Plan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name paths relative to the repository


def links_of(recipe: str | Path):
    """The pipeline, each stage's plan (its error instead, where it cannot plan here) and the links."""
    pipeline = load_pipeline(recipe)
    plans: dict[str, Plan | str] = {}
    for stage in pipeline.stages:
        try:
            plans[stage.name] = plan_here(stage)
        except UserError as exc:
            plans[stage.name] = str(exc)
    made = {name: plan if isinstance(plan, Plan) else Plan() for name, plan in plans.items()}
    return pipeline, plans, check_chain(pipeline, made)


def source(links, stage: str, name: str) -> str:
    found = [link.source for link in links if link.stage == stage and link.name == name]
    assert found, f"{stage} reads no input named {name}"
    return found[0]


def test_tiny_cpu_pipeline_chain():
    pipeline, plans, links = links_of("recipes/tiny-cpu-pipeline.yaml")
    assert [s.name for s in pipeline.stages] == ["tasks", "generate", "filter", "sft", "generate-rl", "filter-rl",
                                                 "grpo", "eval"]
    assert {name: plan for name, plan in plans.items() if isinstance(plan, str)} == {}
    assert [link.describe() for link in links if link.broken] == []
    assert source(links, "generate", "tasks") == "stage tasks"
    assert source(links, "filter", "trajectories") == "stage generate"
    assert source(links, "sft", "dataset") == "stage filter"
    assert source(links, "sft", "model") == "requires"  # the tiny model: scripts/make_tiny_models.py
    # GRPO's prompts: RL-split tasks the SFT model sampled, filtered against SFT's own tasks.
    assert source(links, "generate-rl", "tasks") == "stage tasks" and source(links, "generate-rl", "policy") == "stage sft"
    assert source(links, "filter-rl", "trajectories") == "stage generate-rl"
    assert source(links, "filter-rl", "sft_data") == "stage filter"
    assert source(links, "grpo", "model") == "stage sft" and source(links, "grpo", "prompts") == "stage filter-rl"
    assert source(links, "eval", "tasks") == "stage tasks"
    assert {link.source for link in links if link.stage == "eval" and link.name == "methods.tuned.policy"} == \
        {"stage sft", "stage grpo"}


def test_qwen3_8b_pipeline_chain_dry_run():
    pipeline, plans, links = links_of("recipes/qwen3-8b-pipeline.yaml")
    runs = [s.name for s in pipeline.stages if not s.background]
    assert runs == ["tasks", "generate", "filter", "sft", "generate-rl", "filter-rl", "grpo", "eval"]
    # Every stage plans (a serve stage notes a model or adapter an earlier stage will write).
    assert {name: plan for name, plan in plans.items() if isinstance(plan, str) and not pipeline.stage(name).background} == {}
    assert [link.describe() for link in links if link.broken] == []
    assert source(links, "generate", "tasks") == "stage tasks"
    assert source(links, "generate", "policy") == "served by serve-teacher"
    assert source(links, "filter", "trajectories") == "stage generate"
    assert source(links, "sft", "dataset") == "stage filter" and source(links, "sft", "model") == "requires"
    # The pass rate that picks GRPO's prompts is the SFT model's own, on RL-split tasks, none of SFT's.
    assert source(links, "serve-sft", "model") == "stage sft"
    assert source(links, "generate-rl", "tasks") == "stage tasks"
    assert source(links, "generate-rl", "policy") == "served by serve-sft"
    assert source(links, "filter-rl", "trajectories") == "stage generate-rl"
    assert source(links, "filter-rl", "sft_data") == "stage filter"
    assert source(links, "grpo", "model") == "stage sft" and source(links, "grpo", "prompts") == "stage filter-rl"
    assert source(links, "serve-eval", "adapters") == "stage sft"
    assert source(links, "serve-grpo", "adapters") == "stage grpo"
    assert source(links, "eval", "methods.grpo-rlm.policy") == "served by serve-grpo"
    assert source(links, "eval", "methods.sft-rlm.policy") == "served by serve-eval"
    for stage in pipeline.stages:
        if not stage.background:
            assert {"nodes", "gpus_per_node", "time"} <= set(stage.slurm), stage.name


def test_a_broken_link_is_found(tmp_path):
    """A GRPO prompt set no stage writes, and an eval model asked of a server that does not serve it."""
    data = yaml.safe_load((REPO / "recipes/qwen3-8b-pipeline.yaml").read_text())
    for stage in data["stages"]:
        if stage["name"] == "grpo":
            stage["with"]["prompts"] = "runs/qwen3-8b/rl-prompts"  # filter-rl writes runs/qwen3-8b/data-rl/rl
        if stage["name"] == "eval":
            stage["with"]["methods"][2]["policy"] = "openai:rlm-qwen3-8b"  # served on :8001, not :8000
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    _, _, links = links_of(recipe)
    broken = {(link.stage, link.name) for link in links if link.broken}
    assert broken == {("grpo", "prompts"), ("eval", "methods.sft-rlm.policy")}


def test_pipeline_dry_run_prints_every_stage_command_and_writes_nothing(capsys):
    pipeline = load_pipeline("recipes/qwen3-8b-pipeline.yaml")
    before = pipeline.out_dir.exists()
    assert cli.main(["pipeline", "--recipe", "recipes/qwen3-8b-pipeline.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for index, stage in enumerate(pipeline.stages, 1):
        assert f"[{index}/{len(pipeline.stages)}] {stage.name} (" in out
        assert f"  command: rlm-train {stage.run} --recipe runs/qwen3-8b/pipeline/{stage.name}.yaml" in out
    assert "chain: all " in out and "requires Qwen/Qwen3-8B: " in out
    assert "schedule     2 epoch(s)" in out  # the SFT stage's own plan
    assert pipeline.out_dir.exists() == before


def test_a_hub_model_in_requires_is_looked_for_in_the_hugging_face_cache(tmp_path, monkeypatch, capsys):
    """`requires: - model: Qwen/Qwen3-8B`. Not in the cache: the dry run and the refusal to run give
    the command that downloads it. In the cache (a tiny random Qwen3 stands in for the 8B weights):
    present, and the serve stages give vLLM its snapshot, served under the id."""
    from rlm_train.testing.hub_cache import write_hub_snapshot
    from rlm_train.testing.tiny_models import build_tiny_qwen3

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dry_run = ["pipeline", "--recipe", "recipes/qwen3-8b-pipeline.yaml", "--dry-run"]
    assert cli.main(dry_run) == 0
    assert (f"requires Qwen/Qwen3-8B: MISSING here: not in the Hugging Face cache ({hub}) and no such directory "
            "here; download it: hf download Qwen/Qwen3-8B\n") in capsys.readouterr().out
    needs = tmp_path / "needs.yaml"
    needs.write_text(yaml.safe_dump({"name": "t", "out_dir": str(tmp_path / "out"), "requires": [{"model": "org/absent"}],
                                     "stages": [{"name": "tasks", "run": "tasks make", "with": {"out_dir": str(tmp_path / "tasks")}}]}))
    assert cli.main(["pipeline", "--recipe", str(needs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("requires org/absent: not in the Hugging Face cache "
                                             f"({hub}) and no such directory here; download it: hf download org/absent"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "tasks").exists()

    tiny = build_tiny_qwen3(tmp_path / "tiny")
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40960}))  # Qwen3-8B's window
    snapshot = write_hub_snapshot(hub, "Qwen/Qwen3-8B", tiny)
    assert cli.main(dry_run) == 0
    out = capsys.readouterr().out
    assert "requires Qwen/Qwen3-8B: present\n" in out and "chain: all " in out
    assert f"model        Qwen/Qwen3-8B  (Hugging Face cache: {snapshot})" in out  # the sft stage's plan
    assert out.count(f"--model {snapshot} --served-model-name Qwen/Qwen3-8B ") == 2  # serve-teacher, serve-eval


def test_a_requirement_names_a_path_or_a_model(tmp_path, capsys):
    recipe = tmp_path / "both.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "out_dir": "out", "requires": [{"path": "m", "model": "org/m"}],
                                      "stages": [{"name": "tasks", "run": "tasks make"}]}))
    assert cli.main(["pipeline", "--recipe", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give exactly one of path (a file or directory) and model (e.g. Qwen/Qwen3-8B)" in err[0], err


# ---------------------------------------------------------------------------
# Server windows: each server a stage starts gets --max-model-len from the stages that talk to it

QWEN3_8B_POSITIONS = 40_960  # max_position_embeddings in Qwen/Qwen3-8B's config.json (no rope scaling)


def window(vllm: dict) -> int:
    args = [str(a) for a in vllm["args"]]
    assert args.count("--max-model-len") == 1, args
    return int(args[args.index("--max-model-len") + 1])


def test_every_server_gets_the_window_its_consumers_episodes_need():
    """Qwen3-8B pipeline: the teacher's window is generate's longest request (38,144 tokens: ten
    2,048-token turns with their REPL feedback), the eval servers' the longest of the eval methods
    that call them (a direct method's one prompt included); all within Qwen3-8B's positions."""
    from rlm_train.eval.config import EvalConfig, method_rlm
    from rlm_train.rlm.loop import RLMConfig
    from rlm_train.rlm.window import direct_tokens, rounded, server_window_tokens

    pipeline = load_pipeline("recipes/qwen3-8b-pipeline.yaml")
    generate = pipeline.stage("generate").config.rlm
    assert isinstance(generate, RLMConfig)
    assert window(pipeline.stage("serve-teacher").raw["vllm"]) == server_window_tokens(generate) == 38_144
    evaluation = pipeline.stage("eval").config
    assert isinstance(evaluation, EvalConfig)

    def needs(port: int) -> int:
        return max(rounded(direct_tokens(method_rlm(evaluation.rlm, m), m.max_context_chars)) if m.direct
                   else server_window_tokens(method_rlm(evaluation.rlm, m))
                   for m in evaluation.methods if any(f":{port}/" in url for url in m.base_urls))

    assert window(pipeline.stage("serve-eval").raw["vllm"]) == needs(8000)
    assert window(pipeline.stage("serve-grpo").raw["vllm"]) == needs(8001)
    servers = [s for s in pipeline.stages if s.run == "serve"]
    assert all(window(s.raw["vllm"]) <= QWEN3_8B_POSITIONS for s in servers), [s.name for s in servers]
    # The typed config the pipeline reads holds the same window.
    assert all(s.config.vllm.args == s.raw["vllm"]["args"] for s in servers)
    # The written stage recipe carries it: `rlm-train serve` starts vLLM with this window.
    written = yaml.safe_load(pipeline.stage("serve-teacher").config_text)
    assert written["vllm"]["args"][-2:] == ["--max-model-len", "38144"]
    # A window given large enough is kept as given (either spelling); the demo's 8,192 fits its root turns.
    demo = load_pipeline("recipes/demo-cpu.yaml")
    assert window(demo.stage("serve-base").raw["vllm"]) == 8192


def with_teacher_args(tmp_path: Path, *args: str) -> Path:
    data = yaml.safe_load((REPO / "recipes/qwen3-8b-pipeline.yaml").read_text())
    for stage in data["stages"]:
        if stage["name"] == "serve-teacher":
            stage["with"]["vllm"]["args"] = [*stage["with"]["vllm"]["args"], *args]
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    return recipe


def test_a_server_window_smaller_than_its_consumers_episodes_is_refused_at_plan_time(tmp_path, capsys):
    recipe = with_teacher_args(tmp_path, "--max-model-len", "32768")
    state = REPO / "runs/qwen3-8b/pipeline"
    before = state.exists()
    for command in (["pipeline", "--recipe", str(recipe), "--dry-run"],
                    ["launch", "--recipe", str(recipe), "--slurm", "--dry-run"]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and (f"{recipe}: stage serve-teacher serves a 32768-token window (vllm.args "
                                  "--max-model-len) but stage generate sends it requests of up to 38144 tokens") in err[0]
    assert cli.main(["pipeline", "--recipe", str(with_teacher_args(tmp_path, "--max-model-len=38000")), "--dry-run"]) == 2
    assert "serves a 38000-token window" in capsys.readouterr().err
    kept = load_pipeline(with_teacher_args(tmp_path, "--max-model-len=39936"))
    assert kept.stage("serve-teacher").config.vllm.args[-1] == "--max-model-len=39936"
    assert state.exists() == before  # refused before anything is written


def small_model_pipeline(tmp_path: Path, server_args: list[str], own_server: bool = False) -> Path:
    """An eval stage calling a background server of a model with 4,096 positions (or, with
    `own_server`, the eval stage's own slurm.server of that model)."""
    model = tmp_path / "small-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3", "max_position_embeddings": 4096}))
    vllm = {"model": str(model), "served_model_name": "small", "port": 8123, "args": server_args}
    evaluation = {"name": "eval", "run": "eval",
                  "with": {"tasks": [], "out": str(tmp_path / "ev"),
                           "methods": [{"name": "m", "policy": "openai:small", "base_urls": ["http://127.0.0.1:8123/v1"]}]}}
    stages = [{"name": "serve", "run": "serve", "background": True, "with": {"vllm": vllm}}, {**evaluation, "after": ["serve"]}]
    if own_server:
        stages = [{**evaluation, "slurm": {"server": {"vllm": vllm}}}]
    recipe = tmp_path / "small.yaml"
    recipe.write_text(yaml.safe_dump({"name": "small", "out_dir": str(tmp_path / "out"), "stages": stages}))
    return recipe


def test_a_window_past_the_models_positions_is_refused_unless_rope_scaling_stretches_them(tmp_path):
    from rlm_train.errors import UserError
    from rlm_train.rlm.loop import RLMConfig
    from rlm_train.rlm.window import server_window_tokens

    need = server_window_tokens(RLMConfig())  # the eval method's default rlm: 34,048 tokens
    for own in (False, True):
        with pytest.raises(UserError, match=f"stage eval sends requests of up to {need} tokens .* holds 4096 positions"):
            load_pipeline(small_model_pipeline(tmp_path, [], own_server=own))
    with pytest.raises(UserError, match="--max-model-len 40000 is longer than the 4096 positions"):
        load_pipeline(small_model_pipeline(tmp_path, ["--max-model-len", "40000"]))
    yarn = json.dumps({"rope_scaling": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}})
    for own in (False, True):
        pipeline = load_pipeline(small_model_pipeline(tmp_path, ["--hf-overrides", yarn], own_server=own))
        server = pipeline.stages[0].slurm["server"]["vllm"] if own else pipeline.stage("serve").raw["vllm"]
        assert window(server) == need  # 4,096 x 16 positions hold it
