"""``steered-hf`` model arguments: strict, named in every message, and parsed the same through the
``lm_eval`` CLI (``handle_cli_value_string``) and the Python API (``handle_arg_string``)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_eval._cli.utils import key_val_to_dict
from lm_eval.utils import simple_parse_args_string

from lm_eval_steer.runtime import model as model_module
from lm_eval_steer.runtime.model import HFLM_ARGS, SteeredHFLM
from lm_eval_steer.runtime.modelargs import STEERING_ARGS, ModelArgError, SteeringArgs, check_near_misses, edit_distance, near_miss, parse_steering_args
from lm_eval_steer.runtime.reuse import ReuseError
from lm_eval_steer.runtime.routing import Overrides
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, VectorFileError, save_vector_file

DEFAULTS = {"vectors": None, "layer": None, "scale": 1.0, "mode": None, "positions": None, "route": "auto", "skip_first_token": True, "stop_rules": True}


def parsed(path: str, text: str) -> SteeringArgs:
    """``text`` (``k=v,...``) typed by the CLI's or the API's parser, then parsed by steered-hf."""
    typed = key_val_to_dict(text) if path == "cli" else simple_parse_args_string(text)
    return parse_steering_args(**{**DEFAULTS, **typed})


GOOD = [
    ("route=none", lambda a: a.route == "none"),
    ("route=all", lambda a: a.route == "all"),
    ("route=auto", lambda a: a.route == "auto"),
    ("layer=3", lambda a: a.overrides.layer == 3),
    ("layer=-1", lambda a: a.overrides.layer == -1),
    ("scale=0", lambda a: a.overrides.scale == 0.0),
    ("scale=-2.5", lambda a: a.overrides.scale == -2.5),
    ("scale=1e3", lambda a: a.overrides.scale == 1000.0),
    ("mode=project", lambda a: a.overrides.mode == "project"),
    ("mode=ablate", lambda a: a.overrides.mode == "ablate"),
    ("positions=generated", lambda a: a.overrides.positions == "generated"),
    ("stop_rules=off", lambda a: a.overrides.stop_rules is False and a.overrides.given() == {"stop_rules": False}),
    ("stop_rules=ON", lambda a: a.overrides.stop_rules is True and a.overrides.given() == {}),
    ("stop_rules=false", lambda a: a.overrides.stop_rules is False),
    *[(f"skip_first_token={word}", lambda a, v=value: a.skip_first_token is v) for word, value in
      [("true", True), ("True", True), ("1", True), ("yes", True), ("false", False), ("FALSE", False), ("0", False), ("no", False)]],
    ("vectors=a.safetensors+b.safetensors", lambda a: a.vector_paths == ("a.safetensors", "b.safetensors")),
]

BAD = [
    ("scale=abc", "steered-hf: scale='abc' is not a number"),
    ("scale=nan", "scale=nan is not a finite number"),
    ("scale=inf", "scale=inf is not a finite number"),
    ("scale=-inf", "scale=-inf is not a finite number"),
    ("scale=1e39", "is not a finite number"),
    ("scale=true", "scale=True is not a number"),
    ("layer=1.5", "steered-hf: layer=1.5 is not an integer"),
    ("layer=true", "steered-hf: layer=True is not an integer"),
    ("layer=abc", "layer='abc' is not an integer"),
    ("layer=" + "9" * 400, "is out of range"),
    ("layer=1e300", "is out of range"),
    ("skip_first_token=maybe", "skip_first_token='maybe' is not a boolean"),
    ("skip_first_token=2", "skip_first_token=2 is not a boolean"),
    ("stop_rules=sometimes", "stop_rules='sometimes' is not a boolean"),
    ("vectors=123", "steered-hf: vectors=123 is not a vector file path"),
    ("vectors=1.5", "vectors=1.5 is not a vector file path"),
    ("vectors=true", "vectors=True is not a vector file path"),
    ("vectors=a.safetensors+", "has an empty path"),
    ("vectors=a++b", "has an empty path"),
    ("route=sometimes", "route='sometimes' is not one of auto, all, none"),
    ("mode=multiply", "mode='multiply' is not one of add, project, ablate"),
    ("positions=first", "positions='first' is not one of all, prompt, generated"),
    ("mode=1", "mode=1 is not one of"),
]


@pytest.mark.parametrize("path", ["cli", "api"])
@pytest.mark.parametrize(("text", "holds"), GOOD, ids=[text for text, _ in GOOD])
def test_good_values_mean_the_same_through_the_cli_and_the_api(path, text, holds):
    assert holds(parsed(path, text))


@pytest.mark.parametrize("path", ["cli", "api"])
@pytest.mark.parametrize(("text", "message"), BAD, ids=[text for text, _ in BAD])
def test_bad_values_are_refused_by_name_through_the_cli_and_the_api(path, text, message):
    with pytest.raises(ModelArgError, match=None) as error:
        parsed(path, text)
    assert message in str(error.value)
    assert str(error.value).startswith("steered-hf: ") and len(str(error.value)) < 300


@pytest.mark.parametrize("text", ["route=none", "route=None", "mode=none", "positions=None", "layer=none", "vectors=none"])
def test_none_means_the_same_through_both_paths(text):
    cli, api = parsed("cli", text), parsed("api", text)
    assert cli == api
    assert api.route == ("none" if text.startswith("route") else "auto")
    assert api.vector_paths == () and api.overrides == Overrides()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters=",=\x00"), max_size=30))
def test_any_text_value_gives_the_same_answer_or_error_through_both_paths(value):
    """Whatever a user types as ``scale``, ``layer`` or ``skip_first_token``: both paths agree, and
    a refusal is a ModelArgError naming the argument (never another exception)."""
    for name in ("scale", "layer", "skip_first_token"):
        outcomes = []
        for path in ("cli", "api"):
            try:
                outcomes.append(getattr(parsed(path, f"{name}={value}"), "overrides" if name != "skip_first_token" else "skip_first_token"))
            except ModelArgError as error:
                assert f"steered-hf: {name}=" in str(error)
                outcomes.append("refused")
            except ValueError:  # the harness's own parser refused the text before steered-hf saw it
                outcomes.append("harness")
        # The CLI's parser reads a value as a Python literal: quotes, brackets and a '#' (a comment:
        # `scale=0#` arrives as 0) change the text before steered-hf sees it, so only the rest must agree.
        rewritten_by_cli = value.startswith(("'", '"', "[", "(", "{")) or "#" in value
        if "harness" not in outcomes and value.strip() == value and not rewritten_by_cli:
            assert outcomes[0] == outcomes[1], (name, value, outcomes)
        for outcome in outcomes:
            if isinstance(outcome, Overrides):
                assert math.isfinite(outcome.scale)
                assert outcome.layer is None or isinstance(outcome.layer, int)


def test_plus_in_an_existing_file_name_is_one_path(tmp_path):
    path = tmp_path / "fmt+len.safetensors"
    path.write_bytes(b"")
    assert parse_steering_args(**{**DEFAULTS, "vectors": str(path)}).vector_paths == (str(path),)
    with pytest.warns(UserWarning, match="twice"):
        assert parse_steering_args(**{**DEFAULTS, "vectors": f"{path}+{path}"}).vector_paths == (str(path), str(path))


def test_the_same_file_twice_warns(tmp_path):
    path = str(tmp_path / "v.safetensors")
    with pytest.warns(UserWarning, match="twice"):
        parse_steering_args(**{**DEFAULTS, "vectors": f"{path}+{path}"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_steering_args(**{**DEFAULTS, "vectors": path})


@pytest.fixture(scope="module")
def small_vectors(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("args") / "v.safetensors"
    save_vector_file(path, [SteeringEntry("v", torch.ones(64), 1, "add", 1.0)], model="tiny-llama", hidden_size=64, num_layers=4)
    return str(path)


@pytest.mark.parametrize(
    "extra",
    ["route=none", "route=None", "layer=2", "scale=0.5", "mode=project", "positions=prompt", "skip_first_token=no", "skip_first_token=false"],
)
def test_every_argument_through_create_from_arg_string_like_simple_evaluate(tiny_model_dir, small_vectors, extra):
    """``simple_evaluate(model="steered-hf", model_args="...")`` builds the model with this call."""
    lm = SteeredHFLM.create_from_arg_string(f"pretrained={tiny_model_dir},vectors={small_vectors},{extra}", {"batch_size": 1, "device": "cpu"})
    name, value = extra.split("=")
    recorded = lm.steering_config()
    if name == "route":
        assert recorded["route"] == "none"
    elif name == "skip_first_token":
        assert recorded["skip_first_token"] is False
    else:
        assert str(recorded["overrides"][name]) == str(float(value) if name == "scale" else int(value) if name == "layer" else value)


def test_layer_override_out_of_range_and_project_on_a_zero_add_vector(tiny_model_dir, tmp_path):
    zero = tmp_path / "zero.safetensors"
    save_vector_file(zero, [SteeringEntry("z", torch.zeros(64), 1, "add", 1.0)], model="tiny-llama", hidden_size=64, num_layers=4)
    with pytest.raises(ModelArgError, match="steered-hf: layer=4 is out of range for a 4-layer model"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(zero), layer=4, device="cpu")
    with pytest.raises(VectorFileError, match="zero vector has no direction.*'project'"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(zero), mode="project", device="cpu")


def test_positions_prompt_on_a_delayed_start_entry_is_refused_since_it_would_steer_nothing(tiny_model_dir, tmp_path):
    delayed = tmp_path / "delayed.safetensors"
    entry = SteeringEntry("late", torch.ones(64), 1, "add", 1.0, positions="generated", start_after_tokens=8)
    save_vector_file(delayed, [entry], model="tiny-llama", hidden_size=64, num_layers=4)
    with pytest.raises(VectorFileError, match=r"delayed.safetensors: entry 'late': positions=prompt would steer nothing.*after 8 answer tokens"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(delayed), positions="prompt", device="cpu")
    for positions in ("all", "generated"):  # the answer window lies in these
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(delayed), positions=positions, device="cpu")


def test_a_layer_override_on_a_jointly_trained_set_is_warned_about(tiny_model_dir, tmp_path, caplog):
    lower = AppliesTo("change_case:english_lowercase")
    entries = [SteeringEntry(name, torch.ones(64), layer, "add", 1.0, "all", lower) for name, layer in (("lower", 1), ("lower@L3", 3))]
    save_vector_file(tmp_path / "set.safetensors", [*entries, SteeringEntry("other", torch.ones(64), 2, "add", 1.0)], model="tiny-llama", hidden_size=64, num_layers=4)
    with caplog.at_level("WARNING", logger=model_module.__name__):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(tmp_path / "set.safetensors"), layer=2, device="cpu")
    (warning,) = [record.getMessage() for record in caplog.records if "layer=2" in record.getMessage()]
    assert "sets trained jointly at several layers: 'lower' (layers 1, 3)" in warning and "other" not in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger=model_module.__name__):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(tmp_path / "set.safetensors"), device="cpu")  # no override: nothing to say
    assert not [record for record in caplog.records if "trained jointly" in record.getMessage()]

def test_vector_files_are_checked_before_the_weights_load(tmp_path):
    """A bad vector file or argument is reported even when the model could never load."""
    with pytest.raises(VectorFileError, match="no such file"):
        SteeredHFLM(pretrained="org/model-that-does-not-exist", vectors=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelArgError, match="scale"):
        SteeredHFLM(pretrained="org/model-that-does-not-exist", scale="abc")
    with pytest.raises(ModelArgError, match="pretrained='/no/such/dir': no such model directory"):
        SteeredHFLM(pretrained="/no/such/dir")


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("scale=abc", "steered-hf: scale='abc' is not a number"),
        ("vectors=/no/such.safetensors", "/no/such.safetensors: no such file"),
        ("vector=/no/such.safetensors", "steered-hf: unknown argument 'vector': did you mean vectors=?"),
        ("stop_after=false", "steered-hf: stop_after= is now called stop_rules= (on|off)"),
        ("unsteered_from=/no/such/run", "unsteered_from=/no/such/run: /no/such/run: no such file or directory"),
    ],
)
@pytest.mark.parametrize("program", ["lm_eval", "lm_eval_steer"])
def test_plain_lm_eval_prints_one_line_and_exits_2(tmp_path, program, model_args, message):
    """The start-up hook's excepthook (plain ``lm_eval``) and ``python -m lm_eval_steer``: one line, exit 2."""
    command = [sys.executable, "-m", program, "--model", "steered-hf", "--model_args", f"pretrained=org/none,{model_args}", "--tasks", "ifeval_format", "--limit", "1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- near misses


@pytest.mark.parametrize(
    ("name", "meant"),
    [("vector", "vectors"), ("Vectors", "vectors"), ("layers", "layer"), ("lyaer", "layer"), ("stop-rules", "stop_rules"), ("skip_first_tokens", "skip_first_token"),
     ("unsteered-from", "unsteered_from"), ("position", "positions"), ("scales", "scale"), ("routes", "route"), ("model", "mode")],
)
def test_a_near_miss_of_a_steering_argument_is_refused_naming_the_right_spelling(tiny_model_dir, monkeypatch, name, meant):
    monkeypatch.setattr(model_module.HFLM, "__init__", lambda *a, **k: pytest.fail("the weights loaded before the arguments were checked"))
    with pytest.raises(ModelArgError) as error:
        SteeredHFLM(pretrained=str(tiny_model_dir), **{name: "x"})
    assert str(error.value) == f"steered-hf: unknown argument {name!r}: did you mean {meant}=?"


@pytest.mark.parametrize("value", ["false", "true", "x"])
def test_the_old_spelling_of_a_renamed_argument_is_refused_naming_the_new_one(tiny_model_dir, monkeypatch, value):
    monkeypatch.setattr(model_module.HFLM, "__init__", lambda *a, **k: pytest.fail("the weights loaded before the arguments were checked"))
    with pytest.raises(ModelArgError) as error:
        SteeredHFLM(pretrained=str(tiny_model_dir), stop_after=value)
    assert str(error.value) == "steered-hf: stop_after= is now called stop_rules= (on|off)"


def passed_on(pretrained: str, monkeypatch, **given) -> dict:
    """The model args that reach ``HFLM.__init__`` (stubbed: nothing loads)."""
    passed: dict = {}
    monkeypatch.setattr(model_module.HFLM, "__init__", lambda self, **kwargs: passed.update(kwargs))
    with pytest.raises(AttributeError):  # after HFLM.__init__: the stub loaded no model
        SteeredHFLM(pretrained=pretrained, **given)
    return {name: passed[name] for name in given}


def test_arguments_for_hflm_and_from_pretrained_go_on(tiny_model_dir, monkeypatch):
    given = {"dtype": "float32", "revision": "main", "trust_remote_code": False, "max_length": 64, "device_map": "cpu", "attn_implementation": "eager", "n_layer": 2, "use_cache": True}
    assert passed_on(str(tiny_model_dir), monkeypatch, **given) == given


def test_a_config_attribute_near_a_steering_name_goes_on_for_that_model_only(tiny_model_dir, monkeypatch):
    """GPT-2's ``n_positions`` (two edits from ``positions``) overrides its config; Llama has none."""
    from transformers import GPT2Config

    with pytest.raises(ModelArgError, match="did you mean positions="):
        SteeredHFLM(pretrained=str(tiny_model_dir), n_positions=128)
    monkeypatch.setattr(model_module, "config_before_loading", lambda *args: GPT2Config(n_embd=64, n_layer=4))
    assert passed_on(str(tiny_model_dir), monkeypatch, n_positions=128) == {"n_positions": 128}


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(HFLM_ARGS)))
def test_hflm_parameter_names_are_never_refused(name):
    check_near_misses([name], HFLM_ARGS)


