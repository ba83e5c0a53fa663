import os, contextlib, tempfile, inspect
from pathlib import Path
from unittest import mock
from hypothesis import settings as hs, HealthCheck, given, strategies as st
from moela import cli
from moela.allocators import allocator
from moela.cli import main
from tests.helpers import lm_config

LOG = open("/tmp/hunt3.log", "a")
edge = st.sampled_from([1, 2, 3, 4, 8, 16, 256, 0.5, 0.01, 0.99, 1.0, 100, "2468", "8642", "1", "11", [1, 2], [8], None, True, False, "vote", "proportional", "auto"])
METHODS = ["uniform", "hilo", "mola", "lora", "alphalora", "sensitivity", "guilomo"]
def opts_for(m):
    names = list(allocator(m).options) + (["top_p", "max_k", "num_null"] if allocator(m).open_options else [])
    return st.dictionaries(st.sampled_from(names), edge, max_size=3)
@hs(max_examples=int(os.environ.get("N", "100")), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hunt(tiny_lm, capsys, data):
    method = data.draw(st.sampled_from(METHODS))
    opts = data.draw(opts_for(method))
    if method == "guilomo":
        opts.update(max_steps=1, examples=8)
    budget = data.draw(st.sampled_from([None, None, "uniform:E=2,r=2", 3000, 20000, 10**7]))
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        root = Path(folder)
        config = lm_config(root, tiny_lm, adapter={"method": method, "options": {method: opts}, "budget": budget, "alloc_samples": 8})
        raised = []
        real = cli.cmd_allocate
        def rec(ns):
            try: real(ns)
            except Exception as e: raised.append(e); raise
        capsys.readouterr()
        with mock.patch.object(cli, "cmd_allocate", rec):
            code = main(["allocate", str(config)])
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1].split("\r")[-1] if err else ""
        LOG.write(f"{code} {method} {opts} {budget} :: {last[:200]}\n"); LOG.flush()
        if code:
            assert last.startswith("moela: error: ")
            assert isinstance(raised[0], (ValueError, OSError)), f"{type(raised[0]).__name__}: {raised[0]}"
