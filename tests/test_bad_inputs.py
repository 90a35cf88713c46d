"""The bad-input table of ``tests/bad_inputs.py``, without the launcher (which ``python
tests/bad_inputs.py`` goes through, for the table with seconds; ``tests/test_launch.py`` and
``tests/test_faults.py`` cover what the launcher itself adds):

- the inputs found before any process group: ``launch/train.py``'s ``main`` in this process, with
  the process group made unreachable: exit code 2, one ``gold_ds:`` line naming the key or file,
  no traceback;
- the others on 2 spawned ranks, one after the other in one process group: every rank raises the
  error that ``main`` turns into that one line and exit code 2 (``ConfigError``, ``BadRowError``),
  or, for a run that goes through, reports its bad rows; a run at lr 1e30 stops with exit code 4's
  error after its skips.
"""
import importlib.util
import os

import pytest

from bad_inputs import CASES, preset_file
from conftest import REPO, run_ranks

START = [c for c in CASES if c.when == "start"]
LATER = [c for c in CASES if c.when != "start"]


def _train_module():
    spec = importlib.util.spec_from_file_location("gold_ds_launch_train", os.path.join(REPO, "launch", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", START, ids=[c.name for c in START])
def test_found_before_the_process_group(case, tmp_path, capsys, monkeypatch):
    import gold_ds.trainer.build as build

    def no_process_group(*_):
        raise AssertionError(f"{case.name}: not found before the process group")
    monkeypatch.setattr(build, "init_distributed", no_process_group)
    setup = case.make(str(tmp_path))
    code = _train_module().main(["--config", preset_file(str(tmp_path), setup), *setup.args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gold_ds:")]
    assert code == setup.code, err[-3000:]
    assert len(lines) == 1 and all(s in lines[0] for s in setup.says), err[-3000:]
    assert "Traceback" not in err


def _later_cases(cases):
    import torch.distributed as dist
    from gold_ds.config import ConfigError, load_config
    from gold_ds.data import BadRowError
    from gold_ds.trainer import build_trainer
    from gold_ds.trainer.stop import NonFiniteValues
    failures = []
    for name, preset, args, code, says, trained_first in cases:
        resume, overrides = "--resume" in args, [a for a in args if a != "--resume"]
        if trained_first:
            build_trainer(load_config(preset)).train()
        try:
            trainer = build_trainer(load_config(preset, overrides), resume=resume)
            if code == 4:
                trainer.train()
            message = trainer.train_data.report()  # nothing was refused
        except (ConfigError, BadRowError) as e:
            message = f"exit 2: {e}"
        except NonFiniteValues as e:
            message = f"exit 4: {e}"
        want = "" if code == 0 else f"exit {code}: "
        if not (message.startswith(want) and all(s in message for s in says)):
            failures.append(f"{name}: {message[:600]}")
    dist.barrier()
    assert not failures, "\n".join(failures)


def test_found_with_the_ranks(tmp_path):
    cases = []
    for case in LATER:
        d = tmp_path / case.name
        d.mkdir()
        setup = case.make(str(d))
        cases.append((case.name, preset_file(str(d), setup), setup.args, setup.code, setup.says, setup.trained_first))
    run_ranks(_later_cases, 2, cases, err_dir=str(tmp_path / "errors"))