def _one_edit(name: str, position: int, letter: str, kind: int) -> str:
    """``name`` with one insertion, deletion, replacement or swap of neighbours at ``position``."""
    position %= len(name)
    if kind == 0:
        return name[:position] + letter + name[position:]
    if kind == 1:
        return name[:position] + name[position + 1 :]
    if kind == 2:
        return name[:position] + letter + name[position + 1 :]
    position = min(position, len(name) - 2)
    return name[:position] + name[position + 1] + name[position] + name[position + 2 :]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(STEERING_ARGS), st.integers(0, 20), st.sampled_from("abcdefghijklmnopqrstuvwxyz_-"), st.integers(0, 3))
def test_one_edit_of_a_steering_argument_is_refused_with_a_close_suggestion(name, position, letter, kind):
    typo = _one_edit(name, position, letter, kind)
    if typo in STEERING_ARGS or typo in HFLM_ARGS:
        return
    with pytest.raises(ModelArgError, match=r"^steered-hf: unknown argument .*: did you mean (\w+)=\?$") as error:
        check_near_misses([typo], HFLM_ARGS)
    meant = str(error.value).rsplit("did you mean ", 1)[1].removesuffix("=?")
    assert edit_distance(typo.lower().replace("-", "_"), meant) <= 1


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=24))
def test_names_far_from_every_steering_argument_are_passed_on(name):
    normal = name.lower().replace("-", "_")
    if min(edit_distance(normal, known) for known in STEERING_ARGS) > 2:
        check_near_misses([name], HFLM_ARGS)
        assert near_miss(name) is None


