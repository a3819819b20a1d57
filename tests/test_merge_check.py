"""Checking a merge: ``surgery merge --dry-run`` task-vector diagnostics and ``--check`` measurements, each number
recomputed here independently (numpy float64 for the diagnostics, transformers' own full models for the KL)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model, run_surgery, save_tokenizer
from merge_helpers import read_numpy, save_family


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    """llama base + two fine-tunes (small task vectors), with a tokenizer each."""
    paths = save_family(tmp_path_factory.mktemp("check"), "llama", 2, scale=0.002)
    for path in paths:
        save_tokenizer(path)
    return paths


def dry_run(*args) -> dict:
    result = run_surgery("merge", *map(str, args), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def group_of(name: str) -> str:
    """A decoder layer (``model.layers.3``, GPT-2's ``transformer.h.0``), else the tensor's module."""
    parts = name.split(".")
    for position, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks", "layer", "block") and parts[position + 1].isdigit():
            return ".".join(parts[:position + 2])
    return ".".join(parts[:-1])


def expected_diagnostics(base: Path, models: list[Path], density: float | None) -> dict[str, dict]:
    """Per group: relative norms, pairwise cosines and sign-conflict rate, from the files in float64."""
    w0, tuned = read_numpy(base), [read_numpy(m) for m in models]
    sums: dict[str, dict] = {}
    for name in w0:
        deltas = [t[name].reshape(-1) - w0[name].reshape(-1) for t in tuned]
        kept = []
        for delta in deltas:
            if density is None:
                kept.append(delta)
                continue
            k = max(1, int(density * delta.size))
            keep = np.zeros(delta.size, bool)
            keep[np.argsort(-np.abs(delta), kind="stable")[:k]] = True
            kept.append(np.where(keep, delta, 0.0))
        group = sums.setdefault(group_of(name), {"base": 0.0, "tau": [0.0] * len(deltas), "dot": 0.0,
                                                 "overlap": 0, "mixed": 0})
        group["base"] += float((w0[name] ** 2).sum())
        for i, delta in enumerate(deltas):
            group["tau"][i] += float((delta ** 2).sum())
        group["dot"] += float((deltas[0] * deltas[1]).sum())
        signs = np.sign(np.stack(kept))
        overlap = (signs != 0).sum(0) > 1
        group["overlap"] += int(overlap.sum())
        group["mixed"] += int((overlap & (signs > 0).any(0) & (signs < 0).any(0)).sum())
    return {group: {"relative": [np.sqrt(t / s["base"]) for t in s["tau"]],
                    "cosine": s["dot"] / np.sqrt(s["tau"][0] * s["tau"][1]),
                    "conflicts": s["mixed"] / s["overlap"] if s["overlap"] else None}
            for group, s in sums.items()}


@pytest.mark.parametrize("method, density", [("ties", 0.3), ("task_arithmetic", None)])
def test_dry_run_diagnostics_match_an_independent_computation(family, tmp_path, method, density):
    base, ft1, ft2 = family
    extra = ["--density", str(density)] if density else []
    plan = dry_run(base, ft1, ft2, "--method", method, *extra, "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = plan["diagnostics"]
    expected = expected_diagnostics(base, [ft1, ft2], density)
    assert {layer["group"] for layer in report["layers"]} == set(expected)
    for layer in report["layers"]:
        want = expected[layer["group"]]
        np.testing.assert_allclose(list(layer["relative_norm"].values()), want["relative"], rtol=1e-6)
        np.testing.assert_allclose(list(layer["cosine"].values()), [want["cosine"]], rtol=1e-5, atol=1e-9)
        if want["conflicts"] is None:
            assert layer["sign_conflicts"] is None
        else:
            assert layer["sign_conflicts"] == pytest.approx(want["conflicts"], abs=1e-12)
    assert report["warnings"] == []
    assert 0.4 < report["overall"]["sign_conflicts"] < 0.6  # independent noise: about half the overlaps conflict
    merged = run_surgery("merge", base, ft1, ft2, "--method", method, *extra, "-o", tmp_path / "merged", "--json")
    assert merged.returncode == 0, merged.stderr
    assert report["estimate"]["disk_bytes"] == json.loads(merged.stdout)["total_bytes"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "gpt2"])
def test_dry_run_norms_and_cosines_of_moe_and_conv1d_families(family, family_pairs, tmp_path):
    """Fused 3-D experts (gpt-oss), per-expert tensors, GPT-2's Conv1D: the task-vector norms per group are the
    files' own (the fine-tune here is another seed, so every group is far from the base and warned about)."""
    base, ft = family_pairs[family]
    report = dry_run(base, ft, "--method", "ties", "-o", tmp_path / "out")["diagnostics"]
    w0, w1 = read_numpy(base), read_numpy(ft)
    squares: dict[str, list[float]] = {}
    for name in w0:
        if name in w1 and w0[name].dtype.kind == "f":
            group = squares.setdefault(group_of(name), [0.0, 0.0])
            group[0] += float((w0[name] ** 2).sum())
            group[1] += float(((w1[name] - w0[name]) ** 2).sum())
    for layer in report["layers"]:
        base_squares, task_squares = squares[layer["group"]]
        assert layer["relative_norm"]["ft"] == pytest.approx(np.sqrt(task_squares / base_squares), rel=1e-6)
    assert {layer["group"] for layer in report["layers"]} <= set(squares)
    assert any("ft: its task vector is over 50% of the base's norm" in w for w in report["warnings"])


def test_dry_run_warns_about_a_model_that_is_no_fine_tune_and_opposed_task_vectors(family, tmp_path):
    base, ft1, _ = family
    stranger = tmp_path / "stranger"
    make_tiny_model("llama", seed=7).save_pretrained(stranger)  # trained from another initialisation
    opposed = tmp_path / "opposed"  # base − (ft1 − base): undoes ft1
    shutil.copytree(base, opposed)
    w0, w1 = load_file(base / "model.safetensors"), load_file(ft1 / "model.safetensors")
    save_file({name: (2 * w0[name] - w1[name]).contiguous() for name in w0}, opposed / "model.safetensors",
              metadata={"format": "pt"})
    report = dry_run(base, ft1, stranger, opposed, "--method", "ties", "-o", tmp_path / "out")["diagnostics"]
    warnings = report["warnings"]
    assert any(w.startswith("stranger: its task vector is over 50% of the base's norm") for w in warnings), warnings
    assert not any(w.startswith("ft1: its task vector") for w in warnings)
    assert report["overall"]["cosine"]["ft1 · opposed"] == pytest.approx(-1.0, abs=1e-6)
    assert any(w.startswith("ft1 · opposed: the task vectors point against each other") for w in warnings)
    text = run_surgery("merge", base, ft1, stranger, opposed, "--method", "ties", "-o", tmp_path / "out", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert "models: 1 = ft1, 2 = stranger, 3 = opposed" in text.stdout and "cos 1·3" in text.stdout
    assert "warning: stranger: its task vector" in text.stdout


def test_dry_run_names_a_non_finite_input_tensor(family, tmp_path):
    base, ft1, _ = family
    broken = tmp_path / "broken"
    shutil.copytree(ft1, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = run_surgery("merge", base, broken, "--method", "ties", "-o", tmp_path / "out", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "model.layers.1.mlp.up_proj.weight" in result.stderr and "NaN or Inf" in result.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_without_a_base_reports_no_task_vectors(family, tmp_path):
    _, ft1, ft2 = family
    result = run_surgery("merge", ft1, ft2, "--method", "linear", "-o", tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "no base, so no task vectors to report" in result.stdout and "estimate:" in result.stdout


def full_log_probs(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, use_kernels=False).eval()
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits, -1)


def probe_ids(base: Path, seed: int) -> torch.Tensor:
    """The probe: what the base samples from its BOS token (the runtime's seeded sampler)."""
    from surgery.io import open_checkpoint
    from surgery.runtime import load_tokenizer, loaded_model, self_generated_ids

    with open_checkpoint(str(base)) as ckpt:
        return self_generated_ids(loaded_model(ckpt), load_tokenizer(ckpt), 256, seed, sequences=4)


def test_check_measures_kl_top1_and_nll_against_each_parent(family, tmp_path):
    base, ft1, ft2 = family
    out = tmp_path / "merged"
    result = run_surgery("merge", base, ft1, ft2, "--method", "ties", "--density", "0.5", "--lambda", "40",
                         "--seed", "4", "-o", out, "--check", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["check"]
    assert json.loads((out / "surgery.json").read_text())["output"]["check"] == report
    ids = probe_ids(base, seed=4)
    assert report["probe"]["tokens"] == ids.numel() == 4 * 65
    merged = full_log_probs(out, ids)
    assert float(-merged[:, :-1].gather(-1, ids[:, 1:, None]).mean()) == pytest.approx(report["merged_nll"], rel=1e-3)
    by_model = {row["model"]: row for row in report["parents"]}
    base_log_p = full_log_probs(base, ids)
    for path in (base, ft1, ft2):
        log_p = full_log_probs(path, ids)
        row = by_model[path.name]
        kl = (log_p.exp() * (log_p - merged)).sum(-1).mean()
        assert row["kl"] == pytest.approx(float(kl), rel=2e-3)
        assert row["top1_agreement"] == pytest.approx(float((log_p.argmax(-1) == merged.argmax(-1)).double().mean()),
                                                      abs=1e-3)
        assert row["nll"] == pytest.approx(float(-log_p[:, :-1].gather(-1, ids[:, 1:, None]).mean()), rel=1e-3)
        if path != base:
            to_base = (base_log_p.exp() * (base_log_p - log_p)).sum(-1).mean()
            assert row["kl_to_base"] == pytest.approx(float(to_base), rel=2e-3)
    assert by_model["base"]["kl"] > 10 * by_model["ft1"]["kl_to_base"]  # λ 40 moves the merge well past each parent
    card = (out / "README.md").read_text()
    assert "## Check" in card and f"| `ft1` | {by_model['ft1']['kl']:.4f} |" in card
    assert "Tokenizer: 103 tokens, embedding 160 rows. Chat template: renders." in card


def test_check_is_deterministic_and_leaves_the_weights_alone(family, tmp_path):
    base, ft1, _ = family
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "plain"]
    for out, check in zip(runs, (["--check"], ["--check"], [])):
        result = run_surgery("merge", base, ft1, "--method", "ties", "-o", out, *check)
        assert result.returncode == 0, result.stderr
    for name in ("README.md", "surgery.json", "model.safetensors"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    assert (runs[0] / "model.safetensors").read_bytes() == (runs[2] / "model.safetensors").read_bytes()
    assert "## Check" not in (runs[2] / "README.md").read_text()
    assert "check on 260 tokens base wrote (seed 0)" in run_surgery(
        "merge", base, ft1, "--method", "ties", "-o", tmp_path / "c", "--check").stdout


def test_check_warns_when_the_merge_predicts_far_worse_than_every_parent(family, tmp_path):
    base, ft1, _ = family
    result = run_surgery("merge", base, ft1, "--method", "task_arithmetic", "--lambda", "300", "-o", tmp_path / "out",
                         "--check")
    assert result.returncode == 0, result.stderr
    assert "warning: the merge predicts the probe text far worse than every parent" in result.stdout
    assert "- warning: the merge predicts the probe text far worse" in (tmp_path / "out" / "README.md").read_text()


def test_check_without_a_tokenizer_skips_the_probe(tmp_path):
    base, ft1 = save_family(tmp_path, "qwen2", 1, scale=0.002)
    result = run_surgery("merge", base, ft1, "--method", "ties", "-o", tmp_path / "out", "--check", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["check"]
    assert report["probe"] == {"skipped": "no tokenizer, so no probe text"} and report["finite"] is True
    assert "No tokenizer." in (tmp_path / "out" / "README.md").read_text()


def test_a_tokenizer_past_the_embedding_fails_the_check_unless_a_parent_has_it(family, tmp_path):
    from surgery.errors import CheckFailed
    from surgery.io import open_checkpoint
    from surgery.merge.check import check_merge

    base = family[0]
    big = tmp_path / "big-tokenizer"  # 170 tokens for 160 embedding rows
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(167)}},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(big)
    merged = tmp_path / "merged"
    shutil.copytree(base, merged)
    for file in big.iterdir():
        shutil.copy(file, merged / file.name)
    (merged / "chat_template.jinja").unlink(missing_ok=True)
    with open_checkpoint(str(base)) as parent, pytest.raises(CheckFailed, match="170 tokens but the embedding 160"):
        check_merge(merged, [parent], reference=parent, base=parent)
    with open_checkpoint(str(merged)) as parent:  # the same problem in a parent: a warning, and a measured probe
        report = check_merge(merged, [parent], reference=parent, base=parent)
    assert any("170 tokens but the embedding 160 rows" in w and "(as in a parent)" in w for w in report["warnings"])


def test_check_notices_a_chat_template_the_parents_have_and_the_merge_lost(family, tmp_path):
    from surgery.io import open_checkpoint
    from surgery.merge.check import check_merge

    base = family[0]
    merged = tmp_path / "merged"
    shutil.copytree(base, merged)
    (merged / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((merged / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (merged / "tokenizer_config.json").write_text(json.dumps(config))
    with open_checkpoint(str(base)) as parent:
        report = check_merge(merged, [parent], reference=parent, base=parent)
    assert report["tokenizer"]["chat_template"] is None
    assert any(w.startswith("a parent has a chat template and the merge has none") for w in report["warnings"])
    assert report["parents"][0]["kl"] == 0.0 and report["parents"][0]["top1_agreement"] == 1.0


def test_a_pipeline_merge_step_checks_with_check_true(family, tmp_path):
    base, ft1, _ = family
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"steps:\n  - merge: {{models: [{base}, {ft1}], method: ties, check: true, "
                        f"output: {tmp_path / 'merged'}}}\n")
    result = run_surgery("run", pipeline)
    assert result.returncode == 0, result.stderr
    assert "kl" in json.loads((tmp_path / "merged" / "surgery.json").read_text())["output"]["check"]["parents"][0]


@pytest.mark.parametrize("family, reason", [("gpt2", "has no decoder with a list of layers"),
                                            ("llava", "cannot build a causal LM")])
def test_check_skips_the_probe_of_a_family_the_runtime_cannot_stream(family, reason, family_pairs, tmp_path):
    """The merge is written and its card says why the probe was skipped, naming inputs by name, not by path."""
    pair = []
    for path in family_pairs[family]:
        shutil.copytree(path, tmp_path / path.name)
        save_tokenizer(tmp_path / path.name)
        pair.append(tmp_path / path.name)
    result = run_surgery("merge", *pair, "--method", "ties", "-o", tmp_path / "out", "--check", "--json")
    assert result.returncode == 0, result.stderr
    skipped = json.loads(result.stdout)["check"]["probe"]["skipped"]
    assert reason in skipped and str(tmp_path) not in skipped
    assert "Probe: skipped" in (tmp_path / "out" / "README.md").read_text()
