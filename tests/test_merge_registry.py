"""Merge methods own their parameters: a method with a brand-new parameter is one file, and the recipe, the
``surgery merge`` flags, the pipeline's ``MergeJob`` and the sweep grid all accept the parameter from its declaration."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from merge_helpers import read_numpy, save_family

from surgery.errors import BadInput

PLUGIN = textwrap.dedent('''
    """One file: a parameter of its own and the method that takes it."""
    import torch

    from surgery.merge.params import WEIGHT, Parameter
    from surgery.merge.registry import TensorMerge, register

    BETA = Parameter("beta", float, 0.5, "beta_blend: share of the change kept (0.5).", low=0, high=1)


    @register("beta_blend", uses_base=True, parameters=[WEIGHT, BETA])
    def beta_blend(x: TensorMerge) -> torch.Tensor:
        """θ0 + β Σ wi (θi − θ0)."""
        x = x.as_float32()
        return x.base + x.value("beta") * sum(w * (m - x.base) for w, m in zip(x.per_model("weight"), x.models))
''')


@pytest.fixture
def plugin(tmp_path):
    """The plugin file, imported here (its registrations undone afterwards); returns its directory."""
    from surgery.merge.registry import DECLARATIONS, METHODS, PARAMETERS

    (tmp_path / "beta_plugin.py").write_text(PLUGIN)
    methods, parameters = dict(METHODS), dict(PARAMETERS)
    declarations = {name: list(same_name) for name, same_name in DECLARATIONS.items()}
    spec = importlib.util.spec_from_file_location("beta_plugin", tmp_path / "beta_plugin.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    try:
        yield tmp_path
    finally:
        METHODS.clear(), METHODS.update(methods)
        PARAMETERS.clear(), PARAMETERS.update(parameters)
        DECLARATIONS.clear(), DECLARATIONS.update(declarations)


def _surgery_with_plugin(directory, *args):
    """The real command line in a fresh process that imported the plugin first."""
    code = (f"import sys; sys.path.insert(0, {str(directory)!r}); import beta_plugin; "
            "from surgery.cli import invoke; sys.exit(invoke(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_new_parameter_reaches_recipe_flags_job_and_grid(plugin, tmp_path):
    from surgery.cli.merge import merge_signature
    from surgery.merge import MergeJob, ModelEntry, Recipe
    from surgery.sweep import parse_grid, with_setting

    recipe = Recipe("beta_blend", [ModelEntry("a"), ModelEntry("b")], parameters={"beta": [0.1, 0.9]})
    assert MergeJob(recipe, tmp_path / "out").recipe.parameters == {"beta": [0.1, 0.9]}
    with pytest.raises(BadInput, match=r"parameter beta 1\.5 \(global\): must be in \[0, 1\]"):
        MergeJob(Recipe("beta_blend", recipe.models, parameters={"beta": 1.5}), tmp_path / "out")
    with pytest.raises(BadInput, match="parameter 'beta' \\(global\\) does not apply to method 'ties'"):
        MergeJob(Recipe("ties", recipe.models, parameters={"beta": 0.2}), tmp_path / "out")
    job = MergeJob.from_options(["a", "b"], method="beta_blend", beta=0.25, output=tmp_path / "out")
    assert job.recipe.parameters == {"beta": 0.25} and job.recipe.base is None

    option = merge_signature().parameters["beta_"].default
    assert option.param_decls == ("--beta",) and option.help.startswith("beta_blend:")

    assert parse_grid("beta=0:1:0.5,lambda=1") == {"beta": [0.0, 0.5, 1.0], "lambda": [1.0]}
    assert with_setting(Recipe("beta_blend", recipe.models), {"beta": 0.5}).parameters == {"beta": 0.5}
    with pytest.raises(BadInput, match="parameter beta 1.5"):
        with_setting(Recipe("beta_blend", recipe.models), {"beta": 1.5})


def test_new_method_merges_from_its_flag_and_from_a_recipe(plugin, tmp_path):
    base, ft1, ft2 = save_family(tmp_path / "family", "llama", 2)
    flagged = _surgery_with_plugin(plugin, "merge", base, ft1, ft2, "--method", "beta_blend", "--beta", "0.25",
                                   "--weights", "1,0.5", "-o", tmp_path / "flag")
    assert flagged.returncode == 0, flagged.stderr
    inputs = [read_numpy(path) for path in (base, ft1, ft2)]
    merged = read_numpy(tmp_path / "flag")
    for name, value in merged.items():
        theta0, theta1, theta2 = (tensors[name] for tensors in inputs)
        np.testing.assert_allclose(value, theta0 + 0.25 * ((theta1 - theta0) + 0.5 * (theta2 - theta0)), atol=1e-6)

    recipe = tmp_path / "beta.yaml"
    recipe.write_text(yaml.safe_dump({"method": "beta_blend", "models": [str(base), {"model": str(ft1)},
                                      {"model": str(ft2), "parameters": {"weight": 0.5}}],
                                      "parameters": {"beta": 0.25}}))
    from_recipe = _surgery_with_plugin(plugin, "merge", "--recipe", recipe, "-o", tmp_path / "recipe")
    assert from_recipe.returncode == 0, from_recipe.stderr
    assert (tmp_path / "recipe" / "model.safetensors").read_bytes() == \
        (tmp_path / "flag" / "model.safetensors").read_bytes()

    refused = _surgery_with_plugin(plugin, "merge", base, ft1, "--method", "beta_blend", "--beta", "2",
                                   "-o", tmp_path / "bad")
    assert refused.returncode == 2 and "parameter beta 2.0 (global): must be in [0, 1]" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_declarations_drive_flags_and_grid():
    """The shared declarations give the flags merge has always had, and the grid reads values by their type."""
    from surgery.cli.merge import merge_signature
    from surgery.merge import PARAMETERS
    from surgery.sweep import parse_grid

    flags = {name: option.default.param_decls for name, option in merge_signature().parameters.items()
             if name.endswith("_")}
    shared = {"lambda_": ("--lambda",), "alpha_": ("--alpha",), "density_": ("--density",), "t_": ("--t",),
              "gamma_": ("--gamma",), "epsilon_": ("--epsilon",), "normalize_": ("--normalize/--no-normalize",),
              "eta_": ("--eta",), "rank_": ("--rank",), "mu_": ("--mu",)}
    assert {name: flags[name] for name in shared} == shared
    assert flags["nuslerp_flatten_"] == ("--nuslerp-flatten/--no-nuslerp-flatten",)
    assert flags["max_iter_"] == ("--max-iter",) and flags["select_topk_"] == ("--select-topk",)
    assert {name for name, p in PARAMETERS.items() if p.per_model} == {"weight", "density", "gamma", "epsilon"}
    assert parse_grid("rank=8,16,normalize=true,false,alpha=0.5") == {
        "rank": [8, 16], "normalize": [True, False], "alpha": [0.5]}
    for bad in ("normalize=1", "rank=x", "nonsense=1"):
        with pytest.raises(BadInput):
            parse_grid(bad)


def test_merge_job_checks_options_once_for_every_caller(tmp_path):
    """The CLI's messages from the library constructor (what the pipeline's merge step calls)."""
    from surgery.merge import MergeJob

    pair = ["a", "b"]
    cases = [
        ([], {}, "no models given"),
        (pair, {}, "--method is required without --recipe"),
        (pair, {"method": "ties", "weights": "1,2"}, "--weights: 2 value(s) for 1 non-base model(s)"),
        (pair, {"method": "ties", "weights": "x"}, "--weights 'x': expected comma-separated numbers"),
        (pair, {"method": "ties", "omega": 0.3}, "--omega: applies only with --aim"),
        (pair, {"method": "ties", "executor": "k8s"}, "--executor 'k8s'"),
        (pair, {"method": "ties", "ray_address": "h:1"}, "--ray-address: applies only with --executor ray"),
        (pair, {"method": "ties", "density": 0}, "parameter density 0 (global): must be in (0, 1]"),
        (pair, {"method": "ties", "lambda": 1, "alpha": 2}, "given twice"),
        (pair, {"method": "ties", "nonsense": 1}, "'nonsense': not an option of merge"),
        (pair, {"method": "nope"}, "--method 'nope': unknown merge method"),
    ]
    for models, options, message in cases:
        with pytest.raises(BadInput, match=re.escape(message)):
            MergeJob.from_options(models, output=tmp_path / "out", **options)
    job = MergeJob.from_options(["a", "b", "c"], method="ties", weights=[1, 0.5], alpha=0.8, density=0.2,
                                output=tmp_path / "out")
    assert job.recipe.parameters == {"lambda": 0.8, "density": 0.2}
    assert [entry.parameters for entry in job.recipe.models] == [{}, {"weight": 1.0}, {"weight": 0.5}]


def test_one_name_means_what_the_method_declares():
    """mergekit reuses names: epsilon is della's per-model spread and ram's global threshold, t slerp's position and
    nearswap's (required) distance, alpha lambda's other name and ramplus_tl's cap. Each method gets its own."""
    from surgery.merge import build_recipe, get_method
    from surgery.merge.job import check_parameters
    from surgery.merge.registry import aliases

    assert build_recipe(["b", "a"], method="ties", alpha=0.5).parameters == {"lambda": 0.5}
    assert build_recipe(["b", "a", "c"], method="ramplus_tl", alpha=0.5).parameters == {"alpha": 0.5}
    assert aliases(get_method("ramplus_tl"))["alpha"] == "alpha" and aliases(get_method("ties"))["alpha"] == "lambda"
    with pytest.raises(BadInput, match="parameter 'lambda' .* does not apply to method 'ramplus_tl'"):
        check_parameters(build_recipe(["b", "a", "c"], method="ramplus_tl", parameters={"lambda": 0.5}))
    della = {p.name: p for p in get_method("della").parameters}["epsilon"]
    ram = {p.name: p for p in get_method("ram").parameters}["epsilon"]
    assert (della.per_model, della.default, ram.per_model, ram.default) == (True, 0.15, False, 1e-5)
    assert get_method("ram").function.__name__ == "ram"
    with pytest.raises(BadInput, match="method 'nearswap' needs parameter 't'"):
        check_parameters(build_recipe(["b", "a"], method="nearswap"))
    check_parameters(build_recipe(["b", "a"], method="nearswap", t=0.01))
    with pytest.raises(BadInput, match=r"parameter t 2 \(global\): must be in \(0, 1\]"):
        check_parameters(build_recipe(["b", "a"], method="nearswap", t=2))


def test_registered_methods_fill_their_own_defaults():
    """Called directly, a method takes its declared defaults: ram's epsilon is 1e-5, not della's 0.15."""
    import torch

    from surgery.merge import TensorMerge, get_method

    base = torch.zeros(4)
    a, b = torch.tensor([0.1, 1e-6, 0.0, 0.3]), torch.tensor([0.3, 0.0, 2e-5, 0.0])
    merged = get_method("ram").function(TensorMerge("w", base, [a, b]))
    # entry 0: both changed → mean; 1: |1e-6| is no change; 2: only b changed (2e-5 > 1e-5); 3: only a
    torch.testing.assert_close(merged, torch.tensor([0.2, 0.0, 2e-5, 0.3]))