# --------------------------------------------------------------------------- checked before the weights load


@pytest.fixture
def no_weights(monkeypatch) -> None:
    """Fails the test if HFLM starts loading the model."""
    monkeypatch.setattr(model_module.HFLM, "__init__", lambda *a, **k: pytest.fail("the weights loaded before the check"))


def test_layer_and_vector_shape_are_checked_against_the_config_before_the_weights_load(tiny_model_dir, small_vectors, tmp_path, no_weights):
    with pytest.raises(ModelArgError, match="steered-hf: layer=4 is out of range for a 4-layer model"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=small_vectors, layer=4)
    narrow = tmp_path / "narrow.safetensors"
    save_vector_file(narrow, [SteeringEntry("v", torch.ones(32), 1, "add", 1.0)], model="other", hidden_size=32, num_layers=4)
    with pytest.raises(VectorFileError, match="built for hidden_size 32, but the model has hidden_size 64"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(narrow))
    deep = tmp_path / "deep.safetensors"
    save_vector_file(deep, [SteeringEntry("v", torch.ones(64), 1, "add", 1.0)], model="other", hidden_size=64, num_layers=8)
    with pytest.raises(VectorFileError, match="built for 8 layers, but the model has 4 layers"):
        SteeredHFLM(pretrained=str(tiny_model_dir), vectors=str(deep))
    with pytest.raises(ReuseError, match=r"unsteered_from=.*missing: .*missing: no such file or directory"):
        SteeredHFLM(pretrained=str(tiny_model_dir), unsteered_from=str(tmp_path / "missing"))


def test_a_config_unreadable_before_loading_leaves_the_checks_to_the_loaded_model(tiny_model_dir, monkeypatch):
    from transformers import AutoConfig

    original = AutoConfig.from_pretrained
    calls = []

    def unreadable_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OSError("config not reachable")
        return original(*args, **kwargs)

    loads = []
    load = model_module.HFLM.__init__
    monkeypatch.setattr(AutoConfig, "from_pretrained", unreadable_once)
    monkeypatch.setattr(model_module.HFLM, "__init__", lambda self, *a, **k: loads.append(1) or load(self, *a, **k))
    with pytest.raises(ModelArgError, match="steered-hf: layer=4 is out of range for a 4-layer model"):
        SteeredHFLM(pretrained=str(tiny_model_dir), layer=4, device="cpu")
    assert loads == [1], "the early read failed, so the model loaded and the check ran on it"
