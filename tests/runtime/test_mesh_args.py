"""One mesh syntax everywhere: `sharding.parse_mesh` reads `D,F,T` and `data=D,fsdp=F,tensor=T`, and train.plan,
infer.generate, infer.evaluate and infer.lm_eval all take --mesh through it (train.plan refused `1,8,1` and
planned a 1-device mesh for `banana` or '')."""

import pytest

from mistral_jax.cli import evaluate as evaluate_cli
from mistral_jax.cli import generate as generate_cli
from mistral_jax.cli import lm_eval as lm_eval_cli
from mistral_jax.model.sharding import parse_mesh
from mistral_jax.cli import plan as plan_cli

GOOD = [("1,8,1", (1, 8, 1)), ("data=1,fsdp=8,tensor=1", (1, 8, 1)), ("fsdp=8", (1, 8, 1)),
        ("tensor=2,data=4", (4, 1, 2)), (" 2 , 2 , 2 ", (2, 2, 2)), ("data = 2, fsdp = 4", (2, 4, 1))]
BAD = [("banana", "1 size(s) instead of 3"), ("", "it is empty"), ("  ", "it is empty"),
       ("1,8", "2 size(s) instead of 3"), ("1,8,1,1", "4 size(s) instead of 3"),
       ("data=1,8,1", "mixes D,F,T and name=size"), ("data=2,data=4", "axis 'data' given twice"),
       ("dat=2", "unknown axis 'dat'"), ("1,0,1", "fsdp size 0 is not >= 1"),
       ("1,x,1", "fsdp size 'x' is not an integer"),
       ("1.5,1,1", "data size '1.5' is not an integer"), ("1,,1", "fsdp size '' is not an integer"),
       ("-1,-1,1", "more than one axis is -1"), ("1,-2,1", "fsdp size -2 is not >= 1")]


@pytest.mark.parametrize("text,shape", GOOD)
def test_both_forms_parse_to_the_same_shape(text, shape):
    assert parse_mesh(text) == shape and parse_mesh(text, allow_rest=False) == shape


@pytest.mark.parametrize("text,why", BAD)
def test_bad_meshes_are_refused_naming_the_reason(text, why):
    with pytest.raises(ValueError) as e:
        parse_mesh(text)
    msg = str(e.value)
    assert msg.startswith("expected data,fsdp,tensor as D,F,T") and why in msg and msg.endswith(f"got {text!r}")
    assert "\n" not in msg


def test_minus_one_takes_the_rest_only_where_devices_exist():
    assert parse_mesh("1,-1,1") == (1, -1, 1) and parse_mesh("fsdp=-1,tensor=2") == (1, -1, 2)
    with pytest.raises(ValueError, match="fsdp size -1 is not >= 1, got '1,-1,1'"):
        parse_mesh("1,-1,1", allow_rest=False)           # train.plan simulates an exact number of devices


def _programs():
    """(name, parse --mesh VALUE with the program's own parser) for every program that takes --mesh."""
    base = {"generate": lambda m: generate_cli.parse_args(["--checkpoint", "c", "--prompt", "x", "--mesh", m]),
            "evaluate": lambda m: evaluate_cli.parse_args(["--checkpoint", "c", "--task", "perplexity", "--data",
                                                           "d.jsonl", "--output", "o", "--mesh", m]),
            "lm_eval": lambda m: lm_eval_cli.parse_args(["--checkpoint", "c", "--tasks", "t", "--output", "o",
                                                         "--mesh", m]),
            "plan": lambda m: plan_cli.parse_args(["--mesh", m, "--seq-len", "8", "--batch", "8"])}
    return list(base.items())


@pytest.mark.parametrize("name,parse", _programs())
def test_every_program_takes_both_forms_and_refuses_the_same_bad_ones(name, parse, capsys):
    assert parse("1,8,1").mesh == parse("data=1,fsdp=8,tensor=1").mesh == (1, 8, 1)
    for text, why in [("banana", "1 size(s) instead of 3"), ("", "it is empty"), ("1,0,1", "fsdp size 0")]:
        with pytest.raises(SystemExit) as e:
            parse(text)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --mesh: expected data,fsdp,tensor" in err and why in err, (name, err)
        assert "Traceback" not in err
