"""Models whose tokenizers differ: embedding rows are matched by token, for the base's, a model's or the union
vocabulary (mergekit's tokenizer_source), and compared with mergekit's own output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_surgery
from merge_helpers import MERGEKIT, read_numpy, save_family

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def save_word_tokenizer(directory: Path, tokens: list[str], special: tuple[str, ...] = ()) -> dict[str, int]:
    """A word-level tokenizer whose ids follow ``tokens``' order, then ``special`` (added special tokens);
    returns token → id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(special))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    ids = {**vocab, **{token: len(tokens) + n for n, token in enumerate(special)}}
    assert tokenizer.get_vocab() == ids
    return ids


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """A llama base whose tokenizer knows <unk> w0…w99, and a fine-tune whose tokenizer orders those words backwards
    and adds x0…x9 (both with 160 embedding rows, the rest padding)."""
    base, tuned = save_family(tmp_path_factory.mktemp("vocab"), "llama", 1)
    words = [f"w{i}" for i in range(100)]
    base_ids = save_word_tokenizer(base, ["<unk>", *words])
    tuned_ids = save_word_tokenizer(tuned, ["<unk>", *reversed(words), *[f"x{i}" for i in range(10)]])
    return base, tuned, base_ids, tuned_ids


def test_rows_are_matched_by_token_not_by_id(two_tokenizers, tmp_path):
    base, tuned, base_ids, tuned_ids = two_tokenizers
    result = run_surgery("merge", base, tuned, "--method", "task_arithmetic", "--lambda", "0.5", "--dtype", "float32",
                         "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged, b, t = read_numpy(tmp_path / "out"), read_numpy(base), read_numpy(tuned)
    for name in VOCAB_TENSORS:
        assert merged[name].shape == b[name].shape
        for token, row in base_ids.items():
            expected = b[name][row] + 0.5 * (t[name][tuned_ids[token]] - b[name][row])
            np.testing.assert_allclose(merged[name][row], expected, rtol=1e-6, atol=1e-7, err_msg=f"{name} {token}")
        padding = slice(len(base_ids), None)  # past the last token: matched by id
        np.testing.assert_allclose(merged[name][padding], b[name][padding] + 0.5 * (t[name][padding] -
                                   b[name][padding]), rtol=1e-6, atol=1e-7)
    # the base's tokenizer goes with the output
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"] == base_ids


def test_union_vocabulary_adds_the_other_models_tokens(two_tokenizers, tmp_path):
    base, tuned, base_ids, tuned_ids = two_tokenizers
    result = run_surgery("merge", base, tuned, "--method", "ties", "--density", "0.5", "--dtype", "float32",
                         "--tokenizer-source", "union", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    union_ids = tokenizer.get_vocab()
    assert {token: union_ids[token] for token in base_ids} == base_ids  # the base's ids are kept
    new = [f"x{i}" for i in range(10)]
    assert sorted(union_ids[token] for token in new) == list(range(len(base_ids), len(base_ids) + 10))
    assert tokenizer("w5 x3")["input_ids"] == [base_ids["w5"], union_ids["x3"]]
    merged, t = read_numpy(tmp_path / "out"), read_numpy(tuned)
    for name in VOCAB_TENSORS:
        for token in new:  # only the fine-tune knows them: its rows, unchanged (its task vector there is zero)
            np.testing.assert_allclose(merged[name][union_ids[token]], t[name][tuned_ids[token]], rtol=1e-6,
                                       atol=1e-7, err_msg=f"{name} {token}")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().num_embeddings == 160
    assert torch.isfinite(model(torch.tensor([tokenizer("w5 x3")["input_ids"]])).logits).all()


def test_union_beyond_the_embedding_grows_it(tmp_path):
    """When the union has more tokens than the base has rows, the output vocabulary grows to hold them."""
    base, tuned = save_family(tmp_path, "llama", 1)
    save_word_tokenizer(base, ["<unk>", *[f"w{i}" for i in range(150)]])
    tuned_ids = save_word_tokenizer(tuned, ["<unk>", *[f"y{i}" for i in range(20)]])
    result = run_surgery("merge", base, tuned, "--method", "task_arithmetic", "--dtype", "float32",
                         "--tokenizer-source", "union", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 171  # 151 base tokens + 20 new ones
    merged, b, t = read_numpy(tmp_path / "out"), read_numpy(base), read_numpy(tuned)
    embedding = merged["model.embed_tokens.weight"]
    assert embedding.shape[0] == 171
    np.testing.assert_allclose(embedding[151 + 19], t["model.embed_tokens.weight"][tuned_ids["y19"]], rtol=1e-6)
    # "<unk>" is the one token both know: base + its task vector
    expected = t["model.embed_tokens.weight"][0]
    np.testing.assert_allclose(embedding[0], expected, rtol=1e-6, atol=1e-7)
    # w0 is the base's alone: the fine-tune's stand-in is the base's row, so no task vector
    np.testing.assert_allclose(embedding[1], b["model.embed_tokens.weight"][1], rtol=1e-6, atol=1e-7)


# mergekit's Python API, in one subprocess for all configs (importing mergekit takes most of its time)
MERGEKIT_SCRIPT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(config))), out, options=MergeOptions(quiet=True))
"""
WEIGHTS = (0.6, 0.3)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """The report's case: three llama models with 256 embedding rows whose union vocabulary holds 203 tokens, merged
    by mergekit with ``tokenizer_source: union`` (203 rows) and with ``pad_to_multiple_of: 50`` (250 rows).

    base: <unk> <s> </s> w0…w99 (103 tokens); ft1: <unk> <s> </s> w49…w0 v0…v59 and the added special token
    <tool>; ft2: <unk> <s> </s> v40…v98 w0…w9. The union adds v0…v59 (ft1's), v60…v98 (ft2's) and <tool>:
    v40…v59 are the fine-tunes' only (their mean stands in for the base), v60…v98 ft2's only, w10…w99 the
    base's."""
    if not MERGEKIT.exists():
        pytest.fail("mergekit is not installed (make test installs it with the test extra)")
    root = tmp_path_factory.mktemp("reported")
    base, ft1, ft2 = save_family(root, "llama", 2, vocab_size=256)
    specials, w, v = ["<unk>", "<s>", "</s>"], [f"w{i}" for i in range(100)], [f"v{i}" for i in range(100)]
    ids = {"base": save_word_tokenizer(base, specials + w),
           "ft1": save_word_tokenizer(ft1, specials + w[49::-1] + v[:60], special=("<tool>",)),
           "ft2": save_word_tokenizer(ft2, specials + v[40:99] + w[:10])}
    config = {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(base),
              "models": [{"model": str(m), "parameters": {"weight": weight}} for m, weight in zip((ft1, ft2), WEIGHTS)]}
    runs = {"union": {**config, "tokenizer_source": "union"},
            "pad50": {**config, "tokenizer": {"source": "union", "pad_to_multiple_of": 50}}}
    arguments = []
    for name, run in runs.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(run))
        arguments += [str(root / f"{name}.yml"), str(root / f"mergekit-{name}")]
    done = subprocess.run([sys.executable, "-c", MERGEKIT_SCRIPT, *arguments], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"paths": (base, ft1, ft2), "ids": ids, "root": root}


