"""launch/train.py as users run it: the deepspeed launcher with 2 ranks, two torchrun "nodes" on
loopback, and a bad override failing before any process group starts."""
import json
import os
import subprocess
import sys

from conftest import REPO, ds_section, free_port, tiny_raw

TRAIN = os.path.join(REPO, "launch", "train.py")


def _preset(tmp_path, **top):
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(tiny_raw(tmp_path / "run", **top)))
    return str(path)


def _steps(tmp_path):
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        return [r["step"] for r in map(json.loads, f) if "step" in r and "loss" in r]


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def test_deepspeed_launcher_two_ranks(tmp_path):
    """Also: the teacher's supervised stage (trained, exported, then loaded with from_pretrained from
    that local directory as the frozen teacher) and its parameters offloaded to CPU."""
    sft = {"max_steps": 3, "deepspeed": ds_section(2, 1, lr=1e-3)}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
           "--config", _preset(tmp_path), "max_steps=2", "export.enabled=true", f"teacher.sft={json.dumps(sft)}",
           'teacher.deepspeed.zero_optimization.offload_param={"device": "cpu"}']
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert _steps(tmp_path) == [1, 2]
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "teacher_sft" / "model.safetensors").is_file()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        sft_steps = [r["stage_step"] for r in map(json.loads, f) if r.get("stage") == "teacher_sft"]
    assert sft_steps == [1, 2, 3]


def test_two_nodes_on_loopback(tmp_path):
    """torchrun with --nnodes 2: node 0 and node 1 (one rank each) rendezvous on 127.0.0.1."""
    preset, port = _preset(tmp_path), str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
                               TRAIN, "--config", preset, "max_steps=2"],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert _steps(tmp_path) == [1, 2]
    assert "2 ranks on cpu" in outs[0]


def test_start_up_check_fails_with_one_message(tmp_path):
    """A check that needs the tokenizers (jsd with two vocabularies), through the deepspeed launcher on
    2 ranks: one message, no traceback, exit code 2."""
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, "--config", _preset(tmp_path),
           "student.model.tokenizer=builtin:arithmetic-unigram", "student.model.config.vocab_size=299"]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert text.count("gold_ds: config key 'distill.loss': got 'jsd'") == 1, text[-3000:]
    assert "Traceback" not in text and "different vocabularies" in text


def test_bad_override_fails_at_start(tmp_path):
    for args in (["distill.beta=2"], ["distill.beta=2", "--resume"]):  # --resume anywhere on the line
        out = subprocess.run([sys.executable, TRAIN, "--config", _preset(tmp_path), *args],
                             env=_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "config key 'distill.beta': got 2" in out.stderr and "[0, 1]" in out.stderr


def test_data_errors_fail_with_one_message(tmp_path):
    """Through the launcher on 2 ranks, data that stops the run (a bad row under on_bad_row=error,
    found by the node's encoder and reported by every rank) ends with one message and exit code 2;
    a relaunch finds the encoded cache and says so before failing the same way."""
    rows = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
            {"messages": [{"role": "user", "content": "1+2="}]}] * 4
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, "--config", _preset(tmp_path),
           f"data.train={json.dumps({'path': str(data)})}", "data.on_bad_row=error"]
    for launch in ("first", "relaunch"):
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
        text = out.stdout + out.stderr
        assert out.returncode == 2, text[-3000:]
        assert text.count("gold_ds: data.train: dataset row 1 is bad: no_assistant_turn") == 1, text[-3000:]
        assert "Traceback" not in text
        assert ("found in the cache" in text) == (launch == "relaunch"), text[-3000:]
