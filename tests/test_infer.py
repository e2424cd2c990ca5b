"""End-to-end inference on the shipped default model: the dispatch paths agree token for token,
prefill+decode equals recomputing the whole sequence, and the script reports what it should."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_relayfree as mr
from moe_relayfree.tools import analysis
from helpers import forward, make_mesh, script_env
from moe_relayfree_models import checkpoint, init_cache, tokenizer
from moe_relayfree_models.generation import Sampling, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "models", "default")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

PROMPTS = ["Return the ", "If the file "]
CHAT_TEMPLATE = os.path.join(ROOT, "tests", "fixtures", "chat_plain.jinja")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(8)


def run(mesh, implementation, schedule="auto", new=12, **layout):
    model = checkpoint.load_model(DEFAULT, mesh=mesh, implementation=implementation,
                                  schedule=schedule, **layout)
    return model, generate(model, [tokenizer.encode(p) for p in PROMPTS], new)


def test_schedules_and_meshes_generate_identical_tokens(mesh):
    model, long = run(mesh, "relayfree", new=40)  # auto: the decode schedule at these sizes
    text = tokenizer.decode(long["tokens"][0])
    assert len([w for w in text.split() if w.isalpha()]) >= 3, text  # trained, not byte noise
    base = {"tokens": [t[:12] for t in long["tokens"]]}
    assert max(len(tokenizer.encode(p)) for p in PROMPTS) * len(PROMPTS) // 8 <= mr.decode_threshold()
    # the baselines' tokens: test_sweep_script_smoke (and their logits: test_models.py)
    _, other = run(mesh, "relayfree", "prefill")
    assert other["tokens"] == base["tokens"]
    # the same tokens on a 3-axis mesh: two batch axes, and a tensor axis splitting the
    # experts' width (the loader slices f per device); test_infer_script_json runs (2, 4)
    _, other = run(mr.make_mesh({"data": 2, "ep": 2, "tp": 2}), "relayfree", tensor_axis="tp")
    assert other["tokens"] == base["tokens"]
    # greedy decoding with the cache equals argmax of one full forward over the result
    prompt = [tokenizer.encode(p) for p in PROMPTS]
    rows = [p + g for p, g in zip(prompt, base["tokens"])]
    width = max(len(r) for r in rows)
    pad = jnp.asarray([width - len(r) for r in rows], jnp.int32)
    toks = jnp.asarray([[0] * (width - len(r)) + r for r in rows], jnp.int32)
    # compiled: op by op this forward took twice its compile time
    cache = init_cache(model.cfg, len(rows), width, jnp.float32)
    logits, _ = forward(model, toks, pad, cache, 0)
    pred = np.asarray(jnp.argmax(logits, -1))
    for i, (p, g) in enumerate(zip(prompt, base["tokens"])):
        start = width - len(rows[i]) + len(p) - 1
        assert pred[i, start : start + len(g)].tolist() == g


def test_rows_stop_at_their_first_stop_token_and_sampling_is_seeded(mesh):
    model = checkpoint.load_model(DEFAULT, mesh=mesh)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    full = generate(model, prompts, 12, stop_ids=[tokenizer.EOS])  # never emitted here
    assert full["finish_reasons"] == ["length"] * 2 and len(full["step_s"]) == 11
    rows = full["tokens"]
    # one stop id from each row (the first token that row has not emitted before); each row
    # must end before the first of either, the loop after the step that ends the last row
    stops = {next(t for i, t in enumerate(r) if i >= 3 and t not in r[:i]) for r in rows}
    cuts = [next(i for i, t in enumerate(r) if t in stops) for r in rows]
    assert max(cuts) < 11, (rows, stops)
    got = generate(model, prompts, 12, stop_ids=stops)
    assert got["tokens"] == [r[:c] for r, c in zip(rows, cuts)]
    assert got["finish_reasons"] == ["stop"] * 2 and len(got["step_s"]) == max(cuts)
    # sampling: top-k 1 is greedy at any temperature; a seed fixes the draws
    assert generate(model, prompts, 12, sampling=Sampling(1.5, top_k=1), seed=4)["tokens"] == rows
    hot = [generate(model, prompts, 12, sampling=Sampling(1.5), seed=s)["tokens"] for s in (1, 1, 2)]
    assert hot[0] == hot[1] and hot[0] != hot[2] and rows not in (hot[0], hot[2])


def test_infer_script_json(tmp_path):
    """The script's JSON report, on an FP8 copy of the default checkpoint with its experts kept
    FP8 (``--fp8-experts``), the prompts through a chat template (``--chat``)."""
    from moe_relayfree_models import quant

    quant.quantize_checkpoint(os.path.join(ROOT, "models", "default"), str(tmp_path))
    env = script_env(8)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "infer.py"), "--json",
                          "--max-new-tokens", "6", "--batch", "4",
                          "--mesh", "data=2,ep=4", "--temperature", "0.8", "--top-p", "0.9",
                          "--checkpoint", str(tmp_path), "--fp8-experts", "--chat",
                          "--system", "Be brief.", "--chat-template", CHAT_TEMPLATE],
                         check=True, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    report = json.loads(out.stdout)
    assert "\r" not in out.stderr  # progress only on a terminal, not in a redirected log
    # JAX's persistent compilation cache: the one in the environment (the tests' own), filled
    assert report["compile_cache"] == env["JAX_COMPILATION_CACHE_DIR"]
    assert os.listdir(report["compile_cache"])
    assert report["experts"] == "fp8"
    assert report["devices"] == 8 and report["batch"] == 4
    assert report["mesh"] == {"data": 2, "ep": 4} and report["batch_axes"] == ["data", "ep"]
    assert report["dtype"] == "bfloat16"  # the default checkpoint's: activations follow it
    assert report["prefill_schedule"] in ("prefill", "decode")
    assert report["decode_schedule"] == "decode"  # 4 rows on 8 ranks: 1 token per rank
    assert report["ttft_ms"] > 0 and report["tpot_ms"] > 0
    assert len(report["outputs"]) == 4
    from moe_relayfree_models.serving.chat import ChatTemplate

    template = ChatTemplate.from_folder(str(tmp_path), CHAT_TEMPLATE)
    rendered = [template.render([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": o["prompt"]}])
                for o in report["outputs"]]
    assert report["chat"] and report["prompt_tokens"] == max(
        len(tokenizer.encode(t, bos=False)) for t in rendered)
    assert report["sampling"] == {"temperature": 0.8, "top_k": 0, "top_p": 0.9}
    assert report["stop_ids"] == [tokenizer.EOS]  # the byte-level tokenizer's
    for o in report["outputs"]:
        assert (o["finish_reason"], o["new_tokens"]) in (("length", 6),) + tuple(
            ("stop", n) for n in range(6)), o


def test_chat_without_a_template_is_a_clear_error():
    """--chat on a checkpoint with no chat template (the default one) says so, and how on."""
    import types

    import infer

    args = types.SimpleNamespace(checkpoint=DEFAULT, chat_template=None, system=None)
    with pytest.raises(ValueError, match="ships no chat template; pass --chat-template"):
        infer.chat_prompts(args, tokenizer.ByteTokenizer(), ["hi"])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "infer.py"),
                          "--checkpoint", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 2 and "no checkpoint" in out.stderr


def test_sweep_script_smoke(tmp_path):
    paths = {"relayfree", "allgather-baseline"}
    env = script_env(8)
    # on a 2-D mesh: tokens over both axes, experts over ep (a 1-D mesh is the scripts' default,
    # run by the other tests here); relay-free and one baseline (--dispatch; the default is
    # every dropless path)
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), "--batches", "2",
                    "--prompt-lengths", "8", "--new-tokens", "2", "--repeats", "1", "--out", str(tmp_path),
                    "--mesh", "data=2,ep=4", "--dispatch", "allgather-baseline"],
                   check=True, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["dispatch"] for r in report["rows"]} == paths  # 1 batch size, relay-free first
    assert len(report["rows"]) == 2 and report["rows"][0]["dispatch"] == "relayfree"
    assert all(r["tokens_identical"] for r in report["rows"])
    assert all(len(r["tpot_rounds_ms"]) == 1 and r["tpot_vs_best_baseline"] > 0 for r in report["rows"])
    # one round: the paired ratio is that round's ratio to the faster baseline
    best = min(r["tpot_rounds_ms"][0] for r in report["rows"] if r["dispatch"] != "relayfree")
    for r in report["rows"]:
        assert r["tpot_paired_vs_best_baseline"] == pytest.approx(r["tpot_rounds_ms"][0] / best)
    assert set(report["feasible_batch"]) == paths
    assert report["tpot_target_ms"] > 0 and (tmp_path / "sweep.png").stat().st_size > 1000
    targets = [p["tpot_target_ms"] for p in report["feasible_by_target"]]
    assert targets == pytest.approx([m * report["best_batch1_tpot_ms"] for m in (1.25, 1.5, 2, 3)])
    assert report["mesh"] == {"data": 2, "ep": 4} and report["expert_axis"] == "ep"
    # batch 2 x prompt 8 over 8 token shards: 2 tokens per rank at prefill, 1 at decode
    assert all(r["prefill_schedule"] == r["decode_schedule"] == "decode" for r in report["rows"])


def test_sweep_needs_a_baseline(capsys):
    """sweep.py's ratios are to the best baseline: --dispatch without one is refused by the
    argument parser (exit 2, one line), before JAX starts."""
    import sweep

    with pytest.raises(SystemExit) as done:
        sweep.parse_args(["--dispatch", "relayfree"])
    assert done.value.code == 2
    assert "--dispatch: name at least one baseline" in capsys.readouterr().err
    assert sweep.parse_args(["--dispatch", "capacity-baseline"]).dispatch == ["capacity-baseline"]


def test_sweep_feasibility_is_the_largest_batch_under_each_target():
    from moe_relayfree_models.tools.bench.serving import feasibility

    tpot = {"relayfree": [(1, 3.0), (8, 4.0), (64, 5.0)],
            "capacity-baseline": [(1, 4.8), (8, 3.9), (64, 6.0)],
            "ragged-baseline": [(1, 7.0), (8, 7.0), (64, 9.0)]}
    rows = [dict(dispatch=n, batch=b, tpot_ms=t) for n, pts in tpot.items() for b, t in pts]
    # the largest batch that meets it, even where a smaller batch does not (capacity at 1)
    point = feasibility(rows, 4.5, 1.5)
    assert point["feasible_batch"] == {"relayfree": 8, "capacity-baseline": 8, "ragged-baseline": 0}
    assert point["feasible_vs_best_baseline"] == 1.0 and point["multiple"] == 1.5
    assert feasibility(rows, 5.0)["feasible_vs_best_baseline"] == 8.0
    none = feasibility(rows, 3.5)
    assert none["feasible_batch"]["relayfree"] == 1 and none["feasible_vs_best_baseline"] is None


def test_decode_step_updates_the_cache_in_place(mesh):
    """The decode step donates its KV cache: no copy of every layer's cache per token."""
    import jax

    from moe_relayfree_models.generation import GREEDY, prefill_program, step_program

    model = checkpoint.load_model(DEFAULT, mesh=mesh)
    graphdef, state = nnx.split(model)
    toks, pad = jnp.ones((8, 4), jnp.int32), jnp.zeros((8,), jnp.int32)
    key = jax.random.key(0)
    token, cache = prefill_program(graphdef, GREEDY, state, toks, pad,
                                   init_cache(model.cfg, 8, 8, jnp.float32), key)
    token2, cache2 = step_program(graphdef, GREEDY, state, token, pad, cache, jnp.int32(4), key)
    assert cache.k[0].is_deleted() and not cache2.k[0].is_deleted()
    # one token per device, bf16: no weight matrix is widened to f32 (XLA:CPU's one-row dot
    # did that for every dense matrix on every step; moe_relayfree.ffn.dense_dot). Also a
    # batch of 4 on a baseline, which pads it to one token per device (relay-free keeps it on
    # every device: 4 rows)
    weights = {",".join(map(str, v.shape)) for v in jax.tree.leaves(state)
               if v.dtype == jnp.bfloat16 and v.ndim == 2}
    assert len(weights) >= 5
    baseline = nnx.split(checkpoint.load_model(DEFAULT, mesh=mesh, implementation="capacity_baseline"))
    for (g, st), batch in (((graphdef, state), 8), (baseline, 4)):
        toks, pads = jnp.ones((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32)
        cache = init_cache(model.cfg, batch, 8, jnp.bfloat16)
        text = step_program.lower(g, GREEDY, st, toks, pads, cache, jnp.int32(5),
                                  key).compile().as_text()
        widened = {",".join(map(str, b.shape)) for b in analysis.compiled_hlo_buffers(text, 1)
                   if b.dtype == "f32"} & weights
        assert not widened, (batch, widened)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_random_checkpoints_of_every_family_load(tmp_path, arch):
    """scripts/make_random_checkpoint.py --arch: every family the loader takes (it offered 2)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_random_checkpoint", os.path.join(ROOT, "scripts", "make_random_checkpoint.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--arch", arch, "--experts", "16", "--k", "2", "--d-model", "64",
                 "--d-ff-expert", "32", "--layers", "2", "--out", str(tmp_path)])
    cfg = checkpoint.load_model(str(tmp_path), mesh=make_mesh(8)).cfg
    assert (cfg.arch, cfg.num_experts, cfg.k, cfg.d_model) == (arch, 16, 2, 64)


@pytest.mark.parametrize("case,message", [
    ("no tokenizer", "has no tokenizer.json and its vocabulary"),
    ("broken tokenizer", "tokenizer.json is not a readable tokenizer.json"),
    ("too long", "prompt tokens + 2000 new tokens exceed the model's"),
])
def test_bad_checkpoint_files_and_requests_are_one_line_errors_before_loading(tmp_path, case,
                                                                              message):
    """A missing or broken tokenizer.json, or a request past the model's positions: one line
    naming it, exit 2, before the weights load (the tokenizer failed after the whole model had
    loaded, and a too-long request ran on with no word)."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(DEFAULT, folder)
    cfg = json.loads((folder / "config.json").read_text())
    if case == "no tokenizer":  # a vocabulary the byte-level scheme cannot stand in for
        cfg["vocab_size"] = 300
        (folder / "config.json").write_text(json.dumps(cfg))
    elif case == "broken tokenizer":
        (folder / "tokenizer.json").write_text("{not json")
    argv = ["--checkpoint", str(folder), "--max-new-tokens", "2000" if case == "too long" else "2"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "infer.py"), *argv],
                         capture_output=True, text=True, cwd=ROOT, env=script_env(8), timeout=300)
    assert out.returncode == 2, out.stderr[-800:]
    assert message in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr
    assert cfg["max_position_embeddings"] < 2000  # the too-long case is too long


