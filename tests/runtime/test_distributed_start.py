"""Multi-process flags and settings are checked before anything starts: out-of-range numbers are argparse
errors (exit status 2), and `distributed.initialize` refuses bad settings from flags or the environment with
a DistributedError naming the flag or variable (no jax group is started by these tests)."""

import argparse

import pytest

from mistral_jax.cli import generate as generate_cli
from mistral_jax.runtime import distributed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prog")
    distributed.add_arguments(p)
    return p


@pytest.mark.parametrize("flags,msg", [
    (["--init-timeout=-5"], "argument --init-timeout: must be in [1, 604800], got -5"),
    (["--init-timeout", "0"], "argument --init-timeout: must be in [1, 604800], got 0"),
    (["--init-timeout", "10**9"], "argument --init-timeout: expected an integer, got '10**9'"),
    (["--init-timeout", "999999999"], "argument --init-timeout: must be in [1, 604800], got 999999999"),
    (["--heartbeat-timeout", "0"], "argument --heartbeat-timeout: must be in [1, 604800], got 0"),
    (["--heartbeat-timeout=-1"], "argument --heartbeat-timeout: must be in [1, 604800], got -1"),
    (["--num-processes", "0"], "argument --num-processes: must be >= 1, got 0"),
    (["--process-id=-1"], "argument --process-id: must be >= 0, got -1"),
    (["--process-id", "one"], "argument --process-id: expected an integer, got 'one'"),
])
def test_out_of_range_flags_are_argparse_errors(flags, msg, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1] == f"prog: error: {msg}", err


def test_a_program_refuses_a_negative_init_timeout(capsys):
    """--init-timeout -5 was accepted (and passed on to jax)."""
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["--checkpoint", "c", "--prompt", "x", "--coordinator", "127.0.0.1:1234",
                           "--num-processes", "2", "--process-id", "1", "--init-timeout=-5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --init-timeout: must be in [1, 604800], got -5" in err
    assert "Traceback" not in err


def _ns(**kw) -> argparse.Namespace:
    base = {"coordinator": None, "num_processes": None, "process_id": None, "init_timeout": 120,
            "heartbeat_timeout": 60}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw,env,msg", [
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), {},
     r"^--process-id must be in \[0, 1\] for --num-processes 2, got 2$"),
    ({}, {"MISTRAL_JAX_COORDINATOR": "127.0.0.1:1234", "MISTRAL_JAX_NUM_PROCESSES": "2",
          "MISTRAL_JAX_PROCESS_ID": "5"},
     r"^\$MISTRAL_JAX_PROCESS_ID must be in \[0, 1\] for \$MISTRAL_JAX_NUM_PROCESSES 2, got 5$"),
    ({}, {"MISTRAL_JAX_COORDINATOR": "127.0.0.1:1234", "MISTRAL_JAX_NUM_PROCESSES": "0",
          "MISTRAL_JAX_PROCESS_ID": "0"}, r"^\$MISTRAL_JAX_NUM_PROCESSES must be >= 1, got 0$"),
    ({}, {"MISTRAL_JAX_NUM_PROCESSES": "two"}, r"^\$MISTRAL_JAX_NUM_PROCESSES must be an integer, got 'two'$"),
    (dict(coordinator="127.0.0.1:0", num_processes=2, process_id=1), {},
     r"^--coordinator 127.0.0.1:0: port 0 is not in 1\.\.65535$"),
    (dict(coordinator="127.0.0.1:65536", num_processes=2, process_id=0), {},
     r"^--coordinator 127.0.0.1:65536: port 65536 is not in 1\.\.65535$"),
    (dict(coordinator="127.0.0.1", num_processes=2, process_id=0), {},
     r"^--coordinator must be HOST:PORT, got '127.0.0.1'$"),
    (dict(coordinator=":1234", num_processes=2, process_id=0), {}, r"^--coordinator must be HOST:PORT, got ':1234'$"),
    ({}, {"MISTRAL_JAX_COORDINATOR": "host.invalid:1234", "MISTRAL_JAX_NUM_PROCESSES": "2",
          "MISTRAL_JAX_PROCESS_ID": "1"}, r"^\$MISTRAL_JAX_COORDINATOR host.invalid:1234: cannot resolve host "),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=1, init_timeout=-5), {},
     r"^--init-timeout must be a whole number of seconds in \[1, 604800\], got -5$"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=1, heartbeat_timeout=0.5), {},
     r"^--heartbeat-timeout must be a whole number of seconds in \[1, 604800\], got 0.5$"),
])
def test_bad_settings_name_the_flag_or_variable(kw, env, msg, monkeypatch):
    for var in distributed.ENV.values():
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(distributed.DistributedError, match=msg):
        distributed.initialize(_ns(**kw))


def test_coordinator_addresses():
    assert distributed.parse_coordinator("127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert distributed.parse_coordinator("[::1]:65535") == ("::1", 65535)
    assert distributed.parse_coordinator("localhost:1") == ("localhost", 1)
    with pytest.raises(distributed.DistributedError, match="port 99999 is not in 1..65535"):
        distributed.parse_coordinator("notahost:99999")      # the port is checked before the host is looked up