def _merge_union(reported, out: Path, *extra: str):
    base, ft1, ft2 = reported["paths"]
    return run_surgery("merge", base, ft1, ft2, "--method", "task_arithmetic", "--weights",
                       ",".join(map(str, WEIGHTS)), "--dtype", "float32", "--tokenizer-source", "union", *extra,
                       "-o", out)


def _vocab(directory: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory).get_vocab()


def _by_hand(reported, token: str, name: str) -> np.ndarray:
    """Task arithmetic of ``token``'s row by mergekit's stand-in rules: the base's row where the base has the
    token, else the mean of the models that have it."""
    rows = {model: read_numpy(path)[name][reported["ids"][model][token]] for model, path
            in zip(("base", "ft1", "ft2"), reported["paths"]) if token in reported["ids"][model]}
    stand_in = rows.get("base", np.mean(list(rows.values()), axis=0))
    return stand_in + sum(w * (rows.get(m, stand_in) - stand_in) for m, w in zip(("ft1", "ft2"), WEIGHTS))


def test_union_keeps_the_models_rows_where_mergekit_cuts_them(reported, tmp_path):
    """The report: 256 rows here, 203 from mergekit. The same 203 tokens with the same rows; the 53 rows holding no
    token are the models' own (merged by id); the output says so, in the plan and in the merge."""
    base, ft1, ft2 = reported["paths"]
    plan = _merge_union(reported, tmp_path / "plan", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    why = "256 embedding rows for the union vocabulary's 203 tokens"
    assert why in plan.stderr and "mergekit cuts it to 203 rows" in plan.stderr
    result = _merge_union(reported, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert why in result.stderr
    theirs_dir, ours_dir = reported["root"] / "mergekit-union", tmp_path / "out"
    theirs, ours = read_numpy(theirs_dir), read_numpy(ours_dir)
    theirs_ids, our_ids = _vocab(theirs_dir), _vocab(ours_dir)
    assert len(theirs_ids) == 203 and theirs_ids.keys() == our_ids.keys()
    for name in VOCAB_TENSORS:
        assert theirs[name].shape == (203, 64) and ours[name].shape == (256, 64)
    assert json.loads((theirs_dir / "config.json").read_text())["vocab_size"] == 203
    assert json.loads((ours_dir / "config.json").read_text())["vocab_size"] == 256
    # ids: the base's tokens keep theirs in both; then the other models' plain tokens; then the added ones. Here
    # model by model (ft1's, then ft2's), each in its own id order; mergekit takes the models in the order of a set
    # and each one's tokens in get_vocab()'s order, hash orders that change from run to run
    by_id = sorted(our_ids, key=our_ids.get)
    assert by_id == [*reported["ids"]["base"], *[f"v{i}" for i in range(99)], "<tool>"]
    theirs_by_id = sorted(theirs_ids, key=theirs_ids.get)
    for block in (slice(0, 103), slice(103, 202), slice(202, 203)):
        assert set(theirs_by_id[block]) == set(by_id[block]), block
    for name in VOCAB_TENSORS:  # every token: the same row
        mine = ours[name][[our_ids[token] for token in theirs_by_id]]
        np.testing.assert_allclose(mine, theirs[name], rtol=0, atol=1e-6, err_msg=name)
        for token in ("w5", "w70", "v10", "v50", "v80", "<tool>"):  # and each stand-in rule, by hand
            np.testing.assert_allclose(ours[name][our_ids[token]], _by_hand(reported, token, name), rtol=1e-6,
                                       atol=1e-6, err_msg=f"{name} {token}")
        # rows 203…255 hold no token: each model's rows there, merged by id
        b, m1, m2 = (read_numpy(path)[name][203:] for path in (base, ft1, ft2))
        np.testing.assert_allclose(ours[name][203:], b + WEIGHTS[0] * (m1 - b) + WEIGHTS[1] * (m2 - b), rtol=0,
                                   atol=1e-6)
    for name in theirs.keys() - set(VOCAB_TENSORS):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(ours_dir)("w5 v50 <tool>")["input_ids"] == [8, 103 + 50, 202]


@pytest.mark.parametrize("multiple,rows,run", [(1, 203, "union"), (50, 250, "pad50")])
def test_pad_to_multiple_of_sizes_the_embedding_as_mergekit(reported, tmp_path, multiple, rows, run):
    """pad_to_multiple_of N: the tokenizer's 203 tokens rounded up to a multiple of N (1: 203 rows; 50: 250, fewer
    than the models' 256), rows past the last token the mean of the token rows — mergekit's output, row for row
    once its token order is put in ours."""
    result = _merge_union(reported, tmp_path / "out", "--pad-to-multiple-of", str(multiple))
    assert result.returncode == 0, result.stderr
    theirs_dir, ours_dir = reported["root"] / f"mergekit-{run}", tmp_path / "out"
    theirs, ours = read_numpy(theirs_dir), read_numpy(ours_dir)
    theirs_ids, our_ids = _vocab(theirs_dir), _vocab(ours_dir)
    assert theirs_ids.keys() == our_ids.keys() and len(our_ids) == 203
    assert json.loads((ours_dir / "config.json").read_text())["vocab_size"] == rows
    order = [our_ids[token] for token in sorted(theirs_ids, key=theirs_ids.get)] + list(range(203, rows))
    for name in VOCAB_TENSORS:
        assert ours[name].shape == theirs[name].shape == (rows, 64)
        np.testing.assert_allclose(ours[name][order], theirs[name], rtol=0, atol=1e-6, err_msg=name)
        # task arithmetic is linear: each model's mean token row, merged, is the merged rows' mean
        np.testing.assert_allclose(ours[name][203:], np.broadcast_to(ours[name][:203].mean(axis=0),
                                   (rows - 203, 64)), rtol=0, atol=1e-6, err_msg=name)
    for name in theirs.keys() - set(VOCAB_TENSORS):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)


def _sources(paths: list[Path]) -> list:
    from surgery.merge.vocab import TOKENIZER_FILES, VocabularySource

    return [VocabularySource(str(path), {f.name: f.read_bytes() for f in path.iterdir() if f.name in TOKENIZER_FILES},
                             256) for path in paths]


@pytest.mark.parametrize("multiple,rows", [(None, 256), (1, 203), (7, 203), (50, 250), (64, 256), (300, 300)])
def test_plan_rows_for_pad_to_multiple_of(reported, multiple, rows):
    from surgery.merge.vocab import PADDING, plan_vocabulary

    base, ft1, ft2 = reported["paths"]
    plan = plan_vocabulary(_sources([base, ft1, ft2]), "union", str(base), pad_to_multiple_of=multiple)
    assert (plan.rows, plan.tokens) == (rows, 203)
    assert plan.note.startswith(f"{rows} embedding rows")
    for index in plan.index.values():
        assert index.shape == (rows,)
        assert ((index == PADDING).nonzero().flatten().tolist() == list(range(203, rows))) == (multiple is not None)
        assert (index[:203] != PADDING).all()


def test_pad_to_multiple_of_with_one_tokenizer(reported):
    """One shared tokenizer: by default the rows stay as they are (by id); with pad_to_multiple_of they are sized
    from its 103 tokens, as mergekit sizes any merge given a tokenizer setting."""
    from surgery.errors import BadInput
    from surgery.merge.vocab import PADDING, plan_vocabulary

    base = reported["paths"][0]
    sources = _sources([base, base])
    sources[1].name = "copy"
    assert plan_vocabulary(sources, "base", str(base)).index == {str(base): None, "copy": None}
    plan = plan_vocabulary(sources, "base", str(base), pad_to_multiple_of=64)
    assert (plan.rows, plan.tokens, plan.tokenizer_files) == (128, 103, {})
    assert plan.index["copy"].tolist() == list(range(103)) + [PADDING] * 25
    tensors = [torch.randn(256, 4), torch.randn(256, 4)]
    for tensor, out in zip(tensors, vocab_align(tensors, plan)):
        torch.testing.assert_close(out[:103], tensor[:103])
        torch.testing.assert_close(out[103:], tensor[:103].mean(dim=0).expand(25, 4))
    for bad in (0, -64, 2.5, True):
        with pytest.raises(BadInput, match="pad_to_multiple_of"):
            plan_vocabulary(sources, "base", str(base), pad_to_multiple_of=bad)


def vocab_align(tensors, plan):
    from surgery.merge.vocab import align_rows

    return align_rows(tensors, list(plan.index.values()), plan.rows, base_position=0)


def test_dry_run_and_check_see_rows_matched_by_token(two_tokenizers, tmp_path):
    """--dry-run's embedding task vector is the one the merge uses (rows matched by token, padding by id), and
    --check compares only the parent whose vocabulary is the output's."""
    base, tuned, base_ids, tuned_ids = two_tokenizers
    arguments = ["merge", base, tuned, "--method", "task_arithmetic", "--dtype", "float32", "-o", tmp_path / "out"]
    plan = json.loads(run_surgery(*arguments, "--dry-run", "--json").stdout)["diagnostics"]
    b, t = read_numpy(base), read_numpy(tuned)
    for name in VOCAB_TENSORS:
        aligned = t[name].copy()
        for token, row in base_ids.items():
            aligned[row] = t[name][tuned_ids[token]]
        group = next(layer for layer in plan["layers"] if layer["group"] == name.rsplit(".", 1)[0])
        expected = np.linalg.norm(aligned - b[name]) / np.linalg.norm(b[name])
        assert group["relative_norm"][tuned.name] == pytest.approx(expected, rel=1e-6)
    checked = run_surgery(*arguments, "--check", "--json")  # this tokenizer has no BOS or EOS to sample from
    assert checked.returncode == 0, checked.stderr
    assert "no BOS or EOS token" in json.loads(checked.stdout)["check"]["probe"]["skipped"]
    for model in (base, tuned):  # with a BOS token the base's probe runs; the fine-tune's ids mean other words
        shutil.copytree(model, tmp_path / model.name)
        settings = json.loads((tmp_path / model.name / "tokenizer_config.json").read_text())
        (tmp_path / model.name / "tokenizer_config.json").write_text(json.dumps({**settings, "bos_token": "w0"}))
    checked = run_surgery("merge", tmp_path / base.name, tmp_path / tuned.name, "--method", "task_arithmetic",
                          "-o", tmp_path / "checked", "--check", "--json")
    assert checked.returncode == 0, checked.stderr
    rows = {row["model"]: row for row in json.loads(checked.stdout)["check"]["parents"]}
    assert "kl" in rows[base.name] and rows[tuned.name]["skipped"].startswith("another vocabulary")