def test_random_checkpoint_script_writes_a_loadable_model(tmp_path):
    """scripts/make_random_checkpoint.py: a checkpoint of the requested shape that the loader
    reads on 8 ranks and that runs (a sweep on an MoE-heavy model uses it)."""
    import importlib.util

    from moe_relayfree_models import checkpoint
    from moe_relayfree_models.transformer import init_cache

    spec = importlib.util.spec_from_file_location(
        "make_random_checkpoint", os.path.join(ROOT, "scripts", "make_random_checkpoint.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--experts", "16", "--k", "4", "--d-model", "64", "--d-ff-expert", "32",
                 "--layers", "2", "--out", str(tmp_path)])
    model = checkpoint.load_model(str(tmp_path), mesh=make_mesh(8))
    cfg = model.cfg
    assert (cfg.num_experts, cfg.k, cfg.d_model, cfg.d_ff_expert) == (16, 4, 64, 32)
    assert cfg.moe_layers == (False, True)
    toks = jnp.ones((8, 5), jnp.int32)
    logits, _ = forward(model, toks, jnp.zeros((8,), jnp.int32), init_cache(cfg, 8, 5, jnp.float32), 0)
    assert logits.shape == (8, 5, cfg.vocab_size) and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("argv,message", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["--batch", "-1"], "argument --batch: must be >= 1, got -1"),
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--devices", "x"], "argument --devices: 'x' is not an integer"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    """Refused by the argument parser (exit 2, one line naming the option), before JAX starts;
    --batch 0 used to run batch 3 and --batch -1 blamed the prompt."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import infer

    with pytest.raises(SystemExit) as done:
        infer.parse_args(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_experts_not_divisible_by_the_devices_is_a_one_line_error():
    env = script_env(3)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "infer.py"), "--devices", "3",
                          "--max-new-tokens", "2"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith(
        "E=8 experts is not divisible by the 3 ranks of axis 'ep'"), out.stderr[-500:]
    assert "Traceback" not in out.stderr
